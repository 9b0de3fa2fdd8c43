# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Layout helpers for NCHW feature maps: padding, windows, positional
embeddings and a channel-wise LayerNorm.

Traceable for any input size: while the model is traced or exported
(:func:`tracing_shapes`: ``torch.jit.trace``, the TorchScript ONNX export,
``torch.export``) no helper takes a Python branch on a tensor size, so a
graph traced at one size runs at every other (sizes, pads and indices are
computed in the graph). Eager (and ``torch.compile``) results are the same
as before: the traced forms skip shortcuts that are exact identities (a zero
pad, a same-size resize) or copy the same values another way.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def tracing_shapes() -> bool:
    """True while sizes are graph values rather than Python ints:
    ``torch.jit.trace`` (and so ``torch.onnx.export(dynamo=False)``) and
    ``torch.export``. Not under ``torch.compile``, whose guards handle
    Python branches on sizes."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, 'compiler', None)
    exporting = getattr(compiler, 'is_exporting', None)
    return bool(exporting is not None and exporting())


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the bottom/right of an NCHW map so that H and W are
    multiples of ``multiple`` (nothing is cropped, nothing is lost)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    # traced: always pad (by amounts computed in the graph, maybe 0)
    if tracing_shapes() or ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


def wrap_pad(x: Tensor, pad: int) -> Tensor:
    """Circular padding of H and W by ``pad`` on each side.

    Eager: ``F.pad(x, (pad,) * 4, mode='circular')`` (forward and backward
    as before). Traced (:func:`tracing_shapes`) or for maps smaller than
    ``pad``: a gather of the indices ``(i - pad) mod size``, the same values
    for a map of any size (it wraps as often as needed), exported to ONNX as
    ``Gather`` instead of a ``Pad`` of mode ``wrap``, which OpenVINO
    rejects. (``tools/analysis_tools/benchmark_shift_branches.py`` times
    the paddings in training.)
    """
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    if not tracing_shapes() and min(h, w) >= pad:
        return F.pad(x, (pad, ) * 4, mode='circular')
    rows = (torch.arange(h + 2 * pad, device=x.device) - pad) % h
    cols = (torch.arange(w + 2 * pad, device=x.device) - pad) % w
    return x.index_select(-2, rows).index_select(-1, cols)


class WrapDepthwiseConv(torch.autograd.Function):
    r"""Depthwise convolution with circular padding whose kernel is zero
    outside a few taps, for training on a CPU.

    Forward: ``F.conv2d(wrap_pad(x, pad), kernel[:, None], bias,
    groups=C)`` with ``kernel`` of shape ``(C, K, K)``, ``K = 2·pad + 1``:
    the same values as the plain expression.

    Backward, in forward-sized passes instead of PyTorch's depthwise weight
    gradient (``tools/analysis_tools/benchmark_shift_branches.py`` times
    both):

    - :math:`\partial L/\partial x` is the circular correlation of the
      gradient with the flipped kernel (one depthwise forward);
    - :math:`\partial L/\partial k_{c,i,j} = \sum_{n,h,w}
      g_{n,c,h,w}\, x^{pad}_{n,c,h+i,w+j}` only for the ``taps`` ``(i, j)``
      (one product and sum per tap); the other entries are returned as 0,
      which is right when the kernel is built from filters that are zero
      there (:class:`~mmbhvit.models.backbones.bhvit.ShiftBranches`).

    Gradients equal the plain expression's to float round-off (other
    summation order). :func:`wrap_depthwise_conv` decides when to use it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor, bias: Tensor, pad: int,
                taps: Tuple[Tuple[int, int], ...]) -> Tensor:
        xp = wrap_pad(x, pad)
        ctx.save_for_backward(xp, kernel)
        ctx.pad, ctx.taps = pad, taps
        return F.conv2d(xp, kernel.unsqueeze(1), bias, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        xp, kernel = ctx.saved_tensors
        need_x, need_k, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_k = grad_b = None
        if need_x:
            flipped = kernel.flip(-2, -1).unsqueeze(1)
            grad_x = F.conv2d(wrap_pad(grad, ctx.pad), flipped,
                              groups=grad.shape[1])
        if need_k:
            h, w = grad.shape[-2:]
            grad_k = torch.zeros_like(kernel)
            for i, j in ctx.taps:
                tap = xp[:, :, i:i + h, j:j + w] * grad
                grad_k[:, i, j] = tap.sum(dim=(0, 2, 3))
        if need_b:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_k, grad_b, None, None


def wrap_depthwise_conv(x: Tensor, kernel: Tensor, bias: Tensor,
                        taps: Tuple[Tuple[int, int], ...]) -> Tensor:
    """``F.conv2d(wrap_pad(x, pad), kernel[:, None], bias, groups=C)`` for a
    ``(C, K, K)`` kernel (``K = 2·pad + 1``) that is zero outside ``taps``.

    Eager CPU training in float32/float64 (gradients needed, no autocast,
    the one-pass kernels' switch on: :func:`mmbhvit.models.binary.fused.
    fused_kernels`) runs :class:`WrapDepthwiseConv`; everything else (no
    gradients, tracing, ``torch.compile``, autocast, other devices, maps
    smaller than the pad) runs the plain expression.
    """
    from .binary import fused
    pad = kernel.shape[-1] // 2
    if (torch.is_grad_enabled() and fused.plain_cpu_training(x)
            and min(x.shape[-2:]) >= pad):
        return WrapDepthwiseConv.apply(x, kernel, bias, pad, taps)
    return F.conv2d(wrap_pad(x, pad), kernel.unsqueeze(1), bias,
                    groups=x.shape[1])


def channel_group_mean(x: Tensor, ratio: int) -> Tensor:
    """Mean over groups of ``ratio`` consecutive channels (dim 1): ``(N, C,
    ...)`` → ``(N, C / ratio, ...)``."""
    n, c = x.shape[:2]
    return x.view(n, c // ratio, ratio, *x.shape[2:]).mean(dim=2)


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
    at the trained size, so the trained resolution is reproduced exactly).

    Traced, the resize is always in the graph (``size`` comes from the
    input's shape); at the trained size a bicubic resize is the identity
    (its taps are 0, 1, 0, 0), so the values are the same."""
    if not tracing_shapes() and tuple(pos_embed.shape[-2:]) == tuple(size):
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
