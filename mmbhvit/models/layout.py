# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Layout helpers for NCHW feature maps: padding, windows, positional
embeddings and a channel-wise LayerNorm."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the bottom/right of an NCHW map so that H and W are
    multiples of ``multiple`` (nothing is cropped, nothing is lost)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


def window_partition(x: Tensor, size: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B * nH * nW, C, size * size)``; H, W must be
    multiples of ``size``. Windows are ordered batch-major, then row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // size, size, w // size, size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, size * size)


def window_reverse(windows: Tensor, size: int, batch: int, h: int,
                   w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nH * nW, C, size * size)``
    → ``(B, C, H, W)``."""
    c = windows.shape[1]
    x = windows.view(batch, h // size, w // size, c, size, size)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, c, h, w)


def resize_pos_embed(pos_embed: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bicubic resize of an NCHW positional embedding to ``size`` (a no-op
    at the trained size, so the trained resolution is reproduced exactly)."""
    if tuple(pos_embed.shape[-2:]) == tuple(size):
        return pos_embed
    return F.interpolate(pos_embed, size=size, mode='bicubic',
                         align_corners=False)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension (dim 1) of an N,C,... tensor."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (1, -1) + (1, ) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)
