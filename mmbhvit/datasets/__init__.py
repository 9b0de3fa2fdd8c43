# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Segmentation datasets, data-validation and remote-sensing loading
transforms (mmseg registries); raster I/O in :mod:`.geo`."""
from .rs_lvf import (DatasetMetaError, RSLVFDataset, load_class_file,
                     resolve_metainfo)
from .transforms import (CheckLabelRange, LabelRangeError, LoadRSImage,
                         RandomGainBias)

__all__ = [
    'RSLVFDataset', 'DatasetMetaError', 'load_class_file', 'resolve_metainfo',
    'CheckLabelRange', 'LabelRangeError', 'LoadRSImage', 'RandomGainBias'
]
