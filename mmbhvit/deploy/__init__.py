# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Deployment of binary BHViT models: export with bit-packed 1-bit weights
(:mod:`.export`) and a CPU engine that computes the binary layers with
XNOR/AND + popcount on packed words (:mod:`.engine`). Each module kind has
one file in :mod:`.blocks` (typed spec, folding, packed op with its
PyTorch fallback), registered by module type (:mod:`.registry`); kernels
in ``csrc/``. See ``docs/deployment.md``."""
from .engine import PackedBHViT, PackedClassifier, load_engine
from .export import export_model, load_packed, save_packed
from .ops import extension_available, extension_error, resolve_backend
from .packing import pack_bits, unpack_bits
from .registry import UnsupportedModuleError, register
from .spec import PackedFormatError, arch_spec

__all__ = [
    'export_model', 'save_packed', 'load_packed', 'PackedBHViT',
    'PackedClassifier', 'load_engine', 'extension_available',
    'extension_error', 'resolve_backend', 'pack_bits', 'unpack_bits',
    'PackedFormatError', 'arch_spec', 'register', 'UnsupportedModuleError'
]
