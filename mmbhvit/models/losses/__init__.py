# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .weight_regularization import BinaryWeightRegLoss

__all__ = ['BinaryWeightRegLoss']
