# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""CPU inference engine for an exported (bit-packed) BHViT.

:class:`PackedBHViT` runs the backbone from a file written by
:func:`mmbhvit.deploy.export.export_model`. This module holds what belongs
to the backbone itself (:class:`BackboneSpec`, its handler and the stage
loop); every block kind is a packed op of :mod:`mmbhvit.deploy.blocks`
built from its spec through the registry (:mod:`mmbhvit.deploy.registry`),
running the C++ kernels when they are built and the pure-PyTorch fallback
otherwise (``backend='torch'`` forces it).

Internally every feature map is channels-last ``(N, H, W, C)`` (the packed
dimension is the channel); the outputs are NCHW like the PyTorch backbone.
Profiling (:meth:`PackedBHViT.profile`) and the recording of binarization
decisions (:meth:`PackedBHViT.record`) are forward hooks on the ops.
"""
import time
from collections import defaultdict
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..models import BHViT
from .blocks import BlockSpec, HeadSpec, MergeSpec, StemSpec
from .export import BACKBONE_PATH, HEAD_PATH, load_packed
from .ops import PackedOp, PosEmbed, named_ops, resolve_backend
from .registry import (Folder, Handler, Params, Spec, TensorSpec, build,
                       describe, param, register)
from .spec import check_tensor_shapes, parse_graph



def _uniform(values):
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


@dataclass
class BackboneSpec(Spec):
    """The complete architecture of a BHViT backbone: a summary of its
    options (what :func:`~mmbhvit.deploy.spec.diff_specs` reports first)
    and the specs of its stem, blocks and patch mergings."""
    kind = 'BHViT'
    in_channels: int
    img_size: List[int]
    embed_dims: List[int]
    depths: List[int]
    num_heads: List[int]
    mlp_ratios: List[int]
    window_size: Any
    attn_binarizer: Any
    binary_merge: bool
    shift3: Any
    shift5: Any
    recu: Any
    layer_scale: Any
    weight_bits: Any
    act_bits: Any
    out_indices: List[int]
    final_norm: bool
    min_input_size: int
    pos_size: List[int]
    patch_embed: StemSpec
    downsamples: List[MergeSpec]
    stages: List[List[BlockSpec]]

    def tensors(self) -> Dict[str, TensorSpec]:
        t = {'pos_embed': param(1, self.embed_dims[0], *self.pos_size)}
        if self.final_norm:
            t['norm.scale'] = param(self.embed_dims[-1])
            t['norm.bias'] = param(self.embed_dims[-1])
        return t

    def errors(self) -> List[str]:
        """The summary against the specs of the blocks."""
        errs = []
        for k in ('embed_dims', 'depths', 'num_heads', 'mlp_ratios'):
            v = getattr(self, k)
            if not (isinstance(v, list) and len(v) == 4 and all(
                    isinstance(i, int) and i > 0 for i in v)):
                errs.append(f'arch.{k} must be 4 positive ints, got {v!r}')
        if errs:
            return errs
        dims, heads = self.embed_dims, self.num_heads
        stages, merges = self.stages, self.downsamples
        if not isinstance(stages, list) or len(stages) != 4 or not all(
                isinstance(s, list) for s in stages):
            return ['arch.stages must list 4 stages']
        if not isinstance(merges, list) or len(merges) != 3:
            return ['arch.downsamples must list 3 patch mergings']
        if [len(s) for s in stages] != self.depths:
            errs.append(f'arch.depths {self.depths} but the stages hold '
                        f'{[len(s) for s in stages]} blocks')
        radii = [r for r, on in ((1, self.shift3), (2, self.shift5)) if on]
        for i, stage in enumerate(stages):
            c = dims[i]
            for j, b in enumerate(stage):
                where = f'arch.stages[{i}][{j}]'
                if not isinstance(b, BlockSpec):
                    errs.append(f'{where} is not a block spec')
                    continue
                if b.channels != c:
                    errs.append(f'{where}.channels {b.channels} != '
                                f'embed_dims[{i}] {c}')
                hidden = b.ffn.expand.cout
                if hidden != c * self.mlp_ratios[i]:
                    errs.append(f'{where}.mlp hidden width {hidden} != {c} '
                                f'x mlp_ratios[{i}] {self.mlp_ratios[i]}')
                m = b.token_mixer
                if m.kind == 'msmha':
                    if m.num_heads != heads[i]:
                        errs.append(f'{where}.num_heads {m.num_heads} != '
                                    f'num_heads[{i}] {heads[i]}')
                    if m.window_size != self.window_size:
                        errs.append(f'{where}.window_size {m.window_size} '
                                    '!= arch.window_size '
                                    f'{self.window_size}')
                    kind = (m.attention or {}).get('binarizer')
                    if kind != self.attn_binarizer:
                        errs.append(f'{where}.attention {m.attention!r} but '
                                    'arch.attn_binarizer is '
                                    f'{self.attn_binarizer!r}')
                have = b.shifts.radii if b.shifts is not None else []
                if have != radii:
                    errs.append(f'{where}.shift_radii {have!r} disagree with '
                                f'shift3={self.shift3!r}, '
                                f'shift5={self.shift5!r}')
        for i, m in enumerate(merges):
            where = f'arch.downsamples[{i}]'
            if not isinstance(m, MergeSpec):
                errs.append(f'{where} is not a merge spec')
                continue
            if (m.cin, m.cout) != (dims[i], dims[i + 1]):
                errs.append(f'{where}: {m.cin} -> {m.cout} channels, '
                            f'embed_dims say {dims[i]} -> {dims[i + 1]}')
            if m.binary != self.binary_merge:
                errs.append(f'{where}.binary {m.binary!r} but binary_merge='
                            f'{self.binary_merge!r}')
        out = self.out_indices
        if not (isinstance(out, list) and out and len(set(out)) == len(out)
                and all(isinstance(i, int) and 0 <= i < 4 for i in out)):
            errs.append(f'arch.out_indices must be distinct stages 0..3, got '
                        f'{out!r}')
        stem = self.patch_embed
        if not isinstance(stem, StemSpec) or (
                stem.in_channels, stem.channels) != (self.in_channels,
                                                     dims[0]):
            errs.append(f'arch.patch_embed {stem!r} does not map '
                        f'{self.in_channels} input channels to embed_dims[0]'
                        f' {dims[0]}')
        return errs


class _Engine(nn.Module):
    """What the engine modules share: no parameters to move (moves that
    would change the tensors are refused), hook-based profiling and
    recording."""
    profile_label = 'engine: norms, positional embeddings, layout (float)'

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()`` ... reach the engine through
        the model around it; its tensors are not parameters, so refuse what
        would change them instead of ignoring it (CPU moves are no-ops)."""
        probe = fn(torch.zeros(1, dtype=self.dtype))
        if probe.device.type != 'cpu' or probe.dtype != self.dtype:
            raise RuntimeError(
                f'the packed engine stays on the CPU in {self.dtype} '
                f'(asked for {probe.dtype} on {probe.device}); build it '
                'with PackedBHViT(..., dtype=...) instead')
        return self

    def profile(self, enabled: bool = True) -> Optional['Profile']:
        """Start (or stop) accumulating wall time per op kind (exclusive
        time of each op's ``profile_label``, through hooks on the ops);
        returns the accumulator (``.times``, ``.calls``; the engine's own
        float work between the ops under its ``profile_label``)."""
        old = getattr(self, '_profile', None)
        if old is not None:
            old.remove()
        self._profile = Profile(self) if enabled else None
        return self._profile

    def record(self, enabled: bool = True) -> Optional['Recorder']:
        """Record every binarization decision of the following forward
        passes (sign bits, attention levels), for exactness statistics."""
        old = getattr(self, '_recorder', None)
        if old is not None:
            old.remove()
        self._recorder = Recorder(self) if enabled else None
        return self._recorder


class Profile:
    """Wall time per ``profile_label`` of the engine and its ops; each
    one's time excludes that of the ops it calls."""

    def __init__(self, root: nn.Module):
        self.times: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self._stack: List[str] = []
        self._t = 0.0
        self._handles = [
            root.register_forward_pre_hook(self._enter_root),
            root.register_forward_hook(self._leave)
        ]
        for _, op in named_ops(root):
            remove = op.add_hooks(self._enter, self._leave)
            self._handles.append(SimpleNamespace(remove=remove))

    def _enter_root(self, module, args):
        self._stack.clear()  # a forward that raised leaves its stack
        self._enter(module, args)

    # Each hook reads the clock on entry and again on exit: its own
    # bookkeeping is counted to neither the op nor its caller.
    def _enter(self, module, args):
        now = time.perf_counter()
        if self._stack:
            self.times[self._stack[-1]] += now - self._t
        self._stack.append(module.profile_label)
        self._t = time.perf_counter()

    def _leave(self, module, args, out):
        now = time.perf_counter()
        label = self._stack.pop() if self._stack else module.profile_label
        self.times[label] += now - self._t
        self.calls[label] += 1
        self._t = time.perf_counter()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class Recorder:
    """The binarization decisions of the ops (their ``decisions(*inputs)``)
    in execution order: ``items`` = ``[(name, tensor)]``. Taken before each
    op runs: an op may write its result over an input it is given as
    ``out`` (:class:`~mmbhvit.deploy.ops.PackedOp`)."""

    def __init__(self, root: nn.Module):
        self.items: List[Tuple[str, Tensor]] = []
        self._handles = []
        for name, op in named_ops(root):
            if callable(getattr(op, 'decisions', None)):
                remove = op.add_hooks(pre=lambda op, args, name=name:
                                      self._add(name, op.decisions(*args)))
                self._handles.append(SimpleNamespace(remove=remove))

    def _add(self, name: str, decisions: Dict[str, Tensor]):
        for key, value in decisions.items():
            self.items.append((f'{name}.{key}' if key else name,
                               value.detach().clone()))

    def add(self, name: str, value: Tensor):
        self.items.append((name, value.detach().clone()))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class PackedBHViT(_Engine):
    """The packed BHViT backbone: ``forward(x)`` → tuple of NCHW maps for
    the exported ``out_indices`` (a drop-in for the PyTorch backbone).

    Args:
        packed (str | dict): exported file or dict.
        dtype (torch.dtype): float32 (deployment) or float64 (to check the
            packed arithmetic against a float64 PyTorch model).
        backend (str): ``'auto'`` (C++ kernels if built), ``'cpp'`` or
            ``'torch'`` (pure-PyTorch fallback on the same packed bits).
        out_dtype (torch.dtype, optional): dtype of the returned maps
            (default ``dtype``), e.g. float32 for float32 heads.
        channels_last (bool): return the maps in channels-last memory
            (NCHW shape, NHWC strides): the engine's own layout, so no copy,
            and the faster layout for channels-last heads. Default False
            (contiguous NCHW, like the PyTorch backbone).
    """

    def __init__(self, packed: Union[str, dict],
                 dtype: torch.dtype = torch.float32, backend: str = 'auto',
                 out_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False):
        super().__init__()
        if dtype not in (torch.float32, torch.float64) or (
                out_dtype is not None and not out_dtype.is_floating_point):
            raise ValueError('the packed engine computes in float32 or '
                             f'float64, got dtype={dtype}, out_dtype='
                             f'{out_dtype}')
        packed = load_packed(packed)  # verified once (digests, spec)
        # every tensor's shape and dtype against the spec, once, before any
        # op (C++ or PyTorch backend) reads one
        check_tensor_shapes(packed['graph'], packed['tensors'],
                            packed.source)
        spec, _ = parse_graph(packed['graph'], packed.source)
        self.source = packed.source
        self.graph = packed['graph']
        self.spec = spec
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype
        self.memory_format = (torch.channels_last if channels_last else
                              torch.contiguous_format)
        self.backend = resolve_backend(backend)
        self.in_channels = spec.in_channels
        self.embed_dims = tuple(spec.embed_dims)
        self.out_indices = tuple(spec.out_indices)
        self.final_norm = spec.final_norm
        self.min_input_size = spec.min_input_size
        p = Params(packed['tensors'], BACKBONE_PATH, dtype)
        be = self.backend
        self.patch_embed = build(spec.patch_embed, p.child('patch_embed'),
                                 dtype, be)
        self.pos_embed = PosEmbed(p.f('pos_embed'))
        self.downsamples = [
            build(d, p.child(f'downsamples.{i}'), dtype, be)
            for i, d in enumerate(spec.downsamples)
        ]
        self.stages = [[
            build(b, p.child(f'stages.{i}.{j}'), dtype, be)
            for j, b in enumerate(stage)
        ] for i, stage in enumerate(spec.stages)]
        if self.final_norm:
            self.norm_scale, self.norm_bias = p.f('norm.scale'), p.f(
                'norm.bias')

    def pos_embeds(self) -> List[PosEmbed]:
        """The positional embeddings (stem, then each patch merging)."""
        return [self.pos_embed] + [d.pos for d in self.downsamples]

    def _check_input(self, x: Tensor) -> Tensor:
        # the backbone's checks and messages, then what only the engine needs
        from ..models.backbones.bhvit import check_image_batch
        check_image_batch(x, 'PackedBHViT', self.in_channels,
                          self.min_input_size)
        if x.device.type != 'cpu':
            raise ValueError('the packed engine runs on the CPU; got an input '
                             f'on {x.device}')
        # the backbone's test and message (NaN / inf -> NonFiniteError)
        from ..models.finite import check_finite_input
        check_finite_input(x, 'PackedBHViT')
        return x.to(self.dtype)

    def forward_nhwc(self, x: Tensor) -> List[Tensor]:
        """Channels-last outputs ``(N, H, W, C)`` for ``out_indices``."""
        x = self._check_input(x)
        # the stem's output size: its input zero-padded to multiples of 4
        pos = self.pos_embed(-(-x.shape[2] // 4), -(-x.shape[3] // 4))
        x = self.patch_embed(x, pos)
        outs = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            for blk in stage:
                x = blk(x)
            if i in self.out_indices:
                out = x
                if i == 3 and self.final_norm:
                    out = x * self.norm_scale
                    out = out + self.norm_bias
                outs.append(out)
        return outs

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(
            o.permute(0, 3, 1, 2).to(self.out_dtype).contiguous(
                memory_format=self.memory_format)
            for o in self.forward_nhwc(x))

    def extra_repr(self) -> str:
        depths = [len(s) for s in self.stages]
        return (f'embed_dims={self.embed_dims}, depths={depths}, '
                f'backend={self.backend!r}, dtype={self.dtype}')


@register(BHViT)
class BHViTHandler(Handler):
    """The root of the tree: its op is the engine (:class:`PackedBHViT`),
    built from a whole file rather than by :func:`~.registry.build`."""
    spec = BackboneSpec

    def describe(self, backbone: BHViT) -> BackboneSpec:
        stages = [[describe(b, f'stages.{i}.{j}') for j, b in
                   enumerate(stage)] for i, stage in
                  enumerate(backbone.stages)]
        blocks = [b for s in stages for b in s]
        mixers = [b.token_mixer for b in blocks]
        msmha = [m for m in mixers if m.kind == 'msmha']
        radii = _uniform(b.shifts.radii if b.shifts is not None else []
                         for b in blocks)
        att = _uniform(m.attention for m in msmha)
        expands = [b.ffn.expand for b in blocks]
        return BackboneSpec(
            in_channels=int(backbone.in_channels),
            img_size=list(backbone.img_size),
            embed_dims=[int(v) for v in backbone.arch['embed_dims']],
            depths=[len(s) for s in stages],
            num_heads=[int(v) for v in backbone.arch['num_heads']],
            mlp_ratios=[int(v) for v in backbone.arch['mlp_ratios']],
            window_size=_uniform(m.window_size for m in msmha),
            attn_binarizer=(att.get('binarizer') if isinstance(att, dict) else
                            att),
            binary_merge=bool(backbone.binary_merge),
            shift3=_has_radius(radii, 1),
            shift5=_has_radius(radii, 2),
            recu=_uniform(p.recu for p in expands),
            layer_scale=_uniform(b.ffn.layer_scale for b in blocks),
            weight_bits=_uniform(p.weight_bits for p in expands),
            act_bits=_uniform(p.act_bits for p in expands),
            out_indices=[int(i) for i in backbone.out_indices],
            final_norm=bool(backbone.final_norm),
            min_input_size=int(backbone.min_input_size),
            pos_size=list(backbone.pos_embed.shape[-2:]),
            patch_embed=describe(backbone.patch_embed, 'patch_embed'),
            downsamples=[describe(d, f'downsamples.{i}')
                         for i, d in enumerate(backbone.downsamples)],
            stages=stages)

    def fold(self, backbone: BHViT, spec: BackboneSpec, out: Folder) -> None:
        from .blocks.norm import bn_affine
        out.fold('patch_embed', backbone.patch_embed, spec.patch_embed)
        out.put('pos_embed', backbone.pos_embed.detach().double())
        for i, stage in enumerate(backbone.stages):
            for j, blk in enumerate(stage):
                out.fold(f'stages.{i}.{j}', blk, spec.stages[i][j])
        for i, ds in enumerate(backbone.downsamples):
            out.fold(f'downsamples.{i}', ds, spec.downsamples[i])
        if backbone.final_norm:
            scale, bias = bn_affine(backbone.norm)
            out.put('norm.scale', scale)
            out.put('norm.bias', bias)


class PackedClassifier(_Engine):
    """Packed backbone + global average pooling + linear head (an exported
    mmpretrain ``ImageClassifier``); ``forward(x)`` gives the logits."""

    def __init__(self, packed: Union[str, dict],
                 dtype: torch.dtype = torch.float32, backend: str = 'auto'):
        super().__init__()
        packed = load_packed(packed)
        _, head = parse_graph(packed['graph'], packed.source)
        if head is None:
            raise ValueError('the packed file has no classification head '
                             '(exported from a backbone or a segmentor)')
        self.backbone = PackedBHViT(packed, dtype, backend)
        if 3 not in self.backbone.out_indices:
            raise ValueError('the classifier needs the stage-4 output')
        self._last = self.backbone.out_indices.index(3)
        self.dtype = dtype
        self.head = build(head, Params(packed['tensors'], HEAD_PATH, dtype),
                          dtype, self.backbone.backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.forward_nhwc(x)[self._last])


def load_engine(packed: Union[str, dict], dtype: torch.dtype = torch.float32,
                backend: str = 'auto') -> nn.Module:
    """A :class:`PackedClassifier` if the file has a head, else a
    :class:`PackedBHViT`."""
    packed = load_packed(packed)
    cls = PackedClassifier if packed['graph'].get('head') else PackedBHViT
    return cls(packed, dtype, backend)


__all__ = [
    'BackboneSpec', 'PackedBHViT', 'PackedClassifier', 'load_engine',
    'Profile', 'Recorder', 'HeadSpec', 'PackedOp', 'BACKBONE_PATH',
    'HEAD_PATH'
]
