# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""Binary k×k convolution block of the decode heads
(:class:`~mmbhvit.models.heads.BinaryConvBlock`: the 3×3 convolutions of
``BinaryUPerHead``, ``BinaryFPNHead`` and ``BinaryFPN``).

Folded as :mod:`.proj` folds a 1×1 projection: the learnable shift becomes
the threshold, the weight its sign bits and per-output scale ``s``, the
eval BatchNorm ``(α, β)`` and the RPReLU ``(γ, slope, ζ)`` an affine of the
integer dot product and a post bias:

.. math:: y = \operatorname{prelu}(a \odot D + b + \operatorname{sc}(x))
    + p_b,\quad a = \alpha s,\ b = \beta - \gamma,\ p_b = \zeta

with ``D`` summed over the taps inside the map (the block pads the signs
with zeros, so a tap outside contributes nothing and is not visited).
The shortcut ``sc`` is the block's: identity, the input tiled, or the mean
of the ``cin / cout`` chunks of ``cout`` channels (``'chunk_mean'``).
"""
from dataclasses import dataclass
from typing import Dict, List

import torch.nn.functional as F
from torch import Tensor

from ...models.heads.binary_heads import BinaryConvBlock
from ..ops import SHORTCUTS, PackedOp, kernel_words, pm1_weight, prelu
from ..packing import bits_to_pm1
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        bits, param, register)
from .norm import bn_affine


def conv_shortcut(cin: int, cout: int) -> str:
    """The real-valued shortcut of :class:`BinaryConvBlock`."""
    if max(cin, cout) % min(cin, cout):
        return 'none'
    return ('identity' if cin == cout else
            'tile' if cout > cin else 'chunk_mean')


def chunk_shortcut(x: Tensor, kind: str, cin: int, cout: int) -> Tensor:
    """The shortcut term of a channels-last ``x`` in the kernels' order of
    operations (``'chunk_mean'``: the chunks summed left to right, then
    divided by their number)."""
    if kind == 'identity':
        return x
    if kind == 'tile':
        return x.repeat(1, 1, 1, cout // cin)
    r = cin // cout
    s = x[..., :cout]
    for j in range(1, r):
        s = s + x[..., j * cout:(j + 1) * cout]
    return s / r


@dataclass
class ConvSpec(Spec):
    """A binary ``k × k`` convolution block ``cin → cout`` (stride 1)."""
    kind = 'binary_conv'
    cin: int
    cout: int
    kernel_size: int
    shortcut: str
    weight_bits: int = 1
    act_bits: int = 1

    def tensors(self) -> Dict[str, TensorSpec]:
        t = dict(wbits=bits(self.cout, self.kernel_size**2 * self.cin),
                 thr=param(self.cin))
        for n in ('a', 'b', 'slope', 'post_bias'):
            t[n] = param(self.cout)
        return t

    def errors(self) -> List[str]:
        if not all(isinstance(v, int) and v > 0
                   for v in (self.cin, self.cout, self.kernel_size)):
            return [f'sizes {self.cin!r} -> {self.cout!r}, kernel '
                    f'{self.kernel_size!r} must be positive ints']
        errs = []
        if self.kernel_size % 2 == 0 or self.kernel_size > 7:
            errs.append(f'kernel size {self.kernel_size}: the engine runs '
                        'odd sizes up to 7')
        if self.shortcut != conv_shortcut(self.cin, self.cout):
            errs.append(f'shortcut {self.shortcut!r}, expected '
                        f'{conv_shortcut(self.cin, self.cout)!r}')
        if (self.weight_bits, self.act_bits) != (1, 1):
            errs.append(f'not fully binary (weight_bits {self.weight_bits},'
                        f' act_bits {self.act_bits})')
        return errs


class PackedConv(PackedOp):
    """The packed op of :class:`ConvSpec` on channels-last maps
    ``(N, H, W, cin) → (N, H, W, cout)``."""
    profile_label = 'binary kxk convolutions (heads)'

    def __init__(self, spec: ConvSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.cin, self.cout, self.k = spec.cin, spec.cout, spec.kernel_size
        self.shortcut = spec.shortcut
        f = params.f
        self.thr, self.a, self.b = f('thr'), f('a'), f('b')
        self.slope, self.post_bias = f('slope'), f('post_bias')
        self.post_scale = self.a.new_ones(self.cout)
        words = params.words('wbits')
        taps = self.k * self.k
        if self.ext is not None:
            self.wt = kernel_words(words, taps, self.cin)
        else:
            # (cout, cin, k, k) ±1 for F.conv2d
            self.w_pm1 = pm1_weight(words, taps, self.cin, dtype).view(
                self.cout, self.k, self.k, self.cin).permute(0, 3, 1, 2
                                                             ).contiguous()

    def decisions(self, x: Tensor):
        return {'': x > self.thr}

    def forward(self, x: Tensor) -> Tensor:
        if self.ext is not None:
            return self.ext.conv(x, self.thr, self.wt, self.cout, self.k,
                                 self.a, self.b, self.slope, self.post_scale,
                                 self.post_bias, SHORTCUTS[self.shortcut])
        pad = self.k // 2
        signs = bits_to_pm1(x > self.thr, self.dtype).permute(0, 3, 1, 2)
        # ±1 sums over the taps inside the map: exact integers in float
        d = F.conv2d(signs, self.w_pm1, padding=pad).permute(0, 2, 3, 1)
        z = d * self.a
        z = z + self.b
        if self.shortcut != 'none':
            z = z + chunk_shortcut(x, self.shortcut, self.cin, self.cout)
        y = prelu(z, self.slope)
        y = y * self.post_scale
        return y + self.post_bias


@register(BinaryConvBlock)
class ConvHandler(Handler):
    spec = ConvSpec
    op = PackedConv

    def describe(self, m: BinaryConvBlock) -> ConvSpec:
        conv = m.conv
        k = conv.kernel_size
        if (conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.groups != 1 or k[0] != k[1]
                or conv.padding != (k[0] // 2, k[0] // 2)):
            raise NotImplementedError(
                'the packed engine runs square stride-1 undilated '
                "ungrouped 'same' binary convolutions, got "
                f'{conv.extra_repr()}')
        return ConvSpec(cin=int(m.in_channels), cout=int(m.out_channels),
                        kernel_size=int(k[0]),
                        shortcut=conv_shortcut(m.in_channels,
                                               m.out_channels),
                        weight_bits=int(conv.weight_bits),
                        act_bits=int(conv.act_bits))

    def fold(self, m: BinaryConvBlock, spec: ConvSpec, out: Folder) -> None:
        s = out.put_binary_weight('wbits', m.conv)
        alpha, beta = bn_affine(m.norm)
        out.put('thr', -as_f64(m.shift.bias))
        out.put('a', s * alpha)
        out.put('b', as_f64(m.conv.bias, spec.cout) * alpha + beta -
                as_f64(m.act.bias_in))
        out.put('slope', as_f64(m.act.weight))
        out.put('post_bias', as_f64(m.act.bias_out))
