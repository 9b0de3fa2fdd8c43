# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""1×1 convolutions as matrix products in CPU training
(:class:`~mmbhvit.models.binary.layers.PointwiseConv`,
:func:`~mmbhvit.models.binary.layers.pointwise_grads`): the convolution's
values and gradients, taken only where they apply."""
import pytest
import torch
import torch.nn.functional as F

from mmbhvit.models.binary import BinaryConv2d, fused
from mmbhvit.models.binary.fused import fused_kernels
from mmbhvit.models.binary.layers import PointwiseConv, pointwise_grads

# (batch, in, out, H, W): maps above and below MIN_PIXELS (the backward of
# the small ones is the convolution's), one image, odd sizes
SHAPES = [(3, 24, 40, 12, 11), (1, 16, 8, 16, 8), (2, 12, 20, 5, 7)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('with_bias', [True, False])
def test_values_and_gradients_are_the_convolution_s(shape, with_bias):
    torch.manual_seed(0)
    n, cin, cout, h, w = shape
    x = torch.randn(n, cin, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(cout, cin, 1, 1, dtype=torch.float64,
                         requires_grad=True)
    bias = (torch.randn(cout, dtype=torch.float64, requires_grad=True)
            if with_bias else None)
    grad = torch.randn(n, cout, h, w, dtype=torch.float64)
    leaves = [t for t in (x, weight, bias) if t is not None]
    y = PointwiseConv.apply(x, weight, bias)
    ref = F.conv2d(x, weight, bias)
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    got = torch.autograd.grad(y, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(2)
    args = (torch.randn(2, 3, 12, 11, dtype=torch.float64),  # 132 pixels
            torch.randn(2, 3, 1, 1, dtype=torch.float64),
            torch.randn(2, dtype=torch.float64))
    assert 12 * 11 >= PointwiseConv.MIN_PIXELS
    assert torch.autograd.gradcheck(
        PointwiseConv.apply, tuple(t.requires_grad_() for t in args))


def test_only_the_requested_gradients_are_formed():
    x = torch.randn(2, 8, 12, 12)
    weight = torch.randn(4, 8, 1, 1)
    grad = torch.randn(2, 4, 12, 12)
    gx, gw, gb = pointwise_grads(grad, x, weight, (True, False, True), False)
    assert gx.shape == x.shape and gw is None and gb is None
    gx, gw, gb = pointwise_grads(grad, x, weight, (False, True, True), True)
    assert gx is None and gw.shape == weight.shape and gb.shape == (4, )


def _uses_matmul(layer, x) -> bool:
    return type(layer(x).grad_fn).__name__.startswith('PointwiseConv')


def test_layer_takes_the_matrix_product_only_where_it_applies(monkeypatch):
    """1×1 layers (binary or not) on large enough CPU float maps in eager
    training; not 3×3, strided or grouped layers, small maps, the off
    switch, inference, autocast or tracing."""
    torch.manual_seed(1)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)  # 256 pixels
    full = BinaryConv2d(32, 16, 1, weight_bits=32, act_bits=32)
    narrow_binary = BinaryConv2d(32, 64, 1)  # no integer product: 32 < 2·64
    assert _uses_matmul(full, x)
    with monkeypatch.context() as m:  # without the popcount product
        m.setattr(fused, 'sign_product_route', lambda t: None)
        assert _uses_matmul(narrow_binary, x)
    assert _uses_matmul(full.double(), x.double())
    full.float()
    assert not _uses_matmul(full, x[:, :, :8, :8].contiguous())  # 64 px
    assert not _uses_matmul(BinaryConv2d(32, 16, 3, padding=1,
                                         weight_bits=32, act_bits=32), x)
    assert not _uses_matmul(BinaryConv2d(32, 16, 1, stride=2,
                                         weight_bits=32, act_bits=32), x)
    assert not _uses_matmul(BinaryConv2d(32, 16, 1, groups=4,
                                         weight_bits=32, act_bits=32), x)
    assert not _uses_matmul(full, x.to(memory_format=torch.channels_last))
    with fused_kernels(False):
        assert not _uses_matmul(full, x)

    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _uses_matmul(full, x)
    traced = torch.jit.trace(full, x.detach(), check_trace=False)
    assert 'PointwiseConv' not in str(traced.graph)
    assert 'conv' in str(traced.graph).lower()
    monkeypatch.setattr(PointwiseConv, 'apply', None)  # fails if called
    with torch.no_grad():  # inference keeps the convolution
        torch.testing.assert_close(full(x),
                                   F.conv2d(x, full.weight, full.bias))
