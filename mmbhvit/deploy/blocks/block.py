# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""A BHViT block (:class:`~mmbhvit.models.backbones.bhvit.BHViTBlock`):

.. math:: h = x + \operatorname{Mixer}(\operatorname{Norm}_1(x)), \quad
    \tilde h = \operatorname{Norm}_2(h), \quad
    y = h + \operatorname{FFN}(\tilde h) + \operatorname{Shifts}(\tilde h)

Its own tensors are the two folded norms; the token mixer, the MLP and the
shift branches are children with their own handlers (any registered mixer
kind). A mixer op is called ``mixer(x, norm1, norm2)`` with the norms as
``(scale, bias)`` and returns ``(h, norm2(h))``, so a kernel can fuse the
norms (MSGDC does); one whose ``forward`` also takes ``out`` is called with
``out=x`` and writes ``h`` there, over the block's input.
"""
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import Tensor

from ...models.backbones.bhvit import BHViTBlock
from ..ops import PackedOp
from ..registry import (Folder, Handler, Params, Spec, TensorSpec, build,
                        describe, param, register)
from .norm import bn_affine
from .proj import FFNSpec
from .shift import ShiftSpec


@dataclass
class BlockSpec(Spec):
    kind = 'bhvit_block'
    channels: int
    token_mixer: Spec
    ffn: FFNSpec
    shifts: Optional[ShiftSpec]

    @property
    def mixer_kind(self) -> str:
        return self.token_mixer.kind

    def tensors(self) -> Dict[str, TensorSpec]:
        c = self.channels
        return {n: param(c) for n in ('norm1.scale', 'norm1.bias',
                                      'norm2.scale', 'norm2.bias')}

    def errors(self) -> List[str]:
        c, errs = self.channels, []
        mixer_c = getattr(self.token_mixer, 'channels', c)
        if mixer_c != c:
            errs.append(f'token_mixer has {mixer_c} channels, the block {c}')
        if not isinstance(self.ffn, FFNSpec) or self.ffn.expand.cin != c:
            errs.append(f'ffn does not take {c} channels')
        if self.shifts is not None and (not isinstance(
                self.shifts, ShiftSpec) or self.shifts.channels != c):
            errs.append(f'shifts do not have {c} channels')
        return errs


class PackedBlock(PackedOp):
    profile_label = 'block glue (float)'

    def __init__(self, spec: BlockSpec, params: Params, dtype, backend: str):
        super().__init__(dtype, backend)
        f = params.f
        self.norm1 = (f('norm1.scale'), f('norm1.bias'))
        self.norm2 = (f('norm2.scale'), f('norm2.bias'))
        self.token_mixer = build(spec.token_mixer,
                                 params.child('token_mixer'), dtype, backend)
        self.ffn = build(spec.ffn, params.child('ffn'), dtype, backend)
        self.shifts = (None if spec.shifts is None else build(
            spec.shifts, params.child('shifts'), dtype, backend))
        self.mixer_takes_out = 'out' in inspect.signature(
            self.token_mixer.forward).parameters

    def make_plan(self):
        """The block as one C++ call (``BlockPlan``) from the plans of its
        ops; None when one of them has none (e.g. another mixer kind)."""
        mixer = self.token_mixer.plan()
        ffn = self.ffn.plan()
        shifts = None if self.shifts is None else self.shifts.plan()
        kinds = {self.ext.MSMHAPlan: 'msmha', self.ext.MSGDCPlan: 'msgdc'}
        if (type(mixer) not in kinds or ffn is None
                or (self.shifts is not None and shifts is None)):
            return None
        return self.ext.BlockPlan(
            norm1_scale=self.norm1[0], norm1_bias=self.norm1[1],
            norm2_scale=self.norm2[0], norm2_bias=self.norm2[1],
            ffn=ffn, shifts=shifts, **{kinds[type(mixer)]: mixer})

    def forward(self, x: Tensor) -> Tensor:
        """The block's output; ``x`` may be overwritten (the engine has
        no further use for a block's input). With the extension one call
        of its plan, unless an op inside has hooks (then op by op)."""
        if self.ext is not None and not self.hooked_inside():
            plan = self.plan()
            if plan is not None:
                return plan.forward(x)
        # x, h and the MLP's sum are each used once more, as the residual
        # of the next result, which is written over it while it is still in
        # cache (a new buffer costs cache misses on every line written: the
        # shift branches of stage 1 took ~2x as long that way)
        if self.mixer_takes_out:
            h, hn = self.token_mixer(x, self.norm1, self.norm2, x)
        else:
            h, hn = self.token_mixer(x, self.norm1, self.norm2)
        out = self.ffn(hn, h, h)
        if self.shifts is not None:
            out = self.shifts(hn, out, out)
        return out


@register(BHViTBlock)
class BlockHandler(Handler):
    spec = BlockSpec
    op = PackedBlock

    def describe(self, m: BHViTBlock) -> BlockSpec:
        return BlockSpec(
            channels=int(m.norm1.num_features),
            token_mixer=describe(m.token_mixer, 'token_mixer'),
            ffn=describe(m.ffn, 'ffn'),
            shifts=None if m.shifts is None else describe(m.shifts, 'shifts'))

    def fold(self, m: BHViTBlock, spec: BlockSpec, out: Folder) -> None:
        for name in ('norm1', 'norm2'):
            scale, bias = bn_affine(getattr(m, name))
            out.put(f'{name}.scale', scale)
            out.put(f'{name}.bias', bias)
        out.fold('token_mixer', m.token_mixer, spec.token_mixer)
        out.fold('ffn', m.ffn, spec.ffn)
        if m.shifts is not None:
            out.fold('shifts', m.shifts, spec.shifts)
