# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Binary decode heads (BinaryUPerHead, BinaryFPNHead): registry build,
shapes, the full-precision path, gradients, and the shipped configs."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from mmcv.cnn import ConvModule

import mmbhvit  # noqa: F401
from mmbhvit.apis import build_model
from mmbhvit.models.binary import BinaryConv2d, binary_conv_layers
from mmbhvit.models.heads import (BinaryConvBlock, BinaryFPN,
                                  BinaryFPNHead, BinaryUPerHead)
from mmseg.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_SCOPE = 'mmseg'  # see tests/conftest.py
BN = dict(type='BN', requires_grad=True)


def uper_cfg(**kwargs):
    return dict(type='BinaryUPerHead', in_channels=[8, 16, 32, 64],
                in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                channels=16, num_classes=5, norm_cfg=BN, **kwargs)


def fpn_cfg(**kwargs):
    return dict(type='BinaryFPNHead', in_channels=[16, 16, 16, 16],
                in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                channels=8, num_classes=5, norm_cfg=BN, **kwargs)


def pyramid(widths, size=32):
    """Random feature maps of the given widths, the first ``size``², each
    next one half as wide."""
    torch.manual_seed(0)
    return [torch.randn(2, c, size >> i, size >> i)
            for i, c in enumerate(widths)]


@pytest.mark.parametrize('cfg, widths', [
    (uper_cfg(), [8, 16, 32, 64]), (fpn_cfg(), [16, 16, 16, 16])],
    ids=['uper', 'fpn'])
def test_build_from_registry_and_shapes(cfg, widths):
    head = MODELS.build(cfg)
    assert isinstance(head, (BinaryUPerHead, BinaryFPNHead))
    # no 3x3 ConvModule is left; every 3x3 conv is binary
    for m in head.modules():
        if isinstance(m, ConvModule):
            assert m.conv.kernel_size == (1, 1)
    binary = dict(binary_conv_layers(head))
    assert binary and all(m.is_binary and m.kernel_size == (3, 3)
                          for m in binary.values())
    assert type(head.conv_seg) is torch.nn.Conv2d  # classifier stays fp
    out = head.eval()(pyramid(widths))
    assert out.shape == (2, 5, 32, 32)


def test_uper_binary_layers_and_laterals():
    head = MODELS.build(uper_cfg())
    names = {n.rsplit('.conv', 1)[0] for n, _ in binary_conv_layers(head)}
    assert names == {'bottleneck', 'fpn_convs.0', 'fpn_convs.1',
                     'fpn_convs.2', 'fpn_bottleneck'}
    # the fp 1x1 convs feeding signs end with BN (no ReLU) by default
    fp_convs = list(head.lateral_convs) + [s[1] for s in head.psp_modules]
    assert all(isinstance(m, ConvModule) and m.with_norm for m in fp_convs)
    assert not any(m.with_activation for m in fp_convs)
    head = MODELS.build(uper_cfg(lateral_act=True))
    fp_convs = list(head.lateral_convs) + [s[1] for s in head.psp_modules]
    assert all(m.with_activation for m in fp_convs)
    head = MODELS.build(uper_cfg(binary_laterals=True))
    assert all(isinstance(m, BinaryConvBlock) and m.conv.is_binary
               for m in head.lateral_convs)
    assert head(pyramid([8, 16, 32, 64])).shape == (2, 5, 32, 32)


def test_full_precision_counterpart():
    head = MODELS.build(uper_cfg(weight_bits=32, act_bits=32))
    convs = [m for m in head.modules() if isinstance(m, BinaryConv2d)]
    assert convs and not any(m.is_binary for m in convs)
    # the block's conv is a plain conv of the shifted input (no sign)
    block = head.fpn_bottleneck
    torch.nn.init.normal_(block.shift.bias)
    x = torch.randn(1, block.in_channels, 6, 6)
    expected = F.conv2d(x + block.shift.bias.view(1, -1, 1, 1),
                        block.conv.weight, padding=1)
    torch.testing.assert_close(block.conv(x, block.shift), expected)
    # and the binary one binarizes: its output only takes sign values
    binary = BinaryConvBlock(4, 4, norm_cfg=BN)
    xq = binary.conv.quantize_input(torch.randn(1, 4, 5, 5), binary.shift)
    assert set(xq.unique().tolist()) <= {-1., 1.}


def test_binary_fpn_neck():
    neck = MODELS.build(dict(type='BinaryFPN', in_channels=[8, 16, 32, 64],
                             out_channels=16, num_outs=5,
                             add_extra_convs='on_output'))
    assert isinstance(neck, BinaryFPN)
    assert all(isinstance(m, BinaryConvBlock) for m in neck.fpn_convs[:4])
    extra = neck.fpn_convs[4]  # the stride-2 extra level is left alone
    assert isinstance(extra, ConvModule) and extra.conv.stride == (2, 2)
    assert all(isinstance(m, ConvModule) for m in neck.lateral_convs)
    outs = neck(pyramid([8, 16, 32, 64]))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2]


@pytest.mark.parametrize('cin, cout', [(8, 8), (16, 4), (4, 8), (6, 4)])
def test_block_shortcut(cin, cout):
    block = BinaryConvBlock(cin, cout, norm_cfg=BN).eval()
    x = torch.randn(2, cin, 5, 7)
    assert block(x).shape == (2, cout, 5, 7)
    assert block.has_shortcut == (max(cin, cout) % min(cin, cout) == 0)
    if cin == 16:  # reduction: per-channel mean of the 4 concatenated maps
        torch.testing.assert_close(block.shortcut(x),
                                   x.view(2, 4, 4, 5, 7).mean(1))


@pytest.mark.parametrize('cfg, widths', [
    (uper_cfg(), [8, 16, 32, 64]), (fpn_cfg(), [16, 16, 16, 16])],
    ids=['uper', 'fpn'])
def test_gradients_reach_binary_weights(cfg, widths):
    head = MODELS.build(cfg).train()
    head(pyramid(widths)).square().mean().backward()
    for name, conv in binary_conv_layers(head):
        assert conv.weight.grad is not None, name
        assert torch.isfinite(conv.weight.grad).all(), name
        assert conv.weight.grad.abs().sum() > 0, name
    for m in head.modules():
        if isinstance(m, BinaryConvBlock):
            assert m.shift.bias.grad.abs().sum() > 0


@pytest.mark.parametrize('name, head_type', [
    ('upernet_bhvit_ade20k-binary-head.py', BinaryUPerHead),
    ('fpn_bhvit_ade20k-binary-head.py', BinaryFPNHead),
    ('upernet_bhvit-tiny_ade20k-binary-head.py', BinaryUPerHead),
    ('fpn_bhvit-tiny_ade20k-binary-head.py', BinaryFPNHead),
    ('upernet_bhvit-tiny_demo-shapes-binary-head.py', BinaryUPerHead)])
def test_shipped_configs_build_and_run(name, head_type):
    """The whole model builds; its decode head runs on a small pyramid of
    the backbone's widths (the backbone is tested elsewhere)."""
    model = build_model(osp.join(REPO, 'configs', 'bhvit', name))
    head = model.decode_head
    assert type(head) is head_type
    assert all(m.is_binary for _, m in binary_conv_layers(head))
    if model.with_neck:
        assert type(model.neck) is BinaryFPN
    with torch.no_grad():
        feats = pyramid(model.backbone.num_features, size=16)
        if model.with_neck:
            feats = model.neck(feats)
        out = head(feats)
    assert out.shape == (2, head.num_classes, 16, 16)


def test_bn_folds_exactly_into_the_binary_conv():
    """mmbhvit.deploy.optimize_heads folds each BN into the conv before it
    (mmcv's fuse_conv_bn); for a BinaryConv2d that is exact, because the
    scaled sign of a weight row is positively homogeneous: binarizing
    ``k * w`` gives ``k * binarize(w)`` per output channel."""
    from mmcv.cnn import fuse_conv_bn
    torch.manual_seed(0)
    block = BinaryConvBlock(8, 8, norm_cfg=BN)
    bn = block.norm
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()  # includes negative scales
    bn.bias.data.normal_()
    block.eval()
    x = torch.randn(2, 8, 6, 6)
    expected = block(x)
    fuse_conv_bn(block)
    assert isinstance(block.norm, torch.nn.Identity)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('hw, hwy, mode', [
    ((16, 12), (16, 12), 'bilinear'), ((16, 12), (16, 12), 'nearest'),
    ((16, 12), (8, 6), 'nearest'), ((16, 12), (8, 6), 'bilinear'),
    ((15, 12), (8, 6), 'nearest'), ((18, 12), (6, 4), 'nearest')])
@pytest.mark.parametrize('channels_last', [False, True])
def test_add_resized_equals_mmseg_resize(hw, hwy, mode, channels_last):
    from mmbhvit.models.heads.binary_heads import add_resized
    from mmseg.models.utils import resize
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, *hw), torch.randn(2, 5, *hwy)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        y = y.to(memory_format=torch.channels_last)
    align = False if mode == 'bilinear' else None
    ref = x + resize(y, size=hw, mode=mode, align_corners=align)
    out = add_resized(x, y, mode, align)
    assert torch.equal(out, ref) and out.shape == ref.shape
    assert not torch.equal(x, ref)  # out of place: x unchanged
    x2 = x.clone()
    out = add_resized(x2, y, mode, align, inplace=True)
    assert out is x2 and torch.equal(x2, ref)


def _mmseg_forward(module, inputs):
    # the forward of mmseg's class (FPN / FPNHead), bypassing ours
    return type(module).__mro__[1].forward(module, inputs)


@pytest.mark.parametrize('grad', [True, False])
def test_fpn_forwards_equal_mmseg(grad):
    """BinaryFPN / BinaryFPNHead reorganise mmseg's top-down sums
    (add_resized, in place without autograd): same values, and the same
    gradients, as mmseg's own forward; the inputs are never written."""
    torch.manual_seed(0)
    neck = MODELS.build(dict(type='BinaryFPN', in_channels=[8, 16, 32, 64],
                             out_channels=16, num_outs=4,
                             block_norm_cfg=BN)).eval()
    head = MODELS.build(fpn_cfg()).eval()
    feats = pyramid([8, 16, 32, 64])
    kept = [f.clone() for f in feats]
    with torch.set_grad_enabled(grad):
        outs = neck(feats)
        ref_outs = _mmseg_forward(neck, feats)
        assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
        logits = head(list(outs))
        ref_logits = _mmseg_forward(head, list(ref_outs))
        assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(feats, kept))
    if grad:
        g = torch.autograd.grad(logits.square().sum(),
                                [neck.lateral_convs[3].conv.weight])[0]
        g_ref = torch.autograd.grad(ref_logits.square().sum(),
                                    [neck.lateral_convs[3].conv.weight])[0]
        # the 2x2 sums of the broadcast's backward group differently from
        # the upsampling's: float round-off only
        assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
        assert g.abs().sum() > 0


def test_fpn_head_upsampling_traces_the_factor():
    """BinaryFPNHead's scale heads upsample with nn.Upsample (the factor
    traced, so a dynamic ONNX export holds at every size), with the values
    of mmseg's Upsample (size int(2 * s)) at odd sizes too."""
    from mmseg.models.utils import Upsample
    head = MODELS.build(fpn_cfg())
    ups = [m for m in head.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 6  # 1 + 2 + 3 for the levels below the first
    assert not any(isinstance(m, Upsample) for m in head.modules())
    x = torch.randn(1, 3, 7, 5)
    ref = Upsample(scale_factor=2, mode='bilinear', align_corners=False)(x)
    assert torch.equal(ups[0](x), ref) and ref.shape[2:] == (14, 10)
