# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Binary layers: binary convolution (1×1 = "linear"), learnable biases,
RPReLU and LayerScale. All of them work on NCHW tensors."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from .quantizers import amp_backward, amp_forward, binarize_weight, sign_ste

SUPPORTED_BITS = (1, 32)


def _check_bits(name: str, bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f'{name} must be one of {SUPPORTED_BITS} (1 = binary, '
                         f'32 = full-precision counterpart), got {bits!r}')
    return bits


def _per_channel(p: Tensor) -> Tensor:
    return p.view(1, -1, 1, 1)


def pointwise_grads(grad: Tensor, x: Tensor, weight: Tensor,
                    needs: tuple, has_bias: bool) -> tuple:
    """``(grad_x, grad_weight, grad_bias)`` of ``F.conv2d(x, weight, bias)``
    for a ``1×1`` weight and a contiguous NCHW ``x`` (None where ``needs``
    says no).

    On maps of at least :attr:`PointwiseConv.MIN_PIXELS` pixels they are
    matrix products, per image: ``grad_x = Wᵀ g`` and ``grad_W = Σ_n g_n
    x_nᵀ`` (summed in image order); on a CPU they run 1.1–1.45× faster
    than ``aten.convolution_backward`` for BHViT-small's 28×28 and 56×56
    layers at batch 8 (``tools/analysis_tools/benchmark_train_step.py
    --pointwise``, docs/training_speed.md); smaller maps keep the
    convolution's backward. Equal to the convolution's gradients to float
    round-off.
    """
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    want_b = has_bias and needs[2]
    if h * w < PointwiseConv.MIN_PIXELS:
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [cout] if has_bias else None, [1, 1], [0, 0],
            [1, 1], False, [0, 0], 1, [needs[0], needs[1], want_b])
    g = grad.reshape(n, cout, h * w)
    grad_x = grad_w = grad_b = None
    if needs[0]:
        wt = weight.reshape(cout, cin).t().expand(n, cin, cout)
        grad_x = torch.bmm(wt, g).view(n, cin, h, w)
    if needs[1]:
        xs = x.reshape(n, cin, h * w)
        grad_w = torch.mm(g[0], xs[0].t())
        for i in range(1, n):
            grad_w.addmm_(g[i], xs[i].t())
        grad_w = grad_w.view_as(weight)
    if want_b:
        grad_b = grad.sum(dim=(0, 2, 3))
    return grad_x, grad_w, grad_b


class PointwiseConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias)`` for a ``1×1`` weight as matrix
    products: forward ``y_n = W x_n + b`` (one batched product), backward
    :func:`pointwise_grads`.

    On a CPU, oneDNN's 1×1 convolution of an NCHW map is slower than the
    same product through the BLAS (forward + backward 1.2–1.4× at
    BHViT-small's 28×28 and 56×56 layers, batch 8; ``tools/analysis_tools/
    benchmark_train_step.py --pointwise``), but not on 7×7 maps and token
    windows: :class:`BinaryConv2d` takes this path for maps of at least
    :attr:`MIN_PIXELS` pixels in eager CPU float training
    (:func:`~mmbhvit.models.binary.fused.plain_cpu_training`). Values equal
    the convolution's to float round-off.
    """

    MIN_PIXELS = 128

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor, weight: Tensor,
                bias: Optional[Tensor]) -> Tensor:
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        y = torch.bmm(weight.reshape(1, cout, cin).expand(n, cout, cin),
                      x.view(n, cin, h * w))
        if bias is not None:
            y += bias.view(1, cout, 1)
        PointwiseConv.save(ctx, x, weight, bias)
        return y.view(n, cout, h, w)

    @staticmethod
    def save(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
        """What :meth:`backward` needs (also for subclasses' forwards)."""
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        return pointwise_grads(grad, x, weight, ctx.needs_input_grad,
                               ctx.has_bias)


def sign_product_reference(x: Tensor, weight: Tensor,
                           bias: Optional[Tensor]) -> Tensor:
    """:class:`SignProductConv1x1`'s values, written plainly: the exact
    integer sums in float64, then ``sum * s_o`` and ``+ b_o`` in the
    dtype of ``x``, one rounding each (the kernels' goldens, the tests)."""
    n, cin, h, w = x.shape
    flat = weight.detach().reshape(-1, cin)
    scale = flat.abs().amax(dim=1, keepdim=True)
    sums = torch.matmul(torch.sign(flat).double(),
                        x.detach().double().reshape(n, cin, h * w))
    y = sums.to(x.dtype) * scale
    if bias is not None:
        y = y + bias.detach().view(-1, 1)
    return y.view(n, -1, h, w)


class SignProductConv1x1(PointwiseConv):
    r"""A binary 1×1 convolution whose forward is an exact integer product.

    With ``x`` a sign map (entries -1, 0, +1) and ``weight`` a binarized
    weight (:func:`binarize_weight`: each output channel ``o`` holds
    :math:`\pm s_o` or 0), the output is

    .. math:: y_{o} = s_o \sum_i \operatorname{sign}(w_{o,i})\, x_i + b_o

    The sum is an exact integer, so ``y`` is the correctly rounded value
    that the float convolution approximates (its sums of :math:`\pm s_o`
    round at every step): the two agree to float32 round-off, not bit for
    bit (:func:`sign_product_reference` gives the values). Two routes
    (:func:`~mmbhvit.models.binary.fused.sign_product_route`, or the
    ``route`` argument), equal bit for bit:

    - ``'popcount'``: the extension's ``sign_product`` packs the signs
      along the channels and counts ``XOR`` bits with the packed engine's
      popcount core, on every kernel set (AVX2, AVX-512, NEON, ...); a
      tile of pixels with zero inputs is counted twice (zeros as -1, then
      as +1: the mean is exact). A NaN input, or a weight row with a zero
      or NaN, makes it decline; the integer route where it is fast, else
      the float convolution, then runs.
    - ``'integer'``: int8 × int8 → int32 (``torch._int_mm``, fast only with
      AVX-512 VNNI), per image and per block of output channels, so that
      the int32 block (at most :attr:`BLOCK` values) is scaled into the
      float output while it is still in cache.

    ``grad_fn.route`` says which one ran (``'conv'``: the float
    convolution).

    Backward: :class:`PointwiseConv`'s (:func:`pointwise_grads` on the
    same float tensors), the gradients of ``F.conv2d(x, weight, bias)`` (to
    float round-off on maps where they are matrix products).

    Used by :meth:`BinaryConv2d.forward_quantized` for 1-bit 1×1 layers
    when :func:`~mmbhvit.models.binary.fused.sign_product_route` gives a
    route (CPU float32, no tracing, compiling or autocast, not switched
    off) and the layer is large enough for it
    (:meth:`BinaryConv2d._sign_product_route`).

    Autocast: runs in the incoming dtype (the layer does not call it under
    autocast, where the float convolution follows autocast's own rules).
    """

    BLOCK = 1 << 17  # int32 values (512 KiB), about a quarter of an L2
    MIN_WORK = 1 << 24  # integer route: multiply-accumulates per image
    MIN_POPCOUNT_WORK = 1 << 16  # popcount route: per call (all images)

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                route: Optional[str] = None) -> Tensor:
        route = route or fused.sign_product_route(x)
        y = None
        if route == 'popcount':
            y = fused.ops_for(x).sign_product(
                x, weight.detach(), None if bias is None else bias.detach())
            if y is None:  # not all signs: the next route
                route = 'integer' if fused.integer_product_ok(x) else None
        if route == 'integer':
            y = SignProductConv1x1._integer(x, weight, bias)
        elif y is None:
            y = F.conv2d(x, weight, bias)
        ctx.route = route or 'conv'
        PointwiseConv.save(ctx, x, weight, bias)
        return y

    @staticmethod
    def _integer(x: Tensor, weight: Tensor,
                 bias: Optional[Tensor]) -> Tensor:
        n, cin, h, w = x.shape
        cout, pixels = weight.shape[0], h * w
        flat = weight.detach().reshape(cout, cin)
        signs = torch.sign(flat).to(torch.int8)
        scale = flat.abs().amax(dim=1, keepdim=True)
        codes = x.detach().to(torch.int8).view(n, cin, pixels)
        y = torch.empty(n, cout, pixels, dtype=x.dtype)
        blocks = -(-cout * pixels // SignProductConv1x1.BLOCK)
        rows = -(-cout // blocks)
        acc = torch.empty(rows, pixels, dtype=torch.int32)
        for i in range(n):
            for o in range(0, cout, rows):
                part = acc[:min(rows, cout - o)]
                torch._int_mm(signs[o:o + rows], codes[i], out=part)
                # int32 times float32 is one pass into the float output
                torch.mul(part, scale[o:o + rows], out=y[i, o:o + rows])
        y = y.view(n, cout, h, w)
        if bias is not None:
            y += _per_channel(bias.detach())
        return y

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        return pointwise_grads(grad, x, weight, ctx.needs_input_grad,
                               ctx.has_bias) + (None, )


class BinaryConv2d(nn.Conv2d):
    r"""Convolution whose weights and inputs are binarized.

    .. math:: y = \hat W \circledast \operatorname{sign}(x) + b

    with :math:`\hat W` from :func:`binarize_weight`. ``weight_bits=32`` /
    ``act_bits=32`` keep the weights / inputs in full precision, which gives
    the full-precision counterpart of the same architecture. Zero padding is
    applied after the sign (the padded border contributes 0). A ``1×1``
    instance is the binary "linear" layer used on token features.

    Args:
        weight_bits (int): 1 or 32.
        act_bits (int): 1 or 32.
        recu (bool): use ReCU weight standardisation/clipping in the STE.
        Other arguments are those of :class:`torch.nn.Conv2d`.
    """

    def __init__(self, *args, weight_bits: int = 1, act_bits: int = 1,
                 recu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_bits = _check_bits('weight_bits', weight_bits)
        self.act_bits = _check_bits('act_bits', act_bits)
        self.recu = recu

    @property
    def is_binary(self) -> bool:
        """True when both weights and activations are 1-bit."""
        return self.weight_bits == 1 and self.act_bits == 1

    def quantized_weight(self) -> Tensor:
        """The weight that reaches the convolution."""
        if self.weight_bits == 1:
            return binarize_weight(self.weight, self.recu)
        return self.weight

    def quantize_input(self, x: Tensor,
                       shift: Optional['LearnableBias'] = None) -> Tensor:
        """The activation that reaches the convolution: ``sign(x)``, or
        ``x`` with ``act_bits=32``.

        With ``shift`` (the :class:`LearnableBias` in front of this layer)
        it is ``sign(shift(x))``, with the shift and the sign in one autograd
        Function (:class:`~mmbhvit.models.binary.quantizers.ShiftedSignSTE`:
        same values and gradients, fewer activation-sized tensors).
        """
        if shift is None:
            return sign_ste(x) if self.act_bits == 1 else x
        if self.act_bits == 1:
            return sign_ste(x, shift.bias)
        return shift(x)

    def forward_quantized(self, xq: Tensor) -> Tensor:
        """The convolution of an input already passed through
        :meth:`quantize_input` with the :meth:`quantized_weight` (+ bias).

        Layers that read the same input share one quantization this way
        (e.g. the three convolutions of
        :class:`~mmbhvit.models.backbones.bhvit.MSGDC`). It is a method, not
        a module call: forward hooks of this layer do not run and cost
        counting attributes the convolution to the caller.

        A 1-bit 1×1 layer on a CPU float32 input forms the product in
        integers (:class:`SignProductConv1x1`: same gradients, values to
        float32 round-off).
        """
        weight = self.quantized_weight()
        route = self._sign_product_route(xq)
        if route is not None:
            return SignProductConv1x1.apply(xq, weight, self.bias, route)
        return self._conv_forward(xq, weight, self.bias)

    def _sign_product_route(self, xq: Tensor) -> Optional[str]:
        """The route of :class:`SignProductConv1x1` for a plain 1-bit 1×1
        convolution where it pays, else None.

        ``'popcount'`` for calls of at least
        :attr:`SignProductConv1x1.MIN_POPCOUNT_WORK` multiply-accumulates.
        ``'integer'`` (no extension) saves multiply-accumulates but passes
        an int32 block before the float output, so layers with few inputs
        per output (``in < 256`` and ``in < 2·out``, e.g. 64→512) stay
        float, and so do images with less than
        :attr:`SignProductConv1x1.MIN_WORK` multiply-accumulates (one
        product call per image: small ones lose to its fixed cost).
        ``tools/analysis_tools/benchmark_train_step.py --pointwise`` times
        every route per layer shape."""
        if not (self.is_binary and self.is_pointwise):
            return None
        route = fused.sign_product_route(xq)  # also: NCHW input
        work = xq.shape[2] * xq.shape[3] * self.in_channels * \
            self.out_channels
        if route == 'popcount':
            enough = work * xq.shape[0] >= \
                SignProductConv1x1.MIN_POPCOUNT_WORK
        else:
            enough = (route == 'integer'
                      and (self.in_channels >= 256
                           or self.in_channels >= 2 * self.out_channels)
                      and work >= SignProductConv1x1.MIN_WORK)
        return route if enough else None

    @property
    def is_pointwise(self) -> bool:
        """A plain 1×1 convolution (stride 1, no groups, no padding)."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1)
                and self.groups == 1 and self.padding in ((0, 0), 'valid')
                and self.dilation == (1, 1))

    def _conv_forward(self, x: Tensor, weight: Tensor,
                      bias: Optional[Tensor]) -> Tensor:
        """The float convolution; a 1×1 layer on a large enough map in eager
        CPU training (gradients on) runs it as matrix products
        (:class:`PointwiseConv`). Inference keeps the convolution (the
        PyTorch baselines of the deployment benchmarks are unchanged)."""
        if (self.is_pointwise and torch.is_grad_enabled()
                and fused.plain_cpu_training(x)
                and x.shape[2] * x.shape[3] >= PointwiseConv.MIN_PIXELS):
            return PointwiseConv.apply(x, weight, bias)
        return super()._conv_forward(x, weight, bias)

    def forward(self, x: Tensor,
                shift: Optional['LearnableBias'] = None) -> Tensor:
        """``conv(quantize_input(x, shift))``."""
        return self.forward_quantized(self.quantize_input(x, shift))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', weight_bits={self.weight_bits}, '
                f'act_bits={self.act_bits}, recu={self.recu}')


class LearnableBias(nn.Module):
    """Adds a learnable per-channel bias: ``y = x + b`` (NCHW)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + _per_channel(self.bias)


def _traced() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class RPReLUFunction(torch.autograd.Function):
    r""":math:`\operatorname{PReLU}_a(x - \gamma) + \zeta` with a backward
    written out in vectorised passes.

    Autograd through ``F.prelu`` spends most of its time in
    ``aten::_prelu_kernel_backward`` (on a CPU several times a whole
    forward of the layer: it also materialises the slope's per-element
    gradient), and RPReLU follows every binary convolution. The backward
    here gives the same values: with :math:`t = x - \gamma`,

    - :math:`\partial L/\partial x = g` where :math:`t > 0`, :math:`a g`
      elsewhere, assembled from two ``threshold_backward`` passes (one side
      is an exact 0, so the sum of the two sides is exact);
    - :math:`\partial L/\partial a = \sum_{n,h,w} g \min(t, 0)`,
      :math:`\partial L/\partial \gamma = -\sum_{n,h,w}
      \partial L/\partial x`, :math:`\partial L/\partial \zeta =
      \sum_{n,h,w} g`.

    On CPU float32/float64 tensors forward and backward are each one pass
    of the compiled kernels (:mod:`~mmbhvit.models.binary.fused`): same
    values and input gradient; the three parameter gradients are summed in
    that pass in a fixed order, so they differ from ``torch.sum`` in the
    last bits.

    Autocast: runs in the incoming dtype (``x - \gamma`` promotes as the
    composed expression did).
    """

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor, bias_in: Tensor, slope: Tensor,
                bias_out: Tensor) -> Tensor:
        ctx.ops = fused.ops_for(x, bias_in, slope, bias_out)
        if ctx.ops is not None:  # t is recomputed in the backward
            ctx.save_for_backward(x, bias_in, slope)
            return ctx.ops.rprelu_forward(x, bias_in, slope, bias_out)
        t = x - _per_channel(bias_in)
        ctx.save_for_backward(t, slope)
        return F.prelu(t, slope).add_(_per_channel(bias_out))

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):
        if ctx.ops is not None:
            x, bias_in, slope = ctx.saved_tensors
            grads = ctx.ops.rprelu_backward(grad, x, bias_in, slope)
            return tuple(g if need else None
                         for g, need in zip(grads, ctx.needs_input_grad))
        t, slope = ctx.saved_tensors
        dims = (0, ) + tuple(range(2, t.dim()))
        threshold_backward = torch.ops.aten.threshold_backward
        grad_x = grad_slope = grad_in = grad_out = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            negative = grad * _per_channel(slope)
            negative = negative.sub_(threshold_backward(negative, t, 0))
            grad_x = threshold_backward(grad, t, 0).add_(negative)
            if ctx.needs_input_grad[1]:
                grad_in = grad_x.sum(dim=dims).neg_()
        if ctx.needs_input_grad[2]:
            grad_slope = t.clamp(max=0).mul_(grad).sum(dim=dims)
        if ctx.needs_input_grad[3]:
            grad_out = grad.sum(dim=dims)
        return grad_x, grad_in, grad_slope, grad_out


class RPReLU(nn.Module):
    r"""React-PReLU: a PReLU with learnable shifts before and after.

    .. math:: y = \operatorname{PReLU}_a(x - \gamma) + \zeta

    with per-channel :math:`\gamma` (``bias_in``), slope :math:`a`
    (``weight``, initialised to 0.25) and :math:`\zeta` (``bias_out``).
    When gradients are recorded it runs as :class:`RPReLUFunction` (same
    values, a faster backward); traced (ONNX, ``torch.compile``, cost
    counting) and without gradients it is the plain expression.
    """

    def __init__(self, channels: int, init_slope: float = 0.25):
        super().__init__()
        self.bias_in = nn.Parameter(torch.zeros(channels))
        self.weight = nn.Parameter(torch.full((channels, ), init_slope))
        self.bias_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not _traced():
            return RPReLUFunction.apply(x, self.bias_in, self.weight,
                                        self.bias_out)
        x = F.prelu(x - _per_channel(self.bias_in), self.weight)
        return x + _per_channel(self.bias_out)


class LayerScale(nn.Module):
    r"""Per-channel affine gate ``y = x * scale + bias`` (NCHW).

    Args:
        channels (int): number of channels.
        init_value (float): initial ``scale`` (0.1 for residual branches,
            0 for the shift branches, which then start switched off).
    """

    def __init__(self, channels: int, init_value: float = 0.1):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels, ), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * _per_channel(self.scale) + _per_channel(self.bias)


def binary_conv_layers(module: nn.Module,
                       weight_bits: Optional[int] = 1):
    """Yield ``(name, layer)`` for every :class:`BinaryConv2d` in ``module``
    (restricted to ``weight_bits`` unless it is None)."""
    for name, m in module.named_modules():
        if isinstance(m, BinaryConv2d) and (weight_bits is None
                                            or m.weight_bits == weight_bits):
            yield name, m
