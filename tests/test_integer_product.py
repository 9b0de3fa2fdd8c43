# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The exact forward of binary 1×1 convolutions
(:class:`~mmbhvit.models.binary.layers.SignProductConv1x1`), by its two
routes (int8 products, the extension's popcount kernel): exact products,
equal to each other bit for bit, the convolution's gradients, and taken
only where they apply."""
import pytest
import torch
import torch.nn.functional as F

from mmbhvit.models.binary import BinaryConv2d, binarize_weight
from mmbhvit.models.binary import fused
from mmbhvit.models.binary.fused import fused_kernels
from mmbhvit.models.binary.layers import (SignProductConv1x1,
                                          sign_product_reference)

pytestmark = pytest.mark.skipif(not hasattr(torch, '_int_mm'),
                                reason='this torch has no torch._int_mm')


_INT8_PRODUCTS_FAST = fused.int8_products_fast


@pytest.fixture(autouse=True)
def fast_int8_products(monkeypatch):
    """The layers' choice as on a CPU with fast int8 products (AVX-512
    VNNI), whatever this one is: these tests check values and routing,
    not speed (a plain-loop ``torch._int_mm`` gives the same integers)."""
    monkeypatch.setattr(fused, 'int8_products_fast', lambda: True)


def _signs(*shape):
    """A sign map with some exact zeros (sign(0) = 0)."""
    x = torch.randint(-1, 2, shape).float()
    assert (x == 0).any()
    return x


def _binary_weight(cout, cin):
    w = torch.randn(cout, cin, 1, 1) * 0.05
    w[1] = 0.  # a channel whose scale is 0
    return binarize_weight(w).detach()


@pytest.mark.parametrize('with_bias', [False, True])
def test_values_are_the_correctly_rounded_product(with_bias):
    """The integer sum times the scale is exact before one rounding to
    float32: equal to the float64 convolution rounded to float32 (which a
    float32 convolution only approaches), and within float32 round-off of
    ``F.conv2d``."""
    torch.manual_seed(0)
    x, w = _signs(3, 300, 5, 7), _binary_weight(24, 300)
    bias = torch.randn(24) if with_bias else None
    y = SignProductConv1x1.apply(x, w, bias)
    assert y.dtype == torch.float32 and y.shape == (3, 24, 5, 7)
    exact = F.conv2d(x.double(), w.double())
    if bias is None:
        assert torch.equal(y, exact.float())
    else:
        exact = exact + bias.double().view(1, -1, 1, 1)
        torch.testing.assert_close(y, exact.float(), rtol=2e-7, atol=1e-6)
    torch.testing.assert_close(y, F.conv2d(x, w, bias), rtol=1e-5,
                               atol=1e-5)
    assert (y[:, 1] == (0. if bias is None else bias[1])).all()


@pytest.mark.parametrize('with_bias', [False, True])
def test_gradients_are_those_of_the_convolution(with_bias):
    torch.manual_seed(1)
    x = _signs(2, 64, 6, 6).requires_grad_()
    w = _binary_weight(16, 64).requires_grad_()
    bias = torch.randn(16, requires_grad=True) if with_bias else None
    grad = torch.randn(2, 16, 6, 6)
    leaves = [t for t in (x, w, bias) if t is not None]
    got = torch.autograd.grad(SignProductConv1x1.apply(x, w, bias), leaves,
                              grad)
    want = torch.autograd.grad(F.conv2d(x, w, bias), leaves, grad)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _integer_node(y) -> bool:
    return type(y.grad_fn).__name__.startswith('SignProductConv1x1')


def _route(y):
    """The route the forward took: 'popcount', 'integer', 'conv' (the
    Function fell back to the float convolution) or None (not taken)."""
    return y.grad_fn.route if _integer_node(y) else None


def _uses_integers(layer, x) -> bool:
    return _route(layer(x)) == 'integer'


@pytest.fixture
def without_popcount(monkeypatch):
    """The layers' choice without the extension's popcount product."""
    monkeypatch.setattr(fused, 'sign_product_route', lambda x: (
        'integer' if fused.integer_product_ok(x) else None))


POPCOUNT = pytest.mark.skipif(
    fused.unavailable_reason() is not None,
    reason=f'C++ extension: {fused.unavailable_reason()}')


def _all_signs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def _sign_weight(cout, cin, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(cout, 1, 1, 1, generator=g) + 0.01
    return _all_signs(cout, cin, 1, 1, seed=seed) * scale


def _kernel_sets():
    from mmbhvit.deploy.ops import load_extension
    ext = load_extension()
    return [] if ext is None else [s for s, why in ext.kernel_sets()
                                   if not why]


@POPCOUNT
@pytest.mark.parametrize('cin,cout,h,w', [(70, 13, 9, 11), (64, 512, 8, 8),
                                          (512, 64, 7, 9), (130, 20, 1, 1)])
def test_popcount_route_equals_the_reference_and_the_integer_route(
        cin, cout, h, w):
    """Bit for bit, on every kernel set this CPU runs: partial words of
    channels, partial blocks of 8 outputs, tiles of 64 pixels and parts."""
    from mmbhvit.deploy.ops import load_extension
    ext = load_extension()
    x, wt = _all_signs(2, cin, h, w), _sign_weight(cout, cin)
    bias = torch.randn(cout)
    before = ext.isa()
    try:
        for kset in _kernel_sets():
            ext.set_isa(kset)
            for b in (None, bias):
                y = SignProductConv1x1.apply(x, wt, b, 'popcount')
                assert y.grad_fn is None or y.grad_fn.route == 'popcount'
                want = sign_product_reference(x, wt, b)
                assert torch.equal(y, want), (kset, b is None)
                assert torch.equal(y, SignProductConv1x1.apply(
                    x, wt, b, 'integer'))
    finally:
        ext.set_isa(before)


@POPCOUNT
@pytest.mark.parametrize('cin', [96, 200])
def test_popcount_route_counts_zero_inputs_exactly(cin):
    """sign(0) = 0 inputs (a zero bias meeting an exact 0): the tiles with
    zeros are counted twice, the values stay the reference's, bit for
    bit, on every kernel set; tiles without zeros beside them."""
    from mmbhvit.deploy.ops import load_extension
    ext = load_extension()
    x, wt = _all_signs(2, cin, 17, 19), _sign_weight(22, cin)
    x[0, 5, 3, 4] = 0  # one zero in one tile of image 0
    x[1] *= (torch.rand(cin, 17, 19) > 0.1)  # many in image 1
    bias = torch.randn(22)
    before = ext.isa()
    try:
        for kset in _kernel_sets():
            ext.set_isa(kset)
            y = SignProductConv1x1.apply(x.requires_grad_(), wt, bias,
                                         'popcount')
            assert y.grad_fn.route == 'popcount'
            assert torch.equal(y, sign_product_reference(x, wt, bias)), kset
    finally:
        ext.set_isa(before)


@POPCOUNT
def test_popcount_route_declines_what_is_not_a_sign():
    """A NaN input, a zero weight row: the kernel declines and the integer
    route (here, fast int8 products) or else the float convolution gives
    the values."""
    x, wt = _all_signs(1, 96, 5, 5), _sign_weight(24, 96)
    x.requires_grad_()
    assert SignProductConv1x1.apply(x, wt, None,
                                    'popcount').grad_fn.route == 'popcount'
    zero_w = wt.clone()
    zero_w[5] = 0
    y = SignProductConv1x1.apply(x, zero_w, None, 'popcount')
    assert y.grad_fn.route == 'integer'
    assert torch.equal(y, sign_product_reference(x, zero_w, None))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fused, 'int8_products_fast', lambda: False)
        y = SignProductConv1x1.apply(x, zero_w, None, 'popcount')
        assert y.grad_fn.route == 'conv'
        torch.testing.assert_close(y, F.conv2d(x, zero_w))
        nan_x = x.detach().clone()
        nan_x[0, 0, 0, 0] = float('nan')
        y = SignProductConv1x1.apply(nan_x.requires_grad_(), wt, None,
                                     'popcount')
        assert y.grad_fn.route == 'conv' and y[0, :, 0, 0].isnan().all()


@POPCOUNT
def test_binary_layer_takes_the_popcount_product_only_where_it_applies(
        monkeypatch):
    """With the extension: every 1-bit 1×1 layer on CPU float32 large
    enough for the call to pay, whatever its width or the int8 speed; not
    float64, 3×3, 32-bit layers, the off switch or autocast."""
    torch.manual_seed(2)
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    layer = BinaryConv2d(64, 512, 1)  # 256·64·512 >= MIN_POPCOUNT_WORK
    assert _route(layer(x)) == 'popcount'
    monkeypatch.setattr(fused, 'int8_products_fast', lambda: False)
    assert _route(layer(x)) == 'popcount'
    tiny = x[:, :, :1, :1].contiguous()  # 64·512 < MIN_POPCOUNT_WORK
    assert _route(layer(tiny)) is None
    assert _route(layer.double()(x.double())) is None
    layer = layer.float()
    assert _route(BinaryConv2d(64, 512, 3, padding=1)(x)) is None
    assert _route(BinaryConv2d(64, 512, 1, weight_bits=32)(x)) is None
    with fused_kernels(False):
        assert _route(layer(x)) is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert _route(layer(x)) is None


def test_binary_layer_takes_the_integer_product_only_where_it_applies(
        monkeypatch, without_popcount):
    """Without the popcount product: wide 1-bit 1×1 layers on CPU float32
    take the integer one; narrow ones and small images (it would be
    slower), float64, 3×3, 32-bit layers, the off switch, tracing and
    autocast do not."""
    torch.manual_seed(2)
    x = torch.randn(1, 256, 32, 32, requires_grad=True)
    wide = BinaryConv2d(256, 64, 1)  # 1024·256·64 = MIN_WORK
    assert _uses_integers(wide, x)
    assert not _uses_integers(wide, x[:, :, :16].contiguous())
    monkeypatch.setattr(SignProductConv1x1, 'MIN_WORK', 1)
    small = x[:, :, :4, :4].contiguous()
    assert _uses_integers(wide, small)
    assert _uses_integers(BinaryConv2d(256, 512, 1), small)
    assert _uses_integers(BinaryConv2d(64, 32, 1), small[:, :64])
    assert not _uses_integers(BinaryConv2d(64, 512, 1), small[:, :64])
    assert not _uses_integers(wide.double(), small.double())
    assert not _uses_integers(BinaryConv2d(256, 64, 3, padding=1), small)
    assert not _uses_integers(BinaryConv2d(256, 64, 1, weight_bits=32),
                              small)
    assert not _uses_integers(BinaryConv2d(256, 64, 1, act_bits=32), small)
    wide = wide.float()
    # a CPU whose torch._int_mm is a plain loop (no AVX-512 VNNI)
    with monkeypatch.context() as m:
        m.setattr(fused, 'int8_products_fast', lambda: False)
        assert not _uses_integers(wide, small)
    assert _uses_integers(wide, small)
    with fused_kernels(False):
        assert not _uses_integers(wide, small)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _uses_integers(wide, small)
    seen = []
    real = fused.integer_product_ok

    def spy(t):
        seen.append(real(t))
        return seen[-1]

    monkeypatch.setattr(fused, 'integer_product_ok', spy)
    torch.jit.trace(wide, small.detach(), check_trace=False)
    assert seen and not any(seen)


@pytest.mark.parametrize('route', [
    'integer', pytest.param('popcount', marks=POPCOUNT)])
def test_binary_layer_values_and_gradients_match_the_float_path(
        route, monkeypatch):
    """A whole :class:`BinaryConv2d` with its activation sign (and shift)
    and weight binarizer: output and gradients within float32 round-off,
    with the integer product on and off (on: its backward is a matrix
    product on this 23×23 map, :func:`pointwise_grads`; off: the
    convolution's own)."""
    if route == 'integer':
        monkeypatch.setattr(fused, 'sign_product_route', lambda x: (
            'integer' if fused.integer_product_ok(x) else None))
    torch.manual_seed(3)
    layer = BinaryConv2d(512, 64, 1, bias=True)
    shift = torch.nn.Parameter(torch.randn(512) * 0.1)
    x = torch.randn(2, 512, 23, 23)  # 529·512·64 > MIN_WORK
    grad = torch.randn(2, 64, 23, 23)
    results = []
    for on in (True, False):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        shift.grad = None
        with fused_kernels(on):
            y = layer(xi, _Shift(shift))
        y.backward(grad)
        assert _route(y) == (route if on else None)
        results.append((y.detach(), xi.grad, layer.weight.grad.clone(),
                        layer.bias.grad.clone(), shift.grad.clone()))
    (y1, *g1), (y2, *g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1[:3], g2[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5,
                                   atol=1e-6 * b.abs().max().item())
    # the shift's gradient is summed by the fused sign kernel when on
    torch.testing.assert_close(g1[3], g2[3])


class _Shift(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.bias = bias



def test_int8_products_are_fast_only_with_avx512_vnni(monkeypatch):
    """The CPU test follows what torch reports: AVX-512 VNNI present or
    not (and no such report: not)."""
    probe = _INT8_PRODUCTS_FAST.__wrapped__  # the real test, uncached
    monkeypatch.setattr(torch.cpu, '_is_vnni_supported', lambda: True,
                        raising=False)
    assert probe() is True
    monkeypatch.setattr(torch.cpu, '_is_vnni_supported', lambda: False)
    assert probe() is False
    monkeypatch.delattr(torch.cpu, '_is_vnni_supported')
    assert probe() is False
