# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .bhvit import BHViT

__all__ = ['BHViT']
