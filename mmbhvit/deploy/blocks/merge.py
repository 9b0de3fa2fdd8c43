# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""Patch merging (:class:`~mmbhvit.models.backbones.bhvit.PatchMerging`):
input BatchNorm, zero padding to even sizes, 2×2 stride-2 convolution,
positional embedding.

* binary: :math:`y = \operatorname{prelu}(a \odot D + b +
  \operatorname{tile}(\operatorname{avgpool}_2 x_0)) + p_b + \text{pos}` on
  the sign bits of the normalised, padded map :math:`x_0` (its BatchNorm and
  RPReLU folded as in :mod:`.proj`);
* full precision: the output BatchNorm folded into the convolution.
"""
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.backbones.bhvit import PatchMerging
from ..ops import (PackedOp, PosEmbed, kernel_words, pad_nhwc, pm1_weight,
                   prelu)
from ..packing import bits_to_pm1
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        bits, param, register)
from .norm import bn_affine


@dataclass
class MergeSpec(Spec):
    kind = 'patch_merging'
    cin: int
    cout: int
    binary: bool
    pos_size: List[int]
    weight_bits: int = 1
    act_bits: int = 1

    def tensors(self) -> Dict[str, TensorSpec]:
        cin, cout = self.cin, self.cout
        t = {'norm_in.scale': param(cin), 'norm_in.bias': param(cin),
             'pos_embed': param(1, cout, *self.pos_size)}
        if self.binary:
            t.update(wbits=bits(cout, 4 * cin), thr=param(cin))
            for n in ('a', 'b', 'slope', 'post_bias'):
                t[n] = param(cout)
        else:
            t.update(weight=param(cout, cin, 2, 2), bias=param(cout))
        return t

    def errors(self) -> List[str]:
        errs = []
        if self.binary and self.cout % self.cin:
            errs.append(f'binary merging tiles its input: {self.cout} '
                        f'outputs is not a multiple of {self.cin}')
        if self.binary and (self.weight_bits, self.act_bits) != (1, 1):
            errs.append(f'not fully binary (weight_bits {self.weight_bits},'
                        f' act_bits {self.act_bits})')
        if not (isinstance(self.pos_size, list) and len(self.pos_size) == 2
                and all(isinstance(s, int) and s > 0
                        for s in self.pos_size)):
            errs.append(f'pos_size {self.pos_size!r} must be 2 positive '
                        'ints')
        return errs


class PackedMerge(PackedOp):
    """``forward(x)`` on the channels-last map before the input norm."""

    def __init__(self, spec: MergeSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        f = params.f
        self.binary = spec.binary
        self.profile_label = 'patch merging ' + ('(binary)' if self.binary
                                                 else '(float)')
        self.cin, self.cout = spec.cin, spec.cout
        self.in_scale, self.in_bias = f('norm_in.scale'), f('norm_in.bias')
        self.pos = PosEmbed(f('pos_embed'))
        if not self.binary:
            # in the input's memory format (the map is channels-last): no
            # weight reorder per call; the same convolution values
            self.weight = f('weight').contiguous(
                memory_format=torch.channels_last)
            self.bias = f('bias')
            return
        self.thr, self.a, self.b = f('thr'), f('a'), f('b')
        self.slope, self.post_bias = f('slope'), f('post_bias')
        words = params.words('wbits')
        if self.ext is not None:
            self.wt = kernel_words(words, 4, self.cin)
        else:
            self.w = pm1_weight(words, 4, self.cin, dtype).view(
                self.cout, 2, 2, self.cin).permute(0, 3, 1, 2).contiguous()

    def normalised(self, x: Tensor) -> Tensor:
        """Input norm and zero padding to even sizes: ``x0``."""
        x0 = x * self.in_scale
        return pad_nhwc(x0 + self.in_bias, 2).contiguous()

    def decisions(self, x: Tensor):
        return {'': self.normalised(x) > self.thr} if self.binary else {}

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        pos = self.pos(-(-h // 2), -(-w // 2))  # the output: padded to even
        if self.binary and self.ext is not None and h % 2 == 0 and w % 2 == 0:
            # no padding: the kernel applies the input norm itself
            return self.ext.merge_norm(x, self.in_scale, self.in_bias,
                                       self.thr, self.wt, self.cout, self.a,
                                       self.b, self.slope, self.post_bias,
                                       pos)
        x0 = self.normalised(x)
        if not self.binary:
            y = F.conv2d(x0.permute(0, 3, 1, 2), self.weight, self.bias,
                         stride=2)
            return (y.permute(0, 2, 3, 1) + pos).contiguous()
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
        z = prelu(z, self.slope)
        z = z + self.post_bias
        return (z + pos).contiguous()


@register(PatchMerging)
class MergeHandler(Handler):
    spec = MergeSpec
    op = PackedMerge

    def describe(self, m: PatchMerging) -> MergeSpec:
        return MergeSpec(
            cin=int(m.conv.in_channels), cout=int(m.conv.out_channels),
            binary=bool(m.binary), pos_size=list(m.pos_embed.shape[-2:]),
            weight_bits=int(getattr(m.conv, 'weight_bits', 32)),
            act_bits=int(getattr(m.conv, 'act_bits', 32)))

    def fold(self, m: PatchMerging, spec: MergeSpec, out: Folder) -> None:
        scale, bias = bn_affine(m.norm_in)
        out.put('norm_in.scale', scale)
        out.put('norm_in.bias', bias)
        out.put('pos_embed', m.pos_embed.detach().double())
        alpha, beta = bn_affine(m.norm)
        cout = spec.cout
        if spec.binary:
            s = out.put_binary_weight('wbits', m.conv)
            out.put('thr', -as_f64(m.shift.bias))
            out.put('a', s * alpha)
            out.put('b', as_f64(m.conv.bias, cout) * alpha + beta -
                    as_f64(m.act.bias_in))
            out.put('slope', as_f64(m.act.weight))
            out.put('post_bias', as_f64(m.act.bias_out))
        else:
            out.put('weight', m.conv.weight.detach().double() *
                    alpha.view(-1, 1, 1, 1))
            out.put('bias', as_f64(m.conv.bias, cout) * alpha + beta)
