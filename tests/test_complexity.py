# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""BOP / FLOP counting of binary layers against hand computations."""
import os.path as osp

import pytest
import torch

import mmbhvit  # noqa: F401
from mmbhvit.analysis import (BinaryFlopAnalyzer, analyze_config,
                              analyze_model)
from mmbhvit.apis import build_model
from mmbhvit.models.backbones.bhvit import MSGDC, MSMHA, ShiftBranches
from mmbhvit.models.binary import (BinaryConv2d, QuantizerFunction,
                                   sign_ste)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BN = dict(type='BN')
# a reduced BHViT for the config tests (the real configs, shrunk: fast)
ARCH = dict(_delete_=True, embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])


def _count(module, *inputs):
    module.eval()
    with torch.no_grad():
        return BinaryFlopAnalyzer(module, inputs)


def _grouped_dilated_conv(bits):
    return BinaryConv2d(16, 16, 3, groups=4, dilation=3, padding=3,
                        weight_bits=bits, act_bits=bits)


def test_binary_grouped_dilated_conv():
    x = torch.randn(1, 16, 14, 14)
    macs = 14 * 14 * 16 * (16 // 4) * 9
    binary = _count(_grouped_dilated_conv(1), x)
    assert binary.bops() == macs
    assert binary.flops() == 0
    assert binary.binary_macs() == macs
    assert binary.by_operator() == {'bop_conv_1x1': macs}
    fp = _count(_grouped_dilated_conv(32), x)
    assert fp.bops() == 0
    assert fp.flops() == macs


def test_binary_params_are_weights_of_1bit_convs():
    rows, _ = analyze_model(_grouped_dilated_conv(1).eval(),
                            torch.randn(1, 16, 14, 14))
    assert rows['total'].binary_params == 16 * 4 * 9  # the bias is FP
    assert rows['total'].params == 16 * 4 * 9 + 16
    rows, _ = analyze_model(_grouped_dilated_conv(32).eval(),
                            torch.randn(1, 16, 14, 14))
    assert rows['total'].binary_params == 0


def test_one_binary_operand_is_not_a_bop():
    # 1-bit weights on full-precision activations: float accumulations
    conv = BinaryConv2d(8, 8, 1, weight_bits=1, act_bits=32)
    counted = _count(conv, torch.randn(1, 8, 5, 5))
    assert counted.bops() == 0
    assert counted.flops() == 8 * 8 * 25


@pytest.mark.parametrize('bits', [1, 32])
def test_msgdc_convs_called_outside_forward_are_counted(bits):
    # MSGDC calls conv.forward_quantized (a method, not a module call): the
    # convs' own forward never runs, the ops are attributed to MSGDC.
    mixer = MSGDC(16, BN, weight_bits=bits, act_bits=bits)
    counted = _count(mixer, torch.randn(1, 16, 14, 14))
    conv_macs = 3 * 14 * 14 * 16 * 4 * 9
    bn = 2 * 16 * 14 * 14  # eval-mode BN, affine: 2 per element (mmengine)
    if bits == 1:
        assert counted.bops() == conv_macs
        assert counted.flops() == bn
    else:
        assert counted.bops() == 0
        assert counted.flops() == conv_macs + bn
    assert counted.total('convs.0') == 0  # never called as a module


def test_count_bn_false_drops_batchnorm():
    mixer = MSGDC(16, BN).eval()
    x = torch.randn(1, 16, 14, 14)
    with torch.no_grad():
        without = BinaryFlopAnalyzer(mixer, (x, ), count_bn=False)
        assert without.flops() == 0
        assert without.bops() == 3 * 14 * 14 * 16 * 4 * 9
        assert BinaryFlopAnalyzer(mixer, (x, )).flops() == 2 * 16 * 14 * 14


def _msmha_hand_count(c, h, w, window, planes_p):
    """Hand count of MSMHA on a ``(1, c, h, w)`` map (h, w multiples of
    the window): returns (BOPs, FLOPs, binary MACs)."""
    n_win = (h // window) * (w // window)
    pad = window // 2
    merged = ((h + 2 * pad - window) // window + 1) * (
        (w + 2 * pad - window) // window + 1)
    t = window * window + merged  # window tokens + merged tokens
    qkv = 3 * n_win * t * c * c  # binary 1x1 convs over the token sets
    proj = h * w * c * c  # binary 1x1 conv on the map
    scores = n_win * t * t * c  # q^T k, summed over heads
    context = n_win * c * t * t  # v P^T, summed over heads
    bops = qkv + proj + scores + context * planes_p
    # eval-mode BN (2 per element): q/k/v norms, context norm, proj norm
    flops = 2 * (3 * n_win * c * t + n_win * c * t + c * h * w)
    return bops, flops, qkv + proj + scores + context


@pytest.mark.parametrize('binarizer,planes', [('lsq', 2), ('gsb', 3)])
def test_msmha_binary_attention(binarizer, planes):
    c, heads, h, w = 32, 2, 14, 14
    mixer = MSMHA(c, heads, BN, window_size=7, attn_binarizer=binarizer)
    assert mixer.binarizer.precision == planes  # what the quantizer declares
    counted = _count(mixer, torch.randn(1, c, h, w))
    bops, flops, macs = _msmha_hand_count(c, h, w, 7, planes)
    assert counted.bops() == bops
    assert counted.flops() == flops
    assert counted.binary_macs() == macs
    ops = counted.by_operator()
    assert ops['bop_matmul_1x1'] == 4 * 53 * 53 * c
    assert ops[f'bop_matmul_1x{planes}'] == 4 * 53 * 53 * c * planes
    # softmax and the hand-written LayerNorm are element-wise: not counted
    assert 'aten::softmax' in counted.unsupported_ops()

    fp = _count(MSMHA(c, heads, BN, window_size=7, attn_binarizer=binarizer,
                      weight_bits=32, act_bits=32),
                torch.randn(1, c, h, w))
    assert fp.bops() == 0
    assert fp.flops() == macs + flops  # same MACs, all in floating point


class _ThreeBitForTest(QuantizerFunction):
    """A quantizer that only declares its precision (forward: identity)."""
    precision = 3

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Product(torch.nn.Module):

    def forward(self, a, b):
        return sign_ste(a) @ _ThreeBitForTest.apply(b).transpose(-2, -1)


def test_counter_reads_the_declared_precision():
    counted = _count(_Product(), torch.randn(1, 5, 8), torch.randn(1, 6, 8))
    assert counted.by_operator() == {'bop_matmul_1x3': 5 * 6 * 8 * 3}
    assert counted.binary_macs() == 5 * 6 * 8


def test_shift_branches_are_counted_unfused_and_switched_back():
    m = ShiftBranches(16, (1, 2)).eval()
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        fused = m(x)
        with m.unfused():
            assert not m.fused
            assert torch.equal(m(x), m.forward_rolls(x))
        assert m.fused
        assert torch.allclose(m(x), fused, atol=1e-5)
    rows, counted = analyze_model(m, (x, ))
    assert m.fused  # analysis switched it back
    assert counted.by_operator() == {}  # shifts and gates: no MACs
    assert _count(m, x).flops() > 0  # traced fused: a depthwise conv
    m.fused = False  # a previous setting survives the analysis as well
    analyze_model(m, (x, ))
    assert m.fused is False


def test_config_report_parts_add_up():
    cfg = osp.join(ROOT, 'configs/bhvit/bhvit-tiny_2xb128_in1k.py')
    options = {'model.backbone.arch': ARCH, 'model.head.in_channels': 128}
    report = analyze_config(cfg, shape=(64, 64), cfg_options=options)
    assert report.task == 'classification'
    names = [r.name for r in report.rows]
    assert names[:6] == ['stem', 'stage1', 'stage2', 'stage3', 'stage4',
                         'final norm']
    parts = [r for r in report.rows if r.kind == 'part']
    backbone = report.row('backbone')
    assert sum(r.bops for r in parts) == backbone.bops
    assert sum(r.flops for r in parts) == backbone.flops
    assert sum(r.params for r in parts) == backbone.params
    total = report.total
    assert total.flops == backbone.flops + report.row('neck').flops + \
        report.row('head').flops
    assert report.row('head').flops == 128 * 1000  # the linear classifier
    assert report.row('stem').bops == 0 and report.row('head').bops == 0
    assert total.ops == pytest.approx(total.bops / 64 + total.flops)
    # binary patch merging: every stage from 2 on holds 1-bit parameters
    assert all(report.row(f'stage{i}').binary_params > 0 for i in (2, 3, 4))

    fp = analyze_config(cfg, shape=(64, 64), full_precision=True,
                        cfg_options=options)
    assert fp.total.bops == 0 and fp.total.binary_params == 0
    assert fp.total.flops == total.flops + total.binary_macs
    # the counterpart has no attention quantizers (LSQ: a step and a zero
    # point per head, in one block of 2 heads and one of 4)
    assert total.params - fp.total.params == 2 * (2 + 4)


def test_segmentation_config_reports_auxiliary_head_apart():
    cfg = osp.join(ROOT, 'configs/bhvit/upernet_bhvit-tiny_ade20k.py')
    report = analyze_config(
        cfg, shape=(64, 64),
        cfg_options={
            'model.backbone.arch': ARCH,
            'model.decode_head.in_channels': [16, 32, 64, 128],
            'model.decode_head.channels': 32,
            'model.auxiliary_head.in_channels': 64,
            'model.auxiliary_head.channels': 16
        })
    assert report.task == 'segmentation'
    aux = report.row('auxiliary_head (training only)')
    assert aux.kind == 'extra' and aux.flops > 0
    total = report.row('total (inference)')
    assert total.flops == (report.row('backbone').flops +
                           report.row('decode_head').flops +
                           report.row('resize to input').flops)
    # bilinear resize of 150 logit maps to 64x64: 4 FLOPs per output value
    assert report.row('resize to input').flops == 4 * 150 * 64 * 64
    assert total.bops == report.row('backbone').bops > 0


def test_building_leaves_the_default_scope_alone():
    # a segmentation build must not leave 'mmseg' as the default scope (it
    # would break later mmpretrain builds in the same process)
    from mmengine.registry import DefaultScope
    def current():
        scope = DefaultScope.get_current_instance()
        return None if scope is None else scope.scope_name

    before = current()
    model = build_model(
        osp.join(ROOT, 'configs/bhvit/fpn_bhvit-tiny_ade20k.py'),
        cfg_options={'model.backbone.arch': ARCH,
                     'model.neck.in_channels': [16, 32, 64, 128]})
    assert model.task == 'segmentation' and not model.training
    assert current() == before
    # SyncBN of the config is built as BN (costs and CPU runs)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm)
                   for m in model.modules())
