# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Strict loading of pretrained backbone weights with clear errors."""
import os.path as osp

import torch
from mmengine.logging import print_log

from ..utils.text import first_items
from .layout import resize_pos_embed


def _is_remote(path: str) -> bool:
    return '://' in path


def read_state_dict(filename: str, prefix: str = None) -> dict:
    """The state dict stored in ``filename`` (read by
    :func:`mmbhvit.apis.read_checkpoint`: weights-only, unreadable files
    named), keeping only keys under ``prefix`` (stripped)."""
    from ..apis import checkpoint_state_dict, read_checkpoint
    state = checkpoint_state_dict(read_checkpoint(filename), filename)
    if prefix:
        if not prefix.endswith('.'):
            prefix += '.'
        selected = {k[len(prefix):]: v for k, v in state.items()
                    if k.startswith(prefix)}
        if not selected:
            raise KeyError(f'{filename!r} has no key starting with '
                           f'{prefix!r}; first keys: {list(state)[:5]}')
        state = selected
    return state


def _listed(items, limit: int = 8) -> str:
    """``count: first few`` of a list of keys, for error messages."""
    items = list(items)
    return f'{len(items)}: {first_items(items, limit)}'


class StateDictMismatch:
    """How a state dict read from a file differs from a module's own.

    ``missing`` keys of the module absent from the file, ``unexpected`` keys
    of the file the module lacks, ``mismatched`` shape differences as text;
    positional embeddings that differ only in their grid are resized
    (bicubic) in ``state`` instead of being reported.
    """

    def __init__(self, state: dict, own: dict, ignore_unexpected=()):
        self.state = dict(state)
        self.missing = sorted(set(own) - set(state))
        self.unexpected = sorted(
            k for k in set(state) - set(own)
            if not any(k.startswith(p) for p in ignore_unexpected))
        self.mismatched = []
        self.resized = []
        for k in sorted(set(own) & set(state)):
            src, dst = state[k], own[k]
            if not isinstance(src, torch.Tensor):
                self.mismatched.append(f'{k}: checkpoint holds a '
                                       f'{type(src).__name__}, not a tensor')
                continue
            if src.shape == dst.shape:
                continue
            if k.endswith('pos_embed') and src.dim() == dst.dim() == 4 and \
                    src.shape[:2] == dst.shape[:2]:
                self.state[k] = resize_pos_embed(src.float(),
                                                 dst.shape[-2:]).to(dst.dtype)
                self.resized.append(f'{k} from {tuple(src.shape)} to '
                                    f'{tuple(dst.shape)}')
                continue
            self.mismatched.append(f'{k}: checkpoint {tuple(src.shape)} vs '
                                   f'model {tuple(dst.shape)}')
        self.matched = sorted(set(own) & set(state))

    def __bool__(self) -> bool:
        """True when anything differs."""
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = []
        if self.missing:
            lines.append(f'  missing keys {_listed(self.missing)}')
        if self.unexpected:
            lines.append(f'  unexpected keys {_listed(self.unexpected)}')
        if self.mismatched:
            lines.append(f'  shape mismatches {_listed(self.mismatched, 5)}')
        return '\n'.join(lines)

    def loadable(self, own: dict) -> dict:
        """The entries that fit the module (shapes equal after resizing)."""
        return {k: v for k, v in self.state.items()
                if k in own and isinstance(v, torch.Tensor)
                and v.shape == own[k].shape}


class PretrainedCheckpointError(FileNotFoundError):
    """A ``Pretrained`` init_cfg without a usable checkpoint file."""


def pretrained_file(init_cfg: dict, where: str = 'model.backbone') -> str:
    """The checkpoint of a ``Pretrained`` ``init_cfg``.

    Raises :class:`PretrainedCheckpointError` when it is unset (training
    would start from random weights: a long run wasted) or the file does
    not exist; ``init_cfg=None`` is how a random start is asked for.
    """
    filename = init_cfg.get('checkpoint')
    if filename is None:
        raise PretrainedCheckpointError(
            f'{where}.init_cfg is Pretrained without a checkpoint: the '
            'backbone would start from random weights. Pass an ImageNet '
            'BHViT checkpoint with --cfg-options '
            f'{where}.init_cfg.checkpoint=PATH (official checkpoints: '
            'convert them with tools/model_converters/bhvit2mmbhvit.py; it '
            'must have the same arch and binary_merge as this backbone), or '
            f'set {where}.init_cfg=None to start from random weights on '
            'purpose.')
    if not _is_remote(filename) and not osp.isfile(filename):
        raise PretrainedCheckpointError(
            f'Pretrained checkpoint not found: {filename!r}. Set it with '
            f'--cfg-options {where}.init_cfg.checkpoint=PATH (an mmbhvit '
            'checkpoint, or an official one converted with '
            'tools/model_converters/bhvit2mmbhvit.py).')
    return filename


def check_pretrained_backbone(model_cfg: dict) -> None:
    """Fail early (before a Runner is built) on the backbone's
    ``Pretrained`` init_cfg, see :func:`pretrained_file`."""
    init_cfg = (model_cfg.get('backbone') or {}).get('init_cfg')
    if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
        pretrained_file(init_cfg)


#: The stem convolution whose input channels are the image bands.
STEM_KEY = 'patch_embed.conv.weight'


def expand_stem_bands(state: dict, own: dict, how) -> dict:
    """Fit an RGB (3-band) checkpoint's stem to an N-band model
    (``init_cfg=dict(type='Pretrained', ..., expand_bands='mean')``).

    ``'mean'``: the N-band kernel keeps the RGB kernel for bands 1-3 and
    gives every extra band the mean of the three RGB kernels (per filter
    and tap); all N are then scaled by 3/N, so an input equal on every band
    meets the stem with the response the RGB model had. A 1-band model
    gets the sum of the RGB kernels. Other keys are untouched; None leaves
    ``state`` as it is (a band mismatch stays an error)."""
    if how is None or STEM_KEY not in state or STEM_KEY not in own:
        return state
    if how != 'mean':
        raise ValueError(f"init_cfg.expand_bands must be 'mean' or None, got "
                         f'{how!r}')
    src, dst = state[STEM_KEY], own[STEM_KEY]
    if src.shape == dst.shape:
        return state
    bands = dst.shape[1]
    if src.shape[1] != 3 or src.shape[0] != dst.shape[0] or \
            src.shape[2:] != dst.shape[2:] or bands == 2:
        raise ValueError(f'expand_bands: cannot fit the stem {STEM_KEY} '
                         f'{tuple(src.shape)} of the checkpoint to '
                         f'{tuple(dst.shape)} (from 3 bands to 1 or more '
                         'than 3)')
    if bands == 1:
        weight = src.sum(dim=1, keepdim=True)
    else:
        extra = src.mean(dim=1, keepdim=True).expand(-1, bands - 3, -1, -1)
        weight = torch.cat([src, extra], dim=1) * (3.0 / bands)
    state = dict(state)
    state[STEM_KEY] = weight.to(dst.dtype).contiguous()
    print_log(f'expand_bands: stem {STEM_KEY} from 3 to {bands} bands '
              "('mean')", logger='current')
    return state


def load_pretrained(module: torch.nn.Module, init_cfg: dict):
    """Load ``init_cfg['checkpoint']`` (with optional ``prefix``) into
    ``module`` strictly: every parameter/buffer must be present with its
    shape (positional embeddings are resized if only their grid differs),
    and unknown keys are an error, except the final ``norm.*`` when the
    module has no final norm. A missing checkpoint (unset or no file) is
    a :class:`PretrainedCheckpointError`. Returns True once loaded."""
    filename = pretrained_file(init_cfg)
    state = read_state_dict(filename, init_cfg.get('prefix'))
    own = module.state_dict()
    state = expand_stem_bands(state, own, init_cfg.get('expand_bands'))
    ignore = () if getattr(module, 'final_norm', True) else ('norm.', )
    diff = StateDictMismatch(state, own, ignore_unexpected=ignore)
    if diff:
        from ..apis import CheckpointMismatchError
        raise CheckpointMismatchError(
            f'Checkpoint {filename!r} does not match '
            f'{type(module).__name__} (prefix {init_cfg.get("prefix")!r}):\n'
            f'{diff.describe()}\n'
            'Check that the checkpoint was trained/converted for the same '
            'arch and options (binary_merge, attn_binarizer, shift3/5).')
    for line in diff.resized:
        print_log(f'resized {line}', logger='current')
    state = diff.loadable(own)
    module.load_state_dict(state, strict=True)
    print_log(f'{type(module).__name__}: loaded {len(state)} tensors from '
              f'{filename}', logger='current')
    return True
