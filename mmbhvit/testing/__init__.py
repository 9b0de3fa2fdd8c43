# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .parity import ParityResult, run_parity

__all__ = ['ParityResult', 'run_parity']
