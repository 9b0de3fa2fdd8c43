# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Export with bit-packed weights and the packed CPU engine.

Exactness strategy. The engine computes every ±1 product as an integer
(popcount), so run in float64 it must reproduce the float64 PyTorch model up
to float64 round-off (asserted at 1e-9 relative). In float32 a sign whose
input lies within rounding error of its threshold can flip, and binarized
attention amplifies such flips; the PyTorch model run in float32 shows the
same effect. The float32 engine is therefore asserted to be as close to the
float64 model as the float32 PyTorch model is (with a margin), and the
C++ kernels and the pure-PyTorch fallback are asserted to agree exactly.
"""
import copy
import importlib.util
import json
import logging
import os.path as osp

import numpy as np
import pytest
import torch

import mmbhvit  # noqa: F401
from mmbhvit.converters import (convert_official_state_dict,
                                official_flags_to_backbone_cfg)
from mmbhvit.deploy import (PackedBHViT, PackedClassifier, export_model,
                            load_packed, pack_bits, save_packed, unpack_bits)
from mmbhvit.deploy import blocks as deploy_blocks
from mmbhvit.deploy import ops as deploy_ops
from mmbhvit.deploy.ops import named_ops
from mmbhvit.deploy.registry import Params
from mmbhvit.testing.deploy import (calibrate_random_model, decision_flips,
                                    diff_stats, op_roundoff)
from mmbhvit.models import BHViT
from mmbhvit.testing.parity import build_classifier
from _helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURES = osp.join(ROOT, '..', 'shared', 'fixtures', 'bhvit_reference')
BINARY_FIXTURES = ('tiny_default', 'tiny_gsb', 'tiny_binary_embed_recu')
HAS_EXT = deploy_ops.extension_available()
DEFAULT_SCOPE = 'mmseg'  # mmseg inference pipelines; see tests/conftest.py
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason='packed-bit C++ kernels not built: '
    f'{deploy_ops.extension_error()}')

# float64 engine vs float64 PyTorch: only round-off differs
EXACT = 1e-9
# float32 engine error vs float32 PyTorch error (both against float64)
MARGIN = 4.0


def _quiet():
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


def _mmpretrain_scope():
    from mmengine.registry import DefaultScope
    return DefaultScope.overwrite_default_scope('mmpretrain')


def _fixture_model(name):
    d = osp.join(FIXTURES, name)
    with open(osp.join(d, 'config.json')) as f:
        meta = json.load(f)
    cfg = official_flags_to_backbone_cfg(meta['model_config'], meta['flags'])
    sd = torch.load(osp.join(d, 'state_dict.pt'), weights_only=True)
    conv = convert_official_state_dict(sd, num_heads=cfg['arch']['num_heads'])
    with _mmpretrain_scope():
        model = build_classifier(cfg, int(meta['flags']['num_labels']))
    model.load_state_dict(conv.state_dict, strict=True)
    x = torch.load(osp.join(d, 'input.pt'), weights_only=True)
    logits = torch.load(osp.join(d, 'logits.pt'), weights_only=True)
    return model.eval(), x, logits


REDUCED = dict(embed_dims=[32, 64, 128, 128], depths=[1, 1, 2, 1],
               num_heads=[1, 2, 4, 2], mlp_ratios=[4, 2, 2, 4])


def _reduced_classifier(seed=0, size=(64, 96), **kw):
    torch.manual_seed(seed)
    _quiet()
    with _mmpretrain_scope():
        model = build_classifier(dict(type='BHViT', arch=REDUCED, **kw), 7)
    model.init_weights()
    return calibrate_random_model(model, size, seed=seed)


def _reduced_backbone(seed=0, size=(64, 96), **kw):
    torch.manual_seed(seed)
    _quiet()
    model = BHViT(REDUCED, **kw)
    model.init_weights()
    return calibrate_random_model(model, size, seed=seed)


# --------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------
@pytest.mark.parametrize('n', [1, 16, 63, 64, 65, 130])
def test_pack_unpack_roundtrip(n):
    bits = torch.rand(3, 5, n) > 0.5
    bits[..., -1] = True  # the top bit of a full word is the int64 sign
    words = pack_bits(bits)
    assert words.dtype == torch.int64 and words.shape == (3, 5, (n + 63) // 64)
    assert torch.equal(unpack_bits(words, n), bits)
    if n == 64:
        assert (words < 0).all()  # bit 63 set
    single = pack_bits(torch.tensor([True] + [False] * (n - 1)))
    assert single.tolist()[0] == 1


# --------------------------------------------------------------------------
# kernels: C++ (every instruction set this CPU has) vs PyTorch fallback
# --------------------------------------------------------------------------
def _isas():
    if not HAS_EXT:
        return []
    return deploy_ops.load_extension().available_isas()


@pytest.fixture(params=['avx512', 'avx2', 'generic'])
def isa(request):
    if request.param not in _isas():
        pytest.skip(f'{request.param} kernels not available here')
    ext = deploy_ops.load_extension()
    old = ext.isa()
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa(old)


def _op(cls, spec, tensors, prefix, dtype, backend):
    """A packed op of ``spec`` reading ``prefix.*`` from ``tensors``."""
    return cls(spec, Params(tensors, prefix, dtype), dtype, backend)


def _proj_spec(cin, cout, shortcut):
    return deploy_blocks.ProjSpec(cin=cin, cout=cout, shortcut=shortcut)


def _proj_tensors(prefix, cin, cout, g):
    t = {f'{prefix}.wbits': pack_bits(torch.rand(cout, cin, generator=g) > .5)}
    t[f'{prefix}.thr'] = 0.3 * torch.randn(cin, generator=g)
    for n in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
        t[f'{prefix}.{n}'] = torch.randn(cout, generator=g)
    return t


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_kernels_match_fallback(isa, dtype):
    g = torch.Generator().manual_seed(0)
    # binary 1x1 projections, every shortcut, widths off the word size
    for cin, cout, sc in [(64, 64, 'identity'), (32, 256, 'tile'),
                          (512, 64, 'mean'), (96, 32, 'mean'),
                          (100, 36, 'none'), (36, 108, 'tile')]:
        t = _proj_tensors('p', cin, cout, g)
        spec = _proj_spec(cin, cout, sc)
        x = torch.randn(2, 13, cin, generator=g, dtype=dtype)
        res = torch.randn(2, 13, cout, generator=g, dtype=dtype)
        ops = [_op(deploy_blocks.PackedProj, spec, t, 'p', dtype, be)
               for be in ('cpp', 'torch')]
        a, b = (op(x, res) for op in ops)
        assert torch.equal(a, b), (cin, cout, sc)
        # with the next block norm written beside the output
        norm = (torch.randn(cout, generator=g, dtype=dtype),
                torch.randn(cout, generator=g, dtype=dtype))
        (a1, an), (b1, bn) = (op(x, res, norm) for op in ops)
        assert torch.equal(a1, a) and torch.equal(b1, b)
        assert torch.equal(an, bn) and torch.equal(an, a * norm[0] + norm[1])
        for op in ops:  # y over the residual, as the attention blocks ask
            r = res.clone()
            y, yn = op(x, r, norm, r)
            assert y.data_ptr() == r.data_ptr()
            assert torch.equal(y, a) and torch.equal(yn, an)
            r = res.clone()
            y = op(x, r, None, r)
            assert y.data_ptr() == r.data_ptr() and torch.equal(y, a)
        with pytest.raises(RuntimeError, match='norm_scale'):
            ops[0](x, res, (norm[0][1:], norm[1]))
    # fused MLP (expand + reduce + residual), as in blocks of ratio 1, 2, 8
    for c, ratio in [(64, 8), (48, 2), (32, 1), (128, 4)]:
        hid = c * ratio
        t = _proj_tensors('f.expand', c, hid, g)
        t.update(_proj_tensors('f.reduce', hid, c, g))
        spec = deploy_blocks.FFNSpec(
            expand=_proj_spec(c, hid, 'tile' if ratio > 1 else 'identity'),
            reduce=_proj_spec(hid, c, 'mean' if ratio > 1 else 'identity'),
            layer_scale=True)
        layers = {be: _op(deploy_blocks.PackedFFN, spec, t, 'f', dtype, be)
                  for be in ('cpp', 'torch')}
        x = torch.randn(2, 11, c, generator=g, dtype=dtype)
        res = torch.randn(2, 11, c, generator=g, dtype=dtype)
        a, b = (layers[be](x, res) for be in ('cpp', 'torch'))
        assert torch.equal(a, b), (c, ratio)
        assert torch.equal(a, layers['cpp'].reduce(layers['cpp'].expand(x),
                                                   res))
    # MSGDC: groups of 8 / 16 / 20 / 32 / 128 bits (16 and 32: the lane
    # path of the AVX-512 and AVX2 kernels), dilations up to 5 on small maps
    for c, groups, hw in [(32, 4, (5, 7)), (64, 4, (9, 6)), (80, 4, (4, 4)),
                          (128, 4, (6, 5)), (256, 2, (3, 11))]:
        cg = c // groups
        t = {}
        for n in ('thr', 'out_scale', 'out_bias'):
            t[f'b.{n}'] = torch.randn(c, generator=g)
        norm1, norm2 = ((torch.randn(c, generator=g).to(dtype),
                         torch.randn(c, generator=g).to(dtype))
                        for _ in range(2))
        for i in range(3):
            t[f'b.conv{i}.wbits'] = pack_bits(
                torch.rand(c, 9 * cg, generator=g) > .5)
            for n in ('a', 'b', 'slope'):
                t[f'b.conv{i}.{n}'] = torch.randn(c, generator=g)
        spec = deploy_blocks.MSGDCSpec(channels=c, groups=groups,
                                       kernel_size=[3, 3],
                                       dilations=[1, 3, 5])
        x = torch.randn(2, *hw, c, generator=g, dtype=dtype)
        (h1, hn1), (h2, hn2) = (
            _op(deploy_blocks.PackedMSGDC, spec, t, 'b', dtype, be)(
                x, norm1, norm2) for be in ('cpp', 'torch'))
        assert torch.equal(h1, h2) and torch.equal(hn1, hn2), (c, groups)
        for be in ('cpp', 'torch'):  # h over x, as the blocks ask
            xc = x.clone()
            h, hn = _op(deploy_blocks.PackedMSGDC, spec, t, 'b', dtype, be)(
                xc, norm1, norm2, xc)
            assert h.data_ptr() == xc.data_ptr()
            assert torch.equal(h, h1) and torch.equal(hn, hn1), (c, be)
    # binary patch merging (tile shortcut of the 2x2 average)
    for cin, cout in [(32, 64), (64, 128), (20, 40)]:
        t = _proj_tensors('m', cin, cout, g)
        t['m.wbits'] = pack_bits(torch.rand(cout, 4 * cin, generator=g) > .5)
        for n in ('norm_in.scale', 'norm_in.bias'):
            t[f'm.{n}'] = torch.randn(cin, generator=g)
        t['m.pos_embed'] = torch.randn(1, cout, 2, 4, generator=g)
        spec = deploy_blocks.MergeSpec(cin=cin, cout=cout, binary=True,
                                       pos_size=[2, 4])
        # even sizes: the input norm in the kernel (merge_norm); odd: padded
        # after the norm in PyTorch, pos resized
        for hw in [(6, 10), (7, 9)]:
            x = torch.randn(2, *hw, cin, generator=g, dtype=dtype)
            fast, slow = (_op(deploy_blocks.PackedMerge, spec, t, 'm', dtype,
                              be) for be in ('cpp', 'torch'))
            assert torch.equal(fast(x), slow(x))
        with pytest.raises(RuntimeError, match='in_scale'):
            fast.ext.merge_norm(x[:, :6, :8].contiguous(),
                                fast.in_scale[1:], fast.in_bias, fast.thr,
                                fast.wt, cout, fast.a, fast.b, fast.slope,
                                fast.post_bias, fast.pos(3, 4))
    # attention products, LSQ (2 bit planes) and GSB (4 planes), T > 64
    for mode, heads, c, tokens in [('lsq', 4, 256, 74), ('gsb', 2, 128, 53),
                                   ('lsq', 1, 48, 130), ('gsb', 3, 72, 9)]:
        t = {f'a.{n}_thr': 0.2 * torch.randn(c, generator=g)
             for n in 'qkv'}
        for n in ('ctx.a', 'ctx.b', 'ctx.slope', 'ctx.post_bias'):
            t[f'a.{n}'] = torch.randn(c, generator=g)
        if mode == 'lsq':
            attn = dict(binarizer='lsq', levels=3)
            t['a.lsq.step'] = 0.01 + 0.05 * torch.rand(heads, generator=g)
            t['a.lsq.zero'] = 0.1 * torch.randn(heads, generator=g)
        else:
            attn = dict(binarizer='gsb', low=0.7, high=0.9)
            t['a.gsb'] = torch.tensor([0.006, 0.006, 1.3, 0.8],
                                      dtype=torch.float64)
        spec = deploy_blocks.MSMHASpec(
            channels=c, num_heads=heads, window_size=7, token_norm_eps=1e-5,
            attention=attn, proj_layer_scale=True,
            **{n: _proj_spec(c, c, 'identity') for n in ('q', 'k', 'v',
                                                         'proj')})
        q, k, v = (torch.randn(3, tokens, c, generator=g, dtype=dtype)
                   for _ in range(3))
        scores = [_op(deploy_blocks.AttentionScores, spec, t, 'a', dtype, be)
                  for be in ('cpp', 'torch')]
        context = [_op(deploy_blocks.AttentionContext, spec, t, 'a', dtype,
                       be) for be in ('cpp', 'torch')]
        s1, s2 = (m(q, k) for m in scores)
        assert torch.equal(s1, s2)
        p = torch.softmax(s1, -1)
        o1, o2 = (m(p, q, k, v) for m in context)
        assert torch.equal(o1, o2), mode
        # the whole block: tokens with their layer norm, attention,
        # untokens, output projection and the next norm
        for n in ('q', 'k', 'v', 'proj'):
            t.update(_proj_tensors(f'a.{n}', c, c, g))
        for n in ('merge_mix', 'out_mix', 'token_norm.weight',
                  'token_norm.bias'):
            t[f'a.{n}'] = torch.rand(c, generator=g)
        blocks = [_op(deploy_blocks.PackedMSMHA, spec, t, 'a', dtype, be)
                  for be in ('cpp', 'torch')]
        x = torch.randn(2, 9, 16, c, generator=g, dtype=dtype)
        norms = [(torch.randn(c, generator=g, dtype=dtype),
                  torch.randn(c, generator=g, dtype=dtype))
                 for _ in range(2)]
        (tok1, _), (tok2, _) = (b.tokens(x, norms[0]) for b in blocks)
        assert torch.equal(tok1, tok2)
        (h1, hn1), (h2, hn2) = (b(x, *norms) for b in blocks)
        assert torch.equal(h1, h2) and torch.equal(hn1, hn2), mode
    # shift branches (circular, maps smaller than the filter too; channel
    # counts that take the kernel's vector blocks and its scalar tail)
    for ch in (24, 45):
        t = {'s.weight': torch.randn(9, ch, generator=g),
             's.bias': torch.randn(ch, generator=g)}
        spec = deploy_blocks.ShiftSpec(channels=ch, radii=[1, 2])
        for hw in [(7, 9), (1, 3), (2, 2)]:
            x = torch.randn(2, *hw, ch, generator=g, dtype=dtype)
            for res in (torch.randn(2, *hw, ch, generator=g, dtype=dtype),
                        None):
                a, b = (_op(deploy_blocks.PackedShift, spec, t, 's', dtype,
                            be)(x, res) for be in ('cpp', 'torch'))
                assert torch.equal(a, b), (ch, hw, res is None)
    # the stem with the positional embedding (float32: GELU in the kernel;
    # float64: ATen's GELU after it), sizes that need padding, channel
    # counts that take the vector blocks, single vectors and the tail
    for cout, hw in [(64, (20, 28)), (13, (18, 21))]:
        t = {'st.weight': 0.3 * torch.randn(cout, 3, 4, 4, generator=g),
             'st.bias': torch.randn(cout, generator=g)}
        spec = deploy_blocks.StemSpec(in_channels=3, channels=cout)
        x = torch.randn(2, 3, *hw, generator=g, dtype=dtype)
        pos = torch.randn(-(-hw[0] // 4), -(-hw[1] // 4), cout, generator=g,
                          dtype=dtype)
        stems = [_op(deploy_blocks.PackedStem, spec, t, 'st', dtype, be)
                 for be in ('cpp', 'torch')]
        for p in (pos, None):
            a, b = (s(x, p) for s in stems)
            assert torch.equal(a, b), (cout, hw, p is None)
            assert a.shape == (2, *pos.shape) and a.is_contiguous()
    with pytest.raises(RuntimeError, match='multiples of 4'):
        stems[0].ext.stem(x, stems[0].wt, stems[0].bias, None, True)
    with pytest.raises(RuntimeError, match='pos must have'):
        stems[0].ext.stem(x[..., :16, :20].contiguous(), stems[0].wt,
                          stems[0].bias, pos, True)


def test_stem_gelu_is_as_accurate_as_aten_s():
    """The stem's GELU (a rational erf, the same bits in the kernel and the
    fallback on every CPU) against float64 GELU: within the bounds that
    ATen's float32 GELU has (measured on this project's machines: max 1.2e-6,
    1.1e-6 for |x| < 3, mean 7.7e-8; ours 1.2e-6, 5.2e-7, 7.1e-8)."""
    from mmbhvit.deploy.blocks.stem import gelu_rational
    x = torch.linspace(-9, 9, 1_000_001)
    ref = torch.nn.functional.gelu(x.double())
    err = (gelu_rational(x).double() - ref).abs()
    assert err.max() <= 1.5e-6
    assert err[x.abs() < 3].max() <= 6e-7
    assert err.mean() <= 9e-8
    # the tails: exactly 0 (above: x) where float32 erf is -1 (1)
    assert gelu_rational(torch.tensor([-9.0, 9.0])).tolist() == [0.0, 9.0]


@pytest.mark.parametrize('backend', ['cpp', 'torch'])
def test_stem_convolution_round_off_is_below_pytorch_s(backend):
    """The stem's float32 convolution (products summed as a tree per input
    channel) against float64: less round-off than PyTorch's float32
    convolution (measured 8.0e-8 vs 1.3e-7 relative RMS; adding the 48
    products one by one gave 1.45e-7 on the fixtures' stem, more than
    oneDNN's 1.16e-7)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 96, generator=g, dtype=torch.float64)
    w = 0.2 * torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    t = {'st.weight': w, 'st.bias': b}
    spec = deploy_blocks.StemSpec(in_channels=3, channels=64)
    stem = _op(deploy_blocks.PackedStem, spec, t, 'st', torch.float32,
               backend)
    ref = torch.nn.functional.conv2d(x, w, b, stride=4).permute(0, 2, 3, 1)
    ours = stem._stem(x.float(), None, False)
    theirs = torch.nn.functional.conv2d(x.float(), w.float(), b.float(),
                                        stride=4).permute(0, 2, 3, 1)

    def rel(a):
        return float((a.double() - ref).norm() / ref.norm())

    assert 0 < rel(ours) <= rel(theirs)


@pytest.mark.parametrize('backend', ['cpp', 'torch'])
def test_residual_ops_write_over_their_residual_when_asked(backend):
    """The MLP and the shift branches take ``out``: their result written
    there (over the residual itself, as the engine's blocks ask), the same
    numbers as into a new tensor, the inputs other than the residual
    untouched; an ``out`` sharing memory with the input read around each
    output, or with part of the residual, is refused by name (MSGDC and
    the projections with the next norm: in test_kernels_match_fallback)."""
    if backend == 'cpp' and not HAS_EXT:
        pytest.skip('packed-bit C++ kernels not built')
    g = torch.Generator().manual_seed(5)
    c, ratio = 64, 4
    spec = deploy_blocks.FFNSpec(_proj_spec(c, c * ratio, 'tile'),
                                 _proj_spec(c * ratio, c, 'mean'),
                                 layer_scale=False)
    t = {**_proj_tensors('f.expand', c, c * ratio, g),
         **_proj_tensors('f.reduce', c * ratio, c, g)}
    ffn = _op(deploy_blocks.PackedFFN, spec, t, 'f', torch.float32, backend)
    ch = 24
    shift = _op(deploy_blocks.PackedShift,
                deploy_blocks.ShiftSpec(channels=ch, radii=[1, 2]),
                {'s.weight': torch.randn(9, ch, generator=g),
                 's.bias': torch.randn(ch, generator=g)}, 's', torch.float32,
                backend)
    for op, x in ((ffn, torch.randn(1, 5, 6, c, generator=g)),
                  (shift, torch.randn(1, 5, 6, ch, generator=g))):
        res = torch.randn(x.shape, generator=g)
        x0, res0 = x.clone(), res.clone()
        plain = op(x, res)
        assert torch.equal(res, res0)
        out = op(x, res, res)
        assert out.data_ptr() == res.data_ptr() and torch.equal(out, plain)
        assert torch.equal(x, x0)
        other = torch.empty_like(x)
        assert op(x, res0, other) is other and torch.equal(other, plain)
        if backend == 'cpp':
            with pytest.raises(RuntimeError, match='share memory with x'):
                op(x, res0, x)
            wide = torch.randn(2 * x.numel(), generator=g)
            with pytest.raises(RuntimeError, match='not part of it'):
                op(x, wide[:x.numel()].view(x.shape),
                   wide[x.shape[-1]:x.shape[-1] + x.numel()].view(x.shape))


@needs_ext
@pytest.mark.slow
def test_every_kernel_set_runs_the_model_exactly(isa):
    model = _reduced_backbone(attn_binarizer='gsb', binary_merge=True,
                              size=(80, 72))
    packed = export_model(model)
    x = torch.randn(1, 3, 80, 72, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = PackedBHViT(packed, backend='cpp')(x)
        ref = PackedBHViT(packed, backend='torch')(x)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), isa


# --------------------------------------------------------------------------
# fixtures of the official implementation
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', BINARY_FIXTURES)
@pytest.mark.slow
def test_engine_matches_official_fixture(name):
    model, x, ref = _fixture_model(name)
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        e64 = PackedClassifier(export_model(m64, torch.float64),
                               torch.float64)
        out64 = e64(x)
        out32 = PackedClassifier(export_model(m64))(x)
        torch32 = model(x, mode='tensor')
    # packed arithmetic is exact: float64 engine == float64 official model
    assert diff_stats(out64, ref)['max_rel'] < EXACT
    err32 = diff_stats(out32, ref)['max_abs']
    err_torch32 = diff_stats(torch32, ref)['max_abs']
    assert err32 <= MARGIN * err_torch32 + 1e-6 * ref.abs().max()
    assert err32 < 1e-4


# float32 engine vs float32 PyTorch on several images: the median over the
# images of each one's max |logit error| against the float64 model. On the
# fixtures the engine's median is 0.7-1.1x PyTorch's (Intel Xeon, AVX-512,
# docs/deployment.md "Exactness"); another CPU rounds elsewhere, hence 1.5
MEDIAN_MARGIN = 1.5


@pytest.mark.parametrize('name', BINARY_FIXTURES)
@pytest.mark.slow
def test_engine_float32_error_is_pytorch_s_over_images(name):
    """Not only on the fixture's two images: on eight (the fixture's, with
    noise), the float32 engine is as far from the float64 model as
    PyTorch's float32 model is, by the median."""
    model, x, _ = _fixture_model(name)
    m64 = copy.deepcopy(model).double()
    engine = PackedClassifier(export_model(m64))
    g = torch.Generator().manual_seed(1)
    xs = torch.cat([
        x.double() + 0.3 * torch.randn(x.shape, generator=g,
                                       dtype=torch.float64)
        for _ in range(4)
    ])
    with torch.no_grad():
        ref = m64(xs, mode='tensor')
        ours = engine(xs.float()).double()
        theirs = model(xs.float(), mode='tensor').double()
    scale = ref.abs().amax(dim=1)
    err_ours = ((ours - ref).abs().amax(dim=1) / scale).median()
    err_theirs = ((theirs - ref).abs().amax(dim=1) / scale).median()
    print(f'{name}: median relative error, engine {err_ours:.3g}, PyTorch '
          f'{err_theirs:.3g} ({err_ours / err_theirs:.2f}x)')
    assert 0 < err_ours <= MEDIAN_MARGIN * err_theirs


# float32 round-off one op may add (relative RMS against the float64 op on
# the same inputs). The binary ops (popcounts, sign packing, per-channel
# float epilogues) stay within about one float32 ulp (measured <= 8e-8); the
# float convolutions and linear layers (the stem's kernel, full-precision
# patch merging and head in oneDNN's / MKL's order) sum 48-1024 products each
# (measured <= 5.7e-7: the merges' channels-last convolution has 1.8-3.5x the
# round-off of the NCHW one PyTorch's model runs; docs/deployment.md,
# "Exactness")
OP_ROUNDOFF, FLOAT_OP_ROUNDOFF = 2.5e-7, 1.5e-6


@pytest.mark.parametrize('name', BINARY_FIXTURES)
def test_engine_ops_add_only_float32_roundoff(name):
    model, x, _ = _fixture_model(name)
    m64 = copy.deepcopy(model).double()
    e32 = PackedClassifier(export_model(m64))
    e64 = PackedClassifier(export_model(m64, torch.float64), torch.float64)
    float_ops = {
        path for path, op in named_ops(e32)
        if isinstance(op, (deploy_blocks.PackedStem, deploy_blocks.PackedHead))
        or (isinstance(op, deploy_blocks.PackedMerge) and not op.binary)}
    rows = op_roundoff(e32, e64, x)
    assert len({path for path, _, _ in rows}) > 20
    for path, kind, err in rows:
        bound = FLOAT_OP_ROUNDOFF if path in float_ops else OP_ROUNDOFF
        assert err <= bound, (path, kind, err)


@pytest.mark.parametrize('name', ['tiny_binary_embed_recu'])
@pytest.mark.slow
def test_forced_fallback_gives_identical_results(name, monkeypatch):
    """Without the extension the engine falls back to PyTorch ops on the same
    packed bits, with the same results."""
    model, x, ref = _fixture_model(name)
    packed = export_model(model)
    with torch.no_grad():
        fast = PackedClassifier(packed)(x) if HAS_EXT else None
        monkeypatch.setattr(deploy_ops, '_EXT', None)
        monkeypatch.setattr(deploy_ops, '_EXT_TRIED', True)
        monkeypatch.setattr(deploy_ops, '_EXT_ERROR', 'simulated')
        assert deploy_ops.resolve_backend('auto') == 'torch'
        with pytest.raises(RuntimeError, match='not available'):
            deploy_ops.resolve_backend('cpp')
        engine = PackedClassifier(packed)
        assert engine.backbone.backend == 'torch'
        slow = engine(x)
    assert diff_stats(slow, ref)['max_abs'] < 1e-4
    if fast is not None:
        assert torch.equal(fast, slow)


# --------------------------------------------------------------------------
# reduced widths: every option, odd sizes
# --------------------------------------------------------------------------
@pytest.mark.parametrize('kw,size', [
    (dict(attn_binarizer='lsq'), (64, 96)),
    (dict(attn_binarizer='gsb', binary_merge=True, recu=True), (70, 45)),
    (dict(shift5=False, layer_scale=False, window_size=5), (101, 66)),
    (dict(shift3=False, shift5=False, out_indices=(1, 3), final_norm=False),
     (64, 64)),
])
@pytest.mark.slow
def test_reduced_models_exact_in_float64(kw, size):
    model = _reduced_backbone(size=size, **kw)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    m64 = copy.deepcopy(model).double()
    packed64 = export_model(m64, torch.float64)
    with torch.no_grad():
        ref = m64(x.double())
        backends = ['cpp', 'torch'] if HAS_EXT else ['torch']
        outs = {be: PackedBHViT(packed64, torch.float64, be)(x)
                for be in backends}
    for be, out in outs.items():
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            assert o.shape == r.shape and o.is_contiguous()
            assert diff_stats(o, r)['max_rel'] < EXACT, be
    if HAS_EXT:
        for a, b in zip(outs['cpp'], outs['torch']):
            assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kw', [
    dict(attn_binarizer='lsq'),
    dict(attn_binarizer='gsb', window_size=5),
    dict(shift3=False, shift5=False, binary_merge=True),
])
def test_blocks_in_one_call_match_op_by_op(kw, dtype):
    """Without hooks each block runs as one C++ call (its ``BlockPlan``,
    made of its ops' plans); while an op inside has hooks (here the
    profiler's) op by op: the same bits either way."""
    model = _reduced_backbone(size=(70, 45), **kw)
    x = torch.randn(2, 3, 70, 45, generator=torch.Generator().manual_seed(3))
    engine = PackedBHViT(export_model(model), dtype)
    blocks = [op for _, op in named_ops(engine)
              if isinstance(op, deploy_blocks.block.PackedBlock)]
    assert len(blocks) == sum(REDUCED['depths'])
    with torch.no_grad():
        prof = engine.profile()
        assert all(b.hooked_inside() for b in blocks)
        by_op = engine(x)
        engine.profile(False)
        assert not any(b.hooked_inside() for b in blocks)
        assert prof.calls['attention q/k/v (binary 1x1)'] == 3 * sum(
            REDUCED['depths'][2:])
        assert all(b._plan is None for b in blocks)  # not made with hooks
        remove = blocks[0].add_hooks(pre=lambda *a: None)
        assert not blocks[0].hooked_inside()  # its own hooks do not count
        fused = engine(x)
        remove()
    assert all(b._plan is not None for b in blocks)
    for a, b in zip(by_op, fused):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_plans_check_their_projections_once_and_inputs_every_call():
    """An MLP's and an attention's plans check their projections when
    made and keep their pointers, so a call reads only its inputs' metadata:
    the plan gives the op's bits, and an input of another dtype or channel
    count (which the kept parameters do not fit) is refused by name."""
    engine = PackedBHViT(export_model(_reduced_backbone()), torch.float32)
    block = [op for _, op in named_ops(engine) if isinstance(
        op, deploy_blocks.block.PackedBlock)][-1]
    ffn, mixer = block.ffn, block.token_mixer
    c = ffn.expand.cin
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(1, 3, 5, c, generator=g) for _ in range(2))
    plan = ffn.plan()
    e, r = ffn.expand, ffn.reduce  # the binding that checks every call:
    assert torch.equal(plan.forward(x, res), ffn.ext.ffn(
        x, res, e.kernel_args(), e.cout, deploy_ops.SHORTCUTS[e.shortcut],
        r.kernel_args(), deploy_ops.SHORTCUTS[r.shortcut], ffn.expand_lut))
    with pytest.raises(RuntimeError, match='thr has dtype Float, expected '
                       'Double'):
        plan.forward(x.double(), res.double())
    with pytest.raises(RuntimeError, match=f'gives {c} channels, x has '
                       f'{c - 1}'):
        plan.forward(x[..., :-1].contiguous(), res[..., :-1].contiguous())
    norms = [(torch.randn(c, generator=g), torch.randn(c, generator=g))
             for _ in range(2)]
    y = torch.randn(1, 9, 8, c, generator=g)
    h, hn = mixer.plan().forward(y, *norms[0], *norms[1])
    remove = mixer.q.add_hooks(pre=lambda *a: None)  # op by op
    try:
        h2, hn2 = mixer(y, norms[0], norms[1])
    finally:
        remove()
    assert torch.equal(h, h2) and torch.equal(hn, hn2)
    with pytest.raises(RuntimeError, match='expected Double|dtype'):
        mixer.plan().forward(y.double(), *(t.double() for t in norms[0]),
                             *(t.double() for t in norms[1]))


def test_hooked_inside_follows_hooks_added_and_removed():
    """A block's ``hooked_inside`` (a counter the ops inside keep) is
    right before and after its first call, with several hooks on one op
    and on two ops, and not moved by the block's own hooks."""
    engine = PackedBHViT(export_model(_reduced_backbone()), torch.float32,
                         'torch')
    first, second = [op for _, op in named_ops(engine) if isinstance(
        op, deploy_blocks.block.PackedBlock)][:2]
    r0 = second.ffn.reduce.add_hooks(pre=print)  # before its first call
    assert second.hooked_inside()
    r0()
    assert not second.hooked_inside() and not first.hooked_inside()
    r1, r2 = first.ffn.add_hooks(pre=print), first.ffn.add_hooks(post=print)
    r3 = first.token_mixer.add_hooks(pre=print)
    r4 = first.add_hooks(pre=print)
    for remove in (r1, r2, r3):
        assert first.hooked_inside() and not second.hooked_inside()
        remove()
        remove()  # a second removal changes nothing
    assert not first.hooked_inside()
    r4()


# --------------------------------------------------------------------------
# file format
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_export_file_is_weights_only_and_packed(tmp_path):
    model = _reduced_classifier(attn_binarizer='gsb', binary_merge=True)
    packed = export_model(model, meta=dict(note='test'))
    path = str(tmp_path / 'm.packed.pth')
    save_packed(packed, path)
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    json.dumps(loaded['graph'])
    assert load_packed(path)['graph']['head']['num_classes'] == 7
    stats = loaded['graph']['stats']
    n_binary = sum(
        m.weight.numel() for m in model.modules()
        if type(m).__name__ == 'BinaryConv2d')
    assert stats['binary_weights'] == n_binary
    words = [t for k, t in loaded['tensors'].items() if k.endswith('.wbits')]
    assert all(t.dtype == torch.int64 for t in words)
    packed_bytes = sum(t.numel() * 8 for t in words)
    assert packed_bytes == stats['packed_weight_bytes']
    # 1 bit per weight up to the last word of each output channel
    assert 4 * n_binary / packed_bytes > 28
    with torch.no_grad():
        a = PackedClassifier(path)(torch.ones(1, 3, 64, 64))
        b = PackedClassifier(packed)(torch.ones(1, 3, 64, 64))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match='not an exported packed BHViT'):
        load_packed(dict(state_dict={}))


def test_export_rejects_full_precision_counterpart():
    fp = BHViT(REDUCED, weight_bits=32, act_bits=32).eval()
    with pytest.raises(NotImplementedError, match='fully binary'):
        export_model(fp)


@pytest.mark.slow
def test_engine_refuses_what_it_cannot_do():
    packed = export_model(_reduced_backbone())
    engine = PackedBHViT(packed)
    # bad files: short messages that say what is wrong
    with pytest.raises(ValueError, match='the given dict is incomplete'):
        PackedBHViT(dict(graph=packed['graph']))
    broken = dict(packed, tensors=dict(packed['tensors']))
    key = next(k for k in broken['tensors'] if k.endswith('mixer.thr'))
    del broken['tensors'][key]
    # format v2: the loader finds it in the manifest (tests/
    # test_packed_format.py has the other corruptions)
    with pytest.raises(ValueError,
                       match='corrupt or incomplete.*no tensor .*mixer.thr'):
        PackedBHViT(broken)
    # dtypes, devices and batches it does not compute
    with pytest.raises(ValueError, match='float32 or float64'):
        PackedBHViT(packed, dtype=torch.float16)
    for move in (lambda m: m.half(), lambda m: m.double(),
                 lambda m: m.to(torch.bfloat16)):
        with pytest.raises(RuntimeError, match='stays on the CPU'):
            move(engine)
    assert engine.to('cpu').float() is engine  # CPU moves are no-ops
    with pytest.raises(ValueError, match='empty batch'):
        engine(torch.zeros(0, 3, 64, 64))
    # keep-ratio inference sees many sizes: the resized positional
    # embeddings of only the last few are kept
    with torch.no_grad():
        for w in range(64, 64 + 4 * 12, 4):
            engine(torch.zeros(1, 3, 48, w))
    caches = [p.cache for p in engine.pos_embeds()]
    assert len(caches) == 4
    assert all(0 < len(c) <= p.CACHE_SIZES
               for c, p in zip(caches, engine.pos_embeds()))



def test_export_cli(tmp_path, capsys):
    out = str(tmp_path / 'demo.packed.pth')
    tool = load_tool('deployment/export_binary.py')
    config = osp.join(ROOT, 'configs/bhvit/bhvit-reduced_demo-cls.py')
    assert tool.main([config, 'none', out]) == 0
    text = capsys.readouterr().out
    assert 'binary weights' in text and 'smaller' in text
    engine = PackedClassifier(out)
    with torch.no_grad():
        assert engine(torch.rand(1, 3, 64, 64)).shape == (1, 5)


# --------------------------------------------------------------------------
# segmentation: shipped config at 512x512, mmseg inference with the engine
# --------------------------------------------------------------------------
SEG_CONFIG = osp.join(ROOT, 'configs/bhvit/upernet_bhvit-tiny_demo-shapes.py')


@pytest.fixture(scope='module')
def seg_model():
    import mmbhvit.datasets  # noqa: F401  (CheckLabelRange)
    from mmseg.apis import init_model
    _quiet()
    torch.manual_seed(0)
    model = init_model(SEG_CONFIG, None, device='cpu')
    return calibrate_random_model(model, (128, 128), seed=0)


@pytest.mark.slow
def test_segmentation_backbone_512(seg_model):
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    bb64 = copy.deepcopy(seg_model.backbone).double()
    with torch.no_grad():
        ref = bb64(x.double())
        torch32 = seg_model.backbone(x)
        e64 = PackedBHViT(export_model(bb64, torch.float64), torch.float64)
        rec64 = e64.record()
        out64 = e64(x)
        e32 = PackedBHViT(export_model(bb64))
        rec32 = e32.record()
        out32 = e32(x)
    assert [o.shape[-1] for o in out64] == [128, 64, 32, 16]
    for i, (o64, o32, t32, r) in enumerate(zip(out64, out32, torch32, ref)):
        assert diff_stats(o64, r)['max_rel'] < EXACT
        # float32: a few signs flip (in the engine and in PyTorch alike, at
        # different places); binarized attention amplifies them in stages
        # 3-4. Compare the RMS deviation from the exact result with the
        # float32 PyTorch model's, with a 1% floor for isolated flips.
        err = diff_stats(o32, r)['rms_rel']
        err_torch = diff_stats(t32, r)['rms_rel']
        assert err <= max(MARGIN * err_torch, 1e-2), (i, err, err_torch)
    flips = decision_flips(rec32, rec64)
    assert flips['decisions'] > 5e7
    assert flips['fraction'] < 0.1


class _Float64Backbone(torch.nn.Module):
    """The PyTorch backbone run in float64, maps returned in float32."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = copy.deepcopy(backbone).double()

    def forward(self, x):
        return tuple(o.float() for o in self.inner(x.double()))


@pytest.mark.slow
def test_mmseg_inference_with_packed_backbone(seg_model, tmp_path):
    from mmseg.apis import inference_model, show_result_pyplot

    from mmbhvit.deploy.mmseg_backend import use_packed_backbone
    meta = dict(classes=tuple('abcde'),
                palette=[[i * 50, 0, 0] for i in range(5)])
    rng = np.random.default_rng(0)
    img = (rng.random((512, 512, 3)) * 255).astype(np.uint8)

    def labels(model):
        model.dataset_meta = meta
        result = inference_model(model, img)
        return result, result.pred_sem_seg.data

    # exact reference: PyTorch backbone in float64, same float32 heads
    exact = copy.deepcopy(seg_model)
    exact.backbone = _Float64Backbone(seg_model.backbone)
    _, ref = labels(exact)
    _, torch32 = labels(copy.deepcopy(seg_model))
    path = str(tmp_path / 'seg.packed.pth')
    save_packed(export_model(copy.deepcopy(seg_model).double(),
                             torch.float64), path)
    model64 = copy.deepcopy(seg_model)
    use_packed_backbone(model64, path, dtype=torch.float64)
    _, ours64 = labels(model64)
    model = copy.deepcopy(seg_model)
    assert use_packed_backbone(model, path) is model
    assert isinstance(model.backbone, PackedBHViT)
    result, ours = labels(model)
    assert ours.shape == ref.shape == (1, 512, 512)
    # float64 engine inside mmseg: the same segmentation as PyTorch
    assert (ours64 != ref).double().mean().item() < 1e-4
    # float32: this random model flips ~1-3% of its sign decisions in
    # float32 (PyTorch and engine alike, at different places; attention
    # amplifies them) and a random head has tiny class margins, so some
    # labels move in both; a sanity bound only, the float64 check above is
    # the exact one
    frac = (ours != ref).double().mean().item()
    frac_torch = (torch32 != ref).double().mean().item()
    assert frac <= max(MARGIN * frac_torch, 0.1), (frac, frac_torch)
    out = str(tmp_path / 'overlay.png')
    show_result_pyplot(model, img, result, show=False, out_file=out)
    assert osp.isfile(out)
    # a backbone of other widths is refused
    other = copy.deepcopy(seg_model)
    with pytest.raises(ValueError, match='widths'):
        use_packed_backbone(other, export_model(_reduced_backbone()))



@pytest.mark.slow
def test_fast_heads_same_logits(seg_model):
    """use_packed_backbone's default head preparation (BN folded into the
    convs, channels-last) leaves the segmentation logits unchanged."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from mmbhvit.deploy.mmseg_backend import use_packed_backbone
    packed = export_model(copy.deepcopy(seg_model))
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(5))
    plain = use_packed_backbone(copy.deepcopy(seg_model), packed,
                                fast_heads=False)
    fast = use_packed_backbone(copy.deepcopy(seg_model), packed)
    assert any(isinstance(m, _BatchNorm) for m in plain.decode_head.modules())
    assert not any(
        isinstance(m, _BatchNorm) for m in fast.decode_head.modules())
    with torch.no_grad():
        feats = fast.backbone(x)
        assert all(f.is_contiguous(memory_format=torch.channels_last)
                   for f in feats)
        ref = plain(x, mode='tensor')
        out = fast(x, mode='tensor')
    assert out.shape == ref.shape == (1, 5, 24, 40)
    assert diff_stats(out, ref)['max_rel'] < 1e-4

@pytest.mark.slow
def test_benchmark_tool_smoke(capsys):
    from mmbhvit.deploy.benchmark import (benchmark_task, float_share,
                                          format_result)
    binary = _reduced_classifier()
    torch.manual_seed(0)
    _quiet()
    with _mmpretrain_scope():
        fp = build_classifier(
            dict(type='BHViT', arch=REDUCED, weight_bits=32, act_bits=32),
            7).eval()
    from mmbhvit.deploy.benchmark import BASELINES, resolve_baselines
    baselines = resolve_baselines(None)[0] if importlib.util.find_spec(
        'onnx') else []
    res = benchmark_task('cls', binary, fp, (64, 64), [1], iters=2, warmup=1,
                         profile=True, baselines=baselines)
    text = format_result(res)
    assert '(c) packed engine' in text and 'mlp expand' in text
    flt, frac = float_share(res['profile'][1]['(c) packed engine'])
    assert flt > 0 and 0 < frac < 1
    assert f'float work around the kernels: {flt:.2f} ms' in text
    for runtime in baselines:  # the classifier's fp32 baselines
        assert res['runs'][1][BASELINES[runtime]]['median_ms'] > 0
    assert 'vs the fastest fp32 engine' in text
    ops = res['ops']
    assert ops['backbone_ops'] > 0 and ops['head_ops'] > 0
    assert ops['backbone_ops'] + ops['head_ops'] == pytest.approx(
        ops['total_ops'])
