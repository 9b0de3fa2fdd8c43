# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Numerical parity with outputs of the official BHViT implementation.

A fixture directory holds ``config.json`` (official config + flags),
``state_dict.pt`` (official keys), ``input.pt``, eval ``logits.pt`` and
``stages.pt``, and train-mode ``loss_weight.pt`` / ``train_logits.pt`` /
``loss.pt`` / ``grads.pt``. See ``shared/fixtures/bhvit_reference/README.md``.
"""
import json
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from ..converters import (convert_official_state_dict,
                          official_flags_to_backbone_cfg)

DEFAULT_TOLERANCE = 1e-6
#: Some reference gradients are analytically 0 (a bias followed by a
#: train-mode BatchNorm) and hold only float64 round-off (~1e-12). Gradient
#: differences are therefore scaled by max(|reference|, GRAD_FLOOR × the
#: largest reference gradient of the model).
GRAD_FLOOR = 1e-6


@dataclass
class ParityResult:
    #: (name, max abs diff, max abs diff / max |reference|)
    rows: List[Tuple[str, float, float]] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE

    def add(self, name: str, ours: torch.Tensor, ref: torch.Tensor,
            floor: float = 1e-12):
        if ours.shape != ref.shape:
            raise ValueError(f'{name}: shape {tuple(ours.shape)} vs reference '
                             f'{tuple(ref.shape)}')
        diff = (ours.double() - ref.double()).abs().max().item()
        scale = max(ref.double().abs().max().item(), floor)
        self.rows.append((name, diff, diff / scale))

    @property
    def failures(self) -> List[Tuple[str, float, float]]:
        return [r for r in self.rows if not r[2] <= self.tolerance]

    @property
    def ok(self) -> bool:
        return not self.failures


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def build_classifier(backbone_cfg: dict, num_classes: int):
    """An mmpretrain ImageClassifier: BHViT (final norm) + GAP + linear,
    in train mode (built by :func:`mmbhvit.apis.build_model`)."""
    from ..apis import build_model
    from ..models import BHViT
    backbone = dict(backbone_cfg, out_indices=(3, ), final_norm=True)
    arch = backbone_cfg.get('arch', 'small')
    arch = BHViT.arch_zoo[arch] if isinstance(arch, str) else arch
    model = dict(
        type='ImageClassifier', backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=num_classes,
                  in_channels=arch['embed_dims'][-1]))
    return build_model(dict(default_scope='mmpretrain', model=model)).train()


def run_parity(fixture_dir: str, tolerance: float = DEFAULT_TOLERANCE,
               check_grads: bool = True) -> ParityResult:
    """Build the model described by ``fixture_dir/config.json``, load the
    converted official state dict, run it in float64 and compare eval logits,
    stage outputs, train logits, loss and gradients with the fixture."""
    missing = [f for f in ('config.json', 'state_dict.pt', 'input.pt',
                           'logits.pt', 'stages.pt')
               if not osp.isfile(osp.join(fixture_dir, f))]
    if missing:
        raise FileNotFoundError(f'{fixture_dir!r} is not a BHViT reference '
                                f'fixture directory: missing {missing}')
    with open(osp.join(fixture_dir, 'config.json')) as f:
        meta = json.load(f)
    flags = meta['flags']
    backbone_cfg = official_flags_to_backbone_cfg(meta['model_config'], flags)
    official = _load(osp.join(fixture_dir, 'state_dict.pt'))
    conv = convert_official_state_dict(
        official, num_heads=backbone_cfg['arch']['num_heads'])
    model = build_classifier(backbone_cfg, int(flags['num_labels']))
    model.load_state_dict(conv.state_dict, strict=True)
    model.double()
    x = _load(osp.join(fixture_dir, 'input.pt')).double()
    result = ParityResult(tolerance=tolerance)

    stages: Dict[str, torch.Tensor] = {}
    hooks = [
        stage.register_forward_hook(
            lambda m, i, o, n=f'stage{k + 1}': stages.__setitem__(n, o))
        for k, stage in enumerate(model.backbone.stages)
    ]
    model.eval()
    with torch.no_grad():
        logits = model(x, mode='tensor')
    for h in hooks:
        h.remove()
    result.add('eval logits', logits, _load(osp.join(fixture_dir,
                                                     'logits.pt')))
    ref_stages = _load(osp.join(fixture_dir, 'stages.pt'))
    for name in sorted(ref_stages):
        result.add(f'eval {name}', stages[name], ref_stages[name])

    model.train()
    model.zero_grad()
    train_logits = model(x, mode='tensor')
    weight = _load(osp.join(fixture_dir, 'loss_weight.pt')).double()
    loss = (train_logits * weight).sum()
    result.add('train logits', train_logits.detach(),
               _load(osp.join(fixture_dir, 'train_logits.pt')))
    result.add('train loss', loss.detach(),
               _load(osp.join(fixture_dir, 'loss.pt')))
    if check_grads:
        loss.backward()
        params = dict(model.named_parameters())
        ref_grads = _load(osp.join(fixture_dir, 'grads.pt'))
        floor = GRAD_FLOOR * max(g.double().abs().max().item()
                                 for g in ref_grads.values())
        for name, ref in ref_grads.items():
            ours_name = conv.key_map[name][0]
            grad = params[ours_name].grad
            if grad is None:
                grad = torch.zeros_like(params[ours_name])
            result.add(f'grad {name}', grad,
                       conv.transform(name, ref.double()), floor)
    return result
