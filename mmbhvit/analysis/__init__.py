# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Cost analysis of binary models: BOPs, FLOPs, OPs and parameters."""
from .complexity import (BOPS_PER_FLOP, BinaryFlopAnalyzer, ComplexityReport,
                         CostRow, analyze_config, analyze_model,
                         operand_bits)

__all__ = [
    'BOPS_PER_FLOP', 'BinaryFlopAnalyzer', 'ComplexityReport', 'CostRow',
    'analyze_config', 'analyze_model', 'operand_bits'
]
