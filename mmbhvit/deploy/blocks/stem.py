# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The stem (:class:`~mmbhvit.models.backbones.bhvit.ConvStem`): zero
padding to a multiple of 4 (the model's ``pad_to_multiple``), 4×4 stride-4
convolution with the BatchNorm folded in, GELU; channels-last output."""
from dataclasses import dataclass
from typing import Dict, List

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


class PackedStem(PackedOp):
    """NCHW image → ``gelu(conv(pad(x)))``, ``(N, H, W, C)`` contiguous."""
    profile_label = 'stem (float)'

    def __init__(self, spec: StemSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.weight, self.bias = params.f('weight'), params.f('bias')

    def forward(self, x: Tensor) -> Tensor:
        # a channels-last input gives a channels-last convolution output,
        # so the permuted map is contiguous for GELU and what follows (GELU
        # on a channels-last NCHW tensor is ~3x slower, and the positional
        # embedding's add on a permuted one needs a copy afterwards)
        x = pad_to_multiple(x, 4).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, self.weight, self.bias, stride=4).permute(0, 2, 3, 1)
        return F.gelu(y)


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
