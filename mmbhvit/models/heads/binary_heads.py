# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Binary decode heads: UPerNet and Semantic FPN whose 3×3 convolutions are
binary (and the FPN neck of Semantic FPN, whose 3×3 convolutions then
dominate).

Once the backbone runs packed, the 3×3 convolutions of the head dominate a
segmentor (UPerNet's ``fpn_bottleneck``, ``4C → C`` at 1/4 resolution, is
nearly all of its OPs). :class:`BinaryUPerHead` and :class:`BinaryFPNHead`
are mmseg's :class:`~mmseg.models.decode_heads.UPerHead` and
:class:`~mmseg.models.decode_heads.FPNHead` with every 3×3 ``ConvModule``
replaced by a :class:`BinaryConvBlock`. What stays in full precision:

* the 1×1 classifier ``conv_seg``: it produces the logits (the last layer
  of a binary network is kept real-valued, as the first);
* the 1×1 lateral convolutions of UPerNet and the 1×1 convolutions of the
  pooling pyramid (PPM) by default: they read the backbone's real-valued
  features and are under 0.5 % of the full-precision head's FLOPs
  (``binary_laterals=True`` binarizes the laterals too). They end with
  their BN (no ReLU), so the signs that read them see centred values.

``weight_bits=act_bits=32`` gives the full-precision counterpart of the
same architecture (same shifts, norms, RPReLUs and shortcuts).
"""
from typing import Optional

import torch
from mmcv.cnn import ConvModule, build_norm_layer
from mmseg.models.decode_heads import FPNHead, UPerHead
from mmseg.models.decode_heads.psp_head import PPM
from mmseg.models.necks import FPN
from mmseg.models.utils import Upsample, resize
from torch import Tensor, nn

from ...registry import register_model
from ..finite import is_tracing
from ..binary import BinaryConv2d, LearnableBias, RPReLU


class BinaryConvBlock(nn.Module):
    r"""Binary convolution block (ReActNet / BHViT style).

    .. math:: y = \operatorname{RPReLU}\big(\operatorname{Norm}(\hat W
        \circledast \operatorname{sign}(x + b)) + \operatorname{shortcut}(x)
        \big)

    The real-valued shortcut carries what the sign throws away:

    * ``in == out``: the identity;
    * ``in = r · out``: the mean of the ``r`` channels ``c, c + out, ...,
      c + (r-1)·out`` (for a concatenation of ``r`` maps of ``out``
      channels, as UPerNet's ``fpn_bottleneck`` reads, their per-channel
      mean);
    * ``out = r · in``: the input tiled ``r`` times;
    * otherwise no shortcut.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel_size (int): odd kernel size (``same`` zero padding).
        norm_cfg (dict): norm layer after the convolution.
        weight_bits (int): 1 or 32 (see :class:`BinaryConv2d`).
        act_bits (int): 1 or 32.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int = 3,
                 norm_cfg: Optional[dict] = None,
                 weight_bits: int = 1, act_bits: int = 1):
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.shift = LearnableBias(in_channels)
        self.conv = BinaryConv2d(in_channels, out_channels, kernel_size,
                                 padding=kernel_size // 2, bias=False,
                                 weight_bits=weight_bits, act_bits=act_bits)
        self.norm = build_norm_layer(norm_cfg, out_channels)[1]
        self.act = RPReLU(out_channels)

    @property
    def has_shortcut(self) -> bool:
        big = max(self.in_channels, self.out_channels)
        return big % min(self.in_channels, self.out_channels) == 0

    def shortcut(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.in_channels > self.out_channels:
            ratio = self.in_channels // self.out_channels
            return x.view(b, ratio, self.out_channels, h, w).mean(dim=1)
        if self.out_channels > self.in_channels:
            return x.repeat(1, self.out_channels // self.in_channels, 1, 1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.conv(x, self.shift))  # conv(sign(shift(x)))
        if self.has_shortcut:
            y = y + self.shortcut(x)
        return self.act(y)


def _binarize_conv_modules(parent: nn.Module, kernel_size: int,
                           **block_cfg) -> None:
    """Replace every stride-1 ``kernel_size`` ``ConvModule`` among the
    direct children of ``parent`` (a module list / sequential) by a
    :class:`BinaryConvBlock` of the same widths."""
    for name, child in parent.named_children():
        if (isinstance(child, ConvModule)
                and child.conv.kernel_size == (kernel_size, kernel_size)
                and child.conv.stride == (1, 1)):
            setattr(parent, name, BinaryConvBlock(
                child.in_channels, child.out_channels, kernel_size,
                **block_cfg))


@register_model
class BinaryUPerHead(UPerHead):
    """UPerNet head whose 3×3 convolutions are :class:`BinaryConvBlock`:
    the PSP ``bottleneck``, the ``fpn_convs`` and the ``fpn_bottleneck``.

    Args:
        weight_bits (int): 1, or 32 for the full-precision counterpart.
        act_bits (int): 1 or 32.
        binary_laterals (bool): also binarize the 1×1 lateral convolutions
            (default False: they read the real-valued backbone features
            and cost little).
        lateral_act (bool): keep the head's activation (ReLU) on the
            full-precision 1×1 convolutions (laterals, PPM) whose outputs
            feed the binary blocks. Default False: they end with their BN,
            so the signs see centred values rather than ReLU outputs (all
            ``>= 0``, many exactly 0); +1.0 mIoU on the demo.
        **kwargs: arguments of :class:`~mmseg.models.decode_heads.UPerHead`
            (``pool_scales``, ``in_channels``, ``channels``, ``norm_cfg``,
            ``init_cfg``, ...).
    """

    def __init__(self, weight_bits: int = 1, act_bits: int = 1,
                 binary_laterals: bool = False, lateral_act: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.binary_laterals = binary_laterals
        if not lateral_act:
            self._rebuild_fp_convs(act_cfg=None)
        block_cfg = dict(norm_cfg=self.norm_cfg, weight_bits=weight_bits,
                         act_bits=act_bits)
        _binarize_conv_modules(self, 3, **block_cfg)  # the two bottlenecks
        _binarize_conv_modules(self.fpn_convs, 3, **block_cfg)
        if binary_laterals:
            _binarize_conv_modules(self.lateral_convs, 1, **block_cfg)

    def _rebuild_fp_convs(self, act_cfg: Optional[dict]) -> None:
        """Laterals and PPM again, with ``act_cfg`` as their activation."""
        conv_cfg = dict(conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                        act_cfg=act_cfg)
        self.psp_modules = PPM(self.psp_modules.pool_scales,
                               self.in_channels[-1], self.channels,
                               align_corners=self.align_corners, **conv_cfg)
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, self.channels, 1, inplace=False, **conv_cfg)
            for c in self.in_channels[:-1])


def _may_overwrite() -> bool:
    """Whether a fresh intermediate map may be updated in place: not when
    autograd records (it may be saved for backward) nor when traced or
    compiled (an exported graph records the out-of-place ops)."""
    return not torch.is_grad_enabled() and not is_tracing()


def _shares_memory(t: Tensor, others) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def add_resized(x: Tensor, y: Tensor, mode: str,
                align_corners: Optional[bool] = None,
                inplace: bool = False) -> Tensor:
    """``x + resize(y, size=x.shape[2:], mode=mode, align_corners=...)``
    (mmseg's top-down sums of FPN), without the resized copy of ``y`` where
    the resize is exact:

    * ``y`` already of ``x``'s size: the resize is the identity (bilinear
      and nearest alike), so ``x + y``;
    * ``mode='nearest'`` to exactly twice ``y``'s height and width: output
      pixel ``(i, j)`` reads ``y[i // 2, j // 2]`` (PyTorch's rule for a
      factor of two), so ``x`` viewed as ``(N, C, H, 2, W, 2)`` plus ``y``
      broadcast over the two 2-sized dimensions: the same element sums,
      any memory format.

    Otherwise, and always while traced or compiled (``is_tracing``: an
    exported graph must hold for every input size, where these cases need
    not apply), the resize as mmseg computes it. ``inplace``: add into
    ``x`` (its caller owns it and nothing else reads it). The same values as
    the plain expression, except that a non-finite ``y`` does not spread to
    its neighbours in the identity case
    (bilinear weights of 0 times inf).
    """
    h, w = x.shape[2:]
    hy, wy = y.shape[2:]
    exact_cases = not is_tracing()
    if exact_cases and (hy, wy) == (h, w) and mode in ('bilinear',
                                                        'nearest'):
        return x.add_(y) if inplace else x + y
    if exact_cases and mode == 'nearest' and (h, w) == (2 * hy, 2 * wy):
        x6 = x.unflatten(3, (wy, 2)).unflatten(2, (hy, 2))
        y6 = y[:, :, :, None, :, None]
        if inplace:
            x6.add_(y6)
            return x
        return (x6 + y6).flatten(4, 5).flatten(2, 3)
    resized = resize(y, size=(h, w), mode=mode, align_corners=align_corners)
    return x.add_(resized) if inplace else x + resized


@register_model
class BinaryFPNHead(FPNHead):
    """Semantic FPN head whose 3×3 convolutions (all of the ``scale_heads``)
    are :class:`BinaryConvBlock`.

    Args:
        weight_bits (int): 1, or 32 for the full-precision counterpart.
        act_bits (int): 1 or 32.
        **kwargs: arguments of :class:`~mmseg.models.decode_heads.FPNHead`
            (``feature_strides``, ``in_channels``, ``channels``,
            ``norm_cfg``, ``init_cfg``, ...).
    """

    def __init__(self, weight_bits: int = 1, act_bits: int = 1, **kwargs):
        super().__init__(**kwargs)
        for scale_head in self.scale_heads:
            _binarize_conv_modules(scale_head, 3, norm_cfg=self.norm_cfg,
                                   weight_bits=weight_bits,
                                   act_bits=act_bits)
            for i, m in enumerate(scale_head):
                # mmseg's Upsample turns the traced size into a constant
                # (int()); nn.Upsample traces the factor: an ONNX export
                # holds at every input size. Same values (the output size
                # is 2 * input either way, so the scale is 1/2 either way).
                if isinstance(m, Upsample) and m.size is None:
                    scale_head[i] = nn.Upsample(
                        scale_factor=m.scale_factor, mode=m.mode,
                        align_corners=m.align_corners)

    def forward(self, inputs):
        # FPNHead's sum of the scale heads, with add_resized: the scale
        # heads of the lower levels already end at the first one's size
        x = self._transform_inputs(inputs)
        output = self.scale_heads[0](x[0])
        inplace = _may_overwrite() and not _shares_memory(output, x)
        for i in range(1, len(self.feature_strides)):
            output = add_resized(output, self.scale_heads[i](x[i]),
                                 'bilinear', self.align_corners, inplace)
        return self.cls_seg(output)


@register_model
class BinaryFPN(FPN):
    """FPN neck whose stride-1 3×3 output convolutions (``fpn_convs``) are
    :class:`BinaryConvBlock`; the 1×1 laterals (reading the real-valued
    backbone features) and any stride-2 extra convolution stay as they are.

    In Semantic FPN the neck's ``fpn_convs`` cost more than the whole
    :class:`BinaryFPNHead` (``256 → 256`` at 1/4 resolution), so a binary
    head alone leaves the segmentor dominated by floating-point work.

    Args:
        weight_bits (int): 1, or 32 for the full-precision counterpart.
        act_bits (int): 1 or 32.
        block_norm_cfg (dict): norm of the binary blocks (the plain FPN has
            none by default; binary convolutions need one).
        **kwargs: arguments of :class:`~mmseg.models.necks.FPN`.
    """

    def __init__(self, weight_bits: int = 1, act_bits: int = 1,
                 block_norm_cfg: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        _binarize_conv_modules(self.fpn_convs, 3, norm_cfg=block_norm_cfg,
                               weight_bits=weight_bits, act_bits=act_bits)

    def forward(self, inputs):
        # mmseg's FPN with add_resized in the top-down path (the nearest
        # upsampling by two read in place, no upsampled copy); set-ups with
        # extra levels or other resize options take mmseg's forward
        if (self.num_outs > len(self.lateral_convs) or
                not set(self.upsample_cfg) <= {'mode', 'align_corners'}):
            return super().forward(inputs)
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'{type(self).__name__}: {len(inputs)} input '
                             f'maps, expected {len(self.in_channels)} '
                             '(in_channels)')
        laterals = [conv(inputs[i + self.start_level])
                    for i, conv in enumerate(self.lateral_convs)]
        inplace = _may_overwrite() and not any(
            _shares_memory(lat, inputs) for lat in laterals)
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = add_resized(
                laterals[i - 1], laterals[i],
                self.upsample_cfg.get('mode', 'nearest'),
                self.upsample_cfg.get('align_corners'), inplace)
        return tuple(conv(lat) for conv, lat in zip(self.fpn_convs, laterals))
