# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Segmentation datasets and data-validation transforms (mmseg registries)."""
from .rs_lvf import (DatasetMetaError, RSLVFDataset, load_class_file,
                     resolve_metainfo)
from .transforms import CheckLabelRange, LabelRangeError

__all__ = [
    'RSLVFDataset', 'DatasetMetaError', 'load_class_file', 'resolve_metainfo',
    'CheckLabelRange', 'LabelRangeError'
]
