# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Data-validation transforms for segmentation pipelines."""
from typing import Optional

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS


class LabelRangeError(ValueError):
    """A label map holds a value that is neither a class nor ignored."""


@TRANSFORMS.register_module()
class CheckLabelRange(BaseTransform):
    """Fail clearly on label values outside ``0 .. num_classes - 1``.

    Put it right after ``LoadAnnotations``. Without it a stray value (for
    example a colour mask saved instead of an index mask) reaches the loss
    and fails deep inside a CUDA kernel or, on the CPU, trains on nonsense.

    Required keys: ``gt_seg_map`` (the transform does nothing when it is
    absent, e.g. in inference pipelines), ``seg_map_path`` (for the message).

    Args:
        num_classes (int, optional): number of classes. Defaults to None:
            take ``results['num_classes']``, which ``RSLVFDataset`` sets.
        ignore_index (int): the label that marks "ignore". Defaults to 255.
    """

    def __init__(self,
                 num_classes: Optional[int] = None,
                 ignore_index: int = 255) -> None:
        if num_classes is not None and (not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(
                f'num_classes must be a positive int, got {num_classes!r}')
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        seg = results.get('gt_seg_map')
        if seg is None:
            return results
        num_classes = self.num_classes or results.get('num_classes')
        if num_classes is None:
            raise ValueError(
                'CheckLabelRange needs the number of classes: set '
                '`num_classes` in the transform config or use a dataset '
                'that provides `num_classes` per sample (RSLVFDataset).')
        values = np.unique(seg)
        bad = values[(values >= num_classes) & (values != self.ignore_index)]
        if bad.size:
            hint = ''
            if results.get('reduce_zero_label'):
                hint = (' (reduce_zero_label=True: the file values are these '
                        'plus one, and file value 0 is ignored)')
            raise LabelRangeError(
                f'{results.get("seg_map_path", "<label map>")}: label '
                f'value(s) {bad.tolist()} are outside the {num_classes} '
                f'classes 0..{num_classes - 1} and are not the ignore index '
                f'{self.ignore_index}{hint}. Check that the annotation is '
                'an index mask (not a colour mask) and that the class list '
                'matches the data.')
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(num_classes={self.num_classes}, '
                f'ignore_index={self.ignore_index})')
