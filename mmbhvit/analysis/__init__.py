# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Cost analysis of binary models: BOPs, FLOPs, OPs and parameters.

:mod:`.counting` counts (BOPs vs FLOPs, 1-bit parameters), :mod:`.graphs`
makes whole models traceable, :mod:`.report` holds the results and
:mod:`.complexity` glues them (:func:`analyze_model`,
:func:`analyze_config`).
"""
from .complexity import analyze_config, analyze_model, cost_by_module_type
from .counting import (BOPS_PER_FLOP, BinaryFlopAnalyzer,
                       binary_parameter_count, operand_bits)
from .graphs import ClassifierGraph, SegmentorGraph, backbone_parts
from .report import ComplexityReport, CostRow

__all__ = [
    'BOPS_PER_FLOP', 'BinaryFlopAnalyzer', 'ComplexityReport', 'CostRow',
    'analyze_config', 'analyze_model', 'operand_bits',
    'binary_parameter_count', 'cost_by_module_type', 'ClassifierGraph',
    'SegmentorGraph', 'backbone_parts'
]
