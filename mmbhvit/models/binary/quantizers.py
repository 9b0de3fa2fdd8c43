# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Sign quantizers with straight-through estimators (STE).

Each quantizer is a tiny :class:`torch.autograd.Function` whose forward gives
the exact quantized value and whose backward is the documented surrogate
gradient. They are the only places where gradients are "made up".

Like larq's quantizers, each one declares the precision of what it outputs
(:class:`QuantizerFunction`): cost counting reads it from the class instead
of keeping a table of its own.

Mixed precision: every Function here decorates its ``forward`` with
:func:`amp_forward` and its ``backward`` with :func:`amp_backward`, the
``torch.amp.custom_fwd`` / ``custom_bwd`` pair applied for the device the
inputs are on, so CUDA float16 and CPU bfloat16 autocast are both handled.
Each Function's docstring says whether it runs in the incoming dtype or in
float32 under autocast, and why. Outside autocast both decorators change
nothing (float32 results are bit-identical).
"""
import functools
import math
from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor

from ..layout import channel_group_mean
from . import fused

_QUANTIZER_FUNCTIONS: Dict[str, Type['QuantizerFunction']] = {}


class QuantizerFunction(torch.autograd.Function):
    """Base of the quantizing autograd Functions: declares the precision of
    the output.

    Attributes:
        precision (int | None): the output is ``precision`` binary planes
            times a (per-channel or scalar) scale, e.g. 1 for a sign.
            None when the Function alone does not fix it.
        integer_valued (bool): the output is made of integers (rounding);
            its bit width is set by the range they are clipped to
            afterwards (:func:`integer_range_bits`).

    Every subclass is registered under its class name, the name a
    ``torch.jit`` trace gives its node (``prim::PythonOp.<name>``); see
    :func:`quantizer_function`.
    """
    precision: Optional[int] = None
    integer_valued: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        known = _QUANTIZER_FUNCTIONS.get(cls.__name__)
        where = (cls.__module__, cls.__qualname__)
        if known is not None and (known.__module__,
                                  known.__qualname__) != where:
            raise TypeError(f'two quantizer Functions are named '
                            f'{cls.__name__!r}: {known.__module__} and '
                            f'{cls.__module__}')
        _QUANTIZER_FUNCTIONS[cls.__name__] = cls  # (a reload replaces it)


def _device_type(args) -> Optional[str]:
    """Device type of the first tensor in ``args`` if autocast exists for it
    (``'cuda'``, ``'cpu'``, ...), else None."""
    for arg in args:
        if isinstance(arg, Tensor):
            kind = arg.device.type
            return kind if torch.amp.is_autocast_available(kind) else None
    return None


# Device types whose custom_fwd / custom_bwd wrappers are built when a
# Function is defined rather than at its first call: building them inside a
# torch.compile trace is a graph break (and a recompilation per layer shape).
_PREBUILT_DEVICE_TYPES = ('cpu', 'cuda')


def amp_forward(cast_inputs: Optional[torch.dtype] = None) -> Callable:
    """Decorator of an autograd ``Function.forward``: autocast handling for
    whichever device the inputs are on.

    ``torch.amp.custom_fwd(device_type=...)`` reacts to the autocast of one
    device type only (``'cuda'`` ignores CPU bfloat16 autocast and the
    reverse). This applies ``custom_fwd`` with the device type of the first
    tensor argument, read at call time:

    - ``cast_inputs=None``: ``forward`` runs in the incoming dtype under the
      current autocast state, and :func:`amp_backward` replays that state.
    - ``cast_inputs=torch.float32``: under autocast, floating inputs (except
      float64) are cast to float32 and ``forward`` runs with autocast
      disabled; so does ``backward``. The output is float32; the next
      autocast op casts it down again.

    Outside autocast the Function runs unchanged. The chosen
    ``cast_inputs`` is kept as ``forward.amp_cast_inputs``.
    """

    def decorate(forward: Callable) -> Callable:
        per_device: Dict[str, Callable] = {
            device_type: torch.amp.custom_fwd(
                forward, device_type=device_type, cast_inputs=cast_inputs)
            for device_type in _PREBUILT_DEVICE_TYPES
        }

        @functools.wraps(forward)
        def wrapped(ctx, *args):
            device_type = _device_type(args)
            ctx.amp_device_type = device_type
            if device_type is None:
                return forward(ctx, *args)
            fwd = per_device.get(device_type)
            if fwd is None:
                fwd = per_device[device_type] = torch.amp.custom_fwd(
                    forward, device_type=device_type,
                    cast_inputs=cast_inputs)
            return fwd(ctx, *args)

        wrapped.amp_cast_inputs = cast_inputs
        return wrapped

    return decorate


def amp_backward(backward: Callable) -> Callable:
    """Decorator of an autograd ``Function.backward`` whose ``forward`` has
    :func:`amp_forward`: ``torch.amp.custom_bwd`` for the device type the
    forward saw, so the backward runs under the forward's autocast state."""
    per_device: Dict[str, Callable] = {
        device_type: torch.amp.custom_bwd(backward, device_type=device_type)
        for device_type in _PREBUILT_DEVICE_TYPES
    }

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device_type = getattr(ctx, 'amp_device_type', None)
        if device_type is None:
            return backward(ctx, *grads)
        bwd = per_device.get(device_type)
        if bwd is None:
            bwd = per_device[device_type] = torch.amp.custom_bwd(
                backward, device_type=device_type)
        return bwd(ctx, *grads)

    wrapped.amp_backward = True
    return wrapped


def integer_range_bits(low: int, high: int) -> int:
    """Bits needed for the integers ``low..high``: ``ceil(log2(high - low +
    1))``, at least 1."""
    return max(1, math.ceil(math.log2(int(high) - int(low) + 1)))


def quantizer_function(name: str) -> Optional[Type[QuantizerFunction]]:
    """The :class:`QuantizerFunction` subclass called ``name`` (the name of
    a ``prim::PythonOp`` node in a trace), or None."""
    return _QUANTIZER_FUNCTIONS.get(name)


def _polynomial_ste_grad(abs_x: Tensor, grad: Tensor) -> Tensor:
    """``grad * max(2 - 2|x|, 0)`` written over ``abs_x`` (``|x|``, a buffer
    the caller owns): in place, so the only new tensor is the one the
    caller gave. This runs on every binary activation of the network, so
    passes over memory and fresh allocations count."""
    return abs_x.mul_(-2).add_(2).clamp_(min=0).mul_(grad)


@functools.lru_cache(maxsize=None)
def _open_bound(tau: float, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` above ``tau``: ``|x| <= tau`` is
    ``-bound < x < bound`` for ``x`` of that dtype."""
    t = torch.tensor(tau, dtype=dtype)
    return torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)).item()


def clipped_ste_grad(grad: Tensor, x: Tensor, tau: float) -> Tensor:
    r"""``grad`` where :math:`|x| \le \tau`, 0 elsewhere: the gradient of a
    clipped identity STE, in one pass over memory
    (``aten::hardtanh_backward``, whose window is open, gets the bounds
    :math:`\pm\tau` moved out by one unit in the last place of ``x``'s
    dtype, so :math:`|x| = \tau` is inside as before)."""
    if not x.is_floating_point():
        raise TypeError(f'clipped_ste_grad expects a floating x, got '
                        f'{x.dtype}')
    if torch.compiler.is_compiling():
        # inductor fuses the plain expression into one kernel, and the
        # bound below would be a host read (a graph break)
        return grad * (x.abs() <= tau)
    bound = _open_bound(float(tau), x.dtype)
    return torch.ops.aten.hardtanh_backward(grad, x, -bound, bound)


class SignSTE(QuantizerFunction):
    r"""Activation binarizer: ``sign(x)`` with a piecewise-polynomial STE.

    Forward:  :math:`b = \operatorname{sign}(x) \in \{-1, 0, +1\}` (0 only for
    an exact zero input).

    Backward: :math:`\partial b / \partial x = 2 - 2|x|` for
    :math:`|x| \le 1` and 0 outside, i.e. the derivative of the smooth
    approximation :math:`2x + x^2 \operatorname{sign}(-x)` used by Bi-Real Net.

    On CPU float32/float64 tensors the forward and the backward each run
    as one pass of the compiled kernels (:mod:`~mmbhvit.models.binary.fused`,
    bit-identical values).

    Autocast: runs in the incoming dtype. ``sign`` is exact in every
    floating format (-1, 0, +1 are representable), and the window
    :math:`2 - 2|x|` only shapes a surrogate gradient, so float16/bfloat16
    lose nothing that matters; casting would double the memory of the
    saved activation, which this Function sees for every binary layer.
    """
    precision = 1

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.ops = fused.ops_for(x)
        if ctx.ops is not None:
            return ctx.ops.sign_ste_forward(x)
        return torch.sign(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor) -> Tensor:
        x, = ctx.saved_tensors
        if ctx.ops is not None:
            return ctx.ops.sign_ste_backward(grad, x)[0]
        return _polynomial_ste_grad(x.abs(), grad)


class ClippedSignSTE(QuantizerFunction):
    r"""Weight binarizer: ``scale * sign(w)`` with a clipped identity STE.

    Forward: :math:`\hat w = s \cdot \operatorname{sign}(w)`.

    Backward: :math:`\partial \hat w / \partial w = \mathbb 1[|w| \le \tau]`
    (the scale receives no gradient).

    Autocast: cast to float32. The inputs are the float32 master weight and
    its scale, so under autocast nothing is lost by the cast, and the
    product :math:`s \operatorname{sign}(w)` and the STE mask
    :math:`|w| \le \tau` are formed in float32; the only rounding is the
    one the consuming convolution does when autocast casts its weight.
    In float16 the scale (a mean of small weights) and weights near
    :math:`\tau` would be rounded, moving the mask.
    """
    precision = 1  # one binary plane times a per-output-channel scale

    @staticmethod
    @amp_forward(cast_inputs=torch.float32)
    def forward(ctx, w: Tensor, scale: Tensor, tau: float) -> Tensor:
        ctx.save_for_backward(w)
        ctx.tau = tau
        return scale * torch.sign(w)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):
        w, = ctx.saved_tensors
        return clipped_ste_grad(grad, w, ctx.tau), None, None


class ShiftedSignSTE(QuantizerFunction):
    r"""``sign(x + b)`` with the STE of :class:`SignSTE`, ``b`` a
    per-channel bias (dim 1): a learnable shift and the activation
    binarizer in one Function.

    Forward: :math:`u = x + b`, :math:`s = \operatorname{sign}(u)`.

    Backward: :math:`\partial L/\partial x = g \max(2 - 2|u|, 0)` (the
    :class:`SignSTE` window), :math:`\partial L/\partial b = \sum_{n,h,w}
    \partial L/\partial x`: the values and gradients of
    ``SignSTE.apply(x + b)``.

    Why one Function: on CPU float32/float64 tensors the forward and the
    backward are each one pass of the compiled kernels
    (:mod:`~mmbhvit.models.binary.fused`: same values; the bias gradient is
    summed in the same pass, in a fixed order, so it differs from
    ``torch.sum`` in the last bits). Elsewhere ``u`` is this Function's
    own tensor, and the backward turns it into the gradient in place
    instead of allocating the window (on a CPU a fresh activation-sized
    tensor costs page faults, more than the arithmetic); consequently a
    second backward through the same graph (``retain_graph=True``) is
    refused there by autograd's saved-tensor version check ("modified by an
    inplace operation"), never silently wrong.

    Autocast: runs in the incoming dtype, as :class:`SignSTE`; ``x + b``
    follows the usual type promotion (a float32 bias makes ``u`` float32,
    as the separate add did).
    """
    precision = 1

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor, bias: Tensor) -> Tensor:
        ctx.ops = fused.ops_for(x, bias)
        if ctx.ops is not None:  # u is recomputed in the backward
            ctx.save_for_backward(x, bias)
            return ctx.ops.sign_ste_forward(x, bias)
        u = x + bias.view(1, -1, *([1] * (x.dim() - 2)))
        ctx.save_for_backward(u)
        return torch.sign(u)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):
        if ctx.ops is not None:  # the bias gradient comes in the same pass
            x, bias = ctx.saved_tensors
            grad_x, grad_b = ctx.ops.sign_ste_backward(grad, x, bias)
            return grad_x, grad_b if ctx.needs_input_grad[1] else None
        u, = ctx.saved_tensors
        grad_x = _polynomial_ste_grad(u.abs_(), grad)  # u is ours
        grad_b = None
        if ctx.needs_input_grad[1]:
            dims = (0, ) + tuple(range(2, grad_x.dim()))
            grad_b = grad_x.sum(dim=dims)
        return grad_x, grad_b


class ShiftedSignShortcut(QuantizerFunction):
    r""":class:`ShiftedSignSTE` of ``x`` together with a shortcut of the
    same ``x``: returns ``(sign(x + b), shortcut(x))``, the shortcut being
    ``x`` itself (``ratio`` 1) or the mean over groups of ``ratio``
    consecutive channels (:func:`~mmbhvit.models.layout.channel_group_mean`,
    as the composed shortcut).

    This is what a binary projection with a residual reads from its input
    (:class:`~mmbhvit.models.backbones.bhvit.BinaryResidualProj` when its
    width stays or shrinks). Composed, the backward of ``x`` takes three
    passes over an activation-sized tensor: the window, the mean's
    gradient (``grad / ratio`` broadcast over the group) and autograd's sum
    of the two. Here it is one pass of the compiled kernel
    (``sign_shortcut_backward``): the same values (each of the three
    operations rounds once, in the same order), and the shift's gradient
    (the sum of the window term alone) from the same pass, summed in a
    fixed order as in :class:`ShiftedSignSTE`.

    Only built for the compiled kernels: :func:`sign_ste_with_shortcut`
    returns None where they cannot run, and callers compose the two.

    Autocast: runs in the incoming dtype, as :class:`ShiftedSignSTE`.
    """
    precision = 1

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor, bias: Tensor, ratio: int):
        ctx.ops = fused.ops_for(x, bias)
        ctx.ratio = ratio
        ctx.save_for_backward(x, bias)
        xq = ctx.ops.sign_ste_forward(x, bias)
        if ratio == 1:
            return xq, x.view_as(x)
        return xq, channel_group_mean(x, ratio)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor, grad_shortcut: Optional[Tensor]):
        x, bias = ctx.saved_tensors
        if grad_shortcut is None:  # the shortcut is not used
            grad_x, grad_b = ctx.ops.sign_ste_backward(grad, x, bias)
        else:
            grad_x, grad_b = ctx.ops.sign_shortcut_backward(
                grad, x, bias, grad_shortcut, ctx.ratio)
        return grad_x, grad_b if ctx.needs_input_grad[1] else None, None


def sign_ste_with_shortcut(x: Tensor, bias: Tensor, ratio: int
                           ) -> Optional[Tuple[Tensor, Tensor]]:
    """``(sign(x + bias), shortcut(x))`` as :class:`ShiftedSignShortcut`
    (one backward pass for both), or None where its compiled kernel cannot
    take ``x`` (not built, switched off, tracing, not CPU float32/64
    contiguous, ...: :func:`~mmbhvit.models.binary.fused.ops_for`)."""
    ops = fused.ops_for(x, bias)
    if ops is None or x.shape[1] % ratio:
        return None
    return ShiftedSignShortcut.apply(x, bias, ratio)


class CentredSignSTE(QuantizerFunction):
    r"""Weight binarizer of :func:`binarize_weight` (without ReCU) in one
    Function: centre per output channel, sign, scale.

    Forward, with :math:`o` the output channel (dim 0) and the means over
    the other dims:

    .. math::
        s_o = \operatorname{mean}|w_o|, \quad
        c = w - \operatorname{mean}(w_o), \quad
        \hat w = s_o \operatorname{sign}(c)

    Backward: :math:`g_c = g\,\mathbb 1[|c| \le 1]` (the clipped STE of
    :class:`ClippedSignSTE`, the scale a constant) followed by the gradient
    of the centring, :math:`\partial L/\partial w = g_c -
    \operatorname{mean}_o(g_c)`: the values and gradients of
    ``ClippedSignSTE.apply(w - w.mean(...), scale.detach(), 1.0)``, in
    fewer passes over the weights (it runs on all of them every step).

    On CPU float32/float64 weights the sign, scale and window run as the
    compiled kernels of :mod:`~mmbhvit.models.binary.fused`: the two means
    are ``torch.mean``'s, so the binarized weight is the composed
    expression's bit for bit; the backward is one pass per weight row,
    whose mean of :math:`g_c` is summed in a fixed order (equal to the
    composed gradient to the last bits).

    Autocast: cast to float32, as :class:`ClippedSignSTE`.
    """
    precision = 1

    @staticmethod
    @amp_forward(cast_inputs=torch.float32)
    def forward(ctx, w: Tensor) -> Tensor:
        dims = tuple(range(1, w.dim()))
        scale = w.abs().mean(dim=dims, keepdim=True)
        mean = w.mean(dim=dims, keepdim=True)
        ctx.ops = fused.ops_for(w)
        if ctx.ops is not None:
            ctx.save_for_backward(w, mean)
            return ctx.ops.centred_sign_forward(w, scale, mean)
        centred = w - mean
        ctx.save_for_backward(centred)
        return torch.sign(centred).mul_(scale)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor) -> Tensor:
        if ctx.ops is not None:
            w, mean = ctx.saved_tensors
            return ctx.ops.centred_sign_backward(grad, w, mean)
        centred, = ctx.saved_tensors
        grad_c = clipped_ste_grad(grad, centred, 1.0)
        dims = tuple(range(1, grad_c.dim()))
        return grad_c - grad_c.mean(dim=dims, keepdim=True)


class ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``factor``.

    Autocast: cast to float32. It is applied to the LSQ step sizes and zero
    points (float32 master parameters, so the cast is free) and ``factor``
    is small (``heads / sqrt(numel * levels)``, 1e-2 to 1e-4): in float16
    the scaled gradient of a step size would underflow (float16 has nothing
    below 6e-8), so it is formed in float32.
    """

    @staticmethod
    @amp_forward(cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


class RoundSTE(QuantizerFunction):
    """``round(x)`` in the forward pass, identity gradient.

    The output is integer-valued; its bit width is set by the clipping that
    follows (e.g. 2 bits for the 4 levels of
    :class:`~mmbhvit.models.binary.LSQAttentionQuantizer`).

    Autocast: runs in the incoming dtype. Rounding is exact in every
    floating format and the small integers it produces are representable;
    the precision of its input is decided where that input is computed (in
    the LSQ quantizer: the dtype of the step sizes, float32 under AMP), and
    a cast here could not restore it. The identity backward does no
    arithmetic.
    """
    integer_valued = True

    @staticmethod
    @amp_forward()
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


# ReCU clips the standardised weights at the 92% quantile of a Laplace law.
RECU_QUANTILE = 0.92


def binarize_weight(weight: Tensor, recu: bool = False) -> Tensor:
    r"""Binarize a conv / linear weight ``(out, in, *k)`` per output channel.

    .. math::
        s_o = \operatorname{mean}_{i,k} |w_{o,i,k}|, \qquad
        c = w - \operatorname{mean}_{i,k} w, \qquad
        \hat w = s_o \operatorname{sign}(c)

    The scale ``s`` is taken from the un-centred weight and is treated as a
    constant. The STE passes gradients where :math:`|c| \le 1`
    (:class:`CentredSignSTE`, one Function for the whole construction).

    With ``recu=True`` (ReCU, Xu et al. 2021) ``c`` is first standardised per
    output channel, :math:`c' = c / (\sqrt{\operatorname{var}(c)+10^{-5}} /
    (2\sqrt 2))` (unbiased variance), and the STE window becomes
    :math:`|c'| \le \tau` with :math:`\tau = -\operatorname{mean}|c'| \cdot
    \ln(2 - 2q)`, :math:`q = 0.92`, a constant of the current step.
    """
    if not recu:
        return CentredSignSTE.apply(weight)
    dims = tuple(range(1, weight.dim()))
    scale = weight.abs().mean(dim=dims, keepdim=True).detach()
    centred = weight - weight.mean(dim=dims, keepdim=True)
    std = torch.sqrt(centred.var(dim=dims, keepdim=True) + 1e-5)
    centred = centred / (std / 2 / math.sqrt(2))
    tau = float(-centred.abs().mean().detach() *
                math.log(2 - 2 * RECU_QUANTILE))
    return ClippedSignSTE.apply(centred, scale, tau)


def sign_ste(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``sign(x)`` (:class:`SignSTE`), or ``sign(x + bias)`` with a
    per-channel ``bias`` (:class:`ShiftedSignSTE`, same values and
    gradients as ``SignSTE.apply(x + bias)``)."""
    if bias is None:
        return SignSTE.apply(x)
    return ShiftedSignSTE.apply(x, bias)
