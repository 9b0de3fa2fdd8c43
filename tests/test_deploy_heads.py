# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Binary head convolutions on packed bits (``binary_conv`` deploy kind,
:class:`~mmbhvit.deploy.mmseg_backend.PackedConvBlock`): C++ kernels equal to
the PyTorch fallback bit for bit on every kernel set of this CPU, the
fallback equal to the PyTorch block up to float64 round-off, whole binary-
head segmentors with packed heads, and the errors."""
import copy
import os.path as osp

import pytest
import torch

import mmbhvit  # noqa: F401
from mmbhvit.apis import build_model
from mmbhvit.deploy import ops as deploy_ops
from mmbhvit.deploy.blocks.conv import ConvSpec, conv_shortcut
from mmbhvit.deploy.mmseg_backend import (PackedConvBlock, optimize_heads,
                                          pack_binary_convs,
                                          use_packed_backbone)
from mmbhvit.deploy.registry import (Folder, Params, build, describe,
                                     handler_for)
from mmbhvit.deploy.export import export_model
from mmbhvit.models.heads import BinaryConvBlock
from mmbhvit.testing.deploy import calibrate_random_model

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_SCOPE = 'mmseg'  # see tests/conftest.py
HAS_EXT = deploy_ops.extension_available()
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason='packed-bit C++ kernels not built: '
    f'{deploy_ops.extension_error()}')

# (cin, cout, kernel, H, W): every shortcut, maps smaller than the kernel,
# widths off the word size, a 5x5 kernel
SHAPES = [(64, 64, 3, 7, 9), (256, 64, 3, 5, 6), (32, 96, 3, 4, 11),
          (48, 80, 3, 6, 5), (70, 70, 5, 9, 7), (40, 40, 3, 1, 1),
          (24, 24, 3, 2, 13)]


def random_block(cin, cout, k=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = BinaryConvBlock(cin, cout, k).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m.norm.running_mean.normal_()
        m.norm.running_var.uniform_(0.5, 2)
    return m.eval()


def packed_op(block, dtype, backend):
    spec = describe(block)
    folder = Folder(dtype, 'm')
    handler_for(block).fold(block, spec, folder)
    return spec, build(spec, Params(folder.tensors, 'm', dtype), dtype,
                       backend)


def test_shortcut_kinds():
    assert [conv_shortcut(*c) for c in [(8, 8), (16, 8), (8, 24), (12, 8)]
            ] == ['identity', 'chunk_mean', 'tile', 'none']
    assert ConvSpec(8, 8, 3, 'identity').errors() == []
    errs = ConvSpec(8, 8, 4, 'tile').errors()
    assert any('odd' in e for e in errs) and any('shortcut' in e
                                                 for e in errs)
    assert 'not fully binary' in ConvSpec(8, 8, 3, 'identity', 32,
                                          32).errors()[0]


@pytest.mark.parametrize('cin, cout, k, h, w', SHAPES)
def test_fallback_matches_the_pytorch_block(cin, cout, k, h, w):
    block = random_block(cin, cout, k)
    spec, op = packed_op(block, torch.float64, 'torch')
    assert spec.shortcut == conv_shortcut(cin, cout)
    x = torch.randn(2, cin, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x).permute(0, 2, 3, 1)
    out = op(x.permute(0, 2, 3, 1).contiguous())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-11)


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_kernels_equal_the_fallback_on_every_kernel_set(dtype):
    ext = deploy_ops.load_extension()
    before = ext.isa()
    try:
        for isa in ext.available_isas():
            ext.set_isa(isa)
            for i, (cin, cout, k, h, w) in enumerate(SHAPES):
                block = random_block(cin, cout, k, dtype, seed=i)
                x = torch.randn(2, h, w, cin, dtype=dtype)
                _, cpp = packed_op(block, dtype, 'cpp')
                _, ref = packed_op(block, dtype, 'torch')
                got, want = cpp(x), ref(x)
                assert torch.equal(got, want), (isa, cin, cout, k, h, w)
    finally:
        ext.set_isa(before)
    assert any(op == 'conv (heads)' for op, _ in ext.kernel_paths())


@needs_ext
def test_kernel_checks_its_arguments():
    block = random_block(16, 16, dtype=torch.float32)
    _, op = packed_op(block, torch.float32, 'cpp')
    with pytest.raises(RuntimeError, match='kernel size must be odd'):
        op.ext.conv(torch.zeros(1, 4, 4, 16), op.thr, op.wt, 16, 2, op.a,
                    op.b, op.slope, op.post_scale, op.post_bias, 1)
    with pytest.raises(RuntimeError, match='conv weight must be'):
        op.ext.conv(torch.zeros(1, 4, 4, 16), op.thr, op.wt[:4], 16, 3,
                    op.a, op.b, op.slope, op.post_scale, op.post_bias, 1)
    with pytest.raises(RuntimeError, match='thr must have 8 elements'):
        op.ext.conv(torch.zeros(1, 4, 4, 8), op.thr, op.wt, 16, 3, op.a,
                    op.b, op.slope, op.post_scale, op.post_bias, 1)


def test_packed_block_is_a_drop_in_module():
    block = random_block(32, 16, dtype=torch.float32)
    packed = PackedConvBlock(block)
    assert 'chunk_mean' in repr(packed)
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        ref = block(x)
    for inp in (x, x.contiguous(memory_format=torch.channels_last),
                x.double()):
        out = packed(inp)
        assert out.shape == ref.shape and out.dtype == inp.dtype
        assert out.is_contiguous(memory_format=torch.channels_last)
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 1e-5


def test_a_folding_that_does_not_fit_is_refused(monkeypatch):
    from mmbhvit.deploy.blocks import conv as conv_kind
    block = random_block(16, 16, dtype=torch.float32)
    real_fold = conv_kind.ConvHandler.fold

    def wrong_fold(self, m, spec, out):
        real_fold(self, m, spec, out)
        out.tensors['block.b'] = out.tensors['block.b'] + 1  # a bad BN fold

    monkeypatch.setattr(conv_kind.ConvHandler, 'fold', wrong_fold)
    with pytest.raises(RuntimeError, match='differs from the PyTorch block'):
        PackedConvBlock(block, where='decode_head.fpn_bottleneck')


def test_unsupported_blocks_are_named():
    block = random_block(8, 8, dtype=torch.float32)
    block.conv.stride = (2, 2)
    with pytest.raises(NotImplementedError, match='stride-1'):
        PackedConvBlock(block, where='neck.fpn_convs.0')
    fp_block = BinaryConvBlock(8, 8, weight_bits=32, act_bits=32).eval()
    with pytest.raises(NotImplementedError, match='not fully binary'):
        PackedConvBlock(fp_block, where='x')
    # pack_binary_convs leaves a full-precision counterpart alone
    holder = torch.nn.Sequential(fp_block)
    assert pack_binary_convs(holder) == 0
    assert isinstance(holder[0], BinaryConvBlock)


def _demo_pair():
    cfg = osp.join(REPO, 'configs', 'bhvit',
                   'upernet_bhvit-tiny_demo-shapes-binary-head.py')
    torch.manual_seed(0)
    binary = build_model(cfg)
    calibrate_random_model(binary, (64, 64))
    return cfg, binary.eval()


def test_whole_binary_head_segmentor_with_packed_heads():
    cfg, binary = _demo_pair()
    n_blocks = sum(isinstance(m, BinaryConvBlock) for m in binary.modules())
    assert n_blocks == 5  # PSP bottleneck, 3 fpn_convs, fpn_bottleneck
    seg = use_packed_backbone(copy.deepcopy(binary),
                              export_model(binary, param_dtype=torch.float64),
                              dtype=torch.float64)
    packed = [m for m in seg.modules() if isinstance(m, PackedConvBlock)]
    assert len(packed) == n_blocks
    assert not any(isinstance(m, BinaryConvBlock) for m in seg.modules())
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        ref64 = copy.deepcopy(binary).double()(x.double(), mode='tensor')
        ref32 = binary(x, mode='tensor')
        out = seg(x, mode='tensor')

    def rel(a):
        return float((a.double() - ref64).norm() / ref64.norm())

    # a float32 sign within rounding of its threshold may flip (the float32
    # PyTorch model shows the same): no worse than PyTorch float32
    assert rel(out) <= 4 * rel(ref32) + 1e-6, (rel(out), rel(ref32))
    # the fp32 counterpart keeps PyTorch heads (weight_bits=32 everywhere)
    fp = build_model(cfg, full_precision=True)
    assert all(not m.conv.is_binary for m in fp.modules()
               if isinstance(m, BinaryConvBlock))
    optimize_heads(fp)
    assert not any(isinstance(m, PackedConvBlock) for m in fp.modules())


def test_pack_binary_can_be_switched_off():
    _, binary = _demo_pair()
    model = optimize_heads(copy.deepcopy(binary), pack_binary=False)
    assert not any(isinstance(m, PackedConvBlock) for m in model.modules())
    assert any(isinstance(m, BinaryConvBlock) for m in model.modules())


def test_padded_output_conv_keeps_values():
    from mmbhvit.deploy.mmseg_backend import (PaddedOutputConv,
                                              pad_conv_outputs)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 10, 3, padding=1).double()
    padded = PaddedOutputConv(conv)
    assert padded.conv.out_channels == 16
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        out, ref = padded(x), conv(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # no bias: the padded conv's bias is zero for the kept channels
    plain = torch.nn.Conv2d(12, 10, 1, bias=False).double()
    with torch.no_grad():
        torch.testing.assert_close(PaddedOutputConv(plain)(x), plain(x))
    # wraps only ungrouped float convolutions off the multiple
    holder = torch.nn.Sequential(
        torch.nn.Conv2d(8, 150, 1), torch.nn.Conv2d(8, 16, 1),
        torch.nn.Conv2d(8, 6, 3, groups=2), torch.nn.Sequential(
            torch.nn.Conv2d(8, 7, 1)))
    assert pad_conv_outputs(holder) == 2
    assert isinstance(holder[0], PaddedOutputConv)
    assert isinstance(holder[3][0], PaddedOutputConv)
    assert type(holder[1]) is torch.nn.Conv2d
    assert pad_conv_outputs(holder) == 0  # not wrapped twice
    with pytest.raises(ValueError, match='groups=2'):
        PaddedOutputConv(holder[2])


def test_optimize_heads_pads_the_class_conv():
    from mmbhvit.deploy.mmseg_backend import PaddedOutputConv
    _, binary = _demo_pair()
    model = optimize_heads(copy.deepcopy(binary), pack_binary=False)
    seg = model.decode_head.conv_seg
    classes = binary.decode_head.conv_seg.out_channels
    assert classes % 8  # the demo's 5 classes
    assert isinstance(seg, PaddedOutputConv)
    assert seg.out_channels == classes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x, mode='tensor')
        ref = binary.eval()(x, mode='tensor')
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
