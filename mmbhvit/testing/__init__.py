# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Test helpers: parity with the official fixtures (:mod:`.parity`) and
realistic random models + comparison statistics for the packed engine
(:mod:`.deploy`)."""
from .deploy import calibrate_random_model, decision_flips, diff_stats
from .parity import ParityResult, run_parity

__all__ = [
    'ParityResult', 'run_parity', 'calibrate_random_model', 'diff_stats',
    'decision_flips'
]
