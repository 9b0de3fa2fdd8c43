# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""Binary 1×1 projection (:class:`~mmbhvit.models.backbones.bhvit.
BinaryResidualProj`, with the LayerScale that may follow it) and the binary
MLP (:class:`~mmbhvit.models.backbones.bhvit.BinaryFFN`).

Folding: the weight ``s_o sign(w - mean w)`` becomes its sign bits and the
per-output factor ``s_o``; the eval BatchNorm becomes the affine ``a D + b``
of the integer dot product ``D``; the learnable shift before the sign
becomes the threshold ``thr`` (``sign(x + s)`` is ``x > -s``, exact in
floating point); the RPReLU input shift goes into ``b``, its output shift
and a LayerScale into ``post_scale`` / ``post_bias``:

.. math:: y = \operatorname{prelu}(a \odot D + b + \operatorname{sc}(x))
    \odot p_s + p_b \;(+\ \text{residual}),\quad
    D = \hat W_{\pm1} \cdot [x > \theta]_{\pm1}
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import Tensor, nn

from ...models.backbones.bhvit import BinaryFFN, BinaryResidualProj
from ..ops import (SHORTCUTS, PackedOp, group_sums, kernel_words, pm1_weight,
                   prelu, write_out)
from ..packing import bits_to_pm1
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, as_f64,
                        bits, describe, param, register)
from .norm import Affine, bn_affine


def shortcut_kind(cin: int, cout: int) -> str:
    """The residual of :class:`BinaryResidualProj`: identity, the input
    tiled (expanding) or averaged over groups (reducing)."""
    return 'identity' if cin == cout else 'tile' if cout > cin else 'mean'


@dataclass
class ProjSpec(Spec):
    """A binary 1×1 projection ``cin → cout``."""
    kind = 'binary_proj'
    cin: int
    cout: int
    shortcut: str
    weight_bits: int = 1
    act_bits: int = 1
    recu: bool = False

    def tensors(self) -> Dict[str, TensorSpec]:
        t = dict(wbits=bits(self.cout, self.cin), thr=param(self.cin))
        for n in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
            t[n] = param(self.cout)
        return t

    def errors(self) -> List[str]:
        errs = []
        if not (isinstance(self.cin, int) and isinstance(self.cout, int)
                and self.cin > 0 and self.cout > 0):
            return [f'widths {self.cin!r} -> {self.cout!r} must be positive '
                    'ints']
        if max(self.cin, self.cout) % min(self.cin, self.cout):
            errs.append(f'{self.cin} -> {self.cout} channels: one width '
                        'must be a multiple of the other')
        elif self.shortcut != shortcut_kind(self.cin, self.cout):
            errs.append(f'shortcut {self.shortcut!r}, expected '
                        f'{shortcut_kind(self.cin, self.cout)!r}')
        if (self.weight_bits, self.act_bits) != (1, 1):
            errs.append(f'not fully binary (weight_bits {self.weight_bits},'
                        f' act_bits {self.act_bits})')
        return errs


class PackedProj(PackedOp):
    """The packed op of :class:`ProjSpec` (see the module docstring)."""
    profile_label = 'binary 1x1 projections'

    def __init__(self, spec: ProjSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.cin, self.cout = spec.cin, spec.cout
        self.shortcut = spec.shortcut
        f = params.f
        self.thr, self.a, self.b = f('thr'), f('a'), f('b')
        self.slope = f('slope')
        self.post_scale, self.post_bias = f('post_scale'), f('post_bias')
        words = params.words('wbits')
        if self.ext is not None:
            self.wt = kernel_words(words, 1, self.cin)[0]
        else:
            self.w_t = pm1_weight(words, 1, self.cin,
                                  dtype)[:, 0].t().contiguous()

    def signs(self, x: Tensor) -> Tensor:
        return x > self.thr

    def decisions(self, x: Tensor, residual: Optional[Tensor] = None,
                  norm: Optional[Affine] = None,
                  out: Optional[Tensor] = None):
        return {'': self.signs(x)}

    def kernel_args(self) -> List[Tensor]:
        return [self.thr, self.wt, self.a, self.b, self.slope,
                self.post_scale, self.post_bias]

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                norm: Optional[Affine] = None, out: Optional[Tensor] = None):
        """``y = proj(x) (+ residual)``; with ``norm`` (the next block
        norm's ``(scale, bias)``) the pair ``(y, y * scale + bias)``, the
        kernels writing the second while ``y`` is in cache. ``out``: where
        to write ``y`` (``residual`` itself may be given; see
        :func:`~mmbhvit.deploy.ops.write_out`)."""
        if norm is not None:
            if self.ext is not None:
                return tuple(self.ext.proj_norm(
                    x, self.kernel_args(), self.cout,
                    SHORTCUTS[self.shortcut], residual, norm[0], norm[1],
                    out))
            y = self.forward(x, residual, out=out)
            yn = y * norm[0]
            return y, yn + norm[1]
        if self.ext is not None:
            return self.ext.proj(x, self.thr, self.wt, self.cout, self.a,
                                 self.b, self.slope, self.post_scale,
                                 self.post_bias, SHORTCUTS[self.shortcut],
                                 residual, out)
        lead = x.shape[:-1]
        d = bits_to_pm1(x > self.thr, self.dtype) @ self.w_t
        z = d * self.a
        z = z + self.b
        if self.shortcut == 'identity':
            z = z + x
        elif self.shortcut == 'tile':
            r = self.cout // self.cin
            z = (z.view(*lead, r, self.cin) + x.unsqueeze(-2)).view(
                *lead, self.cout)
        elif self.shortcut == 'mean':
            r = self.cin // self.cout
            z = z + group_sums(x.view(*lead, self.cout, r)) / r
        y = prelu(z, self.slope)
        y = y * self.post_scale
        y = y + self.post_bias
        return write_out(y if residual is None else residual + y, out)


@register(BinaryResidualProj)
class ProjHandler(Handler):
    spec = ProjSpec
    op = PackedProj

    def describe(self, m: BinaryResidualProj) -> ProjSpec:
        return ProjSpec(
            cin=int(m.in_channels), cout=int(m.out_channels),
            shortcut=shortcut_kind(m.in_channels, m.out_channels),
            weight_bits=int(getattr(m.conv, 'weight_bits', 32)),
            act_bits=int(getattr(m.conv, 'act_bits', 32)),
            recu=bool(getattr(m.conv, 'recu', False)))

    def fold(self, m: BinaryResidualProj, spec: ProjSpec, out: Folder,
             layer_scale: Optional[nn.Module] = None) -> None:
        cout = spec.cout
        s = out.put_binary_weight('wbits', m.conv)
        alpha, beta = bn_affine(m.norm)
        if layer_scale is None:
            ls_scale = as_f64(None, cout) + 1
            ls_bias = as_f64(None, cout)
        else:
            ls_scale, ls_bias = as_f64(layer_scale.scale), as_f64(
                layer_scale.bias)
        out.put('thr', -as_f64(m.shift.bias))
        out.put('a', s * alpha)
        out.put('b', as_f64(m.conv.bias, cout) * alpha + beta -
                as_f64(m.act.bias_in))
        out.put('slope', as_f64(m.act.weight))
        out.put('post_scale', ls_scale)
        out.put('post_bias', as_f64(m.act.bias_out) * ls_scale + ls_bias)


# --------------------------------------------------------------------------
# The binary MLP
# --------------------------------------------------------------------------
@dataclass
class FFNSpec(Spec):
    """Binary MLP: ``expand`` then ``reduce`` (which carries the
    LayerScale, when there is one)."""
    kind = 'binary_ffn'
    expand: ProjSpec
    reduce: ProjSpec
    layer_scale: bool

    def errors(self) -> List[str]:
        e, r = self.expand, self.reduce
        if (e.cout, r.cout) != (r.cin, e.cin):
            return [f'reduce ({r.cin} -> {r.cout}) does not map the expanded '
                    f'width back ({e.cin} -> {e.cout})']
        return []


class PackedFFN(PackedOp):
    """``reduce(expand(x)) + residual``; the C++ path runs both projections
    per tile of tokens so the expanded activations stay in cache."""
    profile_label = 'mlp expand + reduce (binary 1x1)'

    def __init__(self, spec: FFNSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        self.expand = PackedProj(spec.expand, params.child('expand'), dtype,
                                 backend)
        self.reduce = PackedProj(spec.reduce, params.child('reduce'), dtype,
                                 backend)
        # the expansion's nibble table (4 cin hidden bytes, derived from
        # the packed weights, never stored): only the AVX2 kernels read it,
        # so it is built when they are the ones in use; empty when the
        # shape takes none (cin a multiple of 64, at most 192)
        self.expand_lut = None
        if self.ext is not None and self.ext.isa() == 'avx2':
            e = self.expand
            self.expand_lut = self.ext.nibble_lut(e.wt, e.cin, e.cout)

    def make_plan(self):
        e, r = self.expand, self.reduce
        return self.ext.FFNPlan(
            expand=e.kernel_args(), hidden=e.cout,
            expand_shortcut=SHORTCUTS[e.shortcut], reduce=r.kernel_args(),
            reduce_shortcut=SHORTCUTS[r.shortcut],
            expand_lut=self.expand_lut)

    def decisions(self, x: Tensor, residual: Tensor,
                  out: Optional[Tensor] = None):
        return {'expand': self.expand.signs(x),
                'reduce': self.reduce.signs(self.expand.forward(x))}

    def forward(self, x: Tensor, residual: Tensor,
                out: Optional[Tensor] = None) -> Tensor:
        """``out``: where to write the result (see :func:`write_out`),
        e.g. ``residual`` itself when the caller is done with it."""
        if self.ext is not None:
            return self.plan().forward(x, residual, out)
        # .forward: the two projections are one op for hooks
        return write_out(
            self.reduce.forward(self.expand.forward(x), residual), out)


@register(BinaryFFN)
class FFNHandler(Handler):
    spec = FFNSpec
    op = PackedFFN

    def describe(self, m: BinaryFFN) -> FFNSpec:
        return FFNSpec(expand=describe(m.expand, 'expand'),
                       reduce=describe(m.reduce, 'reduce'),
                       layer_scale=m.layer_scale is not None)

    def fold(self, m: BinaryFFN, spec: FFNSpec, out: Folder) -> None:
        out.fold('expand', m.expand, spec.expand)
        out.fold('reduce', m.reduce, spec.reduce,
                 layer_scale=m.layer_scale)
