# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""The MSMHA token mixer (:class:`~mmbhvit.models.backbones.bhvit.MSMHA`)
with the norms and the residual of its block.

Norm1, window partition and merged tokens, LayerNorm (float); the binary
Q/K/V projections (:mod:`.proj`); the binarized attention products:

* scores: :math:`S = \text{scale}\cdot [q>\theta_q]_{\pm1}^\top
  [k>\theta_k]_{\pm1}` per head (XOR + popcount over ``d`` bits);
* context: the softmax map quantized into bit planes (LSQ: the 2-bit level;
  GSB: :math:`T_0^+, T_0^-, T_1, T_2`) times the ±1 values (AND + popcount
  over tokens), then :math:`\operatorname{prelu}(a \odot \text{ctx} + b + q
  + k + v) + p_b` (the context BatchNorm and RPReLU folded);

then the tokens back in place, the output projection (with its LayerScale)
and the residual.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.backbones.bhvit import MSMHA
from ...models.binary import GSBAttentionBinarizer, LSQAttentionQuantizer
from ..ops import ATTN_MODES, SHORTCUTS, PackedOp, pad_nhwc, prelu
from ..packing import bits_to_pm1
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        describe, float64, param, register)
from .norm import Affine, bn_affine
from .proj import PackedProj, ProjSpec

#: the GSB scalars stored in the ``gsb`` tensor (float64), in this order:
#: the raw alpha of the maps and the clamped scales of the planes
GSB_VALUES = ('alpha', 'a', 'b1', 'b2')


def attention_spec(binarizer) -> Optional[dict]:
    """The options (not the learned values) of an attention binarizer."""
    if binarizer is None:
        return None
    if isinstance(binarizer, LSQAttentionQuantizer):
        return dict(binarizer='lsq', levels=int(binarizer.levels))
    if isinstance(binarizer, GSBAttentionBinarizer):
        return dict(binarizer='gsb', low=float(binarizer.low),
                    high=float(binarizer.high))
    return dict(binarizer=type(binarizer).__name__)


@dataclass
class MSMHASpec(Spec):
    kind = 'msmha'
    channels: int
    num_heads: int
    window_size: int
    token_norm_eps: float
    attention: Optional[dict]
    proj_layer_scale: bool
    q: ProjSpec
    k: ProjSpec
    v: ProjSpec
    proj: ProjSpec

    def tensors(self) -> Dict[str, TensorSpec]:
        c = self.channels
        t = {
            n: param(c)
            for n in ('merge_mix', 'token_norm.weight', 'token_norm.bias',
                      'q_thr', 'k_thr', 'v_thr', 'ctx.a', 'ctx.b',
                      'ctx.slope', 'ctx.post_bias', 'out_mix')
        }
        kind = (self.attention or {}).get('binarizer')
        if kind == 'lsq':
            t['lsq.step'] = param(self.num_heads)
            t['lsq.zero'] = param(self.num_heads)
        elif kind == 'gsb':
            t['gsb'] = float64(len(GSB_VALUES))
        return t

    def errors(self) -> List[str]:
        c, heads, errs = self.channels, self.num_heads, []
        if not (isinstance(heads, int) and heads >= 1 and c % heads == 0):
            errs.append(f'num_heads {heads!r} does not divide {c} channels')
        ws = self.window_size
        if not (isinstance(ws, int) and ws >= 1 and ws % 2 == 1):
            errs.append(f'window_size must be an odd positive int, got '
                        f'{ws!r}')
        att = self.attention or {}
        if att.get('binarizer') == 'lsq':
            if not (isinstance(att.get('levels'), int) and att['levels'] > 0):
                errs.append(f'LSQ levels {att.get("levels")!r}')
        elif att.get('binarizer') == 'gsb':
            if not all(isinstance(att.get(k), float) for k in ('low',
                                                               'high')):
                errs.append(f'GSB low/high {att!r} must be floats')
        else:
            errs.append(f'attention {self.attention!r} is not binary (LSQ '
                        'or GSB)')
        for n in ('q', 'k', 'v', 'proj'):
            p = getattr(self, n)
            if (p.cin, p.cout) != (c, c):
                errs.append(f'{n}: {p.cin} -> {p.cout} channels, the '
                            f'attention has {c}')
        return errs


class _Heads:

    def _heads(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.heads, c // self.heads).transpose(1, 2)


def softmax_table(d: int, scale: float) -> Tensor:
    """``exp(-2 n scale)`` for ``n = 0 .. d`` in float64: the softmax
    numerators of a row of ±1 dot products over ``d`` bits, ``n`` being how
    many more sign disagreements a key has than the row's best one."""
    return torch.exp(torch.arange(d + 1, dtype=torch.float64) * (-2 * scale))


def table_softmax(dots: Tensor, table: Tensor) -> Tensor:
    """Float32 softmax over the last dimension of ±1 dot products ``dots``
    (exact integers): ``e = table[(max - dots) / 2]`` in float64, the row
    sum left to right (a cumulative sum), ``float32(e * (1 / sum))``; the
    fallback of ``attn_scores(..., table=)``."""
    n = ((dots.amax(dim=-1, keepdim=True) - dots) / 2).long()
    e = table[n]
    total = e.cumsum(dim=-1)[..., -1:]
    return (e * (1 / total)).float()


class AttentionScores(PackedOp, _Heads):
    """The attention map of token sets ``(B, T, C)``: the softmax of the
    binary q·k scores. In float64 it is ATen's softmax of the scores, as in
    the model (bit for bit); in float32 the kernel takes each row's
    numerators from :func:`softmax_table` (float64) and rounds the map once,
    closer to the float64 model than float32 ``softmax`` (docs/deployment.md,
    "The attention map from a table")."""
    profile_label = 'attention q.k + softmax (binary)'

    def __init__(self, spec: MSMHASpec, params: Params, dtype, backend):
        super().__init__(dtype, backend)
        self.heads = spec.num_heads
        d = spec.channels // spec.num_heads
        self.scale = d**-0.5
        self.thr_q, self.thr_k = params.f('q_thr'), params.f('k_thr')
        self.table = (softmax_table(d, self.scale)
                      if dtype == torch.float32 else None)

    def dots(self, q: Tensor, k: Tensor) -> Tensor:
        """The ±1 dot products per head, ``(B, heads, T, T)`` (fallback)."""
        qs = self._heads(bits_to_pm1(q > self.thr_q, self.dtype))
        ks = self._heads(bits_to_pm1(k > self.thr_k, self.dtype))
        return qs @ ks.transpose(-2, -1)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        if self.ext is not None:
            s = self.ext.attn_scores(q, k, self.thr_q, self.thr_k,
                                     self.heads, self.scale, self.table)
            return s if self.table is not None else torch.softmax(s, dim=-1)
        dots = self.dots(q, k)
        if self.table is not None:
            return table_softmax(dots, self.table)
        return torch.softmax(dots * self.scale, dim=-1)


class AttentionContext(PackedOp, _Heads):
    """Quantized softmax map times the binary values, with the epilogue."""
    profile_label = 'attention P.v (bit planes)'

    def __init__(self, spec: MSMHASpec, params: Params, dtype, backend):
        super().__init__(dtype, backend)
        f = params.f
        self.heads = spec.num_heads
        self.thr_q, self.thr_k = f('q_thr'), f('k_thr')
        self.thr_v = f('v_thr')
        att = spec.attention
        self.mode = att['binarizer']
        if self.mode == 'lsq':
            self.levels = int(att['levels'])
            self.step, self.zero = f('lsq.step'), f('lsq.zero')
            self.gsb: List[float] = []
        else:
            self.levels, self.step, self.zero = 0, None, None
            values = params.raw('gsb').tolist()
            if not (all(map(lambda v: v == v and abs(v) != float('inf'),
                            values)) and values[0] > 0):
                raise ValueError(f'{params.path}.gsb: GSB parameters '
                                 f'{dict(zip(GSB_VALUES, values))} must be '
                                 'finite with alpha > 0 (a damaged file?)')
            self.gsb = values + [float(att['low']), float(att['high'])]
        self.ctx_a, self.ctx_b = f('ctx.a'), f('ctx.b')
        self.ctx_slope, self.ctx_post = f('ctx.slope'), f('ctx.post_bias')

    def levels_of(self, p: Tensor):
        """The quantized attention map as integer-valued planes (used by
        the fallback and to record quantization decisions)."""
        if self.mode == 'lsq':
            u = p * self.levels
            u = u / self.step.view(1, -1, 1, 1)
            u = u + self.zero.view(1, -1, 1, 1)
            return torch.round(u).clamp(0, self.levels)
        alpha, _, _, _, low, high = self.gsb
        q = p / alpha
        m = q.amax(dim=-1, keepdim=True)
        above_high = q > high * m
        above_low = q > low * m
        base = torch.round(q).clamp(0, 1) - above_low.to(p.dtype)
        mid = (above_low & ~above_high).to(p.dtype)
        return torch.stack([base, mid, above_high.to(p.dtype)])

    def decisions(self, p: Tensor, q: Tensor, k: Tensor, v: Tensor):
        return {'q': q > self.thr_q, 'k': k > self.thr_k,
                'v': v > self.thr_v, 'attn_levels': self.levels_of(p)}

    def forward(self, p: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.ext is not None:
            return self.ext.attn_context(p, q, k, v, self.thr_v, self.heads,
                                         ATTN_MODES[self.mode], self.levels,
                                         self.step, self.zero, self.gsb,
                                         self.ctx_a, self.ctx_b,
                                         self.ctx_slope, self.ctx_post)
        vs = self._heads(bits_to_pm1(v > self.thr_v, self.dtype)).transpose(
            -2, -1)  # (B, heads, d, T)
        lv = self.levels_of(p)
        if self.mode == 'lsq':  # integer level sums, times the step
            ctx = (vs @ lv.transpose(-2, -1)) * self.step.view(1, -1, 1, 1)
        else:
            _, a, b1, b2, _, _ = self.gsb
            s0, s1, s2 = (vs @ plane.transpose(-2, -1) for plane in lv)
            ctx = s0 + b1 * s1
            ctx = ctx + b2 * s2
            ctx = ctx * a
        ctx = ctx.permute(0, 3, 1, 2).reshape(q.shape)  # (B, T, C)
        z = ctx * self.ctx_a
        z = z + self.ctx_b
        z = z + q
        z = z + k
        z = z + v
        z = prelu(z, self.ctx_slope)
        return z + self.ctx_post


def window_tokens(x: Tensor, scale: Tensor, bias: Tensor, mix: Tensor,
                  rest: Tensor, s: int) -> Tensor:
    """The fallback of the ``attn_tokens`` kernel: the channels-last map
    ``x`` normalised (``x * scale + bias``), zero-padded to whole ``s × s``
    windows; per window its ``s²`` tokens, then the ``nh·nw`` merged tokens
    (``mix`` · max-pool + ``rest`` · average-pool over each window, the
    same for every window): ``(n·nh·nw, s² + nh·nw, c)``."""
    n, _, _, c = x.shape
    xn = x * scale
    xn = pad_nhwc(xn + bias, s)
    hp, wp = xn.shape[1:3]
    nh, nw = hp // s, wp // s
    wins = xn.reshape(n, nh, s, nw, s, c).permute(0, 1, 3, 2, 4, 5).reshape(
        n * nh * nw, s * s, c)
    xc = xn.permute(0, 3, 1, 2)
    mx = F.max_pool2d(xc, s, s, padding=s // 2)
    av = F.avg_pool2d(xc, s, s, padding=s // 2, count_include_pad=True)
    merged = mix.view(-1, 1, 1) * mx + rest.view(-1, 1, 1) * av
    merged = merged.permute(0, 2, 3, 1).reshape(n, 1, nh * nw, c)
    merged = merged.expand(n, nh * nw, nh * nw, c).reshape(
        n * nh * nw, nh * nw, c)
    return torch.cat([wins, merged], dim=1)


def window_untokens(a: Tensor, mix: Tensor, rest: Tensor, n: int, h: int,
                    w: int, s: int) -> Tensor:
    """The fallback of the ``attn_untokens`` kernel, inverse of
    :func:`window_tokens`: window tokens back in place, the merged tokens
    averaged over the windows (summed left to right) and upsampled, mixed
    per channel (``mix`` · window + ``rest`` · merged), cropped to
    ``h × w``."""
    nh, nw, c = -(-h // s), -(-w // s), a.shape[-1]
    win = a[:, :s * s].reshape(n, nh, nw, s, s, c).permute(0, 1, 3, 2, 4, 5)
    per_window = a[:, s * s:].reshape(n, nh * nw, nh, nw, c)
    merged = per_window[:, 0]
    for i in range(1, nh * nw):
        merged = merged + per_window[:, i]
    merged = merged / (nh * nw)
    out = win * mix + merged.view(n, nh, 1, nw, 1, c) * rest
    return out.reshape(n, nh * s, nw * s, c)[:, :h, :w]


class PackedMSMHA(PackedOp):
    """``forward(x, norm1, norm2)`` → ``(h, norm2(h))`` with ``h = x +
    MSMHA(norm1(x))``; the norms are the block's ``(scale, bias)``."""
    profile_label = 'attention tokens, layer norm, mixing (float)'

    def __init__(self, spec: MSMHASpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        f = params.f
        self.mix = f('merge_mix')
        self.rest = (1 - self.mix).contiguous()
        self.ln_weight = f('token_norm.weight')
        self.ln_bias = f('token_norm.bias')
        self.ln_eps = float(spec.token_norm_eps)
        self.out_mix = f('out_mix')
        self.out_rest = (1 - self.out_mix).contiguous()
        self.s = int(spec.window_size)
        for n in ('q', 'k', 'v', 'proj'):
            op = PackedProj(getattr(spec, n), params.child(n), dtype, backend)
            op.profile_label = ('attention proj (binary 1x1)' if n == 'proj'
                                else 'attention q/k/v (binary 1x1)')
            setattr(self, n, op)
        self.scores = AttentionScores(spec, params, dtype, backend)
        self.context = AttentionContext(spec, params, dtype, backend)

    def make_plan(self):
        """The ops of :meth:`forward` bound to their tensors as one C++
        call (``MSMHAPlan``: the same functions in the same order)."""
        sc, ctx = self.scores, self.context
        projs = [getattr(self, n) for n in ('q', 'k', 'v', 'proj')]
        return self.ext.MSMHAPlan(
            window=self.s, mix=self.mix, rest=self.rest,
            ln_weight=self.ln_weight, ln_bias=self.ln_bias,
            ln_eps=self.ln_eps, projs=[p.kernel_args() for p in projs],
            couts=[p.cout for p in projs],
            shortcuts=[SHORTCUTS[p.shortcut] for p in projs],
            heads=sc.heads, scale=sc.scale, table=sc.table,
            thr_q=sc.thr_q, thr_k=sc.thr_k, thr_v=ctx.thr_v,
            mode=ATTN_MODES[ctx.mode], levels=ctx.levels, step=ctx.step,
            zero=ctx.zero, gsb=ctx.gsb, ctx_a=ctx.ctx_a, ctx_b=ctx.ctx_b,
            ctx_slope=ctx.ctx_slope, ctx_post=ctx.ctx_post,
            out_mix=self.out_mix, out_rest=self.out_rest)

    def tokens(self, x: Tensor, norm1: Affine) -> Tuple[Tensor, tuple]:
        """Norm1, window partition and merged tokens, LayerNorm."""
        n, h, w, c = x.shape
        s = self.s
        tokens = (self.ext.attn_tokens
                  if self.ext is not None else window_tokens)
        tok = tokens(x, norm1[0], norm1[1], self.mix, self.rest, s)
        tok = F.layer_norm(tok, (c, ), self.ln_weight, self.ln_bias,
                           self.ln_eps)
        return tok, (n, h, w)

    def untokens(self, a: Tensor, shape: tuple) -> Tensor:
        """Window tokens back in place, merged tokens averaged over windows
        and upsampled, mixed per channel, cropped."""
        n, h, w = shape
        s = self.s
        if self.ext is not None:
            return self.ext.attn_untokens(a, self.out_mix, self.out_rest, n,
                                          h, w, s)
        return window_untokens(a, self.out_mix, self.out_rest, n, h, w,
                               s).contiguous()

    def forward(self, x: Tensor, norm1: Affine, norm2: Affine,
                out: Optional[Tensor] = None):
        """``(h, norm2(h))``; ``out``: where to write ``h`` (``x`` itself
        may be given). With the extension, one call of its plan, unless
        an op inside has hooks (the profiler's, the recorder's): then op
        by op, through them."""
        if self.ext is not None and not self.hooked_inside():
            return tuple(self.plan().forward(x, norm1[0], norm1[1],
                                             norm2[0], norm2[1], out))
        tok, shape = self.tokens(x, norm1)
        q, k, v = self.q(tok), self.k(tok), self.v(tok)
        probs = self.scores(q, k)
        mixed = self.untokens(self.context(probs, q, k, v), shape)
        return self.proj(mixed, x, norm2, out)


@register(MSMHA)
class MSMHAHandler(Handler):
    spec = MSMHASpec
    op = PackedMSMHA

    def describe(self, m: MSMHA) -> MSMHASpec:
        return MSMHASpec(
            channels=int(m.out_mix.numel()), num_heads=int(m.num_heads),
            window_size=int(m.window_size),
            token_norm_eps=float(m.token_norm.eps),
            attention=attention_spec(m.binarizer),
            proj_layer_scale=m.proj_scale is not None,
            q=describe(m.q, 'q'), k=describe(m.k, 'k'), v=describe(m.v, 'v'),
            proj=describe(m.proj, 'proj'))

    def fold(self, m: MSMHA, spec: MSMHASpec, out: Folder) -> None:
        if m.binarizer is None or not m.binarize_qkv:
            raise NotImplementedError(f'{out.path}: attention is not binary '
                                      '(act_bits != 1)')
        out.put('merge_mix', as_f64(m.merge.mix))
        out.put('token_norm.weight', as_f64(m.token_norm.weight))
        out.put('token_norm.bias', as_f64(m.token_norm.bias))
        for n in ('q', 'k', 'v'):
            out.fold(n, getattr(m, n), getattr(spec, n))
            out.put(f'{n}_thr', -as_f64(getattr(m, f'{n}_shift').bias))
        binarizer = m.binarizer
        if isinstance(binarizer, LSQAttentionQuantizer):
            out.put('lsq.step', as_f64(binarizer.step))
            out.put('lsq.zero', as_f64(binarizer.zero_point))
        elif isinstance(binarizer, GSBAttentionBinarizer):
            if float(binarizer.alpha) <= 0:
                raise NotImplementedError(
                    f'{out.path}: GSB alpha must be positive to split the '
                    'attention map into 0/1 planes, got '
                    f'{float(binarizer.alpha)}')
            # forward: (T0 + b1 T1 + b2 T2) a, scales clamped at 1e-5, while
            # the maps use the raw alpha (q = P / alpha)
            values = dict(alpha=float(binarizer.alpha),
                          a=float(binarizer.alpha.clamp_min(1e-5)),
                          b1=float(binarizer.beta1.clamp_min(1e-5)),
                          b2=float(binarizer.beta2.clamp_min(1e-5)))
            out.put_float64('gsb', torch.tensor(
                [values[k] for k in GSB_VALUES], dtype=torch.float64))
        else:
            raise NotImplementedError(f'{out.path}: unknown attention '
                                      f'binarizer {type(binarizer).__name__}')
        alpha, beta = bn_affine(m.context_norm)
        act = m.context_act
        out.put('ctx.a', alpha)
        out.put('ctx.b', beta - as_f64(act.bias_in))
        out.put('ctx.slope', as_f64(act.weight))
        out.put('ctx.post_bias', as_f64(act.bias_out))
        out.put('out_mix', as_f64(m.out_mix))
        out.fold('proj', m.proj, spec.proj, layer_scale=m.proj_scale)
