# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Key and layout conversion from the official BHViT checkpoints.

The official model works on token sequences and names its modules after
HuggingFace's ViT; ours is NCHW. Every official tensor maps to exactly one of
ours through a key rename and one of three layout changes:

* ``flat``   – ``[1, C, 1, 1]`` / ``[1, 1, C]`` learnable biases → ``[C]``;
* ``linear`` – token-wise linear ``[out, in]`` → 1×1 conv ``[out, in, 1, 1]``;
* ``tokens`` – positional embedding ``[1, H·W, C]`` → ``[1, C, H, W]``.

The same transforms map gradients, so parity checks can compare them.
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _linear(t: Tensor) -> Tensor:
    return t.reshape(*t.shape, 1, 1)


def _tokens(t: Tensor) -> Tensor:
    _, n, c = t.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f'token positional embedding with {n} tokens is not '
                         'a square grid')
    return t.transpose(1, 2).reshape(1, c, side, side)


TRANSFORMS: Dict[str, Callable[[Tensor], Tensor]] = {
    'same': lambda t: t,
    'flat': _flat,
    'linear': _linear,
    'tokens': _tokens,
}

_RPRELU = {'move1': 'bias_in', 'prelu.weight': 'weight', 'move2': 'bias_out'}
_LAYERSCALE = {'alpha': 'scale', 'move': 'bias'}


def _rprelu(rest: str) -> str:
    if rest not in _RPRELU:
        raise KeyError(rest)
    return _RPRELU[rest]


def _proj(rest: str) -> Tuple[str, str]:
    """Official binary residual linear (move/dense/norm/rprelu)."""
    if rest == 'move':
        return 'shift.bias', 'flat'
    if rest == 'dense.weight':
        return 'conv.weight', 'linear'
    if rest.startswith('norm.'):
        return rest, 'same'
    if rest.startswith('rprelu.'):
        return 'act.' + _rprelu(rest[7:]), 'same'
    raise KeyError(rest)


def _block(rel: str) -> Tuple[str, str]:
    """Map a key relative to an official block to ours."""
    m = re.fullmatch(r'layernorm_(before|after)\.(.+)', rel)
    if m:
        return ('norm1.' if m[1] == 'before' else 'norm2.') + m[2], 'same'
    m = re.fullmatch(r'layerscale_(h|w|ch)(\d)\.(alpha|move)', rel)
    if m:
        return f'shifts.scales.{m[1]}{m[2]}.{_LAYERSCALE[m[3]]}', 'same'
    m = re.fullmatch(r'output\.layerscale\.(alpha|move)', rel)
    if m:
        return 'ffn.layer_scale.' + _LAYERSCALE[m[1]], 'same'
    for off, ours in (('intermediate.', 'ffn.expand.'),
                      ('output.', 'ffn.reduce.')):
        if rel.startswith(off):
            key, tf = _proj(rel[len(off):])
            return ours + key, tf
    if rel.startswith('GC.'):
        return _msgdc(rel[3:])
    if rel.startswith('attention.'):
        return _msmha(rel[10:])
    raise KeyError(rel)


def _msgdc(rel: str) -> Tuple[str, str]:
    if rel == 'move.bias':
        return 'token_mixer.shift.bias', 'flat'
    m = re.fullmatch(r'cov(\d)\.(weight|bias)', rel)
    if m:
        return f'token_mixer.convs.{int(m[1]) - 1}.{m[2]}', 'same'
    m = re.fullmatch(r'act(\d)\.(.+)', rel)
    if m:
        return f'token_mixer.acts.{int(m[1]) - 1}.{_rprelu(m[2])}', 'same'
    if rel.startswith('norm.'):
        return 'token_mixer.' + rel, 'same'
    raise KeyError(rel)


_QKV = {'query': 'q', 'key': 'k', 'value': 'v'}
_BINARIZER = {
    'att_prob_clip': 'alpha', 'att_prob_clip2': 'beta1',
    'att_prob_clip3': 'beta2', 'att_prob_quantizer.alpha': 'step',
    'att_prob_quantizer.zero_point': 'zero_point',
    'att_prob_quantizer.init_state': 'initialized'
}


def _msmha(rel: str) -> Tuple[str, str]:
    t = 'token_mixer.'
    m = re.fullmatch(r'output\.layerscale\.(alpha|move)', rel)
    if m:
        return t + 'proj_scale.' + _LAYERSCALE[m[1]], 'same'
    if rel.startswith('output.'):
        key, tf = _proj(rel[7:])
        return t + 'proj.' + key, tf
    if not rel.startswith('attention.'):
        raise KeyError(rel)
    rel = rel[10:]
    if rel in _BINARIZER:
        return t + 'binarizer.' + _BINARIZER[rel], 'same'
    m = re.fullmatch(r'move([qkv])(2?)', rel)
    if m:
        return t + (f'{m[1]}_shift.bias' if m[2] else
                    f'{m[1]}.shift.bias'), 'flat'
    m = re.fullmatch(r'(query|key|value)\.weight', rel)
    if m:
        return t + f'{_QKV[m[1]]}.conv.weight', 'linear'
    m = re.fullmatch(r'norm([qkv])\.(.+)', rel)
    if m:
        return t + f'{m[1]}.norm.{m[2]}', 'same'
    m = re.fullmatch(r'rprelu([qkv])\.(.+)', rel)
    if m:
        return t + f'{m[1]}.act.{_rprelu(m[2])}', 'same'
    if rel.startswith('norm_context.'):
        return t + 'context_norm.' + rel[13:], 'same'
    if rel.startswith('rprelu_context.'):
        return t + 'context_act.' + _rprelu(rel[15:]), 'same'
    if rel == 'parm':
        return t + 'out_mix', 'flat'
    if rel == 'token_FA.a1':
        return t + 'merge.mix', 'flat'
    if rel.startswith('token_FA.norm.'):
        return t + 'token_norm.' + rel[14:], 'same'
    raise KeyError(rel)


def _merge(rel: str) -> Tuple[str, str]:
    if rel.startswith('norm0.'):
        return 'norm_in.' + rel[6:], 'same'
    if rel == 'proj.weight':
        return 'conv.weight', 'same'
    if rel.startswith('norm.'):
        return rel, 'same'
    if rel == 'move':
        return 'shift.bias', 'flat'
    if rel.startswith('rprelu.'):
        return 'act.' + _rprelu(rel[7:]), 'same'
    if rel == 'position_embeddings':
        return 'pos_embed', 'tokens'
    raise KeyError(rel)


@dataclass
class OfficialConversion:
    """Result of :func:`convert_official_state_dict`."""
    state_dict: 'OrderedDict[str, Tensor]'
    #: official key → (our key, transform name)
    key_map: Dict[str, Tuple[str, str]]
    #: the architecture read off the checkpoint (BHViT ``arch`` dict)
    arch: dict
    #: BHViT constructor options read off the checkpoint
    options: dict
    num_classes: Optional[int] = None

    def transform(self, official_key: str, tensor: Tensor) -> Tensor:
        """Apply the layout change of ``official_key`` to ``tensor`` (e.g. a
        gradient of that parameter)."""
        return TRANSFORMS[self.key_map[official_key][1]](tensor)


#: A key every official BHViT state dict has (the stem convolution).
OFFICIAL_STEM_KEY = 'vit.embeddings.patch_embeddings.proj.weight'


class NotOfficialCheckpointError(ValueError):
    """The input of the converter is not an official BHViT state dict."""


def _strip_wrapper(ckpt) -> dict:
    """The official state dict inside ``ckpt`` (raw or under ``model`` /
    ``state_dict``); anything else raises NotOfficialCheckpointError."""
    if isinstance(ckpt, dict):
        for key in ('model', 'state_dict'):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt:
        raise NotOfficialCheckpointError(
            f'expected a state dict (a dict of tensors), got '
            f'{type(ckpt).__name__}')
    if OFFICIAL_STEM_KEY not in ckpt:
        keys = sorted(str(k) for k in ckpt)
        if any(k.startswith('backbone.') for k in keys):
            raise NotOfficialCheckpointError(
                'this is already an mmbhvit checkpoint (keys start with '
                "'backbone.'): load it directly, no conversion needed")
        raise NotOfficialCheckpointError(
            f'not an official BHViT (IMRL/BHViT) state dict: it has no '
            f'{OFFICIAL_STEM_KEY!r}; its first keys are {keys[:5]} '
            f'({len(keys)} keys)')
    return ckpt


def _infer_arch(sd: dict, num_heads: Optional[Sequence[int]]):
    dims = [sd['vit.embeddings.patch_embeddings.proj.weight'].shape[0]]
    for k in (1, 2, 3):
        dims.append(sd[f'vit.encoder.patch_embed{k}.proj.weight'].shape[0])
    depths = [0, 0, 0, 0]
    ratios = [None] * 4
    for group, stages in (('A', (0, 1)), ('B', (2, 3))):
        idx = sorted({int(m[1]) for k in sd for m in [re.match(
            rf'vit\.encoder\.layer{group}\.(\d+)\.', k)] if m})
        for n in idx:
            width = sd[f'vit.encoder.layer{group}.{n}.layernorm_before.weight'
                       ].shape[0]
            stage = stages[0] if width == dims[stages[0]] else stages[1]
            depths[stage] += 1
            hidden = sd[f'vit.encoder.layer{group}.{n}.intermediate.dense.'
                        'weight'].shape[0]
            ratios[stage] = hidden // width
    heads = list(num_heads) if num_heads else [1, 1, 1, 1]
    if not num_heads:
        # Heads only matter in stages 3–4; the LSQ quantizer stores them.
        first = [sum(depths[2:s]) for s in (2, 3)]
        for s, n in zip((2, 3), first):
            key = (f'vit.encoder.layerB.{n}.attention.attention.'
                   'att_prob_quantizer.alpha')
            if key in sd:
                heads[s] = sd[key].numel()
            elif dims == [64, 128, 256, 512]:
                heads[s] = (4, 8)[s - 2]  # the official tiny/small setting
            else:
                raise ValueError('cannot read the number of heads from this '
                                 'checkpoint: pass num_heads')
    return dict(embed_dims=dims, depths=depths, num_heads=heads,
                mlp_ratios=ratios)


def convert_official_state_dict(ckpt,
                                num_heads: Optional[Sequence[int]] = None
                                ) -> OfficialConversion:
    """Convert an official BHViT state dict (raw, or ``{'model': ...}``) to
    mmbhvit keys: ``backbone.*`` for the backbone and ``head.fc.*`` for the
    classifier (mmpretrain ``ImageClassifier`` + ``LinearClsHead``).

    Raises ``KeyError`` listing every official key it does not understand.
    """
    sd = _strip_wrapper(ckpt)
    arch = _infer_arch(sd, num_heads)
    depths = arch['depths']
    out, key_map, unknown = OrderedDict(), {}, []
    for key, value in sd.items():
        try:
            new, tf = _convert_key(key, depths)
        except KeyError:
            unknown.append(key)
            continue
        out[new] = TRANSFORMS[tf](value)
        key_map[key] = (new, tf)
    if unknown:
        raise KeyError(f'{len(unknown)} official keys have no mmbhvit '
                       f'counterpart: {unknown[:20]}')
    options = dict(
        binary_merge='vit.encoder.patch_embed1.move' in sd,
        shift3=any('.layerscale_h3.' in k for k in sd),
        shift5=any('.layerscale_h5.' in k for k in sd),
        layer_scale=any('.output.layerscale.' in k for k in sd),
        img_size=sd['vit.embeddings.position_embeddings'].shape[-1] * 4)
    if any('att_prob_clip' in k for k in sd):
        options['attn_binarizer'] = 'gsb'
    elif any('att_prob_quantizer' in k for k in sd):
        options['attn_binarizer'] = 'lsq'
    else:  # the official model quantizes attention only with 1-bit inputs
        options['act_bits'] = 32
    num_classes = sd['classifier.weight'].shape[0] \
        if 'classifier.weight' in sd else None
    return OfficialConversion(out, key_map, arch, options, num_classes)


def _convert_key(key: str, depths) -> Tuple[str, str]:
    if key == 'vit.embeddings.position_embeddings':
        return 'backbone.pos_embed', 'same'
    m = re.fullmatch(r'vit\.embeddings\.patch_embeddings\.(proj|norm)\.(.+)',
                     key)
    if m:
        return (f'backbone.patch_embed.'
                f'{"conv" if m[1] == "proj" else "norm"}.{m[2]}'), 'same'
    m = re.fullmatch(r'vit\.encoder\.layer([AB])\.(\d+)\.(.+)', key)
    if m:
        n = int(m[2])
        first, second = (0, 1) if m[1] == 'A' else (2, 3)
        stage, j = (first, n) if n < depths[first] else (second,
                                                         n - depths[first])
        rel, tf = _block(m[3])
        return f'backbone.stages.{stage}.{j}.{rel}', tf
    m = re.fullmatch(r'vit\.encoder\.patch_embed(\d)\.(.+)', key)
    if m:
        rel, tf = _merge(m[2])
        return f'backbone.downsamples.{int(m[1]) - 1}.{rel}', tf
    if key.startswith('vit.layernorm.'):
        return 'backbone.norm.' + key[14:], 'same'
    if key.startswith('classifier.'):
        return 'head.fc.' + key[11:], 'same'
    raise KeyError(key)


def official_flags_to_backbone_cfg(model_config: dict, flags: dict) -> dict:
    """Translate the official ``ViTConfig`` fields + command-line flags (as in
    the reference fixtures' ``config.json``) to a ``BHViT`` config dict."""
    if not flags.get('replace_ln_bn', True):
        raise ValueError('only the token-BatchNorm variant (replace_ln_bn) is '
                         'supported; the LayerNorm variant is not released')
    dims = list(model_config['hidden_size'])
    mlp = list(model_config['intermediate_size'])
    ratios = []
    for d, h in zip(dims, mlp):
        if h % d:
            raise ValueError(f'intermediate_size {h} is not a multiple of '
                             f'hidden_size {d}')
        ratios.append(h // d)
    return dict(
        type='BHViT',
        arch=dict(embed_dims=dims, depths=list(model_config['depths']),
                  num_heads=list(model_config['num_attention_heads']),
                  mlp_ratios=ratios),
        img_size=model_config.get('image_size', 224),
        attn_binarizer='gsb' if flags.get('gsb') else 'lsq',
        binary_merge=not flags.get('some_fp', False),
        shift3=bool(flags.get('shift3')),
        shift5=bool(flags.get('shift5')),
        recu=bool(flags.get('recu')),
        weight_bits=int(flags.get('weight_bits', 1)),
        act_bits=int(flags.get('input_bits', 1)),
        layer_scale=not flags.get('disable_layerscale', False),
        drop_path_rate=float(flags.get('drop_path', 0.)),
    )
