# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The integer forward of binary 1×1 convolutions
(:class:`~mmbhvit.models.binary.layers.SignProductConv1x1`): exact
products, the convolution's gradients, and taken only where it applies."""
import pytest
import torch
import torch.nn.functional as F

from mmbhvit.models.binary import BinaryConv2d, binarize_weight
from mmbhvit.models.binary import fused
from mmbhvit.models.binary.fused import fused_kernels
from mmbhvit.models.binary.layers import SignProductConv1x1

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


def _uses_integers(layer, x) -> bool:
    return _integer_node(layer(x))


def test_binary_layer_takes_the_integer_product_only_where_it_applies(
        monkeypatch):
    """Wide 1-bit 1×1 layers on CPU float32 take it; narrow ones and small
    images (it would be slower), float64, 3×3, 32-bit layers, the off
    switch, tracing and autocast do not."""
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


def test_binary_layer_values_and_gradients_match_the_float_path():
    """A whole :class:`BinaryConv2d` with its activation sign (and shift)
    and weight binarizer: output and gradients within float32 round-off,
    with the integer product on and off (on: its backward is a matrix
    product on this 23×23 map, :func:`pointwise_grads`; off: the
    convolution's own)."""
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
        assert _integer_node(y) == on
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
