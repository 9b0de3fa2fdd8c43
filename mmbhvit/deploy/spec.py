# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""What a packed BHViT file claims and how it is checked (format v2).

Three things make a packed file trustworthy:

* :func:`arch_spec` – the complete architecture of a PyTorch
  :class:`~mmbhvit.models.BHViT`, read from its modules (every block's kind
  and options, widths, depths, heads, window, MLP ratios, binarizer, shifts,
  merging, image size, outputs). The exporter stores it in the file;
  :func:`mmbhvit.deploy.mmseg_backend.use_packed_backbone` derives it again
  from the backbone it replaces and compares the two (:func:`diff_specs`).
* :func:`expected_tensors` – the name, shape and dtype of every tensor the
  engine reads, computed from the file's spec alone. The engine checks the
  tensors against it once, when it is built (:func:`check_tensor_shapes`),
  so neither backend ever reads a tensor of the wrong size.
* :func:`tensor_manifest` / :func:`digest_tensors` / :func:`graph_sha256`
  – the manifest (every tensor's name, shape, dtype and SHA-256) and the
  SHA-256 digests that :func:`mmbhvit.deploy.export.load_packed` verifies
  (corruption, truncation, hand edits).

:func:`check_graph` verifies that the spec is internally consistent (the
architecture summary, the per-block specs and the engine's layer graph say
the same thing).
"""
import hashlib
import json
import math
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..utils.text import first_items
from .packing import num_words

#: dtype names as stored in the manifest
DTYPES = {
    torch.float32: 'float32',
    torch.float64: 'float64',
    torch.int64: 'int64'
}


class PackedFormatError(ValueError):
    """A packed file is corrupt, incomplete, of an old format or does not
    fit the model it is used with."""


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPES.get(dtype, str(dtype).replace('torch.', ''))


# --------------------------------------------------------------------------
# The architecture spec of a PyTorch BHViT
# --------------------------------------------------------------------------
def _bits(conv: nn.Module) -> Tuple[int, int]:
    return int(getattr(conv, 'weight_bits', 32)), int(
        getattr(conv, 'act_bits', 32))


def shift_taps(radii: Sequence[int]) -> List[Tuple[int, int]]:
    """``(dy, dx)`` of the structural taps of the shift branches with these
    radii, row-major (the order in which the exporter stores them)."""
    taps = set()
    for r in radii:
        for d in range(-r, r + 1):
            taps.add((d, 0))
            taps.add((0, d))
    return sorted(taps)


def _attention_spec(binarizer: Optional[nn.Module]) -> Optional[dict]:
    from ..models.binary import GSBAttentionBinarizer, LSQAttentionQuantizer
    if binarizer is None:
        return None
    if isinstance(binarizer, LSQAttentionQuantizer):
        return dict(kind='lsq', levels=int(binarizer.levels))
    if isinstance(binarizer, GSBAttentionBinarizer):
        return dict(kind='gsb', low=float(binarizer.low),
                    high=float(binarizer.high))
    return dict(kind=type(binarizer).__name__)


def block_spec(blk: nn.Module) -> dict:
    """Kind and options of one :class:`BHViTBlock`."""
    from ..models.backbones.bhvit import MSGDC, MSMHA
    mixer = blk.token_mixer
    expand = blk.ffn.expand
    wb, ab = _bits(expand.conv)
    spec = dict(
        channels=int(blk.norm1.num_features),
        mlp_hidden=int(expand.out_channels),
        layer_scale=blk.ffn.layer_scale is not None,
        shift_radii=list(blk.shifts.radii) if blk.shifts is not None else [],
        recu=bool(getattr(expand.conv, 'recu', False)),
        weight_bits=wb, act_bits=ab)
    if isinstance(mixer, MSGDC):
        conv = mixer.convs[0]
        spec = dict(kind='msgdc', **spec, groups=int(conv.groups),
                    kernel_size=list(conv.kernel_size),
                    dilations=[int(c.dilation[0]) for c in mixer.convs])
    elif isinstance(mixer, MSMHA):
        spec = dict(kind='msmha', **spec, num_heads=int(mixer.num_heads),
                    window_size=int(mixer.window_size),
                    attention=_attention_spec(mixer.binarizer),
                    proj_layer_scale=mixer.proj_scale is not None)
    else:
        spec = dict(kind=type(mixer).__name__, **spec)
    return spec


def _uniform(values: Iterable[Any]):
    """The common value of a per-block option (a list if blocks differ,
    None if there is no such block)."""
    values = list(values)
    if not values:
        return None
    first = values[0]
    return first if all(v == first for v in values) else values


def _has_radius(radii, r: int):
    """``shift3`` / ``shift5`` from the blocks' common shift radii (the
    per-block lists when blocks differ)."""
    if isinstance(radii, list) and all(isinstance(v, int) for v in radii):
        return r in radii
    return radii


def arch_spec(backbone: nn.Module) -> dict:
    """The complete architecture of a BHViT backbone, JSON-able, read from
    its modules (not from constructor arguments, so a model built any way
    gets the same spec). Stored by the exporter as ``graph['arch']`` and
    compared by :func:`use_packed_backbone`; holds no learned values."""
    from ..models import BHViT
    if not isinstance(backbone, BHViT):
        raise TypeError('arch_spec needs a BHViT backbone, got '
                        f'{type(backbone).__name__}')
    stages = [[block_spec(b) for b in stage] for stage in backbone.stages]
    blocks = [b for s in stages for b in s]
    msmha = [b for b in blocks if b['kind'] == 'msmha']
    radii = _uniform(b['shift_radii'] for b in blocks)
    merges = []
    for ds in backbone.downsamples:
        kind = 'binary' if ds.binary else 'fp'
        merges.append(dict(kind=kind, cin=int(ds.conv.in_channels),
                           cout=int(ds.conv.out_channels),
                           pos_size=list(ds.pos_embed.shape[-2:])))
    att = _uniform(b['attention'] for b in msmha)
    return dict(
        type='BHViT',
        in_channels=int(backbone.in_channels),
        img_size=list(backbone.img_size),
        embed_dims=[int(v) for v in backbone.arch['embed_dims']],
        depths=[len(s) for s in stages],
        num_heads=[int(v) for v in backbone.arch['num_heads']],
        mlp_ratios=[int(v) for v in backbone.arch['mlp_ratios']],
        window_size=_uniform(b['window_size'] for b in msmha),
        attn_binarizer=(att.get('kind') if isinstance(att, dict) else att),
        binary_merge=bool(backbone.binary_merge),
        shift3=_has_radius(radii, 1),
        shift5=_has_radius(radii, 2),
        recu=_uniform(b['recu'] for b in blocks),
        layer_scale=_uniform(b['layer_scale'] for b in blocks),
        weight_bits=_uniform(b['weight_bits'] for b in blocks),
        act_bits=_uniform(b['act_bits'] for b in blocks),
        out_indices=[int(i) for i in backbone.out_indices],
        final_norm=bool(backbone.final_norm),
        min_input_size=int(backbone.min_input_size),
        stem=dict(kernel_size=4, stride=4,
                  cout=int(backbone.patch_embed.conv.out_channels),
                  pos_size=list(backbone.pos_embed.shape[-2:])),
        merges=merges,
        stages=stages)


_LABELS = {'embed_dims': 'embed_dims (stage widths)'}
_ABSENT = '<absent>'


def _diff(a, b, path: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            p = f'{path}.{k}' if path else str(k)
            if k not in a or k not in b:
                out.append((p, a.get(k, _ABSENT), b.get(k, _ABSENT)))
            else:
                _diff(a[k], b[k], p, out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and \
            any(isinstance(v, (dict, list, tuple)) for v in [*a, *b]):
        for i in range(max(len(a), len(b))):
            p = f'{path}[{i}]'
            if i >= len(a) or i >= len(b):
                out.append((p, a[i] if i < len(a) else _ABSENT,
                            b[i] if i < len(b) else _ABSENT))
            else:
                _diff(a[i], b[i], p, out)
    elif a != b and not (isinstance(a, (list, tuple))
                         and isinstance(b, (list, tuple))
                         and list(a) == list(b)):
        out.append((path, a, b))


def diff_specs(a: dict, b: dict) -> List[Tuple[str, Any, Any]]:
    """Fields whose values differ between two architecture specs, as
    ``(field, value in a, value in b)`` (``'<absent>'`` for a field or a
    block only one has), top-level fields first."""
    out: List[Tuple[str, Any, Any]] = []
    _diff(a, b, '', out)
    return [(_LABELS.get(k, k), va, vb) for k, va, vb in out]


def _short(v) -> str:
    if isinstance(v, dict) and 'kind' in v:
        return f"a {v['kind']} block"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + '...'


def format_diffs(diffs: List[Tuple[str, Any, Any]], name_a: str,
                 name_b: str, limit: int = 12) -> str:
    lines = [f'  {k}: {name_a} {_short(va)}, {name_b} {_short(vb)}'
             for k, va, vb in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f'  ... and {len(diffs) - limit} more')
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# Internal consistency: architecture spec vs the engine's layer graph
# --------------------------------------------------------------------------
def _proj_ok(p: dict, prefix: str, cin: int, cout: int) -> List[str]:
    errs = []
    if not isinstance(p, dict):
        return [f'{prefix}: missing projection spec']
    if p.get('prefix') != prefix:
        errs.append(f'{prefix}: prefix is {p.get("prefix")!r}')
    if (p.get('cin'), p.get('cout')) != (cin, cout):
        errs.append(f'{prefix}: {p.get("cin")} -> {p.get("cout")} channels, '
                    f'the architecture says {cin} -> {cout}')
    shortcut = ('identity' if cin == cout else
                'tile' if cout > cin else 'mean')
    if p.get('shortcut') != shortcut:
        errs.append(f'{prefix}: shortcut {p.get("shortcut")!r}, expected '
                    f'{shortcut!r}')
    elif max(cin, cout) % max(min(cin, cout), 1):
        errs.append(f'{prefix}: {cin} -> {cout} channels: one width must '
                    'be a multiple of the other')
    return errs


def _arch_errors(arch: dict) -> List[str]:
    """Consistency of the architecture summary with its per-block specs."""
    errs = []
    keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios')
    for k in keys:
        v = arch.get(k)
        if not (isinstance(v, list) and len(v) == 4 and all(
                isinstance(i, int) and i > 0 for i in v)):
            errs.append(f'arch.{k} must be 4 positive ints, got {v!r}')
    if errs:
        return errs
    dims, heads = arch['embed_dims'], arch['num_heads']
    stages, merges = arch.get('stages'), arch.get('merges')
    if not isinstance(stages, list) or len(stages) != 4:
        return ['arch.stages must list 4 stages']
    if not isinstance(merges, list) or len(merges) != 3:
        return ['arch.merges must list 3 patch mergings']
    if [len(s) for s in stages] != arch['depths']:
        errs.append(f'arch.depths {arch["depths"]} but the stages hold '
                    f'{[len(s) for s in stages]} blocks')
    kinds = ('msgdc', 'msgdc', 'msmha', 'msmha')
    for i, stage in enumerate(stages):
        c = dims[i]
        if c % 4 or c % heads[i]:
            errs.append(f'arch.embed_dims[{i}]={c} must be divisible by 4 '
                        f'and by num_heads[{i}]={heads[i]}')
        for j, b in enumerate(stage):
            where = f'arch.stages[{i}][{j}]'
            if not isinstance(b, dict):
                errs.append(f'{where} is not a block spec')
                continue
            if b.get('kind') != kinds[i]:
                errs.append(f'{where}.kind is {b.get("kind")!r}, stage {i} '
                            f'uses {kinds[i]!r}')
            if b.get('channels') != c:
                errs.append(f'{where}.channels {b.get("channels")} != '
                            f'embed_dims[{i}] {c}')
            if b.get('mlp_hidden') != c * arch['mlp_ratios'][i]:
                errs.append(f'{where}.mlp_hidden {b.get("mlp_hidden")} != '
                            f'{c} x mlp_ratios[{i}] {arch["mlp_ratios"][i]}')
            if b.get('weight_bits') != 1 or b.get('act_bits') != 1:
                errs.append(f'{where} is not fully binary (weight_bits '
                            f'{b.get("weight_bits")}, act_bits '
                            f'{b.get("act_bits")})')
            if b.get('kind') == 'msmha':
                if b.get('num_heads') != heads[i]:
                    errs.append(f'{where}.num_heads {b.get("num_heads")} != '
                                f'num_heads[{i}] {heads[i]}')
                if b.get('window_size') != arch.get('window_size'):
                    errs.append(f'{where}.window_size '
                                f'{b.get("window_size")} != arch.window_size '
                                f'{arch.get("window_size")}')
                att = b.get('attention') or {}
                if att.get('kind') != arch.get('attn_binarizer'):
                    errs.append(f'{where}.attention {att!r} but '
                                'arch.attn_binarizer is '
                                f'{arch.get("attn_binarizer")!r}')
            if b.get('kind') == 'msgdc' and (
                    not isinstance(b.get('groups'), int) or b['groups'] < 1
                    or c % b['groups']):
                errs.append(f'{where}.groups {b.get("groups")!r} does not '
                            f'divide {c} channels')
            radii = b.get('shift_radii')
            if radii != [r for r, on in ((1, arch.get('shift3')),
                                         (2, arch.get('shift5'))) if on]:
                errs.append(f'{where}.shift_radii {radii!r} disagree with '
                            f'shift3={arch.get("shift3")!r}, '
                            f'shift5={arch.get("shift5")!r}')
    ws = arch.get('window_size')
    if not (isinstance(ws, int) and ws >= 1 and ws % 2 == 1):
        errs.append(f'arch.window_size must be an odd positive int, got '
                    f'{ws!r}')
    for i, m in enumerate(merges):
        where = f'arch.merges[{i}]'
        if not isinstance(m, dict):
            errs.append(f'{where} is not a merge spec')
            continue
        if (m.get('cin'), m.get('cout')) != (dims[i], dims[i + 1]):
            errs.append(f'{where}: {m.get("cin")} -> {m.get("cout")} '
                        f'channels, embed_dims say {dims[i]} -> '
                        f'{dims[i + 1]}')
        kind = 'binary' if arch.get('binary_merge') else 'fp'
        if m.get('kind') != kind:
            errs.append(f'{where}.kind {m.get("kind")!r} but binary_merge='
                        f'{arch.get("binary_merge")!r}')
    out = arch.get('out_indices')
    if not (isinstance(out, list) and out and len(set(out)) == len(out)
            and all(isinstance(i, int) and 0 <= i < 4 for i in out)):
        errs.append(f'arch.out_indices must be distinct stages 0..3, got '
                    f'{out!r}')
    stem = arch.get('stem') or {}
    if stem.get('cout') != dims[0]:
        errs.append(f'arch.stem.cout {stem.get("cout")} != embed_dims[0] '
                    f'{dims[0]}')
    return errs


def _graph_errors(arch: dict, g: dict, head: Optional[dict]) -> List[str]:
    """The engine's layer graph (``graph['backbone']``) against the
    architecture spec."""
    errs = []
    p = g.get('prefix')
    for k in ('in_channels', 'embed_dims', 'depths', 'num_heads',
              'mlp_ratios', 'img_size', 'binary_merge', 'out_indices',
              'final_norm', 'min_input_size'):
        if g.get(k) != arch.get(k):
            errs.append(f'backbone.{k} is {g.get(k)!r}, the architecture '
                        f'says {arch.get(k)!r}')
    stages, merges = g.get('stages'), g.get('downsamples')
    if not isinstance(stages, list) or [len(s) for s in stages] != [
            len(s) for s in arch['stages']]:
        return errs + ['backbone.stages: the layer graph does not have the '
                       'blocks of the architecture']
    if not isinstance(merges, list) or len(merges) != 3:
        return errs + ['backbone.downsamples must list 3 patch mergings']
    for i, stage in enumerate(stages):
        for j, (b, a) in enumerate(zip(stage, arch['stages'][i])):
            bp = f'{p}.stages.{i}.{j}'
            if not isinstance(b, dict):
                errs.append(f'{bp}: not a block')
                continue
            c = a['channels']
            if b.get('prefix') != bp or b.get('type') != a['kind'] or b.get(
                    'channels') != c:
                errs.append(f'{bp}: layer graph says {b.get("type")!r} '
                            f'{b.get("prefix")!r} with {b.get("channels")} '
                            f'channels, the architecture {a["kind"]!r} with '
                            f'{c}')
                continue
            errs += _proj_ok(b.get('expand'), f'{bp}.ffn.expand', c,
                             a['mlp_hidden'])
            errs += _proj_ok(b.get('reduce'), f'{bp}.ffn.reduce',
                             a['mlp_hidden'], c)
            taps = shift_taps(a['shift_radii'])
            sh = b.get('shift')
            if taps and not (isinstance(sh, dict)
                             and sh.get('prefix') == f'{bp}.shift'
                             and list(zip(sh.get('dy', []), sh.get(
                                 'dx', []))) == taps
                             and len(sh.get('dy')) == len(sh.get('dx'))):
                errs.append(f'{bp}.shift: taps do not match shift radii '
                            f'{a["shift_radii"]}')
            if not taps and sh:
                errs.append(f'{bp}.shift present but the block has none')
            if a['kind'] == 'msgdc':
                if b.get('groups') != a['groups'] or b.get(
                        'dilations') != a['dilations']:
                    errs.append(f'{bp}: groups/dilations '
                                f'{b.get("groups")}/{b.get("dilations")} vs '
                                f'{a["groups"]}/{a["dilations"]}')
                if a.get('kernel_size') != [3, 3]:
                    errs.append(f'{bp}: MSGDC kernel {a.get("kernel_size")}'
                                ' (only 3x3 is packed)')
            else:
                heads = a['num_heads']
                if b.get('num_heads') != heads or b.get(
                        'window_size') != a['window_size']:
                    errs.append(f'{bp}: heads/window {b.get("num_heads")}/'
                                f'{b.get("window_size")} vs {heads}/'
                                f'{a["window_size"]}')
                scale = b.get('scale')
                if not (isinstance(scale, float) and math.isclose(
                        scale, (c // heads)**-0.5, rel_tol=1e-12)):
                    errs.append(f'{bp}: attention scale {scale!r}, expected '
                                f'{(c // heads)**-0.5!r}')
                att, batt = a.get('attention') or {}, b.get('attn') or {}
                if batt.get('type') != att.get('kind'):
                    errs.append(f'{bp}: attention {batt.get("type")!r} vs '
                                f'{att.get("kind")!r}')
                elif att['kind'] == 'lsq' and batt.get(
                        'levels') != att.get('levels'):
                    errs.append(f'{bp}: LSQ levels {batt.get("levels")} vs '
                                f'{att.get("levels")}')
                elif att['kind'] == 'gsb':
                    vals = [batt.get(k) for k in ('alpha', 'a', 'b1', 'b2',
                                                  'low', 'high')]
                    if not all(isinstance(v, float) and math.isfinite(v)
                               for v in vals) or vals[0] <= 0:
                        errs.append(f'{bp}: GSB parameters {vals} must be '
                                    'finite with alpha > 0')
                    elif (batt['low'], batt['high']) != (att['low'],
                                                         att['high']):
                        errs.append(f'{bp}: GSB low/high differ from the '
                                    'architecture')
                m = f'{bp}.mixer'
                for n in ('q', 'k', 'v', 'proj'):
                    errs += _proj_ok(b.get(n), f'{m}.{n}', c, c)
    for i, (d, a) in enumerate(zip(merges, arch['merges'])):
        dp = f'{p}.downsamples.{i}'
        if not isinstance(d, dict) or d.get('prefix') != dp or (
                d.get('type'), d.get('cin'), d.get('cout')) != (
                    a['kind'], a['cin'], a['cout']):
            errs.append(f'{dp}: layer graph {d!r} does not match the '
                        f'architecture {a!r}')
    if head is not None:
        if not isinstance(head, dict) or head.get('type') != 'gap_linear' \
                or head.get('prefix') != 'head.fc' or not isinstance(
                    head.get('num_classes'), int) or head['num_classes'] < 1:
            errs.append(f'head: unsupported or malformed head {head!r}')
        elif head.get('in_channels') != arch['embed_dims'][-1]:
            errs.append(f'head.in_channels {head.get("in_channels")} != '
                        f'embed_dims[-1] {arch["embed_dims"][-1]}')
        elif 3 not in arch['out_indices']:
            errs.append('a classification head needs the stage-4 output '
                        '(3 in out_indices)')
    return errs


def check_graph(graph: dict, what: str) -> None:
    """Raise :class:`PackedFormatError` unless the architecture spec, its
    per-block specs and the engine's layer graph agree."""
    arch, g = graph.get('arch'), graph.get('backbone')
    if not isinstance(arch, dict) or not isinstance(g, dict):
        raise PackedFormatError(f'{what} lacks the architecture spec or the '
                                'layer graph; re-export it with '
                                'tools/deployment/export_binary.py')
    try:
        errs = _arch_errors(arch)
        if not errs:
            errs = _graph_errors(arch, g, graph.get('head'))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        errs = [f'malformed spec ({type(e).__name__}: {e})']
    if errs:
        raise PackedFormatError(
            f'{what}: the architecture spec is inconsistent (a damaged or '
            'hand-edited file; re-export it with '
            'tools/deployment/export_binary.py):\n  ' +
            first_items(errs, 8, '\n  '))


# --------------------------------------------------------------------------
# Every tensor's shape and dtype, from the spec
# --------------------------------------------------------------------------
def expected_tensors(graph: dict) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of every tensor the engine reads, derived
    from the file's architecture spec and layer graph only (call
    :func:`check_graph` first). Binary weights are int64 words
    ``(out, words(taps * in))``, everything else ``param_dtype``."""
    arch, g = graph['arch'], graph['backbone']
    fdt = graph['param_dtype']
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def f(name: str, *shape: int):
        out[name] = (tuple(int(s) for s in shape), fdt)

    def words(name: str, cout: int, bits: int):
        out[name] = ((int(cout), num_words(int(bits))), 'int64')

    def proj(pre: str, cin: int, cout: int):
        words(f'{pre}.wbits', cout, cin)
        f(f'{pre}.thr', cin)
        for n in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
            f(f'{pre}.{n}', cout)

    p = g['prefix']
    dims = arch['embed_dims']
    f(f'{p}.stem.weight', dims[0], arch['in_channels'], 4, 4)
    f(f'{p}.stem.bias', dims[0])
    f(f'{p}.pos_embed', 1, dims[0], *arch['stem']['pos_size'])
    for i, stage in enumerate(arch['stages']):
        for j, a in enumerate(stage):
            bp = f'{p}.stages.{i}.{j}'
            c, m = a['channels'], f'{bp}.mixer'
            for n in ('norm1.scale', 'norm1.bias', 'norm2.scale',
                      'norm2.bias'):
                f(f'{bp}.{n}', c)
            if a['kind'] == 'msgdc':
                f(f'{m}.thr', c)
                for k in range(len(a['dilations'])):
                    words(f'{m}.conv{k}.wbits', c, 9 * (c // a['groups']))
                    for n in ('a', 'b', 'slope'):
                        f(f'{m}.conv{k}.{n}', c)
                f(f'{m}.out_scale', c)
                f(f'{m}.out_bias', c)
            else:
                for n in ('merge_mix', 'token_norm.weight',
                          'token_norm.bias', 'ctx.a', 'ctx.b', 'ctx.slope',
                          'ctx.post_bias', 'out_mix'):
                    f(f'{m}.{n}', c)
                for n in ('q', 'k', 'v'):
                    proj(f'{m}.{n}', c, c)
                    f(f'{m}.{n}_thr', c)
                if a['attention']['kind'] == 'lsq':
                    f(f'{m}.lsq.step', a['num_heads'])
                    f(f'{m}.lsq.zero', a['num_heads'])
                proj(f'{m}.proj', c, c)
            proj(f'{bp}.ffn.expand', c, a['mlp_hidden'])
            proj(f'{bp}.ffn.reduce', a['mlp_hidden'], c)
            taps = shift_taps(a['shift_radii'])
            if taps:
                f(f'{bp}.shift.weight', len(taps), c)
                f(f'{bp}.shift.bias', c)
    for i, a in enumerate(arch['merges']):
        dp = f'{p}.downsamples.{i}'
        cin, cout = a['cin'], a['cout']
        f(f'{dp}.norm_in.scale', cin)
        f(f'{dp}.norm_in.bias', cin)
        f(f'{dp}.pos_embed', 1, cout, *a['pos_size'])
        if a['kind'] == 'binary':
            words(f'{dp}.wbits', cout, 4 * cin)
            f(f'{dp}.thr', cin)
            for n in ('a', 'b', 'slope', 'post_bias'):
                f(f'{dp}.{n}', cout)
        else:
            f(f'{dp}.weight', cout, cin, 2, 2)
            f(f'{dp}.bias', cout)
    if arch['final_norm']:
        f(f'{p}.norm.scale', dims[-1])
        f(f'{p}.norm.bias', dims[-1])
    head = graph.get('head')
    if head:
        f(f'{head["prefix"]}.weight', head['num_classes'],
          head['in_channels'])
        f(f'{head["prefix"]}.bias', head['num_classes'])
    return out


def check_tensor_shapes(graph: dict, tensors: Dict[str, Tensor],
                        what: str) -> None:
    """Every tensor the spec needs is present with the shape and dtype the
    spec gives, and there is no other (raises :class:`PackedFormatError`
    naming the file, the tensor and both shapes)."""
    expected = expected_tensors(graph)
    errs = []
    for name, (shape, dtype) in expected.items():
        t = tensors.get(name)
        if t is None:
            errs.append(f'tensor {name!r} is missing (the spec needs shape '
                        f'{shape}, {dtype})')
        elif not isinstance(t, Tensor):
            errs.append(f'{name!r} is a {type(t).__name__}, not a tensor')
        elif tuple(t.shape) != shape:
            errs.append(f'tensor {name!r} has shape {tuple(t.shape)}, the '
                        f'architecture spec needs {shape}')
        elif dtype_name(t.dtype) != dtype:
            errs.append(f'tensor {name!r} has dtype {dtype_name(t.dtype)}, '
                        f'the spec needs {dtype}')
    extra = sorted(set(tensors) - set(expected))
    errs += [f'tensor {k!r} is not part of the architecture spec'
             for k in extra[:3]]
    if len(extra) > 3:
        errs.append(f'... {len(extra)} tensors the spec does not use')
    if errs:
        raise PackedFormatError(
            f'{what} does not fit its own architecture spec:\n  ' +
            '\n  '.join(errs[:8]) +
            (f'\n  ... and {len(errs) - 8} more' if len(errs) > 8 else ''))


# --------------------------------------------------------------------------
# Manifest and digests
# --------------------------------------------------------------------------
def tensor_manifest(tensors: Dict[str, Tensor],
                    digests: Optional[Dict[str, str]] = None
                    ) -> Dict[str, dict]:
    """``{name: {'shape': [...], 'dtype': 'float32', 'sha256': ...}}``,
    sorted by name (``sha256`` from ``digests`` when given)."""
    out = {}
    for k in sorted(tensors):
        entry = dict(shape=[int(s) for s in tensors[k].shape],
                     dtype=dtype_name(tensors[k].dtype))
        if digests is not None:
            entry['sha256'] = digests[k]
        out[k] = entry
    return out


def _raw_bytes(t: Tensor) -> memoryview:
    arr = t.detach().cpu().contiguous().reshape(-1).numpy()
    if sys.byteorder == 'big':  # digests are over little-endian bytes
        arr = arr.byteswap()
    return memoryview(arr).cast('B')


def digest_tensors(tensors: Dict[str, Tensor]) -> Tuple[str, Dict[str, str]]:
    """``(tensors_sha256, {name: sha256 of its raw bytes})`` in one pass.

    ``tensors_sha256`` is deterministic: for each name in sorted order, a
    JSON header ``[name, dtype, shape]`` (8-byte length prefix) and the raw
    little-endian bytes of the contiguous tensor."""
    h = hashlib.sha256()
    per_tensor = {}
    for name in sorted(tensors):
        t = tensors[name]
        header = json.dumps([name, dtype_name(t.dtype),
                             [int(s) for s in t.shape]]).encode()
        data = _raw_bytes(t)
        h.update(len(header).to_bytes(8, 'little'))
        h.update(header)
        h.update(data)
        per_tensor[name] = hashlib.sha256(data).hexdigest()
    return h.hexdigest(), per_tensor


def tensors_sha256(tensors: Dict[str, Tensor]) -> str:
    """The SHA-256 over all tensors (see :func:`digest_tensors`)."""
    return digest_tensors(tensors)[0]


def graph_sha256(graph: dict) -> str:
    """SHA-256 of the canonical JSON of the graph without its own
    ``graph_sha256`` field (it covers the spec, the manifest, the tensor
    digest and the metadata)."""
    body = {k: v for k, v in graph.items() if k != 'graph_sha256'}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
