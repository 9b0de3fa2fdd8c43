# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The one-pass CPU kernels of sign/STE, RPReLU and the weight binarizer
used in training
(``mmbhvit.models.binary.fused``, ``csrc/training_ops.cpp``) against the
PyTorch-composed path they replace."""
import math

import pytest
import torch

from mmbhvit.models.backbones.bhvit import BinaryResidualProj
from mmbhvit.models.binary import (CentredSignSTE, RPReLU,
                                   ShiftedSignShortcut, ShiftedSignSTE,
                                   SignSTE, binarize_weight, sign_ste,
                                   sign_ste_with_shortcut)
from mmbhvit.models.binary import fused
from mmbhvit.models.binary.fused import fused_kernels

pytestmark = pytest.mark.skipif(
    not fused.enabled(),
    reason=f'fused kernels unavailable: {fused.unavailable_reason()}')

DTYPES = [torch.float32, torch.float64]


def _special(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Put the STE window's edges, zeros (both signs) and non-finite values
    into channel 0 of ``x`` (after the channel's ``shift``)."""
    vals = [1., -1., 0., -0., 0.5, 2., math.inf, -math.inf, math.nan]
    row = torch.tensor(vals, dtype=x.dtype) - shift[0]
    x = x.clone()
    x[0, 0, 0, :len(vals)] = row
    return x


def _run(fn, inputs, grad, enable):
    """Values and input gradients of ``fn(*inputs)`` with the fused kernels
    switched on or off; also returns whether they ran."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with fused_kernels(enable):
        out = fn(*leaves)
    ran = out.grad_fn.ops is not None
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves], ran


def _assert_same(a, b):
    """Equal, NaN where the other is NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('with_bias', [False, True])
def test_sign_ste_fused_is_bit_identical(dtype, with_bias):
    """sign and its STE window: values and the input gradient equal to the
    composed path bit for bit, with the window's edges |u| = 1, signed
    zeros, infinities and NaN (sign 0, as torch.sign); the shift's gradient
    equal up to summation order."""
    torch.manual_seed(0)
    b = torch.randn(5, dtype=dtype) * 0.3
    x = _special(torch.randn(2, 5, 6, 11, dtype=dtype) * 1.2,
                 b if with_bias else torch.zeros(5, dtype=dtype))
    grad = torch.randn_like(x)
    if with_bias:
        fn, inputs = ShiftedSignSTE.apply, (x, b)
    else:
        fn, inputs = SignSTE.apply, (x, )
    out, grads, ran = _run(fn, inputs, grad, True)
    ref, ref_grads, ran_ref = _run(fn, inputs, grad, False)
    assert ran and not ran_ref
    _assert_same(out, ref)
    _assert_same(grads[0], ref_grads[0])
    if with_bias:  # summed in the kernel's pass, in its own order
        torch.testing.assert_close(grads[1], ref_grads[1], equal_nan=True)
    assert set(out[0, 0, 0, :9].tolist()) == {1., -1., 0.}
    assert (grads[0] == 0).any() and (grads[0] != 0).any()


def _composed_shortcut(x, b, ratio):
    """``(sign(x + b), shortcut(x))`` as two separate consumers of x."""
    if ratio == 1:
        return sign_ste(x, b), x
    n, c = x.shape[:2]
    return sign_ste(x, b), x.view(n, c // ratio, ratio,
                                  *x.shape[2:]).mean(dim=2)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('ratio', [1, 4])
def test_sign_with_shortcut_one_pass_is_bit_identical(dtype, ratio):
    """x read by sign(x + b) and by a shortcut (identity or group mean):
    values, shortcut and the input gradient (window term + the shortcut's
    gradient, / ratio for the mean) equal to the two consumers composed,
    bit for bit, with the window's edges, zeros and non-finite values; the
    shift's gradient is the window term's sum alone (to summation order).
    Unused shortcut: the plain window's gradient."""
    torch.manual_seed(0)
    b = torch.randn(8, dtype=dtype) * 0.3
    x = _special(torch.randn(2, 8, 5, 9, dtype=dtype) * 1.2, b)
    grads = (torch.randn_like(x),
             torch.randn(2, 8 // ratio, 5, 9, dtype=dtype) * 3)
    results = []
    for fn in (sign_ste_with_shortcut, _composed_shortcut):
        xl, bl = x.clone().requires_grad_(), b.clone().requires_grad_()
        outs = fn(xl, bl, ratio)
        torch.autograd.backward(outs, grads)
        results.append(([o.detach() for o in outs], xl.grad, bl.grad,
                         outs[0].grad_fn))
    (q, s), gx, gb, node = results[0]
    (q_ref, s_ref), gx_ref, gb_ref, _ = results[1]
    assert type(node).__name__ == ShiftedSignShortcut.__name__ + 'Backward'
    _assert_same(q, q_ref)
    _assert_same(s, s_ref)
    _assert_same(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref, equal_nan=True)
    # only the sign consumed: the window's gradient, no shortcut term
    xl, bl = x.clone().requires_grad_(), b.clone().requires_grad_()
    sign_ste_with_shortcut(xl, bl, ratio)[0].backward(grads[0])
    xr = x.clone().requires_grad_()
    ShiftedSignSTE.apply(xr, b).backward(grads[0])
    _assert_same(xl.grad, xr.grad)


@pytest.mark.parametrize('width', [(16, 16), (32, 8), (8, 32)])
def test_residual_projection_reads_its_input_once_when_it_can(width):
    """BinaryResidualProj takes ShiftedSignShortcut where its shortcut is
    the identity or a mean (not when it expands, not with a hook on its
    convolution, not for 32-bit activations, not without gradients); the
    outputs are the same and every gradient equal to round-off."""
    torch.manual_seed(0)
    cin, cout = width
    proj = BinaryResidualProj(cin, cout, dict(type='BN')).double()
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, cin, 6, 5, dtype=torch.float64)
    grad = torch.randn(3, cout, 6, 5, dtype=torch.float64)

    def run(compose):
        proj.zero_grad()
        xl = x.clone().requires_grad_()
        handle = (proj.conv.register_forward_hook(lambda *a: None)
                  if compose else None)
        try:
            names = set()
            y = proj(xl)
            stack = [y.grad_fn]
            while stack:  # the node names of the graph
                node = stack.pop()
                if node is not None and type(node).__name__ not in names:
                    names.add(type(node).__name__)
                    stack.extend(f for f, _ in node.next_functions)
            y.backward(grad)
        finally:
            if handle is not None:
                handle.remove()
        return (y.detach(), xl.grad,
                {n: p.grad.clone() for n, p in proj.named_parameters()},
                'ShiftedSignShortcutBackward' in names)

    y, gx, gp, fused_ran = run(compose=False)
    y_ref, gx_ref, gp_ref, ref_ran = run(compose=True)
    assert fused_ran == (cout <= cin) and not ref_ran
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-15)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-12,
                                   atol=1e-15)
    with torch.no_grad():
        assert proj._fused_input(x) is None
    full = BinaryResidualProj(cin, cout, dict(type='BN'), act_bits=32)
    assert full._fused_input(x.float().requires_grad_()) is None


@pytest.mark.parametrize('dtype', DTYPES)
def test_rprelu_fused_values_and_gradients(dtype):
    """RPReLU: values and the input gradient bit-identical to the composed
    path (kink included, negative and zero slopes too); the three per-channel
    parameter gradients equal up to summation order, and closer to an exact
    (float64) sum than the composed float32 sums are."""
    torch.manual_seed(1)
    act = RPReLU(6).to(dtype)
    slopes = torch.tensor([-0.3, 0., 0.1, 0.25, 0.7, 1.2], dtype=dtype)
    with torch.no_grad():
        act.weight.copy_(slopes)
        act.bias_in.normal_(std=0.4)
        act.bias_out.normal_(std=0.4)
    x = torch.randn(3, 6, 9, 13, dtype=dtype)
    x[1, :, 2, 3] = act.bias_in.detach()  # t = 0 exactly
    grad = torch.randn_like(x)
    results = {}
    for enable in (True, False):
        xr = x.clone().requires_grad_()
        act.zero_grad(set_to_none=True)
        with fused_kernels(enable):
            y = act(xr)
        assert (y.grad_fn.ops is not None) == enable
        y.backward(grad)
        results[enable] = [y.detach(), xr.grad] + [
            p.grad.clone() for p in act.parameters()]
    fused_res, ref = results[True], results[False]
    assert torch.equal(fused_res[0], ref[0])
    assert torch.equal(fused_res[1], ref[1])
    # exact sums in float64 from the float64 copies of the same tensors
    t = (x - act.bias_in.detach().view(1, -1, 1, 1)).double()
    g64 = grad.double()
    exact = [-ref[1].double().sum((0, 2, 3)),
             (g64 * t.clamp(max=0)).sum((0, 2, 3)), g64.sum((0, 2, 3))]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(
        rtol=1e-12, atol=1e-12)
    for got, want, ex in zip(fused_res[2:], ref[2:], exact):
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(got.double(), ex, **tol)


def test_rprelu_fused_sums_do_not_depend_on_the_thread_count():
    x = torch.randn(4, 8, 17, 19)
    grad = torch.randn_like(x)
    act = RPReLU(8)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            act.zero_grad(set_to_none=True)
            act(x.clone().requires_grad_()).backward(grad)
            grads.append([p.grad.clone() for p in act.parameters()])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_fused_path_is_taken_only_where_it_applies():
    """Non-contiguous input, bfloat16, a bias of another dtype, tracing and
    the switch all take the composed path (same values)."""
    x = torch.randn(2, 4, 5, 6)
    b = torch.randn(4)

    def ops_used(x, b=None):
        xr = x.detach().requires_grad_()
        y = SignSTE.apply(xr) if b is None else ShiftedSignSTE.apply(xr, b)
        return y.grad_fn.ops is not None

    assert ops_used(x) and ops_used(x, b)
    assert not ops_used(x.transpose(2, 3))
    assert not ops_used(x.bfloat16())
    assert not ops_used(x, b.double())
    assert not ops_used(x.double(), b)
    with fused_kernels(False):
        assert not ops_used(x, b)
    assert ops_used(x, b)  # switched back on after the block
    assert fused.ops_for(x.view(-1)) is None  # no channel dim


def test_fused_backward_can_run_twice():
    """The fused path saves the input, not a buffer it overwrites: a second
    backward through the same graph gives the same gradient again."""
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    y = ShiftedSignSTE.apply(x, b).sum()
    assert y.grad_fn.next_functions[0][0].ops is not None
    y.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    y.backward()
    assert torch.equal(x.grad, first)


def _binarize(w, grad, enable):
    leaf = w.clone().requires_grad_()
    with fused_kernels(enable):
        out = CentredSignSTE.apply(leaf)
    out.backward(grad)
    return out.grad_fn.ops is not None, out.detach(), leaf.grad


@pytest.mark.parametrize('dtype', DTYPES)
def test_weight_binarizer_fused_bit_identical_when_sums_are_exact(dtype):
    """Weights and gradients on a coarse dyadic grid make every row sum
    exact in any order: then the fused binarizer equals the composed one
    bit for bit, values and gradient, with centred weights at exactly +-1
    (inside the window), 0 (sign 0) and beyond 1 (gradient 0)."""
    torch.manual_seed(2)
    w = torch.randint(-12, 13, (8, 6, 3, 3)).to(dtype) / 8
    w[0] = 0  # mean 0: centred values +-1 (window edge) and +-1.5
    w[0, 0, 0, :] = torch.tensor([1., -1., 1.5], dtype=dtype)
    w[0, 0, 1, 0] = -1.5
    w[1] = 0.25  # every centred value 0: sign 0, scale 0.25
    grad = torch.randint(-8, 9, w.shape).to(dtype) / 4
    ran, out, g = _binarize(w, grad, True)
    ran_ref, ref, g_ref = _binarize(w, grad, False)
    assert ran and not ran_ref
    assert torch.equal(out, ref) and torch.equal(g, g_ref)
    assert (out[1] == 0).all()
    # what passes in row 0: all but the two |c| = 1.5 entries
    inside = grad[0].sum() - grad[0, 0, 0, 2] - grad[0, 0, 1, 0]
    mean_term = inside / w[0].numel()
    assert torch.equal(g[0, 0, 0, :2], grad[0, 0, 0, :2] - mean_term)
    assert torch.equal(g[0, 0, 0, 2], -mean_term)  # |c| = 1.5: outside


@pytest.mark.parametrize('dtype', DTYPES)
def test_weight_binarizer_fused_values_exact_gradient_to_round_off(dtype):
    """Random weights: the binarized weight equals the composed one bit for
    bit (same torch means), also without gradients; the gradient's row
    mean, summed in the kernel's order, agrees to round-off and does not
    depend on the thread count."""
    torch.manual_seed(3)
    w = torch.randn(64, 40, 3, 3, dtype=dtype) * 0.7
    grad = torch.randn_like(w)
    ran, out, g = _binarize(w, grad, True)
    _, ref, g_ref = _binarize(w, grad, False)
    assert ran
    assert torch.equal(out, ref)
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():
        assert torch.equal(binarize_weight(w), ref)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, out1, g1 = _binarize(w, grad, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out1, out) and torch.equal(g1, g)


def test_weight_binarizer_fused_only_where_it_applies():
    w = torch.nn.Parameter(torch.randn(16, 33) * 0.5)
    assert binarize_weight(w).grad_fn.ops is not None
    with fused_kernels(False):
        assert binarize_weight(w).grad_fn.ops is None
    assert binarize_weight(w.t()).grad_fn.ops is None  # not contiguous
    assert binarize_weight(w.bfloat16()).grad_fn.ops is None


def test_kernels_refuse_bad_input_by_name():
    ops = fused.ops_for(torch.zeros(1, 2, 1, 1))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match='bias must hold 3'):
        ops.sign_ste_forward(x, torch.zeros(4))
    with pytest.raises(RuntimeError, match='x must be float32 or float64'):
        ops.sign_ste_forward(x.half())
    with pytest.raises(RuntimeError, match='x must be contiguous'):
        ops.rprelu_forward(x.transpose(2, 3), *[torch.zeros(3)] * 3)
    with pytest.raises(RuntimeError, match='slope must be a CPU tensor'):
        ops.rprelu_backward(x, x, torch.zeros(3), torch.zeros(3).double())
    with pytest.raises(RuntimeError, match='grad must match the saved'):
        ops.sign_ste_backward(x[:1], x)
    with pytest.raises(RuntimeError, match='ratio must divide the 3'):
        ops.sign_shortcut_backward(x, x, torch.zeros(3), x, 2)
    with pytest.raises(RuntimeError, match=r'shortcut_grad must be Float '
                       r'\[2, 3, 4, 4\]'):
        ops.sign_shortcut_backward(x, x, torch.zeros(3), x[:, :1], 1)
    with pytest.raises(RuntimeError, match='mean must hold 2 contiguous'):
        ops.centred_sign_backward(x, x, torch.zeros(3))
    with pytest.raises(RuntimeError, match='scale must hold 2 contiguous'):
        ops.centred_sign_forward(x, torch.zeros(3), torch.zeros(2))
    with pytest.raises(RuntimeError, match='weight must not be empty'):
        ops.centred_sign_forward(torch.zeros(0, 4), *[torch.zeros(0)] * 2)


def test_sign_shortcut_benchmark_runs_and_checks_its_forms(capsys):
    """tools/analysis_tools/benchmark_sign_shortcut.py: both forms on a
    small map (mean and identity shortcuts), their gradients checked equal
    first; a ratio that does not divide the channels is refused by name."""
    from _helpers import load_tool
    tool = load_tool('analysis_tools/benchmark_sign_shortcut.py')
    for ratio in ('4', '1'):
        assert tool.main(['--batch', '2', '--channels', '16', '--size', '5',
                          '7', '--ratio', ratio, '--repeats', '2',
                          '--warmup', '0', '--default-malloc']) == 0
        out = capsys.readouterr().out
        assert 'one pass   median' in out and 'apart      median' in out
        assert 'equal gradients' in out
    assert tool.main(['--channels', '6', '--ratio', '4']) == 1
    assert '--ratio must divide --channels (6)' in capsys.readouterr().err
