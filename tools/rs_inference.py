# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Segment a whole remote-sensing scene (GeoTIFF, any size, bit depth and
band count) with sliding-window inference, streaming: the scene is read
and the mask written one row of windows at a time, never whole in memory.

Example::

    python tools/rs_inference.py scene.tif \
        configs/bhvit/fpn_bhvit-tiny_rs-lvf-rgbn.py iter_80000.pth \
        scene_mask.tif [--packed bhvit.packed.pth]

Output:

* ``OUT`` (GeoTIFF): one band of uint8 class indices, with the scene's
  size, CRS and geotransform, the class palette as its colour table, 255
  where the scene has nodata (in every band);
* ``OUT`` with ``.png`` instead (``--overview PATH`` to choose): a colour
  overview at most ``--overview-size`` pixels a side.

Windows: ``--window`` pixels a side every ``--stride`` pixels, the last
row/column flush with the scene's edge (defaults: the config's
``test_cfg`` crop_size/stride for ``mode='slide'``, else 512/341). Where
windows overlap, the class logits are averaged before the argmax: exactly
mmseg's ``slide_inference`` over the whole scene (tests/test_rs_pipeline.py
checks the two agree), so tiles leave no seams.

Memory: one row of windows of the scene (bands x window x scene width,
its dtype and float32) and the logits of that row (classes x window x
scene width, float32), plus the model's activations for ``--batch-size``
windows. Measured: tools/analysis_tools/benchmark_rs_inference.py.

Input normalisation: the per-band ``bands.json`` of the training data
(``--band-norm``), or else the one stored in the checkpoint
(``meta.dataset_meta.band_norm``, saved by training on data converted by
tools/dataset_converters/rs_lvf.py); 8-bit scenes without either are used
as they are. Then the model's data preprocessor ``mean``/``std``, as in
testing.
"""
import argparse
import os
import os.path as osp
import sys
import time

import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402

from mmbhvit.datasets import geo  # noqa: E402
from mmbhvit.utils.io import write_image  # noqa: E402

#: Output rows are handed to GDAL in whole blocks of this many rows.
BLOCK = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Sliding-window segmentation of a whole GeoTIFF scene '
        '(streamed), written as a georeferenced GeoTIFF mask + overview PNG')
    parser.add_argument('scene', help='GeoTIFF (or PNG/JPEG) scene')
    parser.add_argument('config', help='segmentation config')
    parser.add_argument('checkpoint', help='checkpoint of that config')
    parser.add_argument('out', help='output mask (.tif)')
    parser.add_argument('--packed', help='packed backbone file '
                        '(tools/deployment/export_binary.py) to run the '
                        'backbone with the 1-bit engine')
    parser.add_argument('--band-norm', help='bands.json of the training data '
                        '(default: the one stored in the checkpoint)')
    parser.add_argument('--bands', type=geo.parse_bands, default=None,
                        help='1-based scene bands to use (default: the '
                        'bands of the normalisation)')
    parser.add_argument('--window', type=int, help='window side (pixels)')
    parser.add_argument('--stride', type=int, help='window stride (pixels)')
    parser.add_argument('--batch-size', type=int, default=4,
                        help='windows per forward pass')
    parser.add_argument('--overview', help='overview PNG path (default: '
                        'OUT with .png)')
    parser.add_argument('--overview-size', type=int, default=1024)
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    parser.add_argument('--cfg-options', nargs='+', default=None,
                        help='config overrides key=value')
    return parser.parse_args(argv)


def _cfg_options(items):
    if not items:
        return None
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    return parser.parse_args(['--o', *items]).o


def window_and_stride(model, window=None, stride=None):
    test_cfg = getattr(model, 'test_cfg', None) or {}
    if test_cfg.get('mode') == 'slide':
        crop, step = test_cfg['crop_size'], test_cfg['stride']
        dw, ds = int(crop[0]), int(step[0])
    else:
        dw, ds = 512, 341
    window = window or dw
    stride = stride or (ds if window == dw else max(1, window * 2 // 3))
    if not 0 < stride <= window:
        raise ValueError(f'--stride must be in 1..window ({window}), got '
                         f'{stride}')
    return window, stride


def resolve_norm(model, info, band_norm_file=None, bands=None):
    """The :class:`BandNorm` and the 1-based scene bands to read."""
    meta = getattr(model, 'dataset_meta', None) or {}
    if band_norm_file:
        norm = geo.load_band_norm(band_norm_file)
        source = band_norm_file
    elif meta.get('band_norm'):
        norm = geo.BandNorm.from_dict(meta['band_norm'],
                                      'checkpoint dataset_meta.band_norm')
        source = 'the checkpoint (dataset_meta.band_norm)'
    else:
        norm, source = None, None
    if bands is None:
        bands = norm.bands if norm is not None else list(
            range(1, info.count + 1))
    bands = geo.check_bands(info, bands)
    if norm is None:
        if info.dtype != 'uint8':
            raise geo.RasterError(
                info.path, f'{info.dtype} scene and no band normalisation: '
                'pass --band-norm data_root/bands.json (written by '
                'tools/dataset_converters/rs_lvf.py), or use a checkpoint '
                'trained on such data (it stores it)')
        norm = geo.BandNorm.identity(len(bands))
        source = 'none (8-bit scene used as it is)'
    in_channels = getattr(getattr(model, 'backbone', None), 'in_channels',
                          None)
    if in_channels is not None and in_channels != len(bands):
        raise ValueError(f'the model takes {in_channels} band(s) but '
                         f'{len(bands)} are selected ({bands}); use '
                         '--bands or the config of this data')
    if norm.num_bands != len(bands):
        raise ValueError(f'--bands selects {len(bands)} band(s) but the '
                         f'normalisation from {source} is for '
                         f'{norm.num_bands}')
    if norm.dtype != info.dtype:
        raise geo.RasterError(
            info.path, f'{info.dtype} pixels but the normalisation from '
            f'{source} was computed on {norm.dtype} data')
    return norm, bands, source


def default_palette(n):
    rng = np.random.default_rng(42)
    return rng.integers(0, 256, (n, 3)).tolist()


class Preprocess:
    """The model's data preprocessor on a batch of windows: optional
    BGR->RGB for 3 bands, then ``(x - mean) / std``."""

    def __init__(self, model):
        pre = model.data_preprocessor
        self.swap = bool(getattr(pre, 'channel_conversion', False))
        self.normalize = bool(getattr(pre, '_enable_normalize', False))
        self.mean = pre.mean if self.normalize else None
        self.std = pre.std if self.normalize else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.swap and x.shape[1] == 3:
            x = x[:, [2, 1, 0]]
        if self.normalize:
            x = (x - self.mean[None]) / self.std[None]
        return x


class RowWriter:
    """Collects finished mask rows and writes them to the GeoTIFF in whole
    blocks of :data:`BLOCK` rows; samples the overview rows on the way."""

    def __init__(self, dst, width, height, overview_size):
        self.dst, self.width, self.height = dst, width, height
        self.pending, self.top = [], 0
        scale = max(1.0, max(width, height) / overview_size)
        oh, ow = max(1, round(height / scale)), max(1, round(width / scale))
        self.ov_rows = ((np.arange(oh) + 0.5) * height / oh).astype(int)
        self.ov_cols = ((np.arange(ow) + 0.5) * width / ow).astype(int)
        self.overview = np.zeros((oh, ow), np.uint8)
        self.done = 0

    def add(self, rows: np.ndarray) -> None:
        start = self.done
        self.done += rows.shape[0]
        sel = np.nonzero((self.ov_rows >= start)
                         & (self.ov_rows < self.done))[0]
        if sel.size:
            self.overview[sel] = rows[self.ov_rows[sel] - start][
                :, self.ov_cols]
        self.pending.append(rows)
        self._flush(final=False)

    def _flush(self, final):
        from rasterio.windows import Window
        n = sum(r.shape[0] for r in self.pending)
        full = n if final else n - n % BLOCK
        if full == 0:
            return
        data = np.concatenate(self.pending, axis=0)
        self.dst.write(data[None, :full],
                       window=Window(0, self.top, self.width, full))
        self.top += full
        self.pending = [data[full:]] if full < n else []

    def close(self):
        self._flush(final=True)
        assert self.top == self.height, (self.top, self.height)


@torch.no_grad()
def infer_scene(model, scene, out, band_norm_file=None, bands=None,
                window=None, stride=None, batch_size=4, overview=None,
                overview_size=1024, log=print):
    """Sliding-window inference over ``scene`` streamed into ``out``; see
    the module docstring. Returns a dict of what was done."""
    t0 = time.perf_counter()
    info = geo.raster_info(scene)
    geo.check_dtype(info)
    norm, bands, source = resolve_norm(model, info, band_norm_file, bands)
    window, stride = window_and_stride(model, window, stride)
    meta = getattr(model, 'dataset_meta', None) or {}
    num_classes = model.decode_head.num_classes
    palette = meta.get('palette') or default_palette(num_classes)
    pre = Preprocess(model)
    width, height = info.width, info.height
    wh, ww = min(window, height), min(window, width)
    ys = geo.window_starts(height, window, stride)
    xs = geo.window_starts(width, window, stride)
    out_channels = getattr(model, 'out_channels', num_classes)
    log(f'{scene}: {width}x{height}, {len(bands)} band(s) {bands} of '
        f'{info.dtype}, normalisation from {source}; {len(ys)}x{len(xs)} '
        f'windows of {ww}x{wh}, stride {stride}')
    profile = dict(driver='GTiff', width=width, height=height, count=1,
                   dtype='uint8', nodata=geo.IGNORE_INDEX, tiled=True,
                   blockxsize=BLOCK, blockysize=BLOCK, compress='deflate')
    if info.crs is not None:
        profile['crs'] = info.crs
    if info.transform is not None:
        from affine import Affine
        profile['transform'] = Affine(*info.transform)
    acc = np.zeros((out_channels, wh, width), np.float32)
    cnt = np.zeros((wh, width), np.float32)
    img_meta = dict(img_shape=(wh, ww), ori_shape=(wh, ww))
    with geo.atomic_geotiff(out, **profile) as dst:
        writer = RowWriter(dst, width, height, overview_size)
        for i, y in enumerate(ys):
            strip = geo.read_raster(scene, bands, (0, y, width, wh))
            for b in range(0, len(xs), batch_size):
                xb = xs[b:b + batch_size]
                crops = np.stack([strip[:, :, x:x + ww] for x in xb])
                x_in = torch.from_numpy(norm.apply(crops, channel_axis=1))
                logits = model.encode_decode(
                    pre(x_in), [dict(img_meta) for _ in xb]).float().numpy()
                for x, lg in zip(xb, logits):
                    acc[:, :, x:x + ww] += lg
                    cnt[:, x:x + ww] += 1
            k = (ys[i + 1] if i + 1 < len(ys) else height) - y
            done = acc[:, :k] / cnt[None, :k]
            if out_channels == 1:
                thr = getattr(model.decode_head, 'threshold', 0.3) or 0.3
                rows = (1 / (1 + np.exp(-done[0])) > thr).astype(np.uint8)
            else:
                rows = done.argmax(axis=0).astype(np.uint8)
            if info.nodata is not None:
                rows[np.all(strip[:, :k] == info.nodata, axis=0)] = \
                    geo.IGNORE_INDEX
            writer.add(rows)
            # slide the buffer up by k rows
            acc[:, :wh - k] = acc[:, k:].copy()
            acc[:, wh - k:] = 0
            cnt[:wh - k] = cnt[k:].copy()
            cnt[wh - k:] = 0
        writer.close()
        dst.write_colormap(1, {i: tuple(c) + (255, )
                               for i, c in enumerate(palette)})
    if overview is None:
        overview = osp.splitext(out)[0] + '.png'
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(palette)] = np.asarray(palette, np.uint8)
    write_image(overview, colours[writer.overview][..., ::-1])
    seconds = time.perf_counter() - t0
    log(f'wrote {out} and {overview} in {seconds:.1f} s')
    return dict(windows=len(ys) * len(xs), window=window, stride=stride,
                bands=bands, seconds=seconds, overview=overview)


def build(config, checkpoint, packed=None, cfg_options=None):
    from mmbhvit.apis import build_model
    model = build_model(config, checkpoint, strict=True,
                        cfg_options=cfg_options)
    if packed:
        from mmbhvit.deploy.mmseg_backend import use_packed_backbone
        use_packed_backbone(model, packed)
    return model


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.out.lower().endswith(('.tif', '.tiff')):
        raise SystemExit(f'ERROR: OUT must be a GeoTIFF path (.tif), got '
                         f'{args.out}')
    try:
        model = build(args.config, args.checkpoint, args.packed,
                      _cfg_options(args.cfg_options))
        infer_scene(model, args.scene, args.out, args.band_norm, args.bands,
                    args.window, args.stride, args.batch_size, args.overview,
                    args.overview_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'ERROR: {e}')


if __name__ == '__main__':
    main()
