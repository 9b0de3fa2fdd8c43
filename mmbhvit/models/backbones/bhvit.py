# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""BHViT: Binarized Hybrid Vision Transformer (Gao et al., CVPR 2025).

The backbone reads top-down like the paper:

* :class:`ConvStem` – 4×4/4 convolution, norm, GELU (+ positional embedding).
* Stages 1–2 – :class:`BHViTBlock` with the :class:`MSGDC` token mixer
  (multi-scale grouped dilated binary convolutions).
* Stages 3–4 – :class:`BHViTBlock` with the :class:`MSMHA` token mixer
  (window attention where every window also attends to merged tokens).
* :class:`PatchMerging` between stages (full precision or binary).

Every tensor is NCHW; the token BatchNorm of the paper is a ``BatchNorm2d``
(so SyncBN works), a token-wise linear layer is a binary 1×1 convolution.
"""
import copy
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import register_model
from ..checkpoint import load_pretrained
from ..binary import (BinaryConv2d, GSBAttentionBinarizer, LayerScale,
                      LearnableBias, LSQAttentionQuantizer, RPReLU,
                      sign_ste, sign_ste_with_shortcut)
from ..finite import check_finite_input, is_tracing
from ..layout import (ChannelLayerNorm, channel_group_mean, pad_to_multiple,
                      resize_pos_embed, tracing_shapes, window_partition,
                      window_reverse, wrap_depthwise_conv)


def _norm(norm_cfg: dict, channels: int) -> nn.Module:
    return build_norm_layer(norm_cfg, channels)[1]


# --------------------------------------------------------------------------
# Binary projection with a residual inside (the paper's binary "linear")
# --------------------------------------------------------------------------
class BinaryResidualProj(nn.Module):
    r"""A binary token projection with its own residual.

    .. math:: y = \operatorname{RPReLU}(\operatorname{Norm}(\hat W
        \operatorname{sign}(x + b)) + \operatorname{shortcut}(x))

    The shortcut keeps the information that binarization throws away: the
    identity when widths match, the input tiled ``out/in`` times when the
    layer expands, and the mean over groups of ``in/out`` consecutive
    channels when it reduces.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: dict,
                 weight_bits: int = 1, act_bits: int = 1,
                 recu: bool = False):
        super().__init__()
        if max(in_channels, out_channels) % min(in_channels,
                                                out_channels) != 0:
            raise ValueError('BinaryResidualProj needs one width to be a '
                             f'multiple of the other, got {in_channels} → '
                             f'{out_channels}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.shift = LearnableBias(in_channels)
        self.conv = BinaryConv2d(in_channels, out_channels, 1, bias=False,
                                 weight_bits=weight_bits, act_bits=act_bits,
                                 recu=recu)
        self.norm = _norm(norm_cfg, out_channels)
        self.act = RPReLU(out_channels)

    def add_shortcut(self, y: Tensor, x: Tensor) -> Tensor:
        """``y + shortcut(x)``; the tiled input is broadcast, not copied."""
        b, _, h, w = x.shape
        if self.out_channels > self.in_channels:
            ratio = self.out_channels // self.in_channels
            y = y.view(b, ratio, self.in_channels, h, w) + x.unsqueeze(1)
            return y.view(b, self.out_channels, h, w)
        if self.out_channels < self.in_channels:
            ratio = self.in_channels // self.out_channels
            return y + channel_group_mean(x, ratio)
        return y + x

    def forward(self, x: Tensor) -> Tensor:
        pair = self._fused_input(x)
        if pair is not None:  # same values, one backward pass over x
            xq, shortcut = pair
            return self.act(self.norm(self.conv.forward_quantized(xq)) +
                            shortcut)
        y = self.norm(self.conv(x, self.shift))  # conv(sign(shift(x)))
        return self.act(self.add_shortcut(y, x))

    def _fused_input(self, x: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """``(sign(shift(x)), shortcut(x))`` from one autograd Function
        (:func:`~mmbhvit.models.binary.sign_ste_with_shortcut`) when
        training a 1-bit layer whose shortcut is the identity or a mean,
        and nothing watches the convolution's own call (its forward
        hooks); else None."""
        conv = self.conv
        if (conv.act_bits != 1 or not torch.is_grad_enabled()
                or self.out_channels > self.in_channels
                or conv._forward_hooks or conv._forward_pre_hooks):
            return None
        return sign_ste_with_shortcut(
            x, self.shift.bias, self.in_channels // self.out_channels)


class BinaryFFN(nn.Module):
    """Binary MLP: expand ×ratio, reduce back, LayerScale, drop path."""

    def __init__(self, channels: int, ratio: int, norm_cfg: dict,
                 drop_path: float = 0., layer_scale: bool = True,
                 **binary_cfg):
        super().__init__()
        hidden = channels * ratio
        self.expand = BinaryResidualProj(channels, hidden, norm_cfg,
                                         **binary_cfg)
        self.reduce = BinaryResidualProj(hidden, channels, norm_cfg,
                                         **binary_cfg)
        self.layer_scale = LayerScale(channels) if layer_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(self.expand(x))
        if self.layer_scale is not None:
            x = self.layer_scale(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return x


# --------------------------------------------------------------------------
# Shift branches: zero-parameter spatial / channel mixing, LayerScale-gated
# --------------------------------------------------------------------------
def spatial_shift_mean(x: Tensor, radius: int, dim: int) -> Tensor:
    """Mean of ``x`` circularly rolled by ``-radius..radius`` along ``dim``."""
    out = x
    for offset in range(1, radius + 1):
        out = out + torch.roll(x, offset, dims=dim) + torch.roll(
            x, -offset, dims=dim)
    return out / (2 * radius + 1)


def channel_group_shift(x: Tensor, offset: int) -> Tensor:
    """Split channels in 4 groups and roll them down / up / right / left."""
    down, up, right, left = x.chunk(4, dim=1)
    return torch.cat([
        torch.roll(down, offset, dims=2),
        torch.roll(up, -offset, dims=2),
        torch.roll(right, offset, dims=3),
        torch.roll(left, -offset, dims=3)
    ], dim=1)


class ShiftBranches(nn.Module):
    """Sum of LayerScale-gated shifts: for each enabled radius ``r`` (1 for
    ``shift3``, 2 for ``shift5``), a vertical and a horizontal mean over
    ``2r+1`` neighbours and a channel-group shift by ``r`` (all circular).
    The LayerScales start at 0, so the branches start switched off.

    Every branch is a fixed per-channel spatial filter, so their gated sum is
    one depthwise convolution (circular padding) whose kernel is the
    scale-weighted sum of the filters, plus the summed biases: one pass over
    the map instead of a dozen rolls. :meth:`forward_rolls` is the direct
    form (used for maps smaller than the filter, and in tests). The
    circular padding is :func:`~mmbhvit.models.layout.wrap_pad`: ``F.pad``
    in eager, a gather when traced (no ONNX ``Pad`` of mode ``wrap``, which
    OpenVINO rejects); a traced forward always takes the fused form, which
    then wraps maps of any size.

    Attributes:
        fused (bool): True (default): :meth:`forward` runs the depthwise
            convolution; False: it runs :meth:`forward_rolls`. Same values
            either way; :meth:`unfused` switches it for a ``with`` block
            (cost counting does: the shifts are data movement, not
            multiply-accumulates).
    """

    def __init__(self, channels: int, radii: Sequence[int]):
        super().__init__()
        self.fused = True
        self.radii = tuple(radii)
        self.pad = max(self.radii)
        self.scales = nn.ModuleDict()
        filters, self.taps = [], []
        for r in self.radii:
            for kind in ('h', 'w', 'ch'):
                self.scales[f'{kind}{2 * r + 1}'] = LayerScale(channels, 0.)
                filters.append(self._filter(kind, r, channels))
                self.taps.append(1 if kind == 'ch' else 2 * r + 1)
        # 0/1 taps (exact in any dtype); the means divide the scales instead
        self.register_buffer('filters', torch.stack(filters), persistent=False)
        # the kernel positions any branch uses (a cross of 4·pad + 1 taps)
        self.support = tuple((int(i), int(j)) for i, j in
                             self.filters.sum(dim=(0, 1)).nonzero().tolist())

    def _filter(self, kind: str, r: int, channels: int) -> Tensor:
        """``(C, K, K)`` 0/1 cross-correlation taps of the branch."""
        k = 2 * self.pad + 1
        c0 = self.pad
        f = torch.zeros(channels, k, k)
        if kind == 'h':
            f[:, c0 - r:c0 + r + 1, c0] = 1.
        elif kind == 'w':
            f[:, c0, c0 - r:c0 + r + 1] = 1.
        else:  # out = x[i - r] (down), x[i + r] (up), x[j - r], x[j + r]
            g = channels // 4
            f[0 * g:1 * g, c0 - r, c0] = 1.
            f[1 * g:2 * g, c0 + r, c0] = 1.
            f[2 * g:3 * g, c0, c0 - r] = 1.
            f[3 * g:4 * g, c0, c0 + r] = 1.
        return f

    @contextmanager
    def unfused(self) -> Iterator['ShiftBranches']:
        """Run :meth:`forward_rolls` inside the ``with`` block; the previous
        setting of :attr:`fused` comes back on exit."""
        previous, self.fused = self.fused, False
        try:
            yield self
        finally:
            self.fused = previous

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused or (not tracing_shapes()
                              and min(x.shape[-2:]) < self.pad):
            return self.forward_rolls(x)
        branches = list(self.scales.values())
        scale = torch.stack([b.scale / n for b, n in zip(branches,
                                                          self.taps)])
        kernel = (scale[:, :, None, None] * self.filters).sum(0)
        bias = torch.stack([b.bias for b in branches]).sum(0)
        return wrap_depthwise_conv(x, kernel, bias, self.support)

    def forward_rolls(self, x: Tensor) -> Tensor:
        out = None
        for r in self.radii:
            k = 2 * r + 1
            for branch in (self.scales[f'h{k}'](spatial_shift_mean(x, r, 2)),
                           self.scales[f'w{k}'](spatial_shift_mean(x, r, 3)),
                           self.scales[f'ch{k}'](channel_group_shift(x, r))):
                out = branch if out is None else out + branch
        return out


# --------------------------------------------------------------------------
# Token mixers
# --------------------------------------------------------------------------
class MSGDC(nn.Module):
    r"""Multi-Scale Grouped Dilated Convolution token mixer (stages 1–2).

    .. math:: y = \operatorname{Norm}\Big(\sum_{d \in \{1,3,5\}}
        \operatorname{RPReLU}_d(\hat W_d \circledast_{d}
        \operatorname{sign}(x + b))\Big)

    three binary 3×3 convolutions with 4 groups and dilations 1, 3, 5 that
    share one binarized input: it is quantized once and given to each
    convolution's ``forward_quantized``
    (:meth:`~mmbhvit.models.binary.BinaryConv2d.forward_quantized`).
    """

    def __init__(self, channels: int, norm_cfg: dict,
                 dilations: Sequence[int] = (1, 3, 5), groups: int = 4,
                 weight_bits: int = 1, act_bits: int = 1, **unused):
        super().__init__()
        self.shift = LearnableBias(channels)
        self.convs = nn.ModuleList(
            BinaryConv2d(channels, channels, 3, padding=d, dilation=d,
                         groups=groups, bias=True, weight_bits=weight_bits,
                         act_bits=act_bits) for d in dilations)
        self.acts = nn.ModuleList(RPReLU(channels) for _ in dilations)
        self.norm = _norm(norm_cfg, channels)

    def forward(self, x: Tensor) -> Tensor:
        xq = self.convs[0].quantize_input(x, self.shift)
        out = None
        for conv, act in zip(self.convs, self.acts):
            y = act(conv.forward_quantized(xq))
            out = y if out is None else out + y
        return self.norm(out)


class MergedTokens(nn.Module):
    r"""Merged tokens for MSMHA: a learned per-channel mix of max- and
    average-pooled maps, :math:`m = a \max_{k}(x) + (1-a)
    \operatorname{avg}_{k}(x)`, pooled with kernel = stride = window size
    and padding ``k // 2`` (the padding counts in the average)."""

    def __init__(self, channels: int, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.mix = nn.Parameter(torch.full((channels, ), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        k = self.window_size
        mx = F.max_pool2d(x, k, k, padding=k // 2)
        avg = F.avg_pool2d(x, k, k, padding=k // 2, count_include_pad=True)
        a = self.mix.view(1, -1, 1, 1)
        return a * mx + (1 - a) * avg


class MSMHA(nn.Module):
    r"""Multi-Scale Multi-Head Attention token mixer (stages 3–4).

    The map is split into ``window_size``² windows; every window attends to
    its own tokens and to the merged tokens of the whole map
    (:class:`MergedTokens`), LayerNorm-ed together. Q/K/V are binary
    projections with residuals (:class:`BinaryResidualProj`), binarized again
    (after a learnable shift) before the products; the attention matrix is
    quantized by ``attn_binarizer``. The context is normalised, added to
    Q+K+V, and split back: window tokens return to their place, merged tokens
    are averaged over windows and upsampled; both are mixed per channel.
    A binary output projection with LayerScale ends the mixer.

    With window size :math:`s`, the input :math:`x` (:math:`C \times H
    \times W`) zero-padded to :math:`\bar x` (:math:`H_p \times W_p`,
    multiples of :math:`s`) and :math:`n = H_p W_p / s^2` windows
    :math:`X_j \in \mathbb R^{C \times s^2}` (lines 2–5 run on each window
    :math:`j` alike; its index is dropped there):

    .. math::
        M &= \operatorname{flat}\big(a \odot \operatorname{maxpool}_s(\bar x)
            + (1 - a) \odot \operatorname{avgpool}_s(\bar x)\big)
            \in \mathbb R^{C \times n} \\
        T &= \operatorname{LN}([X_j, M]), \quad
        Q = \mathcal P_q(T), \; K = \mathcal P_k(T), \;
        V = \mathcal P_v(T) \\
        \hat Q &= \operatorname{sign}(Q + b_q), \quad
        \hat K = \operatorname{sign}(K + b_k), \quad
        \hat V = \operatorname{sign}(V + b_v) \\
        A_h &= \operatorname{softmax}\big(\hat Q_h^\top \hat K_h /
            \sqrt d\big), \quad
        O_h = \hat V_h \, \mathcal B(A_h)^\top \\
        Z &= \operatorname{RPReLU}\big(\operatorname{Norm}(O) + Q + K + V
            \big) = [Z^{w}, Z^{m}] \\
        U &= \mu \odot \operatorname{unwindow}(Z_1^{w}, \dots, Z_n^{w})
            + (1 - \mu) \odot
            \operatorname{up}_s\Big(\frac1n \sum_j Z_j^{m}\Big) \\
        y &= \operatorname{LayerScale}\big(\mathcal P_o(U_{:H, :W})\big)

    Pooling has kernel = stride = :math:`s` and padding :math:`\lfloor s/2
    \rfloor` (:class:`MergedTokens`, per-channel mix :math:`a`), so there
    are as many merged tokens as windows; LN is a LayerNorm over channels;
    :math:`\mathcal P_{q,k,v,o}` are :class:`BinaryResidualProj`;
    :math:`h` runs over the heads, whose :math:`d = C / \text{heads}`
    channels are the rows of :math:`\hat Q_h, \hat K_h, \hat V_h`;
    :math:`\mathcal B` is the attention binarizer (LSQ: a 2-bit map, GSB:
    three binary maps); :math:`O` stacks the :math:`O_h` over channels and
    Norm is the ``norm_cfg`` norm; :math:`Z_j^{w}` (the first :math:`s^2`
    tokens of window :math:`j`) go back in place by
    :math:`\operatorname{unwindow}`, and :math:`\operatorname{up}_s`
    repeats each merged token over an :math:`s \times s` block;
    :math:`\mu` is a per-channel mix (``out_mix``); the LayerScale is the
    identity with ``layer_scale=False``. With ``act_bits=32`` the signs and
    :math:`\mathcal B` are left out.

    Inputs of any size are zero-padded to a multiple of the window size and
    cropped back.
    """

    def __init__(self, channels: int, num_heads: int, norm_cfg: dict,
                 window_size: int = 7, attn_binarizer: str = 'lsq',
                 layer_scale: bool = True, weight_bits: int = 1,
                 act_bits: int = 1, recu: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (channels // num_heads)**-0.5
        self.binarize_qkv = act_bits == 1
        binary_cfg = dict(weight_bits=weight_bits, act_bits=act_bits,
                          recu=recu)
        self.merge = MergedTokens(channels, window_size)
        self.token_norm = ChannelLayerNorm(channels)
        self.q = BinaryResidualProj(channels, channels, norm_cfg, **binary_cfg)
        self.k = BinaryResidualProj(channels, channels, norm_cfg, **binary_cfg)
        self.v = BinaryResidualProj(channels, channels, norm_cfg, **binary_cfg)
        self.q_shift = LearnableBias(channels)
        self.k_shift = LearnableBias(channels)
        self.v_shift = LearnableBias(channels)
        # The reference quantizes attention only when activations are 1-bit.
        if act_bits != 1:
            self.binarizer = None
        elif attn_binarizer == 'gsb':
            self.binarizer = GSBAttentionBinarizer(num_heads)
        elif attn_binarizer == 'lsq':
            self.binarizer = LSQAttentionQuantizer(num_heads)
        else:
            raise ValueError("attn_binarizer must be 'gsb' or 'lsq', got "
                             f'{attn_binarizer!r}')
        self.context_norm = _norm(norm_cfg, channels)
        self.context_act = RPReLU(channels)
        self.out_mix = nn.Parameter(torch.full((channels, ), 0.5))
        self.proj = BinaryResidualProj(channels, channels, norm_cfg,
                                       **binary_cfg)
        self.proj_scale = LayerScale(channels) if layer_scale else None

    def _heads(self, x: Tensor) -> Tensor:
        """``(B', C, T, 1)`` → ``(B', heads, C/heads, T)`` (a view)."""
        return x.view(x.shape[0], self.num_heads, -1, x.shape[2])

    def attend(self, t: Tensor) -> Tensor:
        """Attention over token sets ``t`` of shape ``(B', C, T, 1)``."""
        q, k, v = self.q(t), self.k(t), self.v(t)
        qb, kb, vb = self.q_shift(q), self.k_shift(k), self.v_shift(v)
        if self.binarize_qkv:
            qb, kb, vb = sign_ste(qb), sign_ste(kb), sign_ste(vb)
        scores = self._heads(qb).transpose(-2, -1) @ self._heads(kb)
        probs = torch.softmax(scores * self.scale, dim=-1)
        if self.binarizer is not None:
            probs = self.binarizer(probs)
        context = (self._heads(vb) @ probs.transpose(-2, -1)).reshape_as(t)
        return self.context_act(self.context_norm(context) + q + k + v)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.window_size
        x = pad_to_multiple(x, s)
        hp, wp = x.shape[-2:]
        n_win = (hp // s) * (wp // s)
        windows = window_partition(x, s)
        merged = self.merge(x).flatten(2)
        merged = merged.unsqueeze(1).expand(b, n_win, c, merged.shape[-1])
        tokens = torch.cat([windows, merged.reshape(b * n_win, c, -1)], dim=2)
        tokens = self.attend(self.token_norm(tokens.unsqueeze(-1)))
        win_out = window_reverse(tokens[:, :, :s * s, 0], s, b, hp, wp)
        merged_out = tokens[:, :, s * s:, 0].reshape(b, n_win, c, hp // s,
                                                   wp // s).mean(dim=1)
        merged_out = merged_out.repeat_interleave(s, dim=2).repeat_interleave(
            s, dim=3)
        mix = self.out_mix.view(1, -1, 1, 1)
        out = win_out * mix + merged_out * (1 - mix)
        out = self.proj(out[:, :, :h, :w])
        return out if self.proj_scale is None else self.proj_scale(out)


# --------------------------------------------------------------------------
# Block, stem and patch merging
# --------------------------------------------------------------------------
class BHViTBlock(nn.Module):
    r"""One BHViT block (a MetaFormer with binary parts).

    .. math::
        h = x + \operatorname{Mixer}(\operatorname{Norm}_1(x)), \quad
        \tilde h = \operatorname{Norm}_2(h), \quad
        y = h + \operatorname{FFN}(\tilde h) + \operatorname{Shifts}(\tilde h)
    """

    def __init__(self, token_mixer: nn.Module, channels: int, mlp_ratio: int,
                 norm_cfg: dict, drop_path: float = 0.,
                 layer_scale: bool = True, shift_radii: Sequence[int] = (1, 2),
                 **binary_cfg):
        super().__init__()
        self.norm1 = _norm(norm_cfg, channels)
        self.token_mixer = token_mixer
        self.norm2 = _norm(norm_cfg, channels)
        self.ffn = BinaryFFN(channels, mlp_ratio, norm_cfg, drop_path,
                             layer_scale, **binary_cfg)
        self.shifts = ShiftBranches(channels,
                                    shift_radii) if shift_radii else None

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.token_mixer(self.norm1(x))
        h_norm = self.norm2(h)
        out = h + self.ffn(h_norm)
        if self.shifts is not None:
            out = out + self.shifts(h_norm)
        return out


class ConvStem(nn.Module):
    """Full-precision stem: 4×4 stride-4 conv, norm, GELU. Inputs whose
    size is not a multiple of 4 are zero-padded (bottom/right)."""

    def __init__(self, in_channels: int, channels: int, norm_cfg: dict):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 4, stride=4)
        self.norm = _norm(norm_cfg, channels)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(pad_to_multiple(x, 4))))


class PatchMerging(nn.Module):
    r"""2×2 stride-2 downsampling between stages, plus positional embedding.

    Full precision: :math:`y = \operatorname{Norm}(W \circledast
    \operatorname{Norm}_0(x))`. Binary (``binary=True``):
    :math:`y = \operatorname{RPReLU}(\operatorname{Norm}(\hat W \circledast
    \operatorname{sign}(x_0 + b)) + \operatorname{tile}(\operatorname{avgpool}
    (x_0)))` with :math:`x_0 = \operatorname{Norm}_0(x)`. Odd sizes are
    zero-padded to even.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: dict,
                 pos_size: Sequence[int], binary: bool = False,
                 weight_bits: int = 1, act_bits: int = 1, **unused):
        super().__init__()
        self.binary = binary
        self.norm_in = _norm(norm_cfg, in_channels)
        if binary:
            if out_channels % in_channels:
                raise ValueError('binary patch merging tiles its input on the '
                                 f'shortcut: {out_channels} output channels '
                                 f'is not a multiple of {in_channels}')
            self.shift = LearnableBias(in_channels)
            self.conv = BinaryConv2d(in_channels, out_channels, 2, stride=2,
                                     bias=False, weight_bits=weight_bits,
                                     act_bits=act_bits)
            self.act = RPReLU(out_channels)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 2, stride=2,
                                  bias=False)
        self.norm = _norm(norm_cfg, out_channels)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, out_channels, *pos_size))

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(self.norm_in(x), 2)
        if self.binary:
            shortcut = F.avg_pool2d(x, 2).repeat(
                1, self.conv.out_channels // self.conv.in_channels, 1, 1)
            x = self.act(self.norm(self.conv(x, self.shift)) + shortcut)
        else:
            x = self.norm(self.conv(x))
        return x + resize_pos_embed(self.pos_embed, x.shape[-2:])


# --------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------
def check_image_batch(x: Tensor, owner: str, in_channels: int,
                      min_size: int) -> Tuple[int, int, int, int]:
    """Refuse what a BHViT backbone (``owner``: the model or its packed
    engine) cannot compute: not a 4-D floating-point batch, an empty batch,
    another channel count, a side under ``min_size``. Returns the shape;
    while traced (ONNX export) the sizes are read from the example input
    and are not part of the graph."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x)
        raise ValueError(f'{owner} expects a 4-D image batch (N, C, H, W), '
                         f'got {shape}')
    shape = tuple(x.shape)
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            shape = tuple(int(n) for n in shape)
    if shape[0] == 0:
        raise ValueError(f'{owner} got an empty batch (N = 0, input shape '
                         f'{shape})')
    if shape[1] != in_channels:
        raise ValueError(f'{owner} was built for {in_channels} input '
                         f'channels, got {shape[1]} (input shape {shape})')
    if min(shape[-2:]) < min_size:
        raise ValueError(f'{owner} needs images of at least {min_size}×'
                         f'{min_size} (the last stage works at 1/32 '
                         f'resolution), got {shape[-2]}×{shape[-1]}')
    if not x.is_floating_point():
        raise TypeError(f'{owner} expects a floating-point image batch '
                        '(normalised by the data preprocessor), got '
                        f'{x.dtype}')
    return shape


@register_model
class BHViT(BaseModule):
    """BHViT backbone.

    Args:
        arch (str | dict): ``'tiny'`` or ``'small'``, or a dict with keys
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios`` (four
            values each). Stages 1–2 use MSGDC blocks, stages 3–4 MSMHA.
        in_channels (int): input image channels.
        img_size (int | tuple): training resolution; sets the size of the
            positional embeddings (224 → 56, 28, 14, 7). Other input sizes
            interpolate them.
        attn_binarizer (str): ``'lsq'`` (4-level LSQ-style, the official
            training default) or ``'gsb'`` (quantization decomposition into
            binary maps).
        binary_merge (bool): binary patch merging (the official
            ``some_fp=False``); default full-precision merging.
        shift3 / shift5 (bool): shift branches with radius 1 / 2.
        recu (bool): ReCU in the binary 1×1 layers (Q/K/V, projections,
            MLP); like the reference, the 3×3 and merging convs never use it.
        weight_bits / act_bits (int): 1 (binary) or 32 (full-precision
            counterpart).
        layer_scale (bool): LayerScale on the MLP and attention outputs.
        window_size (int): attention window (odd), 7 by default.
        drop_path_rate (float): stochastic depth, linear over all blocks.
        norm_cfg (dict): norm of the token features (BN; SyncBN works).
        out_indices (Sequence[int]): stages to output (0..3).
        final_norm (bool): normalise the stage-4 output (``norm`` layer).
        frozen_stages (int): freeze the stem and stages ``<= frozen_stages``.
        norm_eval (bool): keep BN layers in eval mode during training.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained',
            checkpoint=PATH, prefix='backbone.')``.
    """
    arch_zoo = {
        'tiny': dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2],
                     num_heads=[1, 1, 4, 8], mlp_ratios=[8, 8, 4, 4]),
        'small': dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 8, 4],
                      num_heads=[1, 1, 4, 8], mlp_ratios=[8, 8, 4, 4]),
    }
    arch_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios')
    stage_mixers = ('msgdc', 'msgdc', 'msmha', 'msmha')
    min_input_size = 32

    def __init__(self,
                 arch: Union[str, Dict] = 'small',
                 in_channels: int = 3,
                 img_size: Union[int, Sequence[int]] = 224,
                 attn_binarizer: str = 'lsq',
                 binary_merge: bool = False,
                 shift3: bool = True,
                 shift5: bool = True,
                 recu: bool = False,
                 weight_bits: int = 1,
                 act_bits: int = 1,
                 layer_scale: bool = True,
                 window_size: int = 7,
                 drop_path_rate: float = 0.,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 final_norm: bool = True,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        self.arch = self._parse_arch(arch)
        dims = self.arch['embed_dims']
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f'window_size must be odd, got {window_size}')
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        out_indices = tuple(i + 4 if i < 0 else i for i in out_indices)
        for i in out_indices:
            if not 0 <= i < 4:
                raise ValueError(f'out_indices must be in 0..3, got {i}')
        self.in_channels = in_channels
        self.img_size = tuple(img_size)
        self.out_indices = out_indices
        self.final_norm = final_norm
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.binary_merge = binary_merge
        binary_cfg = dict(weight_bits=weight_bits, act_bits=act_bits,
                          recu=recu)
        shift_radii = tuple(r for r, on in ((1, shift3), (2, shift5)) if on)

        self.patch_embed = ConvStem(in_channels, dims[0], norm_cfg)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, dims[0], img_size[0] // 4, img_size[1] // 4))

        self.downsamples = nn.ModuleList(
            PatchMerging(dims[i], dims[i + 1], norm_cfg,
                         (img_size[0] // 2**(i + 3),
                          img_size[1] // 2**(i + 3)),
                         binary=binary_merge, weight_bits=weight_bits,
                         act_bits=act_bits) for i in range(3))

        depths = self.arch['depths']
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                if self.stage_mixers[i] == 'msgdc':
                    mixer = MSGDC(dims[i], norm_cfg, **binary_cfg)
                else:
                    mixer = MSMHA(dims[i], self.arch['num_heads'][i],
                                  norm_cfg, window_size, attn_binarizer,
                                  layer_scale, **binary_cfg)
                blocks.append(
                    BHViTBlock(mixer, dims[i], self.arch['mlp_ratios'][i],
                               norm_cfg, dpr[sum(depths[:i]) + j],
                               layer_scale, shift_radii, **binary_cfg))
            self.stages.append(nn.Sequential(*blocks))
        self.num_features = tuple(dims)
        if final_norm:
            self.norm = _norm(norm_cfg, dims[-1])
        self._freeze_stages()

    # ------------------------------------------------------------------
    @classmethod
    def _parse_arch(cls, arch) -> dict:
        if isinstance(arch, str):
            if arch not in cls.arch_zoo:
                raise ValueError(f'Unknown BHViT arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_zoo)} or pass a dict with '
                                 f'keys {cls.arch_keys}')
            return copy.deepcopy(cls.arch_zoo[arch])
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch)}')
        missing = set(cls.arch_keys) - set(arch)
        extra = set(arch) - set(cls.arch_keys)
        if missing or extra:
            raise ValueError(f'Custom BHViT arch needs exactly the keys '
                             f'{cls.arch_keys}; missing {sorted(missing)}, '
                             f'unknown {sorted(extra)}')
        arch = {k: list(arch[k]) for k in cls.arch_keys}
        for k, v in arch.items():
            if len(v) != 4 or not all(isinstance(i, int) and i > 0 for i in v):
                raise ValueError(f'arch[{k!r}] must be 4 positive ints (one per '
                                 f'stage), got {v}')
        for i, (dim, heads) in enumerate(zip(arch['embed_dims'],
                                             arch['num_heads'])):
            if dim % 4:
                raise ValueError(f'embed_dims[{i}]={dim} must be divisible by '
                                 '4 (grouped convs and channel shifts use 4 '
                                 'groups)')
            if dim % heads:
                raise ValueError(f'embed_dims[{i}]={dim} is not divisible by '
                                 f'num_heads[{i}]={heads}')
        return arch

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        frozen = [self.patch_embed]
        self.pos_embed.requires_grad = False
        for i in range(min(self.frozen_stages + 1, 4)):
            if i > 0:
                frozen.append(self.downsamples[i - 1])
            frozen.append(self.stages[i])
        if self.frozen_stages >= 3 and self.final_norm:
            frozen.append(self.norm)
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self):
        cfg = self.init_cfg
        if cfg is not None and cfg.get('type') == 'Pretrained':
            if load_pretrained(self, cfg):
                self._is_init = True
                return
        elif cfg is not None:
            super().init_weights()
            return
        # The reference initialises token-wise linear layers (the binary 1×1
        # convs) like ViT linears, and the positional embeddings alike.
        for m in self.modules():
            if isinstance(m, BinaryConv2d) and m.kernel_size == (1, 1):
                trunc_normal_(m.weight, std=.02)
        for name, p in self.named_parameters():
            if name.endswith('pos_embed'):
                trunc_normal_(p, std=.02)
        self._is_init = True

    # ------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> Tensor:
        """Validate the image batch ``x`` and return it in the dtype of the
        parameters (see :meth:`forward`)."""
        check_image_batch(x, 'BHViT', self.in_channels, self.min_input_size)
        note = ''
        dtype = self.pos_embed.dtype
        if x.dtype != dtype:
            note = f', cast from {x.dtype}'
            x = x.to(dtype)
        if not is_tracing():
            check_finite_input(x, 'BHViT', note)
        return x

    def forward(self, x: Tensor):
        """NCHW feature maps for ``out_indices``.

        Input checks (each a clear error instead of a failure deep inside a
        layer, or a silently wrong output):

        * 4-D, ``in_channels`` channels, at least ``min_input_size`` pixels
          per side, N > 0: else ``ValueError``;
        * floating point: a floating input of another dtype than the
          parameters (float16 / bfloat16 / float64 images into a float32
          model, or float32 images into a half model) is **cast to the
          parameters' dtype**: the model's dtype sets the precision of the
          computation and of the outputs (from float16 / bfloat16 the cast
          is exact). Integer images (raw uint8 pixels) raise ``TypeError``.
          Under ``torch.autocast`` the layers still run in the autocast
          dtype;
        * finite: NaN or ±inf pixels raise
          :class:`~mmbhvit.models.finite.NonFiniteError` (a ``ValueError``)
          naming the images, before any layer (and any BatchNorm running
          statistic) sees them. This test reads the input once and, on an
          accelerator, waits for it; it is skipped while the model is traced
          or compiled (``torch.jit.trace``, ONNX export, ``torch.compile``),
          where a data-dependent check would be frozen at trace time or
          break the graph.
        """
        x = self._check_input(x)
        x = self.patch_embed(x)
        x = x + resize_pos_embed(self.pos_embed, x.shape[-2:])
        outs = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(x)
            if i in self.out_indices:
                out = x
                if i == 3 and self.final_norm:
                    out = self.norm(x)
                outs.append(out)
        return tuple(outs)
