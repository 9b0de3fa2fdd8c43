# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The binary layers of the packed engine, each with two implementations of
the same arithmetic:

* ``'cpp'`` – the C++ extension ``mmbhvit._binary_ops``: sign bits packed in
  64-bit words, ±1 products as XNOR (XOR) / AND + popcount, float epilogues
  fused (see ``csrc/``);
* ``'torch'`` – a pure-PyTorch fallback that unpacks the *same* packed words
  with bit operations into ±1 floats and uses float matmul / convolution.
  ±1 products summed in float are exact integers (below 2**24), and the
  epilogue performs the same float operations in the same order as the C++
  code (which is built without FMA contraction), so both give the same
  numbers.

Every layer takes and returns channels-last tensors: tokens ``(..., C)`` or
maps ``(N, H, W, C)``.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import bits_to_pm1, pack_bits, unpack_bits

BACKENDS = ('cpp', 'torch')
SHORTCUTS = {'none': 0, 'identity': 1, 'tile': 2, 'mean': 3}
ATTN_MODES = {'lsq': 0, 'gsb': 1}

_EXT = None
_EXT_ERROR: Optional[str] = None
_EXT_TRIED = False


def load_extension():
    """The compiled kernels, or None (the reason is in
    :func:`extension_error`)."""
    global _EXT, _EXT_ERROR, _EXT_TRIED
    if not _EXT_TRIED:
        _EXT_TRIED = True
        try:
            from .. import _binary_ops
            _EXT = _binary_ops
        except ImportError as e:  # not built (no compiler at install time)
            _EXT_ERROR = f'{type(e).__name__}: {e}'
    return _EXT


def extension_available() -> bool:
    return load_extension() is not None


def extension_error() -> Optional[str]:
    load_extension()
    return _EXT_ERROR


def resolve_backend(backend: str = 'auto') -> str:
    """``'auto'`` → ``'cpp'`` when the extension is built, else ``'torch'``."""
    if backend == 'auto':
        return 'cpp' if extension_available() else 'torch'
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got "
                         f'{backend!r}')
    if backend == 'cpp' and not extension_available():
        raise RuntimeError(
            'the packed-bit C++ kernels (mmbhvit._binary_ops) are not '
            f'available ({extension_error()}); reinstall with a C++ compiler: '
            'pip install -e . --no-deps --no-build-isolation, or use '
            "backend='torch'")
    return backend


def weight_bits(words: Tensor, taps: int, cin: int) -> Tensor:
    """File layout (dense bits per output, ``(out, words(taps * cin))``) →
    bool ``(out, taps, cin)``."""
    return unpack_bits(words, taps * cin).view(words.shape[0], taps, cin)


def kernel_words(words: Tensor, taps: int, cin: int) -> Tensor:
    """File layout → kernel layout ``(taps, words(cin), out_pad)``: each
    tap's input bits start a new word, outputs are zero-padded to a multiple
    of 8 (eight outputs per 512-bit register)."""
    per_tap = pack_bits(weight_bits(words, taps, cin))  # (out, taps, w)
    cout, _, w = per_tap.shape
    cp = (cout + 7) // 8 * 8
    out = per_tap.new_zeros(taps, w, cp)
    out[:, :, :cout] = per_tap.permute(1, 2, 0)
    return out.contiguous()


def lane_path_shape(channels: int, groups: int) -> bool:
    """MSGDC shapes with a lane-parallel kernel (AVX-512 and AVX2): 4 groups
    of 16 or 32 channels (one 16/32-bit lane per output and tap)."""
    return groups == 4 and channels // 4 in (16, 32) and 512 % channels == 0


def lane_words(words: Tensor, cg: int) -> Tensor:
    """MSGDC weights for the lane path: ``(9, nvec, 8)`` words; 512-bit
    register ``v`` of tap ``t`` holds in its ``cg``-bit lane ``j`` the weight
    bits of output ``v * 512 / cg + j``."""
    c = words.shape[0]
    nl = 512 // cg
    nvec = -(-c // nl)
    bits = weight_bits(words, 9, cg).permute(1, 0, 2)  # (9, C, cg)
    pad = bits.new_zeros(9, nvec * nl - c, cg)
    bits = torch.cat([bits, pad], 1).reshape(9, nvec, nl * cg)
    return pack_bits(bits).contiguous()


def pm1_weight(words: Tensor, taps: int, cin: int, dtype) -> Tensor:
    """File layout → ±1 ``(out, taps, cin)`` of ``dtype``."""
    return bits_to_pm1(weight_bits(words, taps, cin), dtype)


def packed_tensor(tensors: dict, key: str) -> Tensor:
    """``tensors[key]``, or a ``KeyError`` that says the packed file is
    incomplete."""
    try:
        return tensors[key]
    except KeyError:
        raise KeyError(f'the packed model has no tensor {key!r}: the file is '
                       'corrupt or was not written by '
                       'tools/deployment/export_binary.py of this '
                       'version') from None


def float_getter(tensors: dict, prefix: str, dtype):
    """``get(name)`` → ``tensors[prefix + '.' + name]`` in ``dtype``,
    contiguous."""

    def get(name: str) -> Tensor:
        return packed_tensor(tensors, f'{prefix}.{name}').to(
            dtype).contiguous()

    return get


def _prelu(z: Tensor, slope: Tensor) -> Tensor:
    return torch.where(z > 0, z, z * slope)


def group_sums(x: Tensor) -> Tensor:
    """Sums over the last dimension in the kernels' order: a pairwise tree
    ``((x0 + x1) + (x2 + x3)) + ...`` for a power-of-two length, else left
    to right."""
    r = x.shape[-1]
    if r & (r - 1) == 0:
        while x.shape[-1] > 1:
            x = x[..., 0::2] + x[..., 1::2]
        return x[..., 0]
    s = x[..., 0]
    for j in range(1, r):
        s = s + x[..., j]
    return s


class _Layer:
    """Holds a layer's tensors (cast to ``dtype``) and its backend."""

    def __init__(self, tensors: dict, prefix: str, dtype, backend: str):
        self.prefix = prefix
        self.dtype = dtype
        self.backend = resolve_backend(backend)
        self._tensors = tensors
        self.f = float_getter(tensors, prefix, dtype)
        self.ext = load_extension() if self.backend == 'cpp' else None

    def words(self, name: str) -> Tensor:
        """A packed (integer) tensor of this layer, as stored."""
        return packed_tensor(self._tensors, f'{self.prefix}.{name}')


class BinaryProj(_Layer):
    r"""Binary 1×1 projection with residual (``BinaryResidualProj``, and its
    LayerScale when present):

    .. math:: y = \operatorname{prelu}(a \odot D + b + \operatorname{sc}(x))
        \odot p_s + p_b \;(+\ \text{residual}),\quad
        D = \hat W_{\pm1} \cdot [x > \theta]_{\pm1}
    """

    def __init__(self, spec: dict, tensors: dict, dtype, backend: str):
        super().__init__(tensors, spec['prefix'], dtype, backend)
        self.cin, self.cout = spec['cin'], spec['cout']
        self.shortcut = spec['shortcut']
        self.thr, self.a, self.b = self.f('thr'), self.f('a'), self.f('b')
        self.slope = self.f('slope')
        self.post_scale, self.post_bias = self.f('post_scale'), self.f(
            'post_bias')
        words = self.words('wbits')
        if self.backend == 'cpp':
            self.wt = kernel_words(words, 1, self.cin)[0]
        else:
            self.w_t = pm1_weight(words, 1, self.cin,
                                  dtype)[:, 0].t().contiguous()

    def signs(self, x: Tensor) -> Tensor:
        return x > self.thr

    def kernel_args(self) -> List[Tensor]:
        return [self.thr, self.wt, self.a, self.b, self.slope,
                self.post_scale, self.post_bias]

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.ext is not None:
            return self.ext.proj(x, self.thr, self.wt, self.cout, self.a,
                                 self.b, self.slope, self.post_scale,
                                 self.post_bias, SHORTCUTS[self.shortcut],
                                 residual)
        lead = x.shape[:-1]
        d = bits_to_pm1(x > self.thr, self.dtype) @ self.w_t
        z = d * self.a
        z = z + self.b
        if self.shortcut == 'identity':
            z = z + x
        elif self.shortcut == 'tile':
            r = self.cout // self.cin
            z = (z.view(*lead, r, self.cin) + x.unsqueeze(-2)).view(
                *lead, self.cout)
        elif self.shortcut == 'mean':
            r = self.cin // self.cout
            z = z + group_sums(x.view(*lead, self.cout, r)) / r
        y = _prelu(z, self.slope)
        y = y * self.post_scale
        y = y + self.post_bias
        return y if residual is None else residual + y


class BinaryFFN:
    """The binary MLP of a block: ``reduce(expand(x)) + residual`` (the
    reduce carries the LayerScale). The C++ path runs both projections per
    tile of tokens so the expanded activations stay in cache."""

    def __init__(self, expand: BinaryProj, reduce: BinaryProj):
        if expand.cout != reduce.cin or reduce.cout != expand.cin:
            raise ValueError('BinaryFFN: reduce must map the expanded width '
                             'back to the input width')
        self.expand, self.reduce = expand, reduce
        self.ext = expand.ext

    def __call__(self, x: Tensor, residual: Tensor) -> Tensor:
        if self.ext is not None:
            return self.ext.ffn(x, residual, self.expand.kernel_args(),
                                self.expand.cout,
                                SHORTCUTS[self.expand.shortcut],
                                self.reduce.kernel_args(),
                                SHORTCUTS[self.reduce.shortcut])
        return self.reduce(self.expand(x), residual)


class MSGDCMixer(_Layer):
    r"""Norm1 + MSGDC + residual (+ Norm2) of a stage-1/2 block:

    .. math:: h = x + s_o \odot \sum_d \operatorname{prelu}_d(a_d \odot D_d
        + b_d) + b_o,\quad \tilde h = s_2 h + b_2

    with :math:`D_d` the grouped dilated binary 3×3 convolution (zero
    padding: padded taps contribute 0) of :math:`[x s_1 + b_1 > \theta]`.
    """

    def __init__(self, spec: dict, tensors: dict, dtype, backend: str):
        blk = spec['prefix']
        super().__init__(tensors, f'{blk}.mixer', dtype, backend)
        self.c = spec['channels']
        self.groups = spec['groups']
        self.dilations = list(spec['dilations'])
        t = float_getter(tensors, blk, dtype)
        self.in_scale, self.in_bias = t('norm1.scale'), t('norm1.bias')
        self.n2_scale, self.n2_bias = t('norm2.scale'), t('norm2.bias')
        self.thr = self.f('thr')
        self.out_scale, self.out_bias = self.f('out_scale'), self.f('out_bias')
        self.a = [self.f(f'conv{i}.a') for i in range(len(self.dilations))]
        self.b = [self.f(f'conv{i}.b') for i in range(len(self.dilations))]
        self.slope = [
            self.f(f'conv{i}.slope') for i in range(len(self.dilations))
        ]
        cg = self.c // self.groups
        words = [
            self.words(f'conv{i}.wbits') for i in range(len(self.dilations))
        ]
        if self.backend == 'cpp':
            self.wt = [kernel_words(w, 9, cg) for w in words]
            self.lane_wt = ([lane_words(w, cg) for w in words]
                            if lane_path_shape(self.c, self.groups) else [])
        else:  # (C, 9, cg) → conv weight (C, cg, 3, 3)
            self.w = [
                pm1_weight(w, 9, cg, dtype).view(self.c, 3, 3, cg).permute(
                    0, 3, 1, 2).contiguous() for w in words
            ]

    def signs(self, x: Tensor) -> Tensor:
        v = x * self.in_scale
        v = v + self.in_bias
        return v > self.thr

    def __call__(self, x: Tensor):
        if self.ext is not None:
            h, hn = self.ext.msgdc(x, self.in_scale, self.in_bias, self.thr,
                                   self.groups, self.dilations, self.wt,
                                   self.a, self.b, self.slope, self.out_scale,
                                   self.out_bias, self.n2_scale, self.n2_bias,
                                   self.lane_wt)
            return h, hn
        xs = bits_to_pm1(self.signs(x), self.dtype).permute(0, 3, 1, 2)
        total = None
        for w, d, a, b, sl in zip(self.w, self.dilations, self.a, self.b,
                                  self.slope):
            dot = F.conv2d(xs, w, padding=d, dilation=d,
                           groups=self.groups).permute(0, 2, 3, 1)
            z = dot * a
            z = z + b
            z = _prelu(z, sl)
            total = z if total is None else total + z
        t = total * self.out_scale
        t = t + self.out_bias
        h = x + t
        hn = h * self.n2_scale
        hn = hn + self.n2_bias
        return h.contiguous(), hn.contiguous()


class BinaryMerge(_Layer):
    r"""Binary 2×2 stride-2 patch merging on the normalised, zero-padded map
    :math:`x_0`: :math:`y = \operatorname{prelu}(a \odot D + b +
    \operatorname{tile}(\operatorname{avgpool}_2 x_0)) + p_b + \text{pos}`."""

    def __init__(self, spec: dict, tensors: dict, dtype, backend: str):
        super().__init__(tensors, spec['prefix'], dtype, backend)
        self.cin, self.cout = spec['cin'], spec['cout']
        self.thr, self.a, self.b = self.f('thr'), self.f('a'), self.f('b')
        self.slope, self.post_bias = self.f('slope'), self.f('post_bias')
        words = self.words('wbits')
        if self.backend == 'cpp':
            self.wt = kernel_words(words, 4, self.cin)
        else:
            self.w = pm1_weight(words, 4, self.cin, dtype).view(
                self.cout, 2, 2, self.cin).permute(0, 3, 1, 2).contiguous()

    def signs(self, x0: Tensor) -> Tensor:
        return x0 > self.thr

    def __call__(self, x0: Tensor, pos: Tensor) -> Tensor:
        if self.ext is not None:
            return self.ext.merge(x0, self.thr, self.wt, self.cout, self.a,
                                  self.b, self.slope, self.post_bias, pos)
        xs = bits_to_pm1(x0 > self.thr, self.dtype).permute(0, 3, 1, 2)
        dot = F.conv2d(xs, self.w, stride=2).permute(0, 2, 3, 1)
        s = x0[:, 0::2, 0::2] + x0[:, 0::2, 1::2]
        s = s + x0[:, 1::2, 0::2]
        s = s + x0[:, 1::2, 1::2]
        avg = s / 4
        z = dot * self.a
        z = z + self.b
        z = z + avg.repeat(1, 1, 1, self.cout // self.cin)
        z = _prelu(z, self.slope)
        z = z + self.post_bias
        return (z + pos).contiguous()


class BinaryAttention(_Layer):
    r"""The binarized attention products of MSMHA on token sets
    ``(B, T, C)``:

    * :meth:`scores`: :math:`S = \text{scale}\cdot [q>\theta_q]_{\pm1}^\top
      [k>\theta_k]_{\pm1}` per head (XOR + popcount over ``d`` bits);
    * :meth:`context`: quantizes the softmax map into bit planes (LSQ: the
      2-bit level; GSB: :math:`T_0^+, T_0^-, T_1, T_2`), multiplies them with
      the ±1 values (AND + popcount over tokens) and applies the epilogue
      :math:`\operatorname{prelu}(a \odot \text{ctx} + b + q + k + v) + p_b`.
    """

    def __init__(self, spec: dict, tensors: dict, dtype, backend: str):
        super().__init__(tensors, spec['prefix'] + '.mixer', dtype, backend)
        self.heads = spec['num_heads']
        self.scale = float(spec['scale'])
        self.thr_q, self.thr_k, self.thr_v = (self.f(f'{n}_thr')
                                              for n in 'qkv')
        attn = spec['attn']
        self.mode = attn['type']
        if self.mode == 'lsq':
            self.levels = int(attn['levels'])
            self.step, self.zero = self.f('lsq.step'), self.f('lsq.zero')
            self.gsb: List[float] = []
        else:
            self.levels, self.step, self.zero = 0, None, None
            self.gsb = [float(attn[k]) for k in
                        ('alpha', 'a', 'b1', 'b2', 'low', 'high')]
        self.ctx_a, self.ctx_b = self.f('ctx.a'), self.f('ctx.b')
        self.ctx_slope, self.ctx_post = self.f('ctx.slope'), self.f(
            'ctx.post_bias')

    def _heads(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.heads, c // self.heads).transpose(1, 2)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        if self.ext is not None:
            return self.ext.attn_scores(q, k, self.thr_q, self.thr_k,
                                        self.heads, self.scale)
        qs = self._heads(bits_to_pm1(q > self.thr_q, self.dtype))
        ks = self._heads(bits_to_pm1(k > self.thr_k, self.dtype))
        return (qs @ ks.transpose(-2, -1)) * self.scale

    def levels_of(self, p: Tensor):
        """The quantized attention map as integer-valued planes
        ``[(coefficient or None, plane)]`` (used by the fallback and to
        record quantization decisions)."""
        if self.mode == 'lsq':
            u = p * self.levels
            u = u / self.step.view(1, -1, 1, 1)
            u = u + self.zero.view(1, -1, 1, 1)
            return torch.round(u).clamp(0, self.levels)
        alpha, _, _, _, low, high = self.gsb
        q = p / alpha
        m = q.amax(dim=-1, keepdim=True)
        above_high = q > high * m
        above_low = q > low * m
        base = torch.round(q).clamp(0, 1) - above_low.to(p.dtype)
        mid = (above_low & ~above_high).to(p.dtype)
        return torch.stack([base, mid, above_high.to(p.dtype)])

    def context(self, p: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.ext is not None:
            return self.ext.attn_context(p, q, k, v, self.thr_v, self.heads,
                                         ATTN_MODES[self.mode], self.levels,
                                         self.step, self.zero, self.gsb,
                                         self.ctx_a, self.ctx_b,
                                         self.ctx_slope, self.ctx_post)
        vs = self._heads(bits_to_pm1(v > self.thr_v, self.dtype)).transpose(
            -2, -1)  # (B, heads, d, T)
        lv = self.levels_of(p)
        if self.mode == 'lsq':  # integer level sums, times the step
            ctx = (vs @ lv.transpose(-2, -1)) * self.step.view(1, -1, 1, 1)
        else:
            _, a, b1, b2, _, _ = self.gsb
            s0, s1, s2 = (vs @ plane.transpose(-2, -1) for plane in lv)
            ctx = s0 + b1 * s1
            ctx = ctx + b2 * s2
            ctx = ctx * a
        ctx = ctx.permute(0, 3, 1, 2).reshape(q.shape)  # (B, T, C)
        z = ctx * self.ctx_a
        z = z + self.ctx_b
        z = z + q
        z = z + k
        z = z + v
        z = _prelu(z, self.ctx_slope)
        return z + self.ctx_post


class ShiftConv(_Layer):
    """Shift branches as a sparse circular depthwise filter, plus bias and a
    residual: ``y = res + (bias + sum_k w_k * x[(i + dy_k) % H, (j + dx_k) %
    W])``."""

    def __init__(self, spec: dict, tensors: dict, dtype, backend: str):
        super().__init__(tensors, spec['prefix'], dtype, backend)
        self.dy: Sequence[int] = list(spec['dy'])
        self.dx: Sequence[int] = list(spec['dx'])
        self.weight, self.bias = self.f('weight'), self.f('bias')
        self.dy_t = torch.tensor(self.dy, dtype=torch.int32)
        self.dx_t = torch.tensor(self.dx, dtype=torch.int32)

    def __call__(self, x: Tensor, res: Optional[Tensor] = None) -> Tensor:
        if self.ext is not None:
            return self.ext.shift(x, res, self.dy_t, self.dx_t, self.weight,
                                  self.bias)
        acc = None
        for k, (dy, dx) in enumerate(zip(self.dy, self.dx)):
            v = self.weight[k] * torch.roll(x, shifts=(-dy, -dx), dims=(1, 2))
            acc = (self.bias + v) if acc is None else acc + v
        if acc is None:
            acc = self.bias.expand_as(x)
        return acc if res is None else res + acc
