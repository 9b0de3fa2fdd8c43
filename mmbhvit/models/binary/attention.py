# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Quantizers for the attention probabilities ``P`` (softmax output,
shape ``(..., heads, queries, keys)``)."""
import math

import torch
from torch import Tensor, nn

from .quantizers import (QuantizerFunction, RoundSTE, ScaleGrad,
                         amp_backward, amp_forward, integer_range_bits)

_MIN_SCALE = 1e-5


class _GSBFunction(QuantizerFunction):
    """Forward and custom backward of :class:`GSBAttentionBinarizer`.

    Autocast: cast to float32 (forward and backward). The scales are small
    (alpha starts at 0.005 and is clamped at 1e-5, below float16's smallest
    normal number, 6.1e-5), ``q = P / alpha`` reaches 1/alpha, and the scale
    gradients are sums over the whole attention tensor: in float16 they
    overflow (65504) as soon as gradients are loss-scaled, and in bfloat16
    (8-bit mantissa) their many small terms are rounded away. Under AMP the
    attention map is then quantized in float32 and the ``P V`` product that
    follows casts it down again.
    """
    precision = 3  # alpha (T0 + beta1 T1 + beta2 T2): three binary maps

    @staticmethod
    @amp_forward(cast_inputs=torch.float32)
    def forward(ctx, p, alpha, beta1, beta2, low, high):
        q = p / alpha
        row_max = q.amax(dim=-1, keepdim=True)
        above_high = (q > high * row_max).to(p.dtype)
        above_low = (q > low * row_max).to(p.dtype)
        base = torch.round(q).clamp(0, 1) - above_low
        mid = above_low - above_high
        a, b1, b2 = (t.clamp_min(_MIN_SCALE) for t in (alpha, beta1, beta2))
        ctx.save_for_backward(p, a, b1, b2, base, mid, above_high)
        return (base + mid * b1 + above_high * b2) * a

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        p, a, b1, b2, base, mid, high = ctx.saved_tensors
        q = p / a
        inside = ((q >= 0) & (q <= 1)).to(p.dtype)
        levels = base + mid * b1 + high * b2
        grad_alpha = (levels * (1 - inside * q) * grad).sum()
        grad_b1 = (a * mid * grad).sum()
        grad_b2 = (a * high * grad).sum()
        return a * levels * grad, grad_alpha, grad_b1, grad_b2, None, None


class GSBAttentionBinarizer(nn.Module):
    r"""Quantization decomposition of the attention matrix ("GSB").

    With :math:`q = P / \alpha` and :math:`m = \max_{\text{row}} q`, three
    binary maps are built from thresholds relative to the row maximum:

    .. math::
        T_2 = [q > 0.9 m], \quad T_1 = [q > 0.7 m] - T_2, \quad
        T_0 = \operatorname{clip}(\operatorname{round}(q), 0, 1) - [q > 0.7 m]

    and the output is :math:`\alpha (T_0 + \beta_1 T_1 + \beta_2 T_2)`:
    each map is binary, so ``P·V`` becomes three binary products. (As in the
    reference code, :math:`T_0` is -1 where :math:`q > 0.7 m` but
    :math:`q < 0.5`.) Scales below 1e-5 are clamped to 1e-5.

    Backward (custom): :math:`\partial/\partial P = \alpha (T_0 + \beta_1 T_1
    + \beta_2 T_2)`; :math:`\partial/\partial\alpha = \sum g (T_0 + \beta_1 T_1
    + \beta_2 T_2)(1 - q\,[0 \le q \le 1])`; :math:`\partial/\partial\beta_k
    = \sum g\, \alpha\, T_k`.

    ``precision`` = 3: the output is three binary maps (with scales).
    """
    precision = _GSBFunction.precision

    def __init__(self, num_heads: int = 1, init_alpha: float = 0.005,
                 low: float = 0.7, high: float = 0.9):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.beta1 = nn.Parameter(torch.tensor(1.0))
        self.beta2 = nn.Parameter(torch.tensor(1.0))
        self.low, self.high = low, high

    def forward(self, p: Tensor) -> Tensor:
        return _GSBFunction.apply(p, self.alpha, self.beta1, self.beta2,
                                  self.low, self.high)

    def masks(self, p: Tensor):
        """The binary maps ``(T0, T1, T2)`` and the scales
        ``(alpha, alpha*beta1, alpha*beta2)`` (used by exporters/tests)."""
        q = p / self.alpha
        row_max = q.amax(dim=-1, keepdim=True)
        above_high = (q > self.high * row_max).to(p.dtype)
        above_low = (q > self.low * row_max).to(p.dtype)
        base = torch.round(q).clamp(0, 1) - above_low
        a = self.alpha.clamp_min(_MIN_SCALE)
        return ((base, above_low - above_high, above_high),
                (a, a * self.beta1.clamp_min(_MIN_SCALE),
                 a * self.beta2.clamp_min(_MIN_SCALE)))


class LSQAttentionQuantizer(nn.Module):
    r"""LSQ-style quantizer of the attention matrix (not 1-bit: 4 levels).

    Per head :math:`h`, with step :math:`s_h` and zero point :math:`z_h`:

    .. math::
        \hat P = s_h \cdot \operatorname{clip}(\operatorname{round}(
        L P / s_h + z_h), 0, L)

    with :math:`L` = ``levels`` (3 by default, so :math:`\hat P / s_h \in
    \{0, 1, 2, 3\}`, a 2-bit map). Rounding uses an identity STE and the
    gradients of :math:`s, z` are scaled by ``heads / sqrt(numel * L)``
    (LSQ). On the first training step, if ``initialized`` is 0, ``s`` and
    ``z`` are initialised from the data
    (:math:`s = 2\,\overline{|LP|}/\sqrt L`, :math:`z \leftarrow 0.9 z +
    0.1 \min LP`; under torch.distributed the step is averaged and the
    minimum taken over all ranks, so the replicas stay identical).

    ``precision``: bits of the levels, ``ceil(log2(levels + 1))`` (2 by
    default).

    Mixed precision: ``P`` is first cast to the dtype of ``s`` and ``z``
    (float32 master parameters under AMP; CPU autocast leaves the softmax in
    bfloat16), so the data initialisation, ``L P / s + z`` and the rounding
    are computed in float32 and the output is float32; the ``P V`` product
    that follows casts it down. A model converted with ``.half()`` keeps
    everything in float16.
    """

    def __init__(self, num_heads: int, levels: int = 3):
        super().__init__()
        self.levels = levels
        self.step = nn.Parameter(torch.ones(num_heads))
        self.zero_point = nn.Parameter(torch.zeros(num_heads))
        self.register_buffer('initialized', torch.zeros(1))
        # Python-side mirror of `initialized` once read: later steps skip
        # the host sync (and torch.compile sees no graph break)
        self._init_checked = False

    @property
    def precision(self) -> int:
        """Bit width of the quantized map (its levels are ``0..levels``)."""
        return integer_range_bits(0, self.levels)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_checked = False  # read the loaded flag again

    @torch.no_grad()
    def _init_from(self, x: Tensor):
        step = 2 * x.abs().mean(dim=(-1, -2)).mean(dim=0) / math.sqrt(
            self.levels)
        low = x.amin(dim=(-1, -2)).amin(dim=0)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            # every rank must start from the same step / zero point
            dist.all_reduce(step)
            step /= dist.get_world_size()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
        self.step.copy_(step)
        self.zero_point.mul_(0.9).add_(0.1 * low)
        self.initialized.fill_(1)

    def forward(self, p: Tensor) -> Tensor:
        if p.dim() != 4 or p.shape[1] != self.step.numel():
            raise ValueError('LSQAttentionQuantizer expects (batch, heads='
                             f'{self.step.numel()}, queries, keys), got '
                             f'{tuple(p.shape)}')
        x = p.to(self.step.dtype) * self.levels  # no-op in float32
        if self.training and not self._init_checked:
            if self.initialized.item() == 0:
                self._init_from(x)
            self._init_checked = True
        g = self.step.numel() / math.sqrt(x.numel() * self.levels)
        step = ScaleGrad.apply(self.step, g).view(1, -1, 1, 1)
        zero = ScaleGrad.apply(self.zero_point, g).view(1, -1, 1, 1)
        level = RoundSTE.apply(x / step + zero).clamp(0, self.levels)
        return level * step
