# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Convert remote-sensing scenes + masks (RS-LVF or any such set) to the
mmseg layout, tiled, keeping the scenes' bit depth and georeference.

Input::

    SRC/images/NAME.{tif,tiff,png,jpg,jpeg}  scenes: GeoTIFF (8/16-bit,
                                             any band count) or PNG/JPEG
    SRC/masks/NAME.{png,tif,tiff}            one mask per scene: one band of
                                             class indices, or RGB colours
    CLASSES.json                             {"classes": [...],
                                              "palette": [[r, g, b], ...]}

``images/`` and ``masks/`` may each hold ``train/`` and ``val/`` folders:
that split is then kept; otherwise ``--val-ratio`` of the (sorted) scenes,
chosen with ``--seed``, go to ``val``. Splits are made by scene, never by
tile: overlapping tiles of one scene never end up on both sides.

Output (read by ``RSLVFDataset`` with the ``LoadRSImage`` transform)::

    OUT/classes.json                 the class list and palette
    OUT/bands.json                   per-band normalisation (see below)
    OUT/tiles.json                   tile index: scene + window of each tile
    OUT/img_dir/{train,val}/T.tif    GeoTIFF tiles: the selected bands, the
                                     scene's dtype, georeferenced
    OUT/ann_dir/{train,val}/T.png    uint8 class indices, 255 = ignore

Tiles: ``--tile`` pixels a side, overlapping by ``--overlap``, the last
row/column of tiles flush with the scene's edge (the grid of mmseg's
sliding-window inference); a tile is named ``NAME__r<row>_c<col>`` after
its top-left pixel, or ``NAME`` when the scene fits in one tile.
``--tile 0`` keeps whole scenes.

Normalisation (``bands.json``, used by ``LoadRSImage`` and
``tools/rs_inference.py``): each band is mapped linearly from its
``[low, high]`` onto ``[0, 255]`` (float, clipped). ``--norm percentile``
(the default for data that is not 8-bit) takes ``low``/``high`` as the
``--percentiles`` (2 and 98 by default) of that band over the training
scenes (read decimated, nodata pixels left out); ``--norm none`` (the
default for 8-bit data) keeps ``0..255``. The file also holds each band's
mean and std after the mapping, for the data preprocessor.

Masks: a one-band mask holds class indices (checked against the class
list; 255 = ignore); a three-band mask holds palette colours. A colour
missing from the palette is an error naming the file and the colour unless
listed with ``--ignore-colour`` (-> 255) or ``--unknown-to-ignore`` is
given. A mask whose size, CRS or geotransform differs from its scene's, a
pixel type other than uint8/uint16/int16/float32, or a band missing for
``--bands``, stops the conversion before anything is written, naming the
file.

Example::

    python tools/dataset_converters/rs_lvf.py /data/RS-LVF-raw data/rs_lvf \
        --classes /data/RS-LVF-raw/classes.json --bands 1,2,3,4 \
        --tile 512 --overlap 64 --nproc 8
"""
import argparse
import os
import os.path as osp
import sys

import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))))

from mmbhvit.datasets import geo  # noqa: E402
from mmbhvit.utils.io import atomic_write_json  # noqa: E402

IMG_EXTS = ('.tif', '.tiff', '.png', '.jpg', '.jpeg')
MASK_EXTS = ('.png', '.tif', '.tiff')


class ConversionError(ValueError):
    """Input that cannot be converted as it is (the message names the
    file)."""


def read_classes(path):
    from mmbhvit.datasets.rs_lvf import load_class_file
    return load_class_file(path)


def _find_mask(mdir, stem, img_file):
    for ext in MASK_EXTS:
        path = osp.join(mdir, stem + ext)
        if osp.isfile(path) and path != img_file:
            return path
    raise ConversionError(
        f'No mask for {img_file} (expected {osp.join(mdir, stem)}'
        f'{{{",".join(MASK_EXTS)}}}).')


def find_pairs(src):
    """``{split or None: [(name, img_path, mask_path)]}``."""
    img_root, mask_root = osp.join(src, 'images'), osp.join(src, 'masks')
    for d in (img_root, mask_root):
        if not osp.isdir(d):
            raise ConversionError(f'{d} does not exist: expected SRC/images '
                                  'and SRC/masks (see the docstring).')
    splits = [s for s in ('train', 'val')
              if osp.isdir(osp.join(img_root, s))]
    groups = {}
    for split in (splits or [None]):
        idir = osp.join(img_root, split) if split else img_root
        mdir = osp.join(mask_root, split) if split else mask_root
        pairs, seen = [], {}
        for fname in sorted(os.listdir(idir)):
            stem, ext = osp.splitext(fname)
            if ext.lower() not in IMG_EXTS:
                continue
            if stem in seen:
                raise ConversionError(
                    f'{idir} holds two scenes named {stem!r} ({seen[stem]} '
                    f'and {fname}); names must be unique.')
            seen[stem] = fname
            img = osp.join(idir, fname)
            pairs.append((stem, img, _find_mask(mdir, stem, img)))
        if not pairs:
            raise ConversionError(f'No scenes ({", ".join(IMG_EXTS)}) found '
                                  f'in {idir}.')
        groups[split] = pairs
    return groups


def parse_colour(text):
    try:
        rgb = tuple(int(v) for v in text.split(','))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise argparse.ArgumentTypeError(f'expected R,G,B, got {text!r}')
    return rgb


def _same_transform(a, b, tol=1e-9):
    return all(abs(x - y) <= tol * max(1.0, abs(x), abs(y))
               for x, y in zip(a, b))


def check_pair(img_path, mask_path, bands, index_masks):
    """Headers of a scene and its mask, checked against each other;
    returns ``(scene info, mask mode)``."""
    info = geo.raster_info(img_path)
    geo.check_dtype(info)
    geo.check_bands(info, bands)
    mask = geo.raster_info(mask_path)
    if (mask.width, mask.height) != (info.width, info.height):
        raise ConversionError(
            f'{mask_path} is {mask.width}x{mask.height} but its scene '
            f'{img_path} is {info.width}x{info.height} (width x height).')
    if mask.crs and info.crs:
        from rasterio.crs import CRS
        if CRS.from_wkt(mask.crs) != CRS.from_wkt(info.crs):
            raise ConversionError(
                f'{mask_path}: its CRS ({CRS.from_wkt(mask.crs).to_string()}'
                f') differs from the CRS of its scene {img_path} '
                f'({CRS.from_wkt(info.crs).to_string()}); reproject one of '
                'them (gdalwarp) first.')
    if mask.transform and info.transform and mask.crs and info.crs and \
            not _same_transform(mask.transform, info.transform):
        raise ConversionError(
            f'{mask_path}: its geotransform {mask.transform} differs from '
            f'the one of its scene {img_path} {info.transform}: the mask '
            'does not cover the same ground pixel for pixel.')
    if mask.dtype not in ('uint8', 'uint16'):
        raise ConversionError(f'{mask_path}: masks must be uint8 (or uint16 '
                              f'class indices), got {mask.dtype}.')
    if index_masks or mask.count == 1:
        if mask.count != 1:
            raise ConversionError(f'{mask_path}: --index-masks expects one '
                                  f'band of class indices, got '
                                  f'{mask.count} bands.')
        mode = 'index'
    elif mask.count in (3, 4) and mask.dtype == 'uint8':
        mode = 'colour'  # a 4th (alpha) band is not used
    else:
        raise ConversionError(
            f'{mask_path}: {mask.count} bands of {mask.dtype}; a mask is one '
            'band of class indices or an 8-bit RGB colour mask.')
    return info, mode


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert remote-sensing scenes + masks (GeoTIFF, PNG, '
        'JPEG) to tiled RS-LVF mmseg layout (img_dir/, ann_dir/, '
        'classes.json, bands.json, tiles.json).')
    parser.add_argument('src', help='folder with images/ and masks/')
    parser.add_argument('out', help='output data_root')
    parser.add_argument('--classes', required=True,
                        help='classes.json (classes + palette) or .txt')
    parser.add_argument('--bands', type=geo.parse_bands, default=None,
                        help='1-based bands to keep, in this order, e.g. '
                        '"1,2,3,4" or "4,3,2" (default: all)')
    parser.add_argument('--tile', type=int, default=512,
                        help='tile side in pixels; 0 keeps whole scenes')
    parser.add_argument('--overlap', type=int, default=64,
                        help='pixels shared by neighbouring tiles')
    parser.add_argument('--norm', choices=('auto', 'percentile', 'none'),
                        default='auto',
                        help='per-band normalisation (auto: none for 8-bit '
                        'scenes, percentile otherwise)')
    parser.add_argument('--percentiles', type=float, nargs=2,
                        default=(2.0, 98.0), metavar=('LOW', 'HIGH'))
    parser.add_argument('--nproc', type=int, default=1,
                        help='worker processes writing tiles')
    parser.add_argument('--val-ratio', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--ignore-colour', type=parse_colour, action='append',
                        default=[], help='R,G,B mapped to 255 (repeatable)')
    parser.add_argument('--unknown-to-ignore', action='store_true',
                        help='map colours missing from the palette to 255')
    parser.add_argument('--index-masks', action='store_true',
                        help='masks must hold class indices (one band)')
    return parser.parse_args(argv)


def split_groups(groups, val_ratio, seed):
    if None in groups:
        pairs = groups.pop(None)
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_val = int(round(len(pairs) * val_ratio))
        val = set(order[:n_val].tolist())
        groups['train'] = [p for i, p in enumerate(pairs) if i not in val]
        groups['val'] = [p for i, p in enumerate(pairs) if i in val]
    return groups


def convert(args):
    meta = read_classes(args.classes)
    classes, palette = meta['classes'], meta.get('palette')
    groups = split_groups(find_pairs(args.src), args.val_ratio, args.seed)
    if args.tile < 0 or (args.tile and not 0 <= args.overlap < args.tile):
        raise ConversionError(f'--tile must be >= 0 and --overlap in 0..'
                              f'tile-1, got {args.tile} / {args.overlap}.')

    # 1. every header checked before anything is written
    scenes = {}
    for split, pairs in groups.items():
        for stem, img_path, mask_path in pairs:
            info, mode = check_pair(img_path, mask_path, args.bands,
                                    args.index_masks)
            if mode == 'colour' and palette is None:
                raise ConversionError(
                    f'{mask_path} is a colour mask but {args.classes} has no '
                    'palette to decode it.')
            scenes[stem] = (split, info, mode, mask_path)
    infos = [s[1] for s in scenes.values()]
    first = infos[0]
    bands = geo.check_bands(first, args.bands)
    for info in infos:
        if info.dtype != first.dtype or len(
                geo.check_bands(info, args.bands)) != len(bands):
            raise ConversionError(
                f'{info.path} is {info.count} band(s) of {info.dtype} but '
                f'{first.path} is {first.count} of {first.dtype}: all '
                'scenes must share the pixel type and band count (select '
                'common bands with --bands).')

    # 2. per-band normalisation from the training scenes
    method = args.norm
    if method == 'auto':
        method = 'none' if first.dtype == 'uint8' else 'percentile'
    train = [s[1] for s in scenes.values() if s[0] == 'train'] or infos
    norm = geo.compute_band_norm(train, bands, method, args.percentiles)

    # 3. tiles
    tasks, index = [], []
    for stem, (split, info, mode, mask_path) in scenes.items():
        windows = geo.tile_windows(info.width, info.height, args.tile,
                                   args.overlap)
        for window in windows:
            name = stem if len(windows) == 1 else \
                f'{stem}__r{window[1]:05d}_c{window[0]:05d}'
            tasks.append(dict(
                name=name, img_path=info.path, mask_path=mask_path,
                bands=bands, window=window, tiled=len(windows) > 1,
                crs=info.crs, transform=info.transform, nodata=info.nodata,
                mask_mode=mode, num_classes=len(classes), palette=palette,
                ignore_colours=args.ignore_colour,
                unknown=args.unknown_to_ignore,
                img_out=osp.join(args.out, 'img_dir', split, name + '.tif'),
                ann_out=osp.join(args.out, 'ann_dir', split, name + '.png')))
            index.append(dict(name=name, split=split, scene=stem,
                              window=list(window)))
    for split in groups:
        os.makedirs(osp.join(args.out, 'img_dir', split), exist_ok=True)
        os.makedirs(osp.join(args.out, 'ann_dir', split), exist_ok=True)
    print(f'{len(scenes)} scenes -> {len(tasks)} tiles '
          f'({args.nproc} process(es))')
    from mmengine.utils import track_parallel_progress, track_progress
    if args.nproc > 1:
        track_parallel_progress(geo.convert_tile, tasks, args.nproc,
                                chunksize=4)
    else:
        track_progress(geo.convert_tile, tasks)

    # 4. metadata last: a data_root with a bands.json is complete
    out_meta = dict(classes=list(classes))
    if palette is not None:
        out_meta['palette'] = [list(p) for p in palette]
    atomic_write_json(out_meta, osp.join(args.out, 'classes.json'), indent=1)
    atomic_write_json(
        dict(tile=args.tile, overlap=args.overlap,
             scenes={stem: dict(split=s[0], path=s[1].path,
                                width=s[1].width, height=s[1].height,
                                crs=s[1].crs, transform=s[1].transform)
                     for stem, s in scenes.items()},
             tiles=index), osp.join(args.out, geo.TILES_FILE))
    atomic_write_json(norm.to_dict(), osp.join(args.out, geo.BANDS_FILE),
                      indent=1)
    counts = {s: sum(t['split'] == s for t in index) for s in groups}
    print(', '.join(f'{s}: {n} tiles' for s, n in counts.items()))
    print(f'Wrote {args.out} ({len(classes)} classes, {len(bands)} bands '
          f'{first.dtype}, normalisation {method}: low {norm.low}, high '
          f'{norm.high}; after it mean {norm.mean}, std {norm.std})')
    return norm


def main(argv=None):
    args = parse_args(argv)
    try:
        convert(args)
    except (ConversionError, geo.RasterError, ValueError) as e:
        raise SystemExit(f'ERROR: {e}')


if __name__ == '__main__':
    main()
