# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The stem (:class:`~mmbhvit.models.backbones.bhvit.ConvStem`): zero
padding to a multiple of 4 (the model's ``pad_to_multiple``), 4×4 stride-4
convolution with the BatchNorm folded in, GELU, and the backbone's
positional embedding; channels-last output."""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.backbones.bhvit import ConvStem
from ...models.layout import pad_to_multiple
from ..ops import PackedOp
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        param, register)
from .norm import bn_affine


@dataclass
class StemSpec(Spec):
    kind = 'conv_stem'
    in_channels: int
    channels: int
    kernel_size: int = 4
    stride: int = 4

    def tensors(self) -> Dict[str, TensorSpec]:
        k = self.kernel_size
        return dict(weight=param(self.channels, self.in_channels, k, k),
                    bias=param(self.channels))

    def errors(self) -> List[str]:
        if (self.kernel_size, self.stride) != (4, 4):
            return [f'stem {self.kernel_size}x{self.kernel_size} stride '
                    f'{self.stride} (the engine runs 4x4 stride 4)']
        return []


#: erf(u) ~ u P(u^2) / Q(u^2) for |u| <= 4 (1 beyond), clamped to [-1, 1]:
#: the coefficients of P and Q from u^0 up, float32 values (a rational
#: least-squares fit; ``csrc/core/ops/stem.h`` holds the same numbers)
ERF_NUM = tuple(map(float.fromhex, (
    '0x1.20dd76p+0', '0x1.89f130p-3', '0x1.cbb09cp-5', '0x1.1754d0p-8',
    '0x1.c3cf68p-12', '0x1.fb431ap-18')))
ERF_DEN = tuple(map(float.fromhex, (
    '0x1p+0', '0x1.01f28cp-1', '0x1.e1f230p-4', '0x1.0d36b4p-6',
    '0x1.7d1bbep-10', '0x1.47c71cp-14', '0x1.444decp-22')))
RSQRT2_F32 = float.fromhex('0x1.6a09e6p-1')


def gelu_rational(a: Tensor) -> Tensor:
    """GELU with the rational erf above, one rounding per operation in the
    kernel's order (so the same bits as the C++ stem on every CPU); in
    float32 as close to the float64 GELU as ATen's float32 GELU."""
    def c(v):
        return torch.tensor(v, dtype=a.dtype)

    u = (a * c(RSQRT2_F32)).clamp(-4.0, 4.0)
    z = u * u
    num, den = c(ERF_NUM[-1]), c(ERF_DEN[-1])
    for v in reversed(ERF_NUM[:-1]):
        num = num * z + c(v)
    for v in reversed(ERF_DEN[:-1]):
        den = den * z + c(v)
    e = ((u * num) / den).clamp(-1.0, 1.0)
    return (a * c(0.5)) * (c(1.0) + e)


def stem_taps(weight: Tensor) -> Tensor:
    """``(C_out, C_in, 4, 4)`` → ``(C_in * 16, C_out)``: the weights tap by
    tap in the kernel's order (channel, row, column)."""
    return weight.permute(1, 2, 3, 0).reshape(-1, weight.shape[0])


def stem_sum(x: Tensor, wt: Tensor, bias: Tensor, pos: Optional[Tensor],
             gelu: bool) -> Tensor:
    """The fallback of the ``stem`` kernel (and its definition): NCHW ``x``
    (H, W multiples of 4) → ``(N, H/4, W/4, C_out)`` with, per element,
    the products ``w_t * x_t`` (:func:`stem_taps` order) summed per input
    channel as a tree (the 4 of a filter row in pairs, then the 4 rows in
    pairs), the channels' sums added to the bias one by one, then
    :func:`gelu_rational` if ``gelu``, then ``+ pos``."""
    n, cin, h, w = x.shape
    patches = x.reshape(n, cin, h // 4, 4, w // 4, 4).permute(
        0, 2, 4, 1, 3, 5).reshape(n, h // 4, w // 4, cin * 16)

    def row(t):  # the 4 products of a row of the filter, as a tree
        a, b, c, d = (wt[t + k] * patches[..., t + k:t + k + 1]
                      for k in range(4))
        return (a + b) + (c + d)

    acc = bias.expand(n, h // 4, w // 4, bias.numel())
    for ci in range(cin):
        r0, r1, r2, r3 = (row(16 * ci + 4 * ky) for ky in range(4))
        acc = acc + ((r0 + r1) + (r2 + r3))
    if gelu:
        acc = gelu_rational(acc)
    return acc if pos is None else acc + pos


class PackedStem(PackedOp):
    """NCHW image → ``gelu(conv(pad(x))) + pos``, ``(N, H, W, C)``
    contiguous. Float32: one kernel, GELU by :func:`gelu_rational`;
    float64: ATen's GELU (as the model), then ``pos``."""
    profile_label = 'stem (float)'

    def __init__(self, spec: StemSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.wt = stem_taps(params.f('weight')).contiguous()
        self.bias = params.f('bias')
        self.fused_gelu = dtype == torch.float32

    def _stem(self, x, pos, gelu):
        if self.ext is not None:
            return self.ext.stem(x, self.wt, self.bias, pos, gelu)
        return stem_sum(x, self.wt, self.bias, pos, gelu)

    def forward(self, x: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        """``pos``: ``(H/4, W/4, C)`` (after padding), added, or None."""
        x = pad_to_multiple(x, 4).contiguous()
        if self.fused_gelu:
            return self._stem(x, pos, True)
        y = F.gelu(self._stem(x, None, False))
        return y if pos is None else y + pos


@register(ConvStem)
class StemHandler(Handler):
    spec = StemSpec
    op = PackedStem

    def describe(self, m: ConvStem) -> StemSpec:
        return StemSpec(in_channels=int(m.conv.in_channels),
                        channels=int(m.conv.out_channels),
                        kernel_size=int(m.conv.kernel_size[0]),
                        stride=int(m.conv.stride[0]))

    def fold(self, m: ConvStem, spec: StemSpec, out: Folder) -> None:
        alpha, beta = bn_affine(m.norm)
        out.put('weight',
                m.conv.weight.detach().double() * alpha.view(-1, 1, 1, 1))
        out.put('bias', as_f64(m.conv.bias, alpha.numel()) * alpha + beta)
