# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""mmbhvit: BHViT, the Binarized Hybrid Vision Transformer, for OpenMMLab.

Importing the package (directly or through
``custom_imports=dict(imports=['mmbhvit'])``) makes mmcv-lite usable by
mmsegmentation and registers every mmbhvit module in the mmpretrain and
mmsegmentation registries.
"""
from . import compat  # noqa: F401  (must run before mmseg is imported)
from . import datasets  # noqa: F401
from . import engine  # noqa: F401
from . import models  # noqa: F401

__version__ = '0.1.0'
