# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""One module per module kind: its typed spec, its folding and its packed
op, registered for the PyTorch module type (:mod:`mmbhvit.deploy.registry`).
Importing this package registers them all."""
from . import (block, conv, head, merge, msgdc, msmha, proj, shift,  # noqa: F401
               stem)
from .block import BlockSpec, PackedBlock
from .conv import ConvSpec, PackedConv
from .head import HeadSpec, PackedHead
from .merge import MergeSpec, PackedMerge
from .msgdc import MSGDCSpec, PackedMSGDC
from .msmha import (AttentionContext, AttentionScores, MSMHASpec,
                    PackedMSMHA)
from .proj import FFNSpec, PackedFFN, PackedProj, ProjSpec
from .shift import PackedShift, ShiftSpec, shift_taps
from .stem import PackedStem, StemSpec

__all__ = [
    'BlockSpec', 'PackedBlock', 'ConvSpec', 'PackedConv', 'HeadSpec', 'PackedHead', 'MergeSpec',
    'PackedMerge', 'MSGDCSpec', 'PackedMSGDC', 'MSMHASpec', 'PackedMSMHA',
    'AttentionScores', 'AttentionContext', 'FFNSpec', 'PackedFFN',
    'PackedProj', 'ProjSpec', 'ShiftSpec', 'PackedShift', 'shift_taps',
    'StemSpec', 'PackedStem'
]
