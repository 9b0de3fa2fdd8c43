# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""CPU inference engine for an exported (bit-packed) BHViT.

:class:`PackedBHViT` runs the backbone from a file written by
:func:`mmbhvit.deploy.export.export_model`: every 1-bit layer computes on
packed words (MSGDC convolutions, the binary 1×1 projections of Q/K/V,
attention output and MLP, binary patch merging, and the q·k and P̂·v
attention products), through the C++ kernels when they are built and
through the pure-PyTorch fallback otherwise (``backend='torch'`` forces it).
The remaining float operations (stem, norms, pooling, softmax, window
layout, full-precision patch merging, classification head) are PyTorch ops.

Internally every feature map is channels-last ``(N, H, W, C)`` (the packed
dimension is the channel); the outputs are NCHW like the PyTorch backbone.
"""
import time
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .export import load_packed
from .ops import (BinaryAttention, BinaryFFN, BinaryMerge, BinaryProj,
                  MSGDCMixer, ShiftConv, float_getter, resolve_backend)
from .spec import check_tensor_shapes


class _NoLaps:
    """Profiling switched off: laps cost one method call."""

    def lap(self, key: str):
        pass


_NO_LAPS = _NoLaps()


class Laps:
    """Accumulates wall time per layer type between successive laps."""

    def __init__(self):
        self.times: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self.t = time.perf_counter()

    def restart(self):
        self.t = time.perf_counter()

    def lap(self, key: str):
        now = time.perf_counter()
        self.times[key] += now - self.t
        self.calls[key] += 1
        self.t = now


def _pad_nhwc(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the bottom/right of ``(N, H, W, C)`` to multiples."""
    h, w = x.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


class _Recorder:
    """Collects the binarization decisions of one forward pass (tests)."""

    def __init__(self):
        self.items: List[Tuple[str, Tensor]] = []

    def add(self, name: str, value: Tensor):
        self.items.append((name, value.detach().clone()))


class _BlockTail:
    """The end shared by both block kinds: binary MLP (expand + reduce
    with its shortcut ``h``), then the shift branches."""

    def build_tail(self, spec, tensors, dtype, backend) -> None:
        self.ffn = BinaryFFN(
            BinaryProj(spec['expand'], tensors, dtype, backend),
            BinaryProj(spec['reduce'], tensors, dtype, backend))
        self.shift = (ShiftConv(spec['shift'], tensors, dtype, backend)
                      if spec['shift'] else None)

    def mlp_and_shifts(self, hn: Tensor, h: Tensor, laps, rec) -> Tensor:
        out = self.ffn(hn, h)
        laps.lap('mlp expand + reduce (binary 1x1)')
        if rec is not None:
            rec.add(f'{self.name}.expand', self.ffn.expand.signs(hn))
            rec.add(f'{self.name}.reduce',
                    self.ffn.reduce.signs(self.ffn.expand(hn)))
        if self.shift is not None:
            out = self.shift(hn, out)
            laps.lap('shift branches (float)')
        return out


class _MSGDCBlock(_BlockTail):

    def __init__(self, spec, tensors, dtype, backend):
        self.name = spec['prefix']
        self.mixer = MSGDCMixer(spec, tensors, dtype, backend)
        self.build_tail(spec, tensors, dtype, backend)

    def __call__(self, x: Tensor, laps, rec) -> Tensor:
        if rec is not None:
            rec.add(f'{self.name}.msgdc', self.mixer.signs(x))
        h, hn = self.mixer(x)
        laps.lap('msgdc (binary 3x3 convs)')
        return self.mlp_and_shifts(hn, h, laps, rec)


class _MSMHABlock(_BlockTail):

    def __init__(self, spec, tensors, dtype, backend):
        p = spec['prefix']
        self.name = p
        t = float_getter(tensors, p, dtype)
        self.n1_scale, self.n1_bias = t('norm1.scale'), t('norm1.bias')
        self.n2_scale, self.n2_bias = t('norm2.scale'), t('norm2.bias')
        self.mix = t('mixer.merge_mix')
        self.rest = (1 - self.mix).contiguous()
        self.merge_mix = self.mix.view(1, -1, 1, 1)
        self.merge_rest = self.rest.view(1, -1, 1, 1)
        self.ln_weight = t('mixer.token_norm.weight')
        self.ln_bias = t('mixer.token_norm.bias')
        self.ln_eps = float(spec['token_norm_eps'])
        self.out_mix = t('mixer.out_mix')
        self.out_rest = (1 - self.out_mix).contiguous()
        self.s = int(spec['window_size'])
        self.q, self.k, self.v = (BinaryProj(spec[n], tensors, dtype, backend)
                                  for n in 'qkv')
        self.attn = BinaryAttention(spec, tensors, dtype, backend)
        self.ext = self.attn.ext
        self.proj = BinaryProj(spec['proj'], tensors, dtype, backend)
        self.build_tail(spec, tensors, dtype, backend)

    def tokens(self, x: Tensor) -> Tuple[Tensor, tuple]:
        """Norm1, window partition and merged tokens, LayerNorm."""
        n, h, w, c = x.shape
        s = self.s
        if self.ext is not None:
            tok = self.ext.attn_tokens(x, self.n1_scale, self.n1_bias,
                                       self.mix, self.rest, s)
            tok = F.layer_norm(tok, (c, ), self.ln_weight, self.ln_bias,
                               self.ln_eps)
            return tok, (n, h, w, c, -(-h // s), -(-w // s))
        xn = x * self.n1_scale
        xn = _pad_nhwc(xn + self.n1_bias, s)
        hp, wp = xn.shape[1:3]
        nh, nw = hp // s, wp // s
        wins = xn.view(n, nh, s, nw, s, c).permute(0, 1, 3, 2, 4, 5).reshape(
            n * nh * nw, s * s, c)
        xc = xn.permute(0, 3, 1, 2)
        mx = F.max_pool2d(xc, s, s, padding=s // 2)
        av = F.avg_pool2d(xc, s, s, padding=s // 2, count_include_pad=True)
        merged = self.merge_mix * mx + self.merge_rest * av  # (n, c, nh, nw)
        merged = merged.permute(0, 2, 3, 1).reshape(n, 1, nh * nw, c)
        merged = merged.expand(n, nh * nw, nh * nw, c).reshape(
            n * nh * nw, nh * nw, c)
        tok = torch.cat([wins, merged], dim=1)
        tok = F.layer_norm(tok, (c, ), self.ln_weight, self.ln_bias,
                           self.ln_eps)
        return tok, (n, h, w, c, nh, nw)

    def untokens(self, a: Tensor, shape: tuple) -> Tensor:
        """Window tokens back in place, merged tokens averaged over windows
        and upsampled, mixed per channel, cropped."""
        n, h, w, c, nh, nw = shape
        s = self.s
        if self.ext is not None:
            return self.ext.attn_untokens(a, self.out_mix, self.out_rest, n,
                                          h, w, s)
        win = a[:, :s * s].reshape(n, nh, nw, s, s, c)
        win = win.permute(0, 1, 3, 2, 4, 5)
        per_window = a[:, s * s:].reshape(n, nh * nw, nh, nw, c)
        merged = per_window[:, 0]
        for i in range(1, nh * nw):  # left to right, as the kernel
            merged = merged + per_window[:, i]
        merged = merged / (nh * nw)
        out = win * self.out_mix + merged.view(n, nh, 1, nw, 1,
                                               c) * self.out_rest
        return out.reshape(n, nh * s, nw * s, c)[:, :h, :w].contiguous()

    def __call__(self, x: Tensor, laps, rec) -> Tensor:
        tok, shape = self.tokens(x)
        laps.lap('attention tokens: norm, windows, pooling, LN (float)')
        q, k, v = self.q(tok), self.k(tok), self.v(tok)
        laps.lap('attention q/k/v (binary 1x1)')
        scores = self.attn.scores(q, k)
        laps.lap('attention q.k (binary)')
        probs = torch.softmax(scores, dim=-1)
        laps.lap('attention softmax (float)')
        a = self.attn.context(probs, q, k, v)
        laps.lap('attention P.v (bit planes)')
        if rec is not None:
            rec.add(f'{self.name}.qkv_in', torch.stack(
                [p.signs(tok) for p in (self.q, self.k, self.v)]))
            rec.add(f'{self.name}.q', q > self.attn.thr_q)
            rec.add(f'{self.name}.k', k > self.attn.thr_k)
            rec.add(f'{self.name}.v', v > self.attn.thr_v)
            rec.add(f'{self.name}.attn_levels', self.attn.levels_of(probs))
        out = self.untokens(a, shape)
        laps.lap('attention tokens: norm, windows, pooling, LN (float)')
        if rec is not None:
            rec.add(f'{self.name}.proj', self.proj.signs(out))
        h = self.proj(out, residual=x)
        laps.lap('attention proj (binary 1x1)')
        hn = h * self.n2_scale
        hn = hn + self.n2_bias
        laps.lap('norms (float)')
        return self.mlp_and_shifts(hn, h, laps, rec)


class _FPMerge:
    """Full-precision patch merging (BatchNorms folded into the conv)."""

    def __init__(self, spec, tensors, dtype, backend):
        p = spec['prefix']
        t = float_getter(tensors, p, dtype)
        self.in_scale, self.in_bias = t('norm_in.scale'), t('norm_in.bias')
        self.weight, self.bias = t('weight'), t('bias')

    def __call__(self, x0: Tensor, pos: Tensor) -> Tensor:
        y = F.conv2d(x0.permute(0, 3, 1, 2), self.weight, self.bias, stride=2)
        return (y.permute(0, 2, 3, 1) + pos).contiguous()


class _BinaryMerge(BinaryMerge):

    def __init__(self, spec, tensors, dtype, backend):
        super().__init__(spec, tensors, dtype, backend)
        p = spec['prefix']
        t = float_getter(tensors, p, dtype)
        self.in_scale, self.in_bias = t('norm_in.scale'), t('norm_in.bias')


class PackedBHViT(nn.Module):
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
        g = packed['graph']['backbone']
        tensors = packed['tensors']
        # every tensor's shape and dtype against the spec, once, before any
        # layer (C++ or PyTorch backend) reads one
        check_tensor_shapes(packed['graph'], tensors, packed.source)
        self.source = packed.source
        self.graph = packed['graph']
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype
        self.memory_format = (torch.channels_last if channels_last else
                              torch.contiguous_format)
        self.backend = resolve_backend(backend)
        p = g['prefix']
        t = float_getter(tensors, p, dtype)
        self.in_channels = g['in_channels']
        self.embed_dims = tuple(g['embed_dims'])
        self.out_indices = tuple(g['out_indices'])
        self.final_norm = g['final_norm']
        self.min_input_size = g['min_input_size']
        self.stem_weight, self.stem_bias = t('stem.weight'), t('stem.bias')
        self.pos_embeds = [t('pos_embed')] + [
            t(f'downsamples.{i}.pos_embed') for i in range(3)
        ]
        self.stages = [[
            (_MSGDCBlock if b['type'] == 'msgdc' else _MSMHABlock)(
                b, tensors, dtype, self.backend) for b in stage
        ] for stage in g['stages']]
        self.downsamples = [
            (_BinaryMerge if d['type'] == 'binary' else _FPMerge)(
                d, tensors, dtype, self.backend) for d in g['downsamples']
        ]
        if self.final_norm:
            self.norm_scale, self.norm_bias = t('norm.scale'), t('norm.bias')
        # resized positional embeddings of the last few input sizes
        self._pos_cache: 'OrderedDict[tuple, Tensor]' = OrderedDict()
        self.laps: Optional[Laps] = None
        self.recorder: Optional[_Recorder] = None

    #: input sizes whose resized positional embeddings are kept
    POS_CACHE_SIZES = 8

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

    # ------------------------------------------------------------------
    def _pos(self, i: int, h: int, w: int) -> Tensor:
        """Positional embedding ``i`` at ``h × w``, channels-last (bicubic
        resize like the PyTorch model, cached per size)."""
        key = (i, h, w)
        pos = self._pos_cache.get(key)
        if pos is None:
            pe = self.pos_embeds[i]
            if tuple(pe.shape[-2:]) != (h, w):
                pe = F.interpolate(pe, size=(h, w), mode='bicubic',
                                   align_corners=False)
            pos = pe[0].permute(1, 2, 0).contiguous()
            self._pos_cache[key] = pos
            # bounded: keep-ratio inference sees a new size per image
            while len(self._pos_cache) > self.POS_CACHE_SIZES * 4:
                self._pos_cache.popitem(last=False)
        else:
            self._pos_cache.move_to_end(key)
        return pos

    def _check_input(self, x: Tensor):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError('PackedBHViT expects a 4-D image batch (N, C, H, '
                             f'W), got {getattr(x, "shape", type(x))}')
        if x.device.type != 'cpu':
            raise ValueError('the packed engine runs on the CPU; got an input '
                             f'on {x.device}')
        if x.shape[0] == 0:
            raise ValueError('PackedBHViT got an empty batch (N = 0)')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'PackedBHViT was exported for '
                             f'{self.in_channels} input channels, got '
                             f'{x.shape[1]}')
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f'PackedBHViT needs images of at least '
                             f'{self.min_input_size}x{self.min_input_size}, '
                             f'got {x.shape[-2]}x{x.shape[-1]}')
        # the backbone's test and message (NaN / inf -> NonFiniteError)
        from ..models.finite import check_finite_input
        check_finite_input(x, 'PackedBHViT')

    def forward_nhwc(self, x: Tensor) -> List[Tensor]:
        """Channels-last outputs ``(N, H, W, C)`` for ``out_indices``."""
        self._check_input(x)
        laps = self.laps if self.laps is not None else _NO_LAPS
        rec = self.recorder
        if self.laps is not None:
            self.laps.restart()
        x = x.to(self.dtype)
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = F.gelu(F.conv2d(x, self.stem_weight, self.stem_bias, stride=4))
        x = x.permute(0, 2, 3, 1) + self._pos(0, *x.shape[-2:])
        x = x.contiguous()
        laps.lap('stem (float)')
        outs = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                ds = self.downsamples[i - 1]
                x0 = x * ds.in_scale
                x0 = _pad_nhwc(x0 + ds.in_bias, 2)
                pos = self._pos(i, x0.shape[1] // 2, x0.shape[2] // 2)
                if rec is not None and isinstance(ds, _BinaryMerge):
                    rec.add(f'downsamples.{i - 1}', ds.signs(x0))
                x = ds(x0, pos)
                laps.lap('patch merging ' + (
                    '(binary)' if isinstance(ds, _BinaryMerge) else '(float)'))
            for blk in stage:
                x = blk(x, laps, rec)
            if i in self.out_indices:
                out = x
                if i == 3 and self.final_norm:
                    out = x * self.norm_scale
                    out = out + self.norm_bias
                    laps.lap('norms (float)')
                outs.append(out)
        return outs

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        outs = self.forward_nhwc(x)
        res = tuple(
            o.permute(0, 3, 1, 2).to(self.out_dtype).contiguous(
                memory_format=self.memory_format) for o in outs)
        if self.laps is not None:
            self.laps.lap('layout (NHWC -> NCHW outputs)')
        return res

    # ------------------------------------------------------------------
    def profile(self, enabled: bool = True) -> Optional[Laps]:
        """Start (or stop) accumulating time per layer type; returns the
        accumulator (``.times``, ``.calls``)."""
        self.laps = Laps() if enabled else None
        return self.laps

    def record(self, enabled: bool = True) -> Optional[_Recorder]:
        """Record every binarization decision of the following forward
        passes (sign bits, attention levels), for exactness statistics."""
        self.recorder = _Recorder() if enabled else None
        return self.recorder

    def extra_repr(self) -> str:
        depths = [len(s) for s in self.stages]
        return (f'embed_dims={self.embed_dims}, depths={depths}, '
                f'backend={self.backend!r}, dtype={self.dtype}')


class PackedClassifier(nn.Module):
    """Packed backbone + global average pooling + linear head (an exported
    mmpretrain ``ImageClassifier``); ``forward(x)`` gives the logits."""

    def __init__(self, packed: Union[str, dict],
                 dtype: torch.dtype = torch.float32, backend: str = 'auto'):
        super().__init__()
        packed = load_packed(packed)
        head = packed['graph'].get('head')
        if not head:
            raise ValueError('the packed file has no classification head '
                             '(exported from a backbone or a segmentor)')
        self.backbone = PackedBHViT(packed, dtype, backend)
        if 3 not in self.backbone.out_indices:
            raise ValueError('the classifier needs the stage-4 output')
        self._last = self.backbone.out_indices.index(3)
        t = packed['tensors']
        self.fc_weight = t[f"{head['prefix']}.weight"].to(dtype).contiguous()
        self.fc_bias = t[f"{head['prefix']}.bias"].to(dtype).contiguous()
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone.forward_nhwc(x)[self._last]
        out = F.linear(feats.mean(dim=(1, 2)), self.fc_weight, self.fc_bias)
        if self.backbone.laps is not None:
            self.backbone.laps.lap('head: pooling + linear (float)')
        return out


def load_engine(packed: Union[str, dict], dtype: torch.dtype = torch.float32,
                backend: str = 'auto') -> nn.Module:
    """A :class:`PackedClassifier` if the file has a head, else a
    :class:`PackedBHViT`."""
    packed = load_packed(packed)
    cls = PackedClassifier if packed['graph'].get('head') else PackedBHViT
    return cls(packed, dtype, backend)
