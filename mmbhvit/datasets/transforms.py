# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Data-validation and remote-sensing loading transforms for segmentation
pipelines."""
from typing import Optional, Tuple

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


@TRANSFORMS.register_module()
class LoadRSImage(BaseTransform):
    """Load a remote-sensing image or tile keeping its bit depth and bands,
    and apply the dataset's per-band normalisation.

    TIFF/GeoTIFF files are read with rasterio (any band count, 8/16-bit or
    float), other formats with OpenCV (``IMREAD_UNCHANGED``). Bands come in
    file order: RGB for colour PNG/JPEG (not OpenCV's BGR), so the data
    preprocessor needs ``bgr_to_rgb=False``.

    The normalisation (:class:`mmbhvit.datasets.geo.BandNorm`, the
    converter's ``bands.json``) maps each band onto float32 ``[0, 255]``;
    it comes from ``results['band_norm']`` (which ``RSLVFDataset`` sets
    from ``data_root/bands.json``) or from the ``band_norm`` argument.
    Without one, 8-bit images are used as they are (as float32); an image
    of another pixel type is an error (its scale would be a guess).

    Required keys: ``img_path``. Added keys: ``img`` (float32, H x W x
    bands), ``img_shape``, ``ori_shape``.

    Args:
        band_norm (dict, optional): a ``bands.json`` content; overrides the
            dataset's. Defaults to None.
    """

    def __init__(self, band_norm: Optional[dict] = None) -> None:
        from .geo import BandNorm
        self.band_norm = None if band_norm is None else \
            BandNorm.from_dict(band_norm, 'LoadRSImage(band_norm=...)')

    def transform(self, results: dict) -> dict:
        from .geo import BandNorm, read_image
        path = results['img_path']
        img = read_image(path)
        norm = self.band_norm
        if norm is None and results.get('band_norm') is not None:
            norm = BandNorm.from_dict(results['band_norm'], 'band_norm')
        if norm is None:
            if img.dtype != np.uint8:
                raise ValueError(
                    f'{path}: {img.dtype} pixels and no band normalisation '
                    '(bands.json in the data root, written by '
                    'tools/dataset_converters/rs_lvf.py, or '
                    'LoadRSImage(band_norm=...)); the scale of non-8-bit '
                    'data is never guessed.')
            img = img.astype(np.float32)
        else:
            if img.dtype.name != norm.dtype:
                raise ValueError(
                    f'{path}: {img.dtype} pixels but the dataset\'s band '
                    f'normalisation was computed on {norm.dtype} data.')
            if img.shape[2] != norm.num_bands:
                raise ValueError(
                    f'{path}: {img.shape[2]} band(s) but the dataset\'s '
                    f'band normalisation is for {norm.num_bands} (bands '
                    f'{norm.bands} of the source scenes).')
            img = norm.apply(img)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(band_norm={self.band_norm})'


@TRANSFORMS.register_module()
class RandomGainBias(BaseTransform):
    """Brightness/contrast jitter for images of any band count, in float.

    With probability ``prob``: ``img * gain + bias`` with one ``gain`` from
    ``gain_range`` and one ``bias`` from ``bias_range`` for all bands,
    clipped to ``[0, 255]``. Unlike mmseg's ``PhotoMetricDistortion`` it
    works with N bands and keeps float images float (that one converts to
    HSV, which needs 3 bands, and rounds to uint8, which would throw away
    the bit depth of 16-bit data).
    """

    def __init__(self, prob: float = 0.5,
                 gain_range: Tuple[float, float] = (0.75, 1.25),
                 bias_range: Tuple[float, float] = (-25., 25.)) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f'prob must be in [0, 1], got {prob}')
        self.prob = prob
        self.gain_range = tuple(gain_range)
        self.bias_range = tuple(bias_range)

    def transform(self, results: dict) -> dict:
        if np.random.rand() >= self.prob:
            return results
        gain = np.random.uniform(*self.gain_range)
        bias = np.random.uniform(*self.bias_range)
        img = results['img'].astype(np.float32) * gain + bias
        results['img'] = np.clip(img, 0, 255, out=img)
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(prob={self.prob}, gain_range='
                f'{self.gain_range}, bias_range={self.bias_range})')
