# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Folding of eval BatchNorms (shared by the block kinds), and the
:data:`Affine` pair they become."""
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: a folded norm as the engine passes it: ``(scale, bias)``, ``x * scale +
#: bias`` per channel
Affine = Tuple[Tensor, Tensor]


def bn_affine(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """Eval BatchNorm as ``y = x * scale + bias`` (float64)."""
    if not isinstance(bn, _BatchNorm):
        raise NotImplementedError('only BatchNorm token norms can be '
                                  f'folded, got {type(bn).__name__}')
    if bn.running_mean is None or bn.running_var is None:
        raise NotImplementedError('BatchNorm without running statistics '
                                  '(track_running_stats=False) cannot be '
                                  'folded for inference')
    var = bn.running_var.detach().double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().double() * scale
    bias = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().double()
    return scale, bias
