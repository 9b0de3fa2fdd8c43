# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Strict loading of pretrained backbone weights with clear errors."""
import os.path as osp
import warnings

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from .layout import resize_pos_embed


def _is_remote(path: str) -> bool:
    return '://' in path


def read_state_dict(filename: str, prefix: str = None) -> dict:
    """Read the state dict stored in ``filename`` (``state_dict`` / ``model``
    entry or a raw dict), keeping only keys under ``prefix`` (stripped)."""
    if not _is_remote(filename) and not osp.isfile(filename):
        raise FileNotFoundError(
            f'Pretrained checkpoint not found: {filename!r}. Set it with '
            '--cfg-options model.backbone.init_cfg.checkpoint=PATH (an '
            'mmbhvit checkpoint, or an official one converted with '
            'tools/model_converters/bhvit2mmbhvit.py).')
    ckpt = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    state = ckpt
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and key in state:
            state = state[key]
            break
    state = {(k[7:] if k.startswith('module.') else k): v
             for k, v in state.items()}
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


def load_pretrained(module: torch.nn.Module, init_cfg: dict):
    """Load ``init_cfg['checkpoint']`` (with optional ``prefix``) into
    ``module`` strictly: every parameter/buffer must be present with its
    shape (positional embeddings are resized if only their grid differs),
    and unknown keys are an error, except the final ``norm.*`` when the
    module has no final norm. Returns False (after a warning) when no
    checkpoint is set, True once loaded."""
    filename = init_cfg.get('checkpoint')
    if filename is None:
        warnings.warn(f'{type(module).__name__}: init_cfg type Pretrained has '
                      'no checkpoint; the weights are randomly initialised')
        return False
    state = read_state_dict(filename, init_cfg.get('prefix'))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(
        k for k in set(state) - set(own)
        if not (k.startswith('norm.') and not getattr(module, 'final_norm',
                                                      True)))
    mismatched = []
    for k in sorted(set(own) & set(state)):
        src, dst = state[k], own[k]
        if src.shape == dst.shape:
            continue
        if k.endswith('pos_embed') and src.dim() == dst.dim() == 4 and \
                src.shape[:2] == dst.shape[:2]:
            state[k] = resize_pos_embed(src.float(), dst.shape[-2:])
            print_log(f'resized {k} from {tuple(src.shape)} to '
                      f'{tuple(dst.shape)}', logger='current')
            continue
        mismatched.append(f'{k}: checkpoint {tuple(src.shape)} vs model '
                          f'{tuple(dst.shape)}')
    if missing or unexpected or mismatched:
        raise KeyError(
            f'Checkpoint {filename!r} does not match '
            f'{type(module).__name__} (prefix {init_cfg.get("prefix")!r}):\n'
            f'  missing keys: {missing[:20]}{" ..." if len(missing) > 20 else ""}\n'
            f'  unexpected keys: {unexpected[:20]}'
            f'{" ..." if len(unexpected) > 20 else ""}\n'
            f'  shape mismatches: {mismatched[:20]}\n'
            'Check that the checkpoint was trained/converted for the same '
            'arch and options (binary_merge, attn_binarizer, shift3/5).')
    state = {k: v for k, v in state.items() if k in own}
    module.load_state_dict(state, strict=True)
    print_log(f'{type(module).__name__}: loaded {len(state)} tensors from '
              f'{filename}', logger='current')
    return True
