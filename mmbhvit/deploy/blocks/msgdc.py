# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""The MSGDC token mixer (:class:`~mmbhvit.models.backbones.bhvit.MSGDC`)
with the norms and the residual of its block:

.. math:: h = x + s_o \odot \sum_d \operatorname{prelu}_d(a_d \odot D_d
    + b_d) + b_o,\quad \tilde h = s_2 h + b_2

with :math:`D_d` the grouped dilated binary 3×3 convolution (zero padding:
padded taps contribute 0) of :math:`[x s_1 + b_1 > \theta]`. Folding: the
three RPReLU output shifts go into the bias of the summing BatchNorm
(``out_bias``), the input shifts into the per-convolution ``b``.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch.nn.functional as F
from torch import Tensor

from ...models.backbones.bhvit import MSGDC
from ..ops import (PackedOp, kernel_words, lane_path_shape, lane_words,
                   pm1_weight, prelu, write_out)
from ..packing import bits_to_pm1
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        bits, param, register)
from .norm import Affine, bn_affine


@dataclass
class MSGDCSpec(Spec):
    kind = 'msgdc'
    channels: int
    groups: int
    kernel_size: List[int]
    dilations: List[int]
    weight_bits: int = 1
    act_bits: int = 1

    def tensors(self) -> Dict[str, TensorSpec]:
        c = self.channels
        t = dict(thr=param(c), out_scale=param(c), out_bias=param(c))
        for i in range(len(self.dilations)):
            t[f'conv{i}.wbits'] = bits(c, 9 * (c // self.groups))
            for n in ('a', 'b', 'slope'):
                t[f'conv{i}.{n}'] = param(c)
        return t

    def errors(self) -> List[str]:
        errs = []
        if not (isinstance(self.groups, int) and self.groups >= 1
                and self.channels % self.groups == 0):
            errs.append(f'groups {self.groups!r} does not divide '
                        f'{self.channels} channels')
        if list(self.kernel_size) != [3, 3]:
            errs.append(f'MSGDC kernel {self.kernel_size} (only 3x3 is '
                        'packed)')
        if not self.dilations or not all(
                isinstance(d, int) and d >= 1 for d in self.dilations):
            errs.append(f'dilations {self.dilations!r} must be positive ints')
        if (self.weight_bits, self.act_bits) != (1, 1):
            errs.append(f'not fully binary (weight_bits {self.weight_bits},'
                        f' act_bits {self.act_bits})')
        return errs


class PackedMSGDC(PackedOp):
    """``forward(x, norm1, norm2)`` → ``(h, norm2(h))`` with ``h = x +
    MSGDC(norm1(x))``; the norms are the block's ``(scale, bias)``."""
    profile_label = 'msgdc (binary 3x3 convs)'

    def __init__(self, spec: MSGDCSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.c = spec.channels
        self.groups = spec.groups
        self.dilations = list(spec.dilations)
        f = params.f
        n = len(self.dilations)
        self.thr = f('thr')
        self.out_scale, self.out_bias = f('out_scale'), f('out_bias')
        self.a = [f(f'conv{i}.a') for i in range(n)]
        self.b = [f(f'conv{i}.b') for i in range(n)]
        self.slope = [f(f'conv{i}.slope') for i in range(n)]
        cg = self.c // self.groups
        words = [params.words(f'conv{i}.wbits') for i in range(n)]
        if self.ext is not None:
            self.wt = [kernel_words(w, 9, cg) for w in words]
            self.lane_wt = ([lane_words(w, cg) for w in words]
                            if lane_path_shape(self.c, self.groups) else [])
        else:  # (C, 9, cg) → conv weight (C, cg, 3, 3)
            self.w = [
                pm1_weight(w, 9, cg, dtype).view(self.c, 3, 3, cg).permute(
                    0, 3, 1, 2).contiguous() for w in words
            ]

    def make_plan(self):
        return self.ext.MSGDCPlan(
            thr=self.thr, groups=self.groups, dilations=self.dilations,
            wts=self.wt, a=self.a, b=self.b, slopes=self.slope,
            out_scale=self.out_scale, out_bias=self.out_bias,
            lane_wts=self.lane_wt)

    def signs(self, x: Tensor, norm1: Affine) -> Tensor:
        v = x * norm1[0]
        v = v + norm1[1]
        return v > self.thr

    def decisions(self, x: Tensor, norm1: Affine, norm2: Affine,
                  out: Optional[Tensor] = None):
        return {'': self.signs(x, norm1)}

    def forward(self, x: Tensor, norm1: Affine, norm2: Affine,
                out: Optional[Tensor] = None):
        """``(h, norm2(h))``; ``out``: where to write ``h`` (``x`` itself
        may be given, see :func:`~mmbhvit.deploy.ops.write_out`)."""
        if self.ext is not None:
            return tuple(self.plan().forward(x, norm1[0], norm1[1],
                                             norm2[0], norm2[1], out))
        xs = bits_to_pm1(self.signs(x, norm1), self.dtype).permute(0, 3, 1, 2)
        total = None
        for w, d, a, b, sl in zip(self.w, self.dilations, self.a, self.b,
                                  self.slope):
            dot = F.conv2d(xs, w, padding=d, dilation=d,
                           groups=self.groups).permute(0, 2, 3, 1)
            z = dot * a
            z = z + b
            z = prelu(z, sl)
            total = z if total is None else total + z
        t = total * self.out_scale
        t = t + self.out_bias
        h = x + t
        hn = h * norm2[0]
        hn = hn + norm2[1]
        return write_out(h.contiguous(), out), hn.contiguous()


@register(MSGDC)
class MSGDCHandler(Handler):
    spec = MSGDCSpec
    op = PackedMSGDC

    def describe(self, m: MSGDC) -> MSGDCSpec:
        conv = m.convs[0]
        return MSGDCSpec(
            channels=int(conv.in_channels), groups=int(conv.groups),
            kernel_size=list(conv.kernel_size),
            dilations=[int(c.dilation[0]) for c in m.convs],
            weight_bits=int(getattr(conv, 'weight_bits', 32)),
            act_bits=int(getattr(conv, 'act_bits', 32)))

    def fold(self, m: MSGDC, spec: MSGDCSpec, out: Folder) -> None:
        c = spec.channels
        out.put('thr', -as_f64(m.shift.bias))
        zeta = 0
        for i, (conv, act) in enumerate(zip(m.convs, m.acts)):
            d = conv.dilation[0]
            if (conv.kernel_size != (3, 3) or conv.stride != (1, 1)
                    or conv.padding != (d, d) or conv.dilation != (d, d)
                    or conv.groups != spec.groups):
                raise NotImplementedError(
                    f'{out.name(f"conv{i}")}: MSGDC convs must be 3x3, '
                    'stride 1, padding = dilation, all with the same groups;'
                    f' got {conv}')
            s = out.put_binary_weight(f'conv{i}.wbits', conv)
            out.put(f'conv{i}.a', s)
            out.put(f'conv{i}.b', as_f64(conv.bias, c) - as_f64(act.bias_in))
            out.put(f'conv{i}.slope', as_f64(act.weight))
            zeta = zeta + as_f64(act.bias_out)
        alpha, beta = bn_affine(m.norm)
        out.put('out_scale', alpha)
        out.put('out_bias', alpha * zeta + beta)
