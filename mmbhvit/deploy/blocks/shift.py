# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Shift branches (:class:`~mmbhvit.models.backbones.bhvit.ShiftBranches`)
as one sparse circular depthwise filter: the non-zero taps of the combined
filter with per-channel weights, and the summed bias:
``y = res + (bias + sum_k w_k * x[(i + dy_k) % H, (j + dx_k) % W])``.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...models.backbones.bhvit import ShiftBranches
from ..ops import PackedOp, write_out
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        param, register)


def shift_taps(radii: Sequence[int]) -> List[Tuple[int, int]]:
    """``(dy, dx)`` of the structural taps of the shift branches with these
    radii, row-major (the order in which they are stored)."""
    taps = set()
    for r in radii:
        for d in range(-r, r + 1):
            taps.add((d, 0))
            taps.add((0, d))
    return sorted(taps)


@dataclass
class ShiftSpec(Spec):
    kind = 'shift_branches'
    channels: int
    radii: List[int]

    def tensors(self) -> Dict[str, TensorSpec]:
        return dict(weight=param(len(shift_taps(self.radii)), self.channels),
                    bias=param(self.channels))

    def errors(self) -> List[str]:
        if not self.radii or not all(isinstance(r, int) and r >= 1
                                     for r in self.radii):
            return [f'radii {self.radii!r} must be positive ints']
        return []


class PackedShift(PackedOp):
    profile_label = 'shift branches (float)'

    def __init__(self, spec: ShiftSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        taps = shift_taps(spec.radii)
        self.dy = [dy for dy, _ in taps]
        self.dx = [dx for _, dx in taps]
        self.weight, self.bias = params.f('weight'), params.f('bias')
        self.dy_t = torch.tensor(self.dy, dtype=torch.int32)
        self.dx_t = torch.tensor(self.dx, dtype=torch.int32)

    def make_plan(self):
        return self.ext.ShiftPlan(dy=self.dy_t, dx=self.dx_t,
                                  weight=self.weight, bias=self.bias)

    def forward(self, x: Tensor, res: Optional[Tensor] = None,
                out: Optional[Tensor] = None) -> Tensor:
        """``out``: where to write the result (``res`` itself may be given;
        not ``x``, read around each output), see
        :func:`~mmbhvit.deploy.ops.write_out`."""
        if self.ext is not None:
            return self.plan().forward(x, res, out)
        return write_out(
            shift_sum(x, self.dy, self.dx, self.weight, self.bias, res), out)


def shift_sum(x: Tensor, dy: Sequence[int], dx: Sequence[int],
              weight: Tensor, bias: Tensor,
              res: Optional[Tensor] = None) -> Tensor:
    """The fallback of :class:`PackedShift` (and the kernel's definition):
    ``bias + sum_k weight[k] * x[y + dy_k, x + dx_k]`` (circular), taps in
    order, ``+ res`` first when given; ``x`` channels-last."""
    acc = None
    for k, (sy, sx) in enumerate(zip(dy, dx)):
        v = weight[k] * torch.roll(x, shifts=(-sy, -sx), dims=(1, 2))
        acc = (bias + v) if acc is None else acc + v
    if acc is None:
        acc = bias.expand_as(x)
    return acc if res is None else res + acc


@register(ShiftBranches)
class ShiftHandler(Handler):
    spec = ShiftSpec
    op = PackedShift

    def describe(self, m: ShiftBranches) -> ShiftSpec:
        return ShiftSpec(channels=int(m.filters.shape[1]),
                         radii=[int(r) for r in m.radii])

    def fold(self, m: ShiftBranches, spec: ShiftSpec, out: Folder) -> None:
        branches = list(m.scales.values())
        scale = torch.stack(
            [as_f64(b.scale) / n for b, n in zip(branches, m.taps)])
        filters = m.filters.double()
        kernel = (scale[:, :, None, None] * filters).sum(0)  # (C, K, K)
        support = filters.abs().sum(dim=(0, 1)) > 0  # structural taps
        p = m.pad
        taps = [(ky - p, kx - p) for ky, kx in support.nonzero().tolist()]
        if taps != shift_taps(spec.radii):
            raise NotImplementedError(
                f'{out.path}: the shift filters have taps {taps}, not those '
                f'of radii {spec.radii}')
        out.put('weight', torch.stack([kernel[:, dy + p, dx + p]
                                       for dy, dx in taps]))
        out.put('bias', torch.stack([as_f64(b.bias) for b in branches]).sum(0))
