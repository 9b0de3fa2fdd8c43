# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Classification head: global average pooling + the linear layer of an
mmpretrain classifier (its ``head.fc``, an ``nn.Linear``)."""
from dataclasses import dataclass
from typing import Dict, List

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import PackedOp
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        param, register)


@dataclass
class HeadSpec(Spec):
    kind = 'gap_linear'
    in_channels: int
    num_classes: int

    def tensors(self) -> Dict[str, TensorSpec]:
        return dict(weight=param(self.num_classes, self.in_channels),
                    bias=param(self.num_classes))

    def errors(self) -> List[str]:
        if not (isinstance(self.num_classes, int) and self.num_classes > 0):
            return [f'num_classes {self.num_classes!r}']
        return []


class PackedHead(PackedOp):
    """Channels-last features ``(N, H, W, C)`` → logits."""
    profile_label = 'head: pooling + linear (float)'

    def __init__(self, spec: HeadSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.weight, self.bias = params.f('weight'), params.f('bias')

    def forward(self, feats: Tensor) -> Tensor:
        return F.linear(feats.mean(dim=(1, 2)), self.weight, self.bias)


@register(nn.Linear)
class HeadHandler(Handler):
    spec = HeadSpec
    op = PackedHead

    def describe(self, fc: nn.Linear) -> HeadSpec:
        return HeadSpec(in_channels=int(fc.in_features),
                        num_classes=int(fc.out_features))

    def fold(self, fc: nn.Linear, spec: HeadSpec, out: Folder) -> None:
        out.put('weight', fc.weight.detach().double())
        out.put('bias', as_f64(fc.bias, fc.out_features))
