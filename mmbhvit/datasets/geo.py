# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Raster I/O for remote-sensing scenes: GeoTIFF (16-bit, multiband,
georeferenced) as well as PNG/JPEG, read and written with rasterio (GDAL).

What lives here, shared by ``tools/dataset_converters/rs_lvf.py``, the
``LoadRSImage`` transform and ``tools/rs_inference.py``:

* :func:`raster_info` / :func:`read_raster`: a raster's header (size, band
  count, dtype, CRS, transform, nodata) and windowed reads of chosen bands;
  an unsupported dtype or a band out of range is a :class:`RasterError`
  naming the file;
* :class:`BandNorm`: the per-band normalisation of a dataset, stored in
  ``data_root/bands.json`` by the converter (see its docstring for the
  formula) and applied by the loading transform and the scene inference;
* :func:`window_starts` / :func:`tile_windows`: the overlapping window grid
  (the same as mmseg's sliding-window inference: stride ``tile - overlap``,
  the last window flush with the far edge);
* :func:`write_geotiff_bytes` / :func:`atomic_geotiff`: GeoTIFF output that
  is either complete or absent (temporary file + rename);
* the tile index (``tiles.json``) and :func:`stitch_tiles`, which puts tile
  predictions (or labels) back into a scene-sized georeferenced mask.

rasterio is an optional dependency (``pip install mmbhvit[geo]``, pinned in
``requirements/optional.txt``): it is imported when first needed, with an
error saying how to install it.
"""
import contextlib
import json
import os
import os.path as osp
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    'RasterError', 'RasterInfo', 'BandNorm', 'SUPPORTED_DTYPES',
    'BANDS_FILE', 'TILES_FILE', 'raster_info', 'read_raster', 'read_image',
    'parse_bands', 'window_starts', 'tile_windows', 'compute_band_norm',
    'load_band_norm', 'write_geotiff_bytes', 'atomic_geotiff',
    'stitch_tiles', 'is_tiff'
]

#: Pixel types kept as they are (bit depth preserved in the tiles).
SUPPORTED_DTYPES = ('uint8', 'uint16', 'int16', 'float32')
#: Per-band normalisation written by the converter into ``data_root``.
BANDS_FILE = 'bands.json'
#: Tile index (scene, window of every tile) written into ``data_root``.
TILES_FILE = 'tiles.json'
#: The label value meaning "ignore" / "no data" in masks.
IGNORE_INDEX = 255
TIFF_EXTS = ('.tif', '.tiff')


class RasterError(ValueError):
    """A raster that cannot be used as it is; the message names the file."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f'{path}: {problem}')


def rasterio():
    """The rasterio module, or an ImportError saying how to install it."""
    try:
        import rasterio as rio
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            'reading GeoTIFF scenes needs rasterio: pip install '
            '"mmbhvit[geo]" (or pip install rasterio==1.4.4, the version '
            'pinned in requirements/optional.txt)') from exc
    return rio


@contextlib.contextmanager
def _quiet_georef():
    """PNG/JPEG files have no georeference: GDAL's warning about it is
    noise (the converter and the tools report what matters)."""
    rio = rasterio()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', rio.errors.NotGeoreferencedWarning)
        yield rio


def is_tiff(path: str) -> bool:
    return osp.splitext(path)[1].lower() in TIFF_EXTS


@dataclass
class RasterInfo:
    """What a raster's header says (nothing is decoded)."""
    path: str
    width: int
    height: int
    count: int
    dtype: str
    #: WKT of the coordinate reference system, None without one.
    crs: Optional[str] = None
    #: GDAL geotransform order is not used: this is the affine
    #: ``(a, b, c, d, e, f)`` of rasterio, None when not georeferenced.
    transform: Optional[Tuple[float, ...]] = None
    nodata: Optional[float] = None

    @property
    def shape(self) -> Tuple[int, int]:
        return self.height, self.width


def raster_info(path: str) -> RasterInfo:
    """The header of ``path``; unreadable files are a :class:`RasterError`."""
    if not osp.isfile(path):
        raise RasterError(path, 'no such file')
    with _quiet_georef() as rio:
        try:
            with rio.open(path) as src:
                dtypes = set(src.dtypes)
                if len(dtypes) != 1:
                    raise RasterError(path, f'bands of different pixel types '
                                      f'{sorted(dtypes)}')
                transform = None
                if not src.transform.is_identity or src.crs is not None:
                    transform = tuple(src.transform)[:6]
                return RasterInfo(
                    path, src.width, src.height, src.count, src.dtypes[0],
                    src.crs.to_wkt() if src.crs else None, transform,
                    src.nodata)
        except rio.errors.RasterioIOError as exc:
            raise RasterError(path, f'not a readable raster ({exc})') from None


def check_dtype(info: RasterInfo) -> None:
    if info.dtype not in SUPPORTED_DTYPES:
        raise RasterError(
            info.path, f'unsupported pixel type {info.dtype}; supported: '
            f'{", ".join(SUPPORTED_DTYPES)} (convert it first, e.g. '
            'gdal_translate -ot UInt16 -scale ...: the converter never '
            'rescales silently)')


def parse_bands(text: Optional[str]) -> Optional[List[int]]:
    """``'4,3,2'`` -> ``[4, 3, 2]`` (1-based band numbers, GDAL's
    convention); None or ``''`` -> None (all bands)."""
    if text is None or text == '':
        return None
    if isinstance(text, (list, tuple)):
        bands = [int(b) for b in text]
    else:
        try:
            bands = [int(b) for b in str(text).split(',')]
        except ValueError:
            raise ValueError(f'bands: expected 1-based band numbers such as '
                             f'"1,2,3,4", got {text!r}') from None
    if not bands or min(bands) < 1:
        raise ValueError(f'bands are 1-based (the first band is 1), got '
                         f'{text!r}')
    return bands


def check_bands(info: RasterInfo, bands: Optional[Sequence[int]]) -> list:
    """The 1-based bands to read from ``info`` (all when None)."""
    if bands is None:
        return list(range(1, info.count + 1))
    bad = [b for b in bands if b > info.count]
    if bad:
        raise RasterError(info.path, f'has {info.count} band(s); bands '
                          f'{bad} requested (--bands is 1-based)')
    return list(bands)


def read_raster(path: str, bands: Optional[Sequence[int]] = None,
                window: Optional[Tuple[int, int, int, int]] = None,
                out_shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Read ``bands`` (1-based, all when None) of ``path`` in ``window``
    ``(col_off, row_off, width, height)`` (whole raster when None), as a
    ``(bands, h, w)`` array of the file's own dtype. ``out_shape``
    ``(h, w)`` reads decimated (nearest), without decoding more than
    needed for overviews."""
    with _quiet_georef() as rio:
        from rasterio.windows import Window
        with rio.open(path) as src:
            idx = bands if bands is not None else list(
                range(1, src.count + 1))
            win = Window(*window) if window is not None else None
            kwargs = {}
            if out_shape is not None:
                kwargs['out_shape'] = (len(idx), *out_shape)
            return src.read(idx, window=win, **kwargs)


def read_image(path: str) -> np.ndarray:
    """An image or tile as ``(h, w, bands)`` in band order (RGB for colour
    PNG/JPEG, unlike OpenCV's BGR), dtype as stored. TIFF is read with
    rasterio (any band count and bit depth), other formats with OpenCV
    (``IMREAD_UNCHANGED``: 16-bit PNG stays 16-bit)."""
    if is_tiff(path):
        return np.ascontiguousarray(read_raster(path).transpose(1, 2, 0))
    import cv2
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise RasterError(path, 'cannot be read as an image')
    if img.ndim == 2:
        return img[..., None]
    if img.shape[2] == 3:
        return np.ascontiguousarray(img[..., ::-1])
    if img.shape[2] == 4:
        return np.ascontiguousarray(img[..., [2, 1, 0, 3]])
    return img


# --------------------------------------------------------------------------
# Per-band normalisation
# --------------------------------------------------------------------------
@dataclass
class BandNorm:
    """Per-band normalisation of a dataset (``data_root/bands.json``).

    Each band ``b`` is mapped linearly from ``[low[b], high[b]]`` onto
    ``[0, 255]`` (float32, values outside clipped)::

        v' = clip((v - low[b]) / (high[b] - low[b]), 0, 1) * 255

    so the rest of the pipeline (resizing, flips, brightness/contrast
    jitter, padding) and the data preprocessor's ``mean``/``std`` work in
    the 8-bit range as for ordinary RGB, without losing the file's bit
    depth (the result is float, never quantised). ``method`` says where
    ``low``/``high`` come from: ``'percentile'`` (the ``percentiles`` of
    the training scenes, per band) or ``'none'`` (``0`` and ``255``: 8-bit
    data used as it is). ``mean``/``std`` are the per-band statistics of
    the training scenes *after* this mapping, for the data preprocessor of
    bands that have no RGB-pretrained statistics.
    """
    #: 1-based band numbers of the source scenes, in the order stored.
    bands: List[int]
    dtype: str
    low: List[float]
    high: List[float]
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    method: str = 'percentile'
    percentiles: Optional[List[float]] = None

    def __post_init__(self):
        n = len(self.bands)
        for name in ('low', 'high') + (('mean', 'std') if self.mean else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f'band normalisation: {len(self.bands)} '
                                 f'bands but {len(getattr(self, name))} '
                                 f'"{name}" values')
        for b, (lo, hi) in enumerate(zip(self.low, self.high)):
            if not hi > lo:
                raise ValueError(f'band normalisation: band {self.bands[b]} '
                                 f'has high {hi} <= low {lo} (a constant '
                                 'band cannot be stretched)')

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def apply(self, img: np.ndarray, channel_axis: int = -1) -> np.ndarray:
        """``img`` with its bands on ``channel_axis`` -> float32 in
        ``[0, 255]``."""
        if img.shape[channel_axis] != self.num_bands:
            raise ValueError(f'{img.shape[channel_axis]} band(s) but the '
                             f'normalisation is for {self.num_bands}')
        shape = [1] * img.ndim
        shape[channel_axis] = self.num_bands
        low = np.asarray(self.low, np.float32).reshape(shape)
        scale = (255.0 / (np.asarray(self.high, np.float32) -
                          np.asarray(self.low, np.float32))).reshape(shape)
        out = img.astype(np.float32)
        out -= low
        out *= scale
        return np.clip(out, 0.0, 255.0, out=out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = 'band normalisation'):
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f'{source}: expected a dict, got {type(d)}')
        try:
            return cls(**d)
        except TypeError as exc:
            raise ValueError(f'{source}: {exc}') from None
        except ValueError as exc:
            raise ValueError(f'{source}: {exc}') from None

    @classmethod
    def identity(cls, num_bands: int, dtype: str = 'uint8'):
        """8-bit data used as it is."""
        return cls(list(range(1, num_bands + 1)), dtype, [0.0] * num_bands,
                   [255.0] * num_bands, method='none')


def load_band_norm(path: str) -> BandNorm:
    """A ``bands.json`` written by the converter."""
    try:
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f'{path}: cannot read the band normalisation '
                         f'({exc})') from None
    return BandNorm.from_dict(d, path)


def compute_band_norm(infos: Sequence[RasterInfo], bands: Sequence[int],
                      method: str = 'percentile',
                      percentiles: Tuple[float, float] = (2.0, 98.0),
                      sample_side: int = 1024) -> BandNorm:
    """The normalisation of scenes ``infos`` (the training scenes).

    Each scene is read decimated to at most ``sample_side`` pixels a side
    (nearest sampling: never the whole scene in memory); pixels equal to
    the scene's nodata value in every band are left out.
    """
    dtype = infos[0].dtype
    samples = []
    for info in infos:
        step = max(1, -(-max(info.width, info.height) // sample_side))
        shape = (max(1, info.height // step), max(1, info.width // step))
        arr = read_raster(info.path, bands, out_shape=shape)
        flat = arr.reshape(len(bands), -1)
        if info.nodata is not None:
            valid = ~np.all(flat == info.nodata, axis=0)
            flat = flat[:, valid]
        samples.append(flat)
    data = np.concatenate(samples, axis=1).astype(np.float64)
    if data.shape[1] == 0:
        raise ValueError('the training scenes hold only nodata pixels: no '
                         'band statistics')
    if method == 'none':
        if dtype != 'uint8':
            raise ValueError(
                f"normalisation 'none' keeps 0..255 and is for 8-bit data; "
                f'{infos[0].path} is {dtype} (use percentile)')
        low, high = [0.0] * len(bands), [255.0] * len(bands)
        pct = None
    elif method == 'percentile':
        pct = [float(p) for p in percentiles]
        if not 0 <= pct[0] < pct[1] <= 100:
            raise ValueError(f'percentiles must be 0 <= low < high <= 100, '
                             f'got {pct}')
        low = np.percentile(data, pct[0], axis=1).tolist()
        high = np.percentile(data, pct[1], axis=1).tolist()
        for b, (lo, hi) in enumerate(zip(low, high)):
            if not hi > lo:  # a (nearly) constant band: use its range
                low[b] = float(data[b].min())
                high[b] = float(max(data[b].max(), low[b] + 1))
    else:
        raise ValueError(f"normalisation method must be 'percentile' or "
                         f"'none', got {method!r}")
    norm = BandNorm(list(bands), dtype, [float(v) for v in low],
                    [float(v) for v in high], method=method,
                    percentiles=pct)
    stretched = norm.apply(data.astype(np.float32), channel_axis=0)
    norm.mean = [round(float(v), 3) for v in stretched.mean(axis=1)]
    norm.std = [round(max(float(v), 1e-3), 3) for v in stretched.std(axis=1)]
    return norm


# --------------------------------------------------------------------------
# Window grid
# --------------------------------------------------------------------------
def window_starts(size: int, tile: int, stride: int) -> List[int]:
    """Window offsets along one axis: every ``stride``, the last window
    flush with the end (mmseg's ``slide_inference`` grid); a single window
    at 0 when ``size <= tile``."""
    if tile <= 0 or stride <= 0:
        raise ValueError(f'tile and stride must be positive, got {tile}, '
                         f'{stride}')
    n = max(size - tile + stride - 1, 0) // stride + 1
    return [max(min(i * stride + tile, size) - tile, 0) for i in range(n)]


def tile_windows(width: int, height: int, tile: int,
                 overlap: int) -> List[Tuple[int, int, int, int]]:
    """``(col_off, row_off, w, h)`` of the tiles of a ``width x height``
    scene; ``tile <= 0``: the whole scene as one tile."""
    if tile <= 0:
        return [(0, 0, width, height)]
    if not 0 <= overlap < tile:
        raise ValueError(f'overlap must be in 0..tile-1, got {overlap} for '
                         f'tile {tile}')
    stride = tile - overlap
    return [(x, y, min(tile, width), min(tile, height))
            for y in window_starts(height, tile, stride)
            for x in window_starts(width, tile, stride)]


# --------------------------------------------------------------------------
# GeoTIFF output
# --------------------------------------------------------------------------
def _profile(array: np.ndarray, crs, transform, nodata=None,
             compress: str = 'deflate') -> dict:
    from affine import Affine
    count, height, width = array.shape
    profile = dict(driver='GTiff', width=width, height=height, count=count,
                   dtype=array.dtype.name, compress=compress)
    if array.dtype.kind in 'iu':
        profile['predictor'] = 2
    if crs is not None:
        profile['crs'] = crs
    if transform is not None:
        profile['transform'] = Affine(*transform[:6])
    if nodata is not None:
        profile['nodata'] = nodata
    return profile


def write_geotiff_bytes(array: np.ndarray, crs=None, transform=None,
                        nodata=None, colormap: Optional[dict] = None
                        ) -> bytes:
    """A ``(bands, h, w)`` array as the bytes of a GeoTIFF (for a small
    file written with :func:`mmbhvit.utils.io.atomic_write`)."""
    with _quiet_georef():
        from rasterio.io import MemoryFile
        with MemoryFile() as mem:
            with mem.open(**_profile(array, crs, transform, nodata)) as dst:
                dst.write(array)
                if colormap:
                    dst.write_colormap(1, colormap)
            return mem.read()


@contextlib.contextmanager
def atomic_geotiff(path: str, **profile) -> Iterator:
    """``with atomic_geotiff(path, width=..., ...) as dst:`` a rasterio
    dataset open for writing a temporary file beside ``path``, renamed to
    ``path`` only when the block ends without an error (a large output
    written window by window: the same guarantee as
    :func:`mmbhvit.utils.io.atomic_write`)."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.',
                               suffix='.tmp.tif', dir=folder)
    os.close(fd)
    try:
        with _quiet_georef() as rio:
            with rio.open(tmp, 'w', **profile) as dst:
                yield dst
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------
# Tile index and stitching
# --------------------------------------------------------------------------
def stitch_tiles(data_root: str, scene: str, tile_dir: str, out: str,
                 suffix: str = '.png') -> np.ndarray:
    """Put the tile masks of ``scene`` found in ``tile_dir`` (one
    ``NAME + suffix`` per tile of ``data_root/tiles.json``, e.g. the label
    maps written by ``tools/test.py --out``) back into one mask the size
    of the scene, saved as a GeoTIFF with the scene's CRS and transform
    (when ``out`` is not None); returns it.

    Where tiles overlap, the tile whose centre is nearest wins (each pixel
    is taken from the tile it lies deepest in, away from tile borders).
    Pixels no tile covers are 255.
    """
    import cv2

    from mmbhvit.utils.io import atomic_write
    index_path = osp.join(data_root, TILES_FILE)
    with open(index_path, encoding='utf-8') as f:
        index = json.load(f)
    if scene not in index['scenes']:
        raise KeyError(f'{index_path} has no scene {scene!r}; scenes: '
                       f'{sorted(index["scenes"])[:10]}')
    meta = index['scenes'][scene]
    h, w = meta['height'], meta['width']
    mask = np.full((h, w), IGNORE_INDEX, np.uint8)
    depth = np.full((h, w), -1, np.int32)
    for t in index['tiles']:
        if t['scene'] != scene:
            continue
        x, y, tw, th = t['window']
        path = osp.join(tile_dir, t['name'] + suffix)
        tile = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if tile is None:
            raise RasterError(path, 'missing or unreadable tile mask')
        if tile.shape[:2] != (th, tw):
            raise RasterError(path, f'is {tile.shape[1]}x{tile.shape[0]} '
                              f'but its window in {index_path} is {tw}x{th}')
        yy, xx = np.mgrid[0:th, 0:tw]
        d = np.minimum(np.minimum(yy, th - 1 - yy),
                       np.minimum(xx, tw - 1 - xx)).astype(np.int32)
        region = depth[y:y + th, x:x + tw]
        take = d > region
        region[take] = d[take]
        mask[y:y + th, x:x + tw][take] = tile[take]
    if out is not None:
        data = write_geotiff_bytes(mask[None], meta.get('crs'),
                                   meta.get('transform'),
                                   nodata=IGNORE_INDEX)
        with atomic_write(out, 'wb') as f:
            f.write(data)
    return mask


# --------------------------------------------------------------------------
# Masks and the converter's per-tile work
# --------------------------------------------------------------------------
def colour_to_index(mask_rgb: np.ndarray, palette, ignore_colours=(),
                    unknown: bool = False, name: str = 'mask') -> np.ndarray:
    """An ``h x w x 3`` RGB colour mask -> uint8 class indices.

    A colour that is neither in ``palette`` nor in ``ignore_colours``
    (-> 255) is a ValueError naming ``name`` and the colours, unless
    ``unknown`` maps them to 255 too."""
    codes = (mask_rgb[..., 0].astype(np.int64) << 16) | (
        mask_rgb[..., 1].astype(np.int64) << 8) | mask_rgb[..., 2]
    lookup = {(r << 16) | (g << 8) | b: i
              for i, (r, g, b) in enumerate(palette)}
    for r, g, b in ignore_colours:
        lookup.setdefault((r << 16) | (g << 8) | b, IGNORE_INDEX)
    values, inverse = np.unique(codes, return_inverse=True)
    mapped = np.empty(len(values), np.uint8)
    bad = []
    for k, code in enumerate(values):
        if int(code) in lookup:
            mapped[k] = lookup[int(code)]
        elif unknown:
            mapped[k] = IGNORE_INDEX
        else:
            bad.append(((int(code) >> 16) & 255, (int(code) >> 8) & 255,
                        int(code) & 255))
    if bad:
        raise ValueError(
            f'{name}: colour(s) {bad[:10]} are not in the palette '
            f'{[list(p) for p in palette]}; add them with --ignore-colour '
            'R,G,B or pass --unknown-to-ignore.')
    return mapped[inverse.reshape(codes.shape)]


def check_index_values(label: np.ndarray, num_classes: int,
                       name: str) -> np.ndarray:
    """An index mask checked against ``0 .. num_classes-1`` and 255, as
    uint8."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX) |
                 (values < 0)]
    if bad.size:
        raise ValueError(f'{name}: label value(s) {bad[:10].tolist()} are '
                         f'outside the {num_classes} classes 0..'
                         f'{num_classes - 1} and are not the ignore index '
                         f'{IGNORE_INDEX} (a colour mask saved as one band?)')
    return label.astype(np.uint8)


def mask_to_index(mask: np.ndarray, mode: str, num_classes: int,
                  palette=None, ignore_colours=(), unknown: bool = False,
                  name: str = 'mask') -> np.ndarray:
    """A mask read as ``(bands, h, w)`` -> uint8 class indices; ``mode`` is
    ``'index'`` (one band of class indices) or ``'colour'`` (RGB)."""
    if mode == 'index':
        return check_index_values(mask[0], num_classes, name)
    rgb = mask[:3].transpose(1, 2, 0)
    return colour_to_index(rgb, palette, ignore_colours, unknown, name)


def convert_tile(task: dict) -> str:
    """Write one image tile (GeoTIFF, the scene's dtype, its georeference
    shifted to the window) and its label tile (uint8 PNG); returns the
    tile name. Run by the converter, possibly in worker processes; errors
    name the scene or mask file and the window."""
    from mmbhvit.utils.io import atomic_write, write_image
    window = task['window']
    where = f' (window col {window[0]}, row {window[1]}, {window[2]}x' \
            f'{window[3]})' if task.get('tiled') else ''
    img = read_raster(task['img_path'], task['bands'], window)
    transform = task.get('transform')
    if transform is not None:  # the same affine, origin at the window
        a, b, c, d, e, f = transform[:6]
        x, y = window[0], window[1]
        transform = (a, b, a * x + b * y + c, d, e, d * x + e * y + f)
    data = write_geotiff_bytes(img, task.get('crs'), transform,
                               task.get('nodata'))
    with atomic_write(task['img_out'], 'wb', sync=False) as f:
        f.write(data)
    if task.get('mask_path'):
        mask = read_raster(task['mask_path'], None, window)
        label = mask_to_index(mask, task['mask_mode'], task['num_classes'],
                              task.get('palette'),
                              task.get('ignore_colours', ()),
                              task.get('unknown', False),
                              task['mask_path'] + where)
        write_image(task['ann_out'], label)
    return task['name']
