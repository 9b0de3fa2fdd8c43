# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Synthetic georeferenced scenes for the tests and benchmarks: a 16-bit
multiband GeoTIFF and its class mask, written strip by strip (a
10000 x 10000 scene never sits in memory).

The ground is a patchwork of square "fields", one class each, with a
round "pond" in some of them; every class has its own mean in each band
(plus noise), so a model can learn it in a few iterations.
"""
import contextlib
from typing import Optional, Sequence, Tuple

import numpy as np

from .geo import atomic_geotiff

__all__ = ['make_scene', 'scene_labels', 'DEFAULT_CRS', 'DEFAULT_TRANSFORM']

#: UTM zone 33N, 0.5 m pixels.
DEFAULT_CRS = 'EPSG:32633'
DEFAULT_TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)


def scene_labels(rows: np.ndarray, cols: np.ndarray, num_classes: int,
                 cell: int = 96, seed: int = 0) -> np.ndarray:
    """Class index of the pixels ``rows x cols`` (1-D absolute coordinates,
    broadcast to a grid), uint8."""
    y, x = rows[:, None].astype(np.int64), cols[None, :].astype(np.int64)
    cy, cx = y // cell, x // cell
    h = (cy * 73856093) ^ (cx * 19349663) ^ (seed * 83492791)
    labels = (h % (num_classes - 1)).astype(np.uint8)
    # a pond (the last class) in every third field
    dy, dx = y - (cy * cell + cell // 2), x - (cx * cell + cell // 2)
    pond = (dy * dy + dx * dx < (cell // 4) ** 2) & ((h // 7) % 3 == 0)
    labels[pond] = num_classes - 1
    return labels


def make_scene(img_path: str, mask_path: Optional[str], size: Tuple[int,
                                                                    int],
               bands: int = 4, num_classes: int = 4, dtype: str = 'uint16',
               crs: Optional[str] = DEFAULT_CRS,
               transform: Optional[Sequence[float]] = DEFAULT_TRANSFORM,
               seed: int = 0, strip: int = 256, cell: int = 96,
               palette: Optional[Sequence[Sequence[int]]] = None) -> None:
    """Write a ``size = (width, height)`` scene to ``img_path`` (GeoTIFF,
    ``bands`` bands of ``dtype``) and its mask to ``mask_path``: one band
    of class indices (GeoTIFF, same CRS/transform), or with ``palette`` an
    RGB colour mask (format from the extension; no georeference for PNG).
    """
    from affine import Affine
    width, height = size
    rng = np.random.default_rng(seed)
    top = 4000.0 if dtype == 'uint16' else 200.0
    # the same look for a class in every scene, whatever the seed
    means = np.random.default_rng(1234).uniform(
        0.1, 1.0, (num_classes, bands)) * top
    noise = 0.05 * top
    geo_kw = {}
    if crs is not None:
        geo_kw['crs'] = crs
    if transform is not None:
        geo_kw['transform'] = Affine(*transform)
    img_profile = dict(driver='GTiff', width=width, height=height,
                       count=bands, dtype=dtype, tiled=True, blockxsize=256,
                       blockysize=256, compress='deflate', **geo_kw)
    if mask_path is not None and palette is None:
        mask_profile = dict(img_profile, count=1, dtype='uint8')
    elif mask_path is not None:
        mask_profile = dict(driver='PNG' if mask_path.lower().endswith(
            '.png') else 'GTiff', width=width, height=height, count=3,
                            dtype='uint8')
    from rasterio.windows import Window
    cols = np.arange(width)
    colour = None
    with contextlib.ExitStack() as stack:
        dst = stack.enter_context(atomic_geotiff(img_path, **img_profile))
        mask_dst = None
        if mask_path is not None and palette is None:
            mask_dst = stack.enter_context(
                atomic_geotiff(mask_path, **mask_profile))
        elif mask_path is not None:  # PNG: written whole at the end
            colour = np.zeros((3, height, width), np.uint8)
        lo, hi = (0, 65535) if dtype == 'uint16' else (0, 255)
        for y0 in range(0, height, strip):
            h = min(strip, height - y0)
            labels = scene_labels(np.arange(y0, y0 + h), cols, num_classes,
                                  cell, seed)
            vals = means[labels].transpose(2, 0, 1)
            vals = vals + rng.normal(0, noise, vals.shape)
            win = Window(0, y0, width, h)
            dst.write(np.clip(vals, lo, hi).astype(dtype), window=win)
            if mask_dst is not None:
                mask_dst.write(labels[None], window=win)
            if colour is not None:
                colour[:, y0:y0 + h] = np.asarray(
                    palette, np.uint8)[labels].transpose(2, 0, 1)
    if colour is not None:
        with atomic_geotiff(mask_path, **mask_profile) as mdst:
            mdst.write(colour)
