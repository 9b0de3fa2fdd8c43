# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Parity with the official implementation, through the key converter."""
import glob
import os.path as osp
import shutil

import pytest
import torch

from mmbhvit.testing import run_parity
from _helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURES = osp.join(ROOT, '..', 'shared', 'fixtures', 'bhvit_reference')
FIXTURE_DIRS = sorted(
    osp.dirname(p) for p in glob.glob(osp.join(FIXTURES, '*', 'config.json')))



def test_fixtures_are_present():
    names = {osp.basename(d) for d in FIXTURE_DIRS}
    assert {'tiny_default', 'tiny_gsb', 'tiny_binary_embed_recu',
            'tiny_fp32'} <= names


# make test-quick keeps one fixture (the default model); make test runs all
@pytest.mark.parametrize('fixture', [
    pytest.param(
        d, marks=() if osp.basename(d) == 'tiny_default' else pytest.mark.slow)
    for d in FIXTURE_DIRS
], ids=osp.basename)
def test_parity_with_official(fixture):
    result = run_parity(fixture)
    assert result.failures == []
    names = [r[0] for r in result.rows]
    assert 'eval logits' in names and 'train loss' in names
    assert sum(n.startswith('eval stage') for n in names) == 4
    assert sum(n.startswith('grad ') for n in names) > 100
    # eval logits are float64 in the fixture: we match to round-off
    assert result.rows[0][2] < 1e-12


@pytest.mark.slow
def test_check_parity_cli_fails_on_a_wrong_reference(tmp_path, capsys):
    src = osp.join(FIXTURES, 'tiny_default')
    dst = tmp_path / 'tampered'
    shutil.copytree(src, dst)
    logits = torch.load(dst / 'logits.pt')
    logits[0, 3] += 1e-3
    (dst / 'logits.pt').chmod(0o644)
    torch.save(logits, dst / 'logits.pt')
    tool = load_tool('analysis_tools/check_parity.py')
    assert tool.main([str(dst)]) == 1
    out = capsys.readouterr().out
    assert 'FAIL eval logits' in out


def test_converter_cli_roundtrip_into_classifier(tmp_path):
    src = osp.join(FIXTURES, 'tiny_gsb', 'state_dict.pt')
    dst = tmp_path / 'converted.pth'
    tool = load_tool('model_converters/bhvit2mmbhvit.py')
    assert tool.main([src, str(dst)]) == 0
    ckpt = torch.load(dst, weights_only=True)   # slim: weights-only loads it
    assert set(ckpt) == {'meta', 'state_dict'}
    assert ckpt['meta']['backbone_options']['attn_binarizer'] == 'gsb'
    assert ckpt['meta']['arch']['depths'] == [1, 1, 2, 1]
    from mmbhvit.testing.parity import build_classifier
    from mmbhvit.converters import official_flags_to_backbone_cfg
    import json
    cfg = json.load(open(osp.join(FIXTURES, 'tiny_gsb', 'config.json')))
    model = build_classifier(
        official_flags_to_backbone_cfg(cfg['model_config'], cfg['flags']),
        cfg['flags']['num_labels'])
    model.load_state_dict(ckpt['state_dict'], strict=True)
    # and the backbone half loads into a segmentation-style backbone
    from mmbhvit.models import BHViT
    bb = BHViT(ckpt['meta']['arch'], **ckpt['meta']['backbone_options'],
               init_cfg=dict(type='Pretrained', checkpoint=str(dst),
                             prefix='backbone.'))
    bb.init_weights()
    assert torch.equal(bb.pos_embed, ckpt['state_dict']['backbone.pos_embed'])


def test_converter_rejects_unknown_and_incomplete(tmp_path, capsys):
    sd = torch.load(osp.join(FIXTURES, 'tiny_default', 'state_dict.pt'))
    tool = load_tool('model_converters/bhvit2mmbhvit.py')
    bad = dict(sd)
    bad['vit.encoder.layerA.0.mystery.weight'] = torch.zeros(1)
    torch.save({'model': bad}, tmp_path / 'unknown.pth')
    assert tool.main([str(tmp_path / 'unknown.pth'),
                      str(tmp_path / 'o.pth')]) == 1
    assert 'layerA.0.mystery.weight' in capsys.readouterr().err
    partial = dict(sd)
    del partial['vit.encoder.layerB.1.attention.attention.query.weight']
    torch.save(partial, tmp_path / 'partial.pth')
    assert tool.main([str(tmp_path / 'partial.pth'),
                      str(tmp_path / 'o.pth')]) == 1
    err = capsys.readouterr().err
    assert 'backbone.stages.2.1.token_mixer.q.conv.weight' in err
    assert not (tmp_path / 'o.pth').exists()


@pytest.mark.slow
def test_classification_config_reproduces_official_logits():
    """configs/_base_/models/bhvit_small.py, with the fixture's reduced
    depths/flags, is the official classifier: same logits."""
    import json
    from mmengine.config import Config
    from mmengine.utils import import_modules_from_strings
    from mmpretrain.registry import MODELS
    from mmbhvit.converters import (convert_official_state_dict,
                                    official_flags_to_backbone_cfg)
    fixture = osp.join(FIXTURES, 'tiny_default')
    meta = json.load(open(osp.join(fixture, 'config.json')))
    cfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'models',
                                   'bhvit_small.py'))
    assert cfg.model.backbone.arch == 'small'
    import_modules_from_strings(['mmbhvit'])    # what custom_imports does
    bb = official_flags_to_backbone_cfg(meta['model_config'], meta['flags'])
    bb.pop('type')
    cfg.model.backbone.update(bb)
    cfg.model.head.num_classes = meta['flags']['num_labels']
    model = MODELS.build(cfg.model)
    sd = torch.load(osp.join(fixture, 'state_dict.pt'))
    model.load_state_dict(convert_official_state_dict(sd).state_dict,
                          strict=True)
    model.double().eval()
    x = torch.load(osp.join(fixture, 'input.pt')).double()
    with torch.no_grad():
        logits = model(x, mode='tensor')
    ref = torch.load(osp.join(fixture, 'logits.pt'))
    assert (logits - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.slow
def test_custom_imports_registers_bhvit():
    """A config with custom_imports=['mmbhvit'] builds BHViT in a fresh
    interpreter (nothing imported beforehand)."""
    import subprocess
    import sys
    code = ('from mmengine.config import Config\n'
            'cfg = Config(dict(custom_imports=dict(imports=["mmbhvit"], '
            'allow_failed_imports=False)))\n'
            'from mmengine.utils import import_modules_from_strings\n'
            'import_modules_from_strings(**cfg.custom_imports)\n'
            'from mmseg.registry import MODELS\n'
            'm = MODELS.build(dict(type="BHViT", arch="tiny"))\n'
            'print(type(m).__module__)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, check=True).stdout
    assert 'mmbhvit.models.backbones.bhvit' in out
