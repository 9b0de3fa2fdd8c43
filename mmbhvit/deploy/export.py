# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Export a trained BHViT into a deployable file with bit-packed weights.

The file (format version 2) is a plain ``torch.save`` of
``{'graph': dict, 'tensors': dict}`` (loads with ``torch.load(path,
weights_only=True)``), written atomically (:func:`save_packed`):

* ``graph`` – JSON-able description: ``arch``, the complete architecture
  spec derived from the model (:func:`mmbhvit.deploy.spec.arch_spec`);
  ``backbone`` / ``head``, the engine's layer graph; ``tensors``, the
  manifest of every tensor's shape, dtype and SHA-256; ``tensors_sha256``
  over all tensors; ``meta`` with the SHA-256 of the source checkpoint and of
  the resolved config; statistics; and ``graph_sha256`` over all of it;
* ``tensors`` – ``{name: tensor}``; binary weights are int64 words of 64
  sign bits (:mod:`mmbhvit.deploy.packing`), everything else float.

:func:`load_packed` verifies all of it (format, version, digests, manifest,
spec consistency); the engine checks every tensor's shape against the spec
when it is built (:func:`mmbhvit.deploy.spec.check_tensor_shapes`).

What is folded (all in float64, then stored in ``param_dtype``):

* binary weight ``s_o sign(w - mean w)`` → its sign bits (one bit per weight)
  and one float per output channel (``s_o`` times whatever affine follows);
* eval BatchNorm after a binary conv (and the conv bias) → the per-channel
  affine ``a D + b`` of the integer dot product ``D``; the input shift of the
  following RPReLU is folded into ``b``, its output shift (and a LayerScale)
  into the post affine; in MSGDC the three RPReLU output shifts go into the
  bias of the summing BatchNorm;
* learnable shift before a sign → a per-channel threshold, ``sign(x + s)``
  becomes ``x > -s``; this is exact in floating point (``fl(x + s) > 0``
  if and only if ``x > -s``);
* the shift branches → one sparse depthwise filter (its 9 taps) + bias;
* stem / full-precision patch-merging BatchNorm → into the convolution.

Sign convention: ``torch.sign(0) = 0``, a third value 1 bit cannot hold. The
engine maps an exact 0 to -1 (an activation exactly equal to its threshold,
or a centred weight exactly 0). In a trained network exact zeros do not
occur except at zero padding, which the engine handles exactly (a padded
tap contributes 0); :func:`export_model` counts zero centred weights and
warns if there are any.
"""
import argparse
import hashlib
import io
import os
import os.path as osp
import re
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.io import DiskFullError, atomic_torch_save, sha256_file
from ..utils.text import first_items
from .packing import pack_bits
from .spec import (PackedFormatError, arch_spec, check_graph,
                   check_tensor_shapes, digest_tensors, dtype_name,
                   graph_sha256, tensor_manifest)

FORMAT = 'mmbhvit.packed-bhvit'
VERSION = 2
#: the command that writes packed files (named in every "re-export" error)
EXPORT_TOOL = 'tools/deployment/export_binary.py CONFIG CHECKPOINT OUT'

SIGN_CONVENTION = (
    'activation bit = (x > threshold) (x + shift > 0); weight bit = '
    '(w - mean_in(w) > 0); an exact 0 maps to -1 (torch.sign gives 0); '
    'zero padding of the binary 3x3 convolutions contributes 0')


def bn_affine(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """Eval BatchNorm as ``y = x * scale + bias`` (float64)."""
    if not isinstance(bn, _BatchNorm):
        raise NotImplementedError('only BatchNorm token norms can be '
                                  f'folded, got {type(bn).__name__}')
    if bn.running_mean is None or bn.running_var is None:
        raise NotImplementedError('BatchNorm without running statistics '
                                  '(track_running_stats=False) cannot be '
                                  'folded for inference')
    var = bn.running_var.detach().double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().double() * scale
    bias = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().double()
    return scale, bias


def _d(t: Optional[Tensor], like: int = None) -> Tensor:
    """Detached float64 copy (zeros of size ``like`` for None)."""
    if t is None:
        return torch.zeros(like, dtype=torch.float64)
    return t.detach().double().reshape(-1) if t.dim() else t.detach().double()


class _Writer:
    """Collects the tensors of the exported file and size statistics."""

    def __init__(self, param_dtype: torch.dtype):
        if param_dtype not in (torch.float32, torch.float64):
            raise ValueError('param_dtype must be float32 or float64')
        self.dtype = param_dtype
        self.tensors: Dict[str, Tensor] = {}
        self.stats = dict(binary_weights=0, packed_weight_bytes=0,
                          float_values=0, zero_centred_weights=0)

    def put(self, name: str, t: Tensor) -> str:
        if name in self.tensors:
            raise KeyError(f'duplicate tensor name {name}')
        self.tensors[name] = t.detach().to(self.dtype).contiguous().clone()
        self.stats['float_values'] += t.numel()
        return name

    def put_binary_weight(self, name: str, conv: nn.Module) -> Tensor:
        """Pack the sign bits of a binary conv's centred weight densely, per
        output channel: ``(out, words(kh*kw*in/groups))``, bit ``k * cin_g +
        i`` for tap ``k`` (row-major) and group input ``i``; returns the
        per-output scale ``mean |w|`` (float64)."""
        if not getattr(conv, 'is_binary', False):
            raise NotImplementedError(
                f'{name}: only fully binary layers (weight_bits=act_bits=1) '
                'can be packed; export a binary BHViT, not its full-precision '
                'counterpart')
        w = conv.weight.detach()
        dims = tuple(range(1, w.dim()))
        # as binarize_weight, in the weight's own dtype (ReCU rescales the
        # centred weight by a positive factor: same signs)
        scale = w.abs().mean(dim=dims).double()
        centred = w - w.mean(dim=dims, keepdim=True)
        self.stats['zero_centred_weights'] += int((centred == 0).sum())
        cout, cin_g = w.shape[:2]
        bits = (centred > 0).permute(0, 2, 3, 1).reshape(cout, -1)
        words = pack_bits(bits)
        self.tensors[name] = words.contiguous()
        self.stats['binary_weights'] += w.numel()
        self.stats['packed_weight_bytes'] += words.numel() * 8
        return scale


def _layer_scale(ls: Optional[nn.Module], channels: int):
    if ls is None:
        return (torch.ones(channels, dtype=torch.float64),
                torch.zeros(channels, dtype=torch.float64))
    return _d(ls.scale), _d(ls.bias)


def _export_proj(wr: _Writer, prefix: str, proj: nn.Module,
                 layer_scale: Optional[nn.Module] = None) -> dict:
    """BinaryResidualProj (+ LayerScale) → threshold, bits, affine, PReLU,
    post affine, shortcut."""
    cin, cout = proj.in_channels, proj.out_channels
    s = wr.put_binary_weight(f'{prefix}.wbits', proj.conv)
    alpha, beta = bn_affine(proj.norm)
    conv_bias = _d(proj.conv.bias, cout)
    ls_scale, ls_bias = _layer_scale(layer_scale, cout)
    wr.put(f'{prefix}.thr', -_d(proj.shift.bias))
    wr.put(f'{prefix}.a', s * alpha)
    wr.put(f'{prefix}.b', conv_bias * alpha + beta - _d(proj.act.bias_in))
    wr.put(f'{prefix}.slope', _d(proj.act.weight))
    wr.put(f'{prefix}.post_scale', ls_scale)
    wr.put(f'{prefix}.post_bias', _d(proj.act.bias_out) * ls_scale + ls_bias)
    shortcut = ('identity' if cin == cout else
                'tile' if cout > cin else 'mean')
    return dict(prefix=prefix, cin=cin, cout=cout, shortcut=shortcut)


def _export_shifts(wr: _Writer, prefix: str, shifts) -> Optional[dict]:
    """ShiftBranches → the non-zero taps of their combined depthwise filter
    (circular), with per-channel weights and the summed bias."""
    if shifts is None:
        return None
    branches = list(shifts.scales.values())
    scale = torch.stack(
        [_d(b.scale) / n for b, n in zip(branches, shifts.taps)])
    filters = shifts.filters.double()
    kernel = (scale[:, :, None, None] * filters).sum(0)  # (C, K, K)
    support = filters.abs().sum(dim=(0, 1)) > 0  # structural taps
    taps = support.nonzero().tolist()
    p = shifts.pad
    wr.put(f'{prefix}.weight',
           torch.stack([kernel[:, ky, kx] for ky, kx in taps]))
    wr.put(f'{prefix}.bias',
           torch.stack([_d(b.bias) for b in branches]).sum(0))
    return dict(prefix=prefix, dy=[ky - p for ky, _ in taps],
                dx=[kx - p for _, kx in taps])


def _export_block(wr: _Writer, prefix: str, blk: nn.Module) -> dict:
    from ..models.backbones.bhvit import MSGDC, MSMHA
    mixer = blk.token_mixer
    c = blk.norm1.num_features
    spec = dict(prefix=prefix, channels=c)
    n2_scale, n2_bias = bn_affine(blk.norm2)
    wr.put(f'{prefix}.norm2.scale', n2_scale)
    wr.put(f'{prefix}.norm2.bias', n2_bias)
    n1_scale, n1_bias = bn_affine(blk.norm1)
    wr.put(f'{prefix}.norm1.scale', n1_scale)
    wr.put(f'{prefix}.norm1.bias', n1_bias)
    if isinstance(mixer, MSGDC):
        spec['type'] = 'msgdc'
        m = f'{prefix}.mixer'
        wr.put(f'{m}.thr', -_d(mixer.shift.bias))
        dilations, groups, zeta = [], None, 0
        for i, (conv, act) in enumerate(zip(mixer.convs, mixer.acts)):
            d = conv.dilation[0]
            if (conv.kernel_size != (3, 3) or conv.stride != (1, 1)
                    or conv.padding != (d, d) or conv.dilation != (d, d)):
                raise NotImplementedError(
                    f'{m}.conv{i}: MSGDC convs must be 3x3, stride 1, '
                    f'padding = dilation; got {conv}')
            if groups is not None and conv.groups != groups:
                raise NotImplementedError('MSGDC convs with different groups')
            groups = conv.groups
            dilations.append(d)
            s = wr.put_binary_weight(f'{m}.conv{i}.wbits', conv)
            wr.put(f'{m}.conv{i}.a', s)
            wr.put(f'{m}.conv{i}.b',
                   _d(conv.bias, c) - _d(act.bias_in))
            wr.put(f'{m}.conv{i}.slope', _d(act.weight))
            zeta = zeta + _d(act.bias_out)
        alpha, beta = bn_affine(mixer.norm)
        wr.put(f'{m}.out_scale', alpha)
        wr.put(f'{m}.out_bias', alpha * zeta + beta)
        spec.update(groups=groups, dilations=dilations)
    elif isinstance(mixer, MSMHA):
        spec['type'] = 'msmha'
        m = f'{prefix}.mixer'
        if mixer.binarizer is None or not mixer.binarize_qkv:
            raise NotImplementedError(f'{m}: attention is not binary '
                                      '(act_bits != 1)')
        spec.update(num_heads=mixer.num_heads,
                    window_size=mixer.window_size, scale=mixer.scale)
        wr.put(f'{m}.merge_mix', _d(mixer.merge.mix))
        wr.put(f'{m}.token_norm.weight', _d(mixer.token_norm.weight))
        wr.put(f'{m}.token_norm.bias', _d(mixer.token_norm.bias))
        spec['token_norm_eps'] = float(mixer.token_norm.eps)
        for name in ('q', 'k', 'v'):
            spec[name] = _export_proj(wr, f'{m}.{name}', getattr(mixer, name))
            wr.put(f'{m}.{name}_thr',
                   -_d(getattr(mixer, f'{name}_shift').bias))
        binarizer = mixer.binarizer
        from ..models.binary import (GSBAttentionBinarizer,
                                     LSQAttentionQuantizer)
        if isinstance(binarizer, LSQAttentionQuantizer):
            spec['attn'] = dict(type='lsq', levels=int(binarizer.levels))
            wr.put(f'{m}.lsq.step', _d(binarizer.step))
            wr.put(f'{m}.lsq.zero', _d(binarizer.zero_point))
        elif isinstance(binarizer, GSBAttentionBinarizer):
            if float(binarizer.alpha) <= 0:
                raise NotImplementedError(
                    f'{m}: GSB alpha must be positive to split the attention '
                    f'map into 0/1 planes, got {float(binarizer.alpha)}')
            # forward: (T0 + b1 T1 + b2 T2) a, scales clamped at 1e-5, while
            # the maps use the raw alpha (q = P / alpha)
            spec['attn'] = dict(
                type='gsb', alpha=float(binarizer.alpha),
                a=float(binarizer.alpha.clamp_min(1e-5)),
                b1=float(binarizer.beta1.clamp_min(1e-5)),
                b2=float(binarizer.beta2.clamp_min(1e-5)),
                low=float(binarizer.low), high=float(binarizer.high))
        else:
            raise NotImplementedError(f'{m}: unknown attention binarizer '
                                      f'{type(binarizer).__name__}')
        alpha, beta = bn_affine(mixer.context_norm)
        act = mixer.context_act
        wr.put(f'{m}.ctx.a', alpha)
        wr.put(f'{m}.ctx.b', beta - _d(act.bias_in))
        wr.put(f'{m}.ctx.slope', _d(act.weight))
        wr.put(f'{m}.ctx.post_bias', _d(act.bias_out))
        wr.put(f'{m}.out_mix', _d(mixer.out_mix))
        spec['proj'] = _export_proj(wr, f'{m}.proj', mixer.proj,
                                    mixer.proj_scale)
    else:
        raise NotImplementedError(f'unknown token mixer {type(mixer)}')
    spec['expand'] = _export_proj(wr, f'{prefix}.ffn.expand', blk.ffn.expand)
    spec['reduce'] = _export_proj(wr, f'{prefix}.ffn.reduce', blk.ffn.reduce,
                                  blk.ffn.layer_scale)
    spec['shift'] = _export_shifts(wr, f'{prefix}.shift', blk.shifts)
    return spec


def _export_merge(wr: _Writer, prefix: str, ds: nn.Module) -> dict:
    scale, bias = bn_affine(ds.norm_in)
    wr.put(f'{prefix}.norm_in.scale', scale)
    wr.put(f'{prefix}.norm_in.bias', bias)
    wr.put(f'{prefix}.pos_embed', ds.pos_embed.detach().double())
    alpha, beta = bn_affine(ds.norm)
    cin, cout = ds.conv.in_channels, ds.conv.out_channels
    spec = dict(prefix=prefix, cin=cin, cout=cout)
    if ds.binary:
        spec['type'] = 'binary'
        s = wr.put_binary_weight(f'{prefix}.wbits', ds.conv)
        wr.put(f'{prefix}.thr', -_d(ds.shift.bias))
        wr.put(f'{prefix}.a', s * alpha)
        wr.put(f'{prefix}.b',
               _d(ds.conv.bias, cout) * alpha + beta - _d(ds.act.bias_in))
        wr.put(f'{prefix}.slope', _d(ds.act.weight))
        wr.put(f'{prefix}.post_bias', _d(ds.act.bias_out))
    else:
        spec['type'] = 'fp'
        w = ds.conv.weight.detach().double() * alpha.view(-1, 1, 1, 1)
        wr.put(f'{prefix}.weight', w)
        wr.put(f'{prefix}.bias', _d(ds.conv.bias, cout) * alpha + beta)
    return spec


def export_backbone(backbone: nn.Module, wr: _Writer,
                    prefix: str = 'backbone') -> dict:
    """Write the tensors of a :class:`~mmbhvit.models.BHViT` into ``wr`` and
    return its graph."""
    from ..models import BHViT
    if not isinstance(backbone, BHViT):
        raise TypeError(f'expected a BHViT backbone, got {type(backbone)}')
    arch = backbone.arch
    stem = backbone.patch_embed
    alpha, beta = bn_affine(stem.norm)
    wr.put(f'{prefix}.stem.weight',
           stem.conv.weight.detach().double() * alpha.view(-1, 1, 1, 1))
    wr.put(f'{prefix}.stem.bias',
           _d(stem.conv.bias, alpha.numel()) * alpha + beta)
    wr.put(f'{prefix}.pos_embed', backbone.pos_embed.detach().double())
    stages = []
    for i, stage in enumerate(backbone.stages):
        stages.append([
            _export_block(wr, f'{prefix}.stages.{i}.{j}', blk)
            for j, blk in enumerate(stage)
        ])
    downsamples = [
        _export_merge(wr, f'{prefix}.downsamples.{i}', ds)
        for i, ds in enumerate(backbone.downsamples)
    ]
    if backbone.final_norm:
        scale, bias = bn_affine(backbone.norm)
        wr.put(f'{prefix}.norm.scale', scale)
        wr.put(f'{prefix}.norm.bias', bias)
    return dict(
        prefix=prefix,
        in_channels=backbone.in_channels,
        embed_dims=list(arch['embed_dims']),
        depths=list(arch['depths']),
        num_heads=list(arch['num_heads']),
        mlp_ratios=list(arch['mlp_ratios']),
        img_size=list(backbone.img_size),
        binary_merge=bool(backbone.binary_merge),
        out_indices=list(backbone.out_indices),
        final_norm=bool(backbone.final_norm),
        min_input_size=int(backbone.min_input_size),
        stages=stages,
        downsamples=downsamples)


def _export_head(wr: _Writer, model: nn.Module) -> Optional[dict]:
    """GAP neck + linear classification head of an mmpretrain classifier."""
    neck, head = getattr(model, 'neck', None), getattr(model, 'head', None)
    if head is None:  # a segmentor or a bare backbone
        return None
    fc = getattr(head, 'fc', None)
    if neck is None or not isinstance(fc, nn.Linear):
        warnings.warn(f'head {type(head).__name__} (neck '
                      f'{type(neck).__name__}) is not exported: only GAP + '
                      'a linear head are; the packed file holds the backbone '
                      'only and load_engine() returns feature maps')
        return None
    if type(neck).__name__ != 'GlobalAveragePooling':
        warnings.warn(f'neck {type(neck).__name__} is not exported; the '
                      'packed file holds the backbone only')
        return None
    wr.put('head.fc.weight', fc.weight.detach().double())
    wr.put('head.fc.bias', _d(fc.bias, fc.out_features))
    return dict(type='gap_linear', prefix='head.fc',
                num_classes=fc.out_features, in_channels=fc.in_features)


_SHA256_HEX = re.compile(r'^[0-9a-f]{64}$')
#: provenance digests every file records (None when unknown)
PROVENANCE_KEYS = ('config_sha256', 'checkpoint_sha256')


def _export_meta(meta: Optional[dict]) -> dict:
    """``meta`` with validated ``config_sha256`` / ``checkpoint_sha256``
    (hex SHA-256 or None; always present) and the torch version."""
    meta = dict(meta or {})
    for key in PROVENANCE_KEYS:
        value = meta.get(key)
        if isinstance(value, str):
            value = value.lower()
        if value is not None and not (isinstance(value, str)
                                      and _SHA256_HEX.match(value)):
            raise ValueError(f'export_model: meta[{key!r}] must be a hex '
                             f'SHA-256 (64 hex digits) or None, got '
                             f'{value!r}')
        meta[key] = value
    meta['torch'] = str(torch.__version__)
    return meta


def export_model(model: nn.Module,
                 param_dtype: torch.dtype = torch.float32,
                 meta: Optional[dict] = None) -> dict:
    """Export a BHViT backbone, or a model with a ``.backbone`` (mmpretrain
    classifier: the GAP + linear head is exported too; mmseg segmentor: the
    backbone only) into the deployable dict ``{'graph', 'tensors'}``
    (format version 2, sealed with its manifest and digests).

    ``meta`` is recorded in ``graph['meta']``; its ``config_sha256`` and
    ``checkpoint_sha256`` (hex SHA-256 of the resolved config text and of
    the checkpoint file, see :func:`resolved_config_sha256` and
    :func:`mmbhvit.utils.io.sha256_file`) are validated and always present
    (None when not given)."""
    from ..models import BHViT
    backbone = model if isinstance(model, BHViT) else getattr(
        model, 'backbone', None)
    if not isinstance(backbone, BHViT):
        raise TypeError('export_model needs a BHViT or a model whose '
                        f'.backbone is a BHViT, got {type(model).__name__}')
    meta = _export_meta(meta)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            wr = _Writer(param_dtype)
            graph = dict(format=FORMAT, version=VERSION,
                         sign_convention=SIGN_CONVENTION,
                         param_dtype=dtype_name(param_dtype))
            graph['arch'] = arch_spec(backbone)
            graph['backbone'] = export_backbone(backbone, wr)
            graph['head'] = (None if model is backbone else
                             _export_head(wr, model))
    finally:
        model.train(was_training)
    if wr.stats['zero_centred_weights']:
        warnings.warn(
            f"{wr.stats['zero_centred_weights']} binary weights are exactly "
            'equal to their mean (torch.sign gives 0 there, the packed file '
            '-1): the exported model can differ slightly')
    graph['stats'] = dict(wr.stats)
    graph['meta'] = meta
    # the exporter's own output must satisfy the checks of the loader
    check_graph(graph, 'the export')
    check_tensor_shapes(graph, wr.tensors, 'the export')
    sealed = seal_packed(graph, wr.tensors)
    # checked just above: save_packed and the engines need no second pass
    return VerifiedPacked(sealed['graph'], sealed['tensors'],
                          'the given dict')


def seal_packed(graph: dict, tensors: Dict[str, Tensor]) -> dict:
    """``{'graph', 'tensors'}`` with the graph's manifest (every tensor's
    shape, dtype and SHA-256), ``tensors_sha256`` and ``graph_sha256``
    (re)computed. Used by :func:`export_model`; tests use it to build files
    that are consistent but do not fit their spec."""
    graph = {
        k: v for k, v in graph.items()
        if k not in ('manifest', 'tensors_sha256', 'graph_sha256')
    }
    overall, per_tensor = digest_tensors(tensors)
    graph['manifest'] = tensor_manifest(tensors, per_tensor)
    graph['tensors_sha256'] = overall
    graph['graph_sha256'] = graph_sha256(graph)
    return dict(graph=graph, tensors=dict(tensors))


def save_packed(packed: dict, path: str):
    """Write an exported dict (see :func:`export_model`) atomically: to a
    temporary file in the same folder, fsync'ed, then renamed over ``path``.
    A dict that would not load is refused; a full disk raises
    :class:`~mmbhvit.utils.io.DiskFullError` naming the file and leaves any
    previous file at ``path`` untouched."""
    packed = load_packed(packed)  # verify before writing
    atomic_torch_save(dict(graph=packed['graph'], tensors=packed['tensors']),
                      path)


class VerifiedPacked(dict):
    """A packed dict that passed :func:`load_packed` (``source`` names the
    file); the engines do not verify it a second time."""

    def __init__(self, graph: dict, tensors: dict, source: str):
        super().__init__(graph=graph, tensors=tensors)
        self.source = source


def _reexport(what: str) -> str:
    return f'{what}; re-export it with {EXPORT_TOOL}'


def _check_manifest(manifest: dict, tensors: dict, what: str) -> None:
    errs = []
    for name in sorted(set(manifest) | set(tensors), key=str):
        m, t = manifest.get(name), tensors.get(name)
        if not isinstance(m, dict):
            errs.append(f'tensor {name!r} is not in its manifest')
        elif t is None:
            errs.append(f'it has no tensor {name!r} (its manifest lists '
                        f"shape {tuple(m.get('shape', ()))}, "
                        f"{m.get('dtype')})")
        elif not isinstance(t, Tensor):
            errs.append(f'{name!r} is a {type(t).__name__}, not a tensor')
        elif list(t.shape) != m.get('shape'):
            errs.append(f'tensor {name!r} has shape {tuple(t.shape)}, its '
                        f"manifest says {tuple(m.get('shape') or ())}")
        elif dtype_name(t.dtype) != m.get('dtype'):
            errs.append(f'tensor {name!r} has dtype {dtype_name(t.dtype)}, '
                        f"its manifest says {m.get('dtype')}")
    if errs:
        raise PackedFormatError(
            _reexport(f'{what} is corrupt or incomplete: ' +
                      first_items(errs, 4, '; ')))


def load_packed(path_or_dict) -> dict:
    """Read an exported file (weights-only loading) or take an exported
    dict, and verify it: format and version (a version-1 file is refused
    with a "re-export" message), the SHA-256 of its graph and of its
    tensors (corruption), the manifest against the tensors present
    (missing, extra, shape, dtype) and the internal consistency of the
    architecture spec. Returns a :class:`VerifiedPacked` (a dict).

    Raises:
        PackedFormatError (a ValueError): naming the file and the problem.
    """
    if isinstance(path_or_dict, VerifiedPacked):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        packed, what = path_or_dict, 'the given dict'
    else:
        path = os.fspath(path_or_dict)
        what = f'packed file {path!r}'
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} not found')
        try:
            packed = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # damaged zip, not a torch file, pickles
            msg = str(e).strip().splitlines()
            raise PackedFormatError(_reexport(
                f'{what} cannot be read ({type(e).__name__}: '
                f"{msg[0] if msg else ''}): it is truncated, corrupt or not "
                'a packed BHViT')) from e
    graph = packed.get('graph') if isinstance(packed, dict) else None
    if not isinstance(graph, dict) or graph.get('format') != FORMAT:
        raise PackedFormatError(f'{what} is not an exported packed BHViT '
                                f'(format {FORMAT!r}); write one with '
                                f'{EXPORT_TOOL}')
    version = graph.get('version')
    if version != VERSION:
        if isinstance(version, int) and version < VERSION:
            raise PackedFormatError(_reexport(
                f'{what} has the old packed format version {version} '
                '(no architecture spec, no checksums), which this mmbhvit '
                f'no longer reads (it reads version {VERSION})'))
        raise PackedFormatError(
            f'{what} has packed format version {version!r}; this mmbhvit '
            f'reads version {VERSION} (written by a newer mmbhvit? update '
            f'mmbhvit, or re-export it with this one: {EXPORT_TOOL})')
    tensors = packed.get('tensors')
    if not isinstance(tensors, dict) or not all(
            isinstance(graph.get(k), dict)
            for k in ('arch', 'backbone', 'manifest')):
        raise PackedFormatError(_reexport(
            f'{what} is incomplete: it lacks the tensors, the layer graph, '
            'the architecture spec or the manifest (a corrupt export?)'))
    try:
        graph_ok = graph.get('graph_sha256') == graph_sha256(graph)
    except (TypeError, ValueError):  # not JSON-able any more
        graph_ok = False
    if not graph_ok:
        raise PackedFormatError(
            f'{what} is corrupt: its graph (architecture spec, manifest, '
            'metadata) does not match its SHA-256 (damaged or edited after '
            f'export); copy it again or re-export it with {EXPORT_TOOL}')
    _check_manifest(graph['manifest'], tensors, what)
    overall, per_tensor = digest_tensors(tensors)
    if overall != graph.get('tensors_sha256'):
        bad = [k for k in sorted(per_tensor)
               if per_tensor[k] != graph['manifest'][k].get('sha256')]
        raise PackedFormatError(
            f'{what} is corrupt: the SHA-256 of its tensors does not match '
            f'the one recorded at export (damaged: '
            f"{', '.join(bad[:4]) or 'unknown'}"
            f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}): it "
            'changed after export (a damaged copy, download or disk); copy '
            f'it again or re-export it with {EXPORT_TOOL}')
    check_graph(graph, what)
    return VerifiedPacked(graph, tensors, what)


def resolved_config_sha256(config) -> str:
    """SHA-256 of the resolved config text (``_base_`` files merged), as
    ``Config.dump()`` writes it (``pretty_text``) for a ``.py`` config: the
    digest of the ``config.py`` a training run dumps into its work dir."""
    from mmengine.config import Config
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    return hashlib.sha256(cfg.pretty_text.encode('utf-8')).hexdigest()


def state_dict_bytes(module: nn.Module, dtype=torch.float32) -> int:
    """Bytes of ``torch.save`` of the module's float32 state dict."""
    buf = io.BytesIO()
    sd = {
        k: (v.to(dtype) if v.is_floating_point() else v)
        for k, v in module.state_dict().items()
    }
    torch.save(sd, buf)
    return buf.tell()


def size_report(packed: dict, fp32_bytes: int, packed_bytes: int) -> str:
    """Human-readable size comparison."""
    st = packed['graph']['stats']
    nb = st['binary_weights']
    lines = [
        f"binary weights: {nb:,} -> {st['packed_weight_bytes']:,} bytes "
        f"packed (float32: {4 * nb:,} bytes, "
        f"{4 * nb / max(st['packed_weight_bytes'], 1):.1f}x smaller)",
        f"other values (float, folded): {st['float_values']:,}",
        f'file: {packed_bytes:,} bytes vs float32 reference {fp32_bytes:,} '
        f'bytes ({fp32_bytes / max(packed_bytes, 1):.1f}x smaller)',
    ]
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# Command line (tools/deployment/export_binary.py)
# --------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a trained BHViT (classifier or segmentor '
        'backbone) with bit-packed 1-bit weights for the packed CPU engine')
    parser.add_argument('config', help='mmpretrain or mmseg config file')
    parser.add_argument(
        'checkpoint',
        help="trained checkpoint; 'none' exports the random initialisation "
        '(for benchmarks)')
    parser.add_argument('out',
                        help='output file (e.g. bhvit_small.packed.pth)')
    parser.add_argument(
        '--param-dtype', choices=('float32', 'float64'), default='float32',
        help='dtype of the folded per-channel parameters (float64 only for '
        'exactness tests)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = None if args.checkpoint.lower() == 'none' else args.checkpoint
    if ckpt is not None and not osp.isfile(ckpt):
        raise SystemExit(f'checkpoint not found: {ckpt}')
    from ..apis import build_model
    model = build_model(args.config, ckpt, student_only=True)
    packed = export_model(
        model, getattr(torch, args.param_dtype),
        meta=dict(config=osp.abspath(args.config),
                  checkpoint=osp.abspath(ckpt) if ckpt else None,
                  config_sha256=resolved_config_sha256(args.config),
                  checkpoint_sha256=sha256_file(ckpt) if ckpt else None))
    try:
        save_packed(packed, args.out)
    except DiskFullError as e:
        raise SystemExit(f'ERROR: {e}')
    out_bytes = os.path.getsize(args.out)
    exported = model if packed['graph']['head'] else model.backbone
    fp32 = state_dict_bytes(exported)
    print(f'wrote {args.out}')
    what = ('classifier (backbone + head)' if packed['graph']['head'] else
            'backbone')
    print(f'exported: {what}')
    print(size_report(packed, fp32, out_bytes))
    if ckpt is not None:
        print(f'checkpoint file {ckpt}: {os.path.getsize(ckpt):,} bytes '
              '(whole model, may include optimizer state)')
    meta = packed['graph']['meta']
    print(f"sha256: tensors {packed['graph']['tensors_sha256']}, config "
          f"{meta['config_sha256']}, checkpoint {meta['checkpoint_sha256']}")
    return 0
