# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
import math

import pytest
import torch
import torch.nn.functional as F

from mmbhvit.models.binary import (BinaryConv2d, CentredSignSTE,
                                   ClippedSignSTE, GSBAttentionBinarizer,
                                   LayerScale, LearnableBias,
                                   LSQAttentionQuantizer, QuantizerFunction,
                                   RoundSTE, RPReLU, ScaleGrad,
                                   ShiftedSignSTE, SignSTE, binarize_weight,
                                   clipped_ste_grad, integer_range_bits,
                                   quantizer_function, sign_ste)
from mmbhvit.models.binary.fused import fused_kernels


def test_sign_ste_values_and_polynomial_gradient():
    x = torch.tensor([-2., -1., -0.5, 0., 0.25, 0.5, 1., 3.],
                     dtype=torch.float64, requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1., -1., -1., 0., 1., 1., 1., 1.]
    y.sum().backward()
    # d/dx of the piecewise polynomial: 2 - 2|x| inside [-1, 1], else 0
    assert x.grad.tolist() == [0., 0., 1., 2., 1.5, 1., 0., 0.]


def _reference_binary_weight(w):
    """The straight-through construction written with autograd only."""
    dims = tuple(range(1, w.dim()))
    scale = w.abs().mean(dim=dims, keepdim=True).detach()
    c = w - w.mean(dim=dims, keepdim=True)
    clipped = c.clamp(-1, 1)
    return (scale * c.sign()).detach() - clipped.detach() + clipped


def test_binarize_weight_two_values_per_channel_and_ste():
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.8).requires_grad_()
    wb = binarize_weight(w)
    for o in range(6):
        values = wb[o].unique()
        assert len(values) == 2
        assert torch.allclose(values.abs(), w[o].abs().mean().expand(2))
    # sign follows the centred weight
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(wb.sign(), centred.sign())
    g = torch.randn_like(w)
    (wb * g).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    (_reference_binary_weight(w2) * g).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-15)
    assert (w.grad != 0).any()


def test_binarize_weight_recu_clips_at_laplace_quantile():
    torch.manual_seed(1)
    w = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    wb = binarize_weight(w, recu=True)
    assert torch.allclose(wb.abs(), w.abs().mean(1, keepdim=True).expand(8, 16))
    wb.sum().backward()
    c = w.detach() - w.detach().mean(1, keepdim=True)
    z = c / (torch.sqrt(c.var(1, keepdim=True) + 1e-5) / 2 / math.sqrt(2))
    tau = -z.abs().mean().item() * math.log(2 - 2 * 0.92)
    # gradient flows only where |z| <= tau (some entries must be cut)
    outside = z.abs() > tau
    assert outside.any() and (~outside).any()
    w3 = w.detach().clone().requires_grad_()
    c3 = w3 - w3.mean(1, keepdim=True)
    z3 = c3 / (torch.sqrt(c3.var(1, keepdim=True) + 1e-5) / 2 / math.sqrt(2))
    z3.clamp(-tau, tau).sum().backward()
    assert torch.allclose(w.grad, w3.grad, atol=1e-12)


def _grads(f, *inputs, seed=0):
    """Output of ``f(*inputs)`` and the gradients of a random projection
    of it with respect to every input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = f(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_shifted_sign_ste_equals_sign_ste_of_the_shifted_input(dtype):
    """The fused shift + sign gives the values and gradients (input and
    bias) of ``SignSTE.apply(x + b)``, bit for bit, inside and outside the
    STE window and at its edges."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 3, dtype=dtype)
    x[0, 0, 0, :3] = torch.tensor([1., -1., 0.], dtype=dtype)  # |u| = 1, 0
    b = torch.tensor([0., 0.3, -0.2, 1.5], dtype=dtype)
    with fused_kernels(False):  # (the compiled path: test_fused_kernels.py)
        out, grads = _grads(ShiftedSignSTE.apply, x, b)
    ref, ref_grads = _grads(
        lambda x, b: SignSTE.apply(x + b.view(1, -1, 1, 1)), x, b)
    assert torch.equal(out, ref)
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, want)
    assert (grads[0] == 0).any() and (grads[0] != 0).any()
    # the functional form and the layer API take the same path
    assert torch.equal(sign_ste(x, b), ref)
    conv = BinaryConv2d(4, 2, 1, bias=False).to(dtype)
    shift = LearnableBias(4).to(dtype)
    with torch.no_grad():
        shift.bias.copy_(b)
    assert torch.equal(conv(x, shift), conv(shift(x)))


def test_shifted_sign_ste_refuses_a_second_backward():
    """The composed backward reuses the shifted input in place; a second
    backward through the same graph is an autograd error, not a wrong
    gradient."""
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    with fused_kernels(False):
        y = ShiftedSignSTE.apply(x, b).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='inplace operation'):
        y.backward()


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_centred_sign_ste_equals_the_composed_weight_binarizer(dtype):
    """One Function for centring + clipped sign + scale: the values and
    gradients of ``ClippedSignSTE`` applied to the centred weight with a
    detached scale, bit for bit, including weights at exactly |c| = 1."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=dtype) * 0.8
    w[0] = 0
    w[0, 0, 0, :2] = torch.tensor([1., -1.], dtype=dtype)  # c = +-1 exactly

    def composed(w):
        dims = (1, 2, 3)
        scale = w.abs().mean(dim=dims, keepdim=True).detach()
        return ClippedSignSTE.apply(w - w.mean(dim=dims, keepdim=True),
                                    scale, 1.0)

    with fused_kernels(False):  # (the compiled path: test_fused_kernels.py)
        out, (grad, ) = _grads(CentredSignSTE.apply, w)
    ref, (ref_grad, ) = _grads(composed, w)
    assert torch.equal(out, ref)
    assert torch.equal(grad, ref_grad)
    assert grad[0, 0, 0, 0] != 0 and grad[0, 0, 0, 1] != 0  # |c| = 1: in
    assert torch.equal(binarize_weight(w), out)


@pytest.mark.parametrize('dtype',
                         [torch.float64, torch.float32, torch.bfloat16])
def test_clipped_ste_grad_window_is_closed(dtype):
    """``grad`` where ``|x| <= tau`` (the edge included), 0 outside."""
    one = torch.tensor(1., dtype=dtype)
    above = torch.nextafter(one, torch.tensor(2., dtype=dtype))
    x = torch.stack([-above, -one, -one / 2, one * 0, one, above])
    g = torch.arange(1., 7.).to(dtype)
    assert clipped_ste_grad(g, x, 1.0).tolist() == [0., 2., 3., 4., 5., 0.]
    assert clipped_ste_grad(g, x * 0.5, 0.5).tolist() == [
        0., 2., 3., 4., 5., 0.]


def test_binary_conv_bits_switch():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    conv = BinaryConv2d(8, 8, 3, padding=1, groups=4, weight_bits=32,
                        act_bits=32).double()
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=4)
    assert torch.allclose(conv(x), ref)
    conv.weight_bits = conv.act_bits = 1
    out = conv(x)
    ref = F.conv2d(x.sign(), binarize_weight(conv.weight), conv.bias,
                   padding=1, groups=4)
    assert torch.allclose(out, ref)
    assert conv.is_binary
    with pytest.raises(ValueError, match='weight_bits must be one of'):
        BinaryConv2d(4, 4, 1, weight_bits=8)


@pytest.mark.parametrize('bits', [1, 32])
def test_binary_conv_forward_quantized_shares_the_input_quantization(bits):
    torch.manual_seed(0)
    conv = BinaryConv2d(8, 8, 3, padding=2, dilation=2, groups=4,
                        weight_bits=bits, act_bits=bits).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    xq = conv.quantize_input(x)
    assert torch.equal(conv.forward_quantized(xq), conv(x))
    ref = F.conv2d(xq, conv.quantized_weight(), conv.bias, padding=2,
                   dilation=2, groups=4)
    assert torch.equal(conv.forward_quantized(xq), ref)


def test_quantizers_declare_their_precision():
    assert SignSTE.precision == ClippedSignSTE.precision == 1
    assert ShiftedSignSTE.precision == CentredSignSTE.precision == 1
    assert RoundSTE.precision is None and RoundSTE.integer_valued
    assert not SignSTE.integer_valued
    # each quantizer's output really has that many levels per scale
    x = torch.randn(64)
    assert set(SignSTE.apply(x).unique().tolist()) == {-1., 1.}
    w = torch.randn(4, 16)
    scale = w.abs().mean(1, keepdim=True)
    assert set((ClippedSignSTE.apply(w, scale, 1.) / scale).unique().tolist()
               ) == {-1., 1.}
    # attention quantizers (modules) declare theirs too
    assert GSBAttentionBinarizer(2).precision == 3
    assert len(GSBAttentionBinarizer(2).masks(torch.rand(1, 2, 4, 4))[0]) == 3
    assert LSQAttentionQuantizer(2).precision == 2  # levels 0..3
    assert LSQAttentionQuantizer(2, levels=7).precision == 3
    assert LSQAttentionQuantizer(2, levels=1).precision == 1
    assert [integer_range_bits(0, n) for n in (1, 2, 3, 4)] == [1, 2, 2, 3]


def test_quantizer_registry_is_built_from_the_classes():
    """A trace names a Function node by its class name; the registry maps
    that name back to the class, whose ``precision`` the counter reads."""
    for cls in (SignSTE, ShiftedSignSTE, ClippedSignSTE, CentredSignSTE,
                RoundSTE):
        assert issubclass(cls, QuantizerFunction)
        assert quantizer_function(cls.__name__) is cls
    assert quantizer_function('_GSBFunction').precision == 3
    assert quantizer_function(ScaleGrad.__name__) is None  # not a quantizer
    assert quantizer_function('QuantizerFunction') is None  # the base
    with pytest.raises(TypeError, match="named 'SignSTE'"):
        type('SignSTE', (QuantizerFunction, ), {})
    assert quantizer_function('SignSTE') is SignSTE


def test_rprelu_and_layerscale_formulas():
    x = torch.tensor([[-2., 0.5], [1., -1.]]).view(1, 2, 2, 1)
    act = RPReLU(2)
    with torch.no_grad():
        act.bias_in.copy_(torch.tensor([0.5, -0.5]))
        act.weight.copy_(torch.tensor([0.1, 0.2]))
        act.bias_out.copy_(torch.tensor([1., 2.]))
    # channel 0: x-0.5 = [-2.5, 0.0] -> [-0.25, 0] + 1
    # channel 1: x+0.5 = [1.5, -0.5] -> [1.5, -0.1] + 2
    expected = torch.tensor([[0.75, 1.0], [3.5, 1.9]]).view(1, 2, 2, 1)
    assert torch.allclose(act(x), expected)
    ls = LayerScale(2, init_value=0.)
    assert torch.equal(ls(x), torch.zeros_like(x))
    with torch.no_grad():
        ls.scale.fill_(2.)
        ls.bias.copy_(torch.tensor([1., -1.]))
    assert torch.allclose(ls(x), x * 2 + torch.tensor([1., -1.]).view(1, 2, 1, 1))


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_rprelu_function_equals_the_composed_expression(dtype):
    """RPReLUFunction's backward is hand-written: values and all four
    gradients bit-identical to autograd through ``F.prelu``, including
    ``x - bias_in == 0`` (the kink) and a channel with a negative slope;
    without gradients (and when traced) the plain expression runs."""
    torch.manual_seed(0)
    act = RPReLU(6).to(dtype)
    with torch.no_grad():
        for p in act.parameters():
            p.uniform_(-0.5, 0.5)
        act.weight[0] = -0.3
    x = torch.randn(3, 6, 5, 7, dtype=dtype)
    x[0, :, 0, 0] = act.bias_in.detach()
    grad = torch.randn_like(x)
    results = []
    for function in (True, False):
        xr = x.clone().requires_grad_()
        act.zero_grad(set_to_none=True)
        if function:
            with fused_kernels(False):  # the PyTorch-composed backward
                y = act(xr)
            assert y.grad_fn.name() == 'RPReLUFunctionBackward'
            assert y.grad_fn.ops is None
        else:
            y = F.prelu(xr - act.bias_in.view(1, -1, 1, 1), act.weight) + \
                act.bias_out.view(1, -1, 1, 1)
        y.backward(grad)
        results.append([y.detach(), xr.grad] +
                       [p.grad for p in act.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(act(x), results[1][0])
    traced = torch.jit.trace(act, x, check_trace=False)
    assert 'PythonOp' not in str(traced.graph)


def test_gsb_decomposes_into_binary_maps():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 7, dtype=torch.float64) * 3, -1)
    gsb = GSBAttentionBinarizer().double()
    with torch.no_grad():
        gsb.alpha.fill_(0.4)
        gsb.beta1.fill_(1.5)
        gsb.beta2.fill_(2.5)
    out = gsb(p)
    (t0, t1, t2), (s0, s1, s2) = gsb.masks(p)
    for t in (t1, t2):
        assert set(t.unique().tolist()) <= {0., 1.}
    assert set(t0.unique().tolist()) <= {-1., 0., 1.}
    assert torch.allclose(out, s0 * t0 + s1 * t1 + s2 * t2)
    # hand computation of the thresholds for one row
    q = p[0, 0, 0] / 0.4
    m = q.max()
    assert torch.equal(t2[0, 0, 0], (q > 0.9 * m).double())
    assert torch.equal(t1[0, 0, 0], (q > 0.7 * m).double() - (q > 0.9 * m).double())


def test_gsb_custom_gradients():
    p = torch.tensor([[[[0.1, 0.3, 0.6]]]], dtype=torch.float64,
                     requires_grad=True)
    gsb = GSBAttentionBinarizer().double()
    with torch.no_grad():
        gsb.alpha.fill_(0.5)   # q = [0.2, 0.6, 1.2], max 1.2
        gsb.beta1.fill_(2.)
        gsb.beta2.fill_(3.)
    out = gsb(p)
    # T2 = [q > 1.08] = [0,0,1]; above 0.84: [0,0,1] -> T1 = 0
    # T0 = round(q).clip(0,1) - [q>0.84] = [0,1,1] - [0,0,1] = [0,1,0]
    assert out.tolist() == [[[[0., 0.5, 1.5]]]]
    g = torch.tensor([[[[1., 2., 3.]]]], dtype=torch.float64)
    (out * g).sum().backward()
    assert p.grad.tolist() == [[[[0., 1., 4.5]]]]       # alpha * levels * g
    # d/dalpha = sum g * levels * (1 - q [0<=q<=1]) = 2*1*(1-0.6) + 3*3*1
    assert gsb.alpha.grad.item() == pytest.approx(0.8 + 9.)
    assert gsb.beta1.grad.item() == 0.
    assert gsb.beta2.grad.item() == pytest.approx(0.5 * 3.)


def test_lsq_attention_levels_and_data_init():
    torch.manual_seed(0)
    q = LSQAttentionQuantizer(num_heads=2).double().train()
    p = torch.softmax(torch.randn(3, 2, 4, 4, dtype=torch.float64), -1)
    out = q(p)
    assert q.initialized.item() == 1
    expected_step = 2 * (3 * p).abs().mean(dim=(-1, -2)).mean(0) / math.sqrt(3)
    assert torch.allclose(q.step.detach(), expected_step)
    levels = out / q.step.detach().view(1, -1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-12)
    assert levels.min() >= 0 and levels.max() <= 3
    # second call does not re-initialise
    with torch.no_grad():
        q.step.fill_(0.7)
    q(p)
    assert torch.all(q.step == 0.7)
    # loading an uninitialised state makes the next step initialise again
    q.load_state_dict(LSQAttentionQuantizer(num_heads=2).double().state_dict())
    assert q.initialized.item() == 0
    q(p)
    assert q.initialized.item() == 1
    assert torch.allclose(q.step.detach(), expected_step)
    with pytest.raises(ValueError, match='heads=2'):
        q(torch.rand(1, 3, 4, 4))


def test_lsq_gradient_scale():
    q = LSQAttentionQuantizer(num_heads=1).double()
    q.initialized.fill_(1)
    p = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64)
    out = q(p)   # x = 0.75 -> round(0.75) = 1 -> out = step
    out.sum().backward()
    g = 1 / math.sqrt(4 * 3)
    # d out / d step = level + (x/step)' ... through round STE:
    # out = round(x/s + z) * s  -> d/ds = round(.) + s * (-x/s^2) = 1 - 0.75
    assert q.step.grad.item() == pytest.approx(4 * (1 - 0.75) * g)
    assert q.zero_point.grad.item() == pytest.approx(4 * 1. * g)
