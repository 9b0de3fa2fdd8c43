# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Convert RS-LVF (or any image + colour-mask set) to the mmseg layout.

Input::

    SRC/images/NAME.EXT      RGB images (any format OpenCV reads)
    SRC/masks/NAME.png       colour masks: one RGB colour per class
    CLASSES.json             {"classes": [...], "palette": [[r, g, b], ...]}

``images/`` and ``masks/`` may each hold ``train/`` and ``val/`` folders:
that split is then kept; otherwise ``--val-ratio`` of the (sorted) names,
chosen with ``--seed``, go to ``val``.

Output (read by ``RSLVFDataset``)::

    OUT/classes.json                  copy of the class list and palette
    OUT/img_dir/{train,val}/NAME.png  the images, as 8-bit RGB PNG
    OUT/ann_dir/{train,val}/NAME.png  uint8 class indices, 255 = ignore

A mask colour that is not in the palette is an error naming the file and
the colour, unless it is listed with ``--ignore-colour`` (-> 255) or
``--unknown-to-ignore`` is given. With ``--index-masks`` the masks already
hold class indices; they are only checked and copied.

Example::

    python tools/dataset_converters/rs_lvf.py /data/RS-LVF-raw data/rs_lvf \
        --classes /data/RS-LVF-raw/classes.json --ignore-colour 255,255,255
"""
import argparse
import os
import os.path as osp
import sys

import cv2
import numpy as np

from mmbhvit.utils.io import atomic_write_json, write_image

IMG_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


def read_classes(path):
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
        osp.abspath(__file__)))))
    from mmbhvit.datasets.rs_lvf import load_class_file
    return load_class_file(path)


def colour_to_index(mask_rgb, palette, ignore_colours=(), unknown=False,
                    name='mask'):
    """Map an ``H x W x 3`` RGB mask to class indices (uint8)."""
    codes = (mask_rgb[..., 0].astype(np.int64) << 16) | (
        mask_rgb[..., 1].astype(np.int64) << 8) | mask_rgb[..., 2]
    lookup = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in
              enumerate(palette)}
    for r, g, b in ignore_colours:
        lookup.setdefault((r << 16) | (g << 8) | b, 255)
    values, inverse = np.unique(codes, return_inverse=True)
    mapped = np.empty(len(values), np.uint8)
    bad = []
    for k, code in enumerate(values):
        if int(code) in lookup:
            mapped[k] = lookup[int(code)]
        elif unknown:
            mapped[k] = 255
        else:
            bad.append(((int(code) >> 16) & 255, (int(code) >> 8) & 255,
                        int(code) & 255))
    if bad:
        raise ValueError(
            f'{name}: colour(s) {bad[:10]} are not in the palette '
            f'{[list(p) for p in palette]}; add them with --ignore-colour '
            'R,G,B or pass --unknown-to-ignore.')
    return mapped[inverse.reshape(codes.shape)]


def find_pairs(src):
    """``{split or None: [(name, img_path, mask_path)]}``."""
    img_root, mask_root = osp.join(src, 'images'), osp.join(src, 'masks')
    for d in (img_root, mask_root):
        if not osp.isdir(d):
            raise SystemExit(f'{d} does not exist: expected SRC/images and '
                             'SRC/masks (see the docstring).')
    splits = [s for s in ('train', 'val')
              if osp.isdir(osp.join(img_root, s))]
    groups = {}
    for split in (splits or [None]):
        idir = osp.join(img_root, split) if split else img_root
        mdir = osp.join(mask_root, split) if split else mask_root
        pairs = []
        for fname in sorted(os.listdir(idir)):
            stem, ext = osp.splitext(fname)
            if ext.lower() not in IMG_EXTS:
                continue
            mask = osp.join(mdir, stem + '.png')
            if not osp.isfile(mask):
                raise SystemExit(f'No mask for {osp.join(idir, fname)} '
                                 f'(expected {mask}).')
            pairs.append((stem, osp.join(idir, fname), mask))
        if not pairs:
            raise SystemExit(f'No images found in {idir}.')
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert images + colour masks to the RS-LVF mmseg '
        'layout (img_dir/, ann_dir/, classes.json).')
    parser.add_argument('src', help='folder with images/ and masks/')
    parser.add_argument('out', help='output data_root')
    parser.add_argument('--classes', required=True,
                        help='classes.json (classes + palette) or .txt')
    parser.add_argument('--val-ratio', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--ignore-colour', type=parse_colour, action='append',
                        default=[], help='R,G,B mapped to 255 (repeatable)')
    parser.add_argument('--unknown-to-ignore', action='store_true',
                        help='map colours missing from the palette to 255')
    parser.add_argument('--index-masks', action='store_true',
                        help='masks already hold class indices')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    meta = read_classes(args.classes)
    classes, palette = meta['classes'], meta.get('palette')
    if palette is None and not args.index_masks:
        raise SystemExit(f'{args.classes} has no palette: colour masks '
                         'cannot be decoded (or pass --index-masks).')
    groups = find_pairs(args.src)
    if None in groups:
        pairs = groups.pop(None)
        order = np.random.default_rng(args.seed).permutation(len(pairs))
        n_val = int(round(len(pairs) * args.val_ratio))
        val = set(order[:n_val].tolist())
        groups['train'] = [p for i, p in enumerate(pairs) if i not in val]
        groups['val'] = [p for i, p in enumerate(pairs) if i in val]
    for split, pairs in groups.items():
        img_dir = osp.join(args.out, 'img_dir', split)
        ann_dir = osp.join(args.out, 'ann_dir', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for stem, img_path, mask_path in pairs:
            img = cv2.imread(img_path, cv2.IMREAD_COLOR)
            if img is None:
                raise SystemExit(f'Cannot read image {img_path}.')
            if args.index_masks:
                label = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
                if label is None or label.ndim != 2:
                    raise SystemExit(f'{mask_path}: expected a single-channel '
                                     'index mask.')
                bad = np.setdiff1d(np.unique(label),
                                   list(range(len(classes))) + [255])
                if bad.size:
                    raise SystemExit(f'{mask_path}: values {bad.tolist()} '
                                     f'outside 0..{len(classes) - 1} / 255.')
                label = label.astype(np.uint8)
            else:
                mask = cv2.imread(mask_path, cv2.IMREAD_COLOR)
                if mask is None:
                    raise SystemExit(f'Cannot read mask {mask_path}.')
                try:
                    label = colour_to_index(mask[..., ::-1], palette,
                                            args.ignore_colour,
                                            args.unknown_to_ignore,
                                            mask_path)
                except ValueError as e:
                    raise SystemExit(str(e))
            if label.shape != img.shape[:2]:
                raise SystemExit(f'{mask_path} is {label.shape} but '
                                 f'{img_path} is {img.shape[:2]}.')
            write_image(osp.join(img_dir, stem + '.png'), img)
            write_image(osp.join(ann_dir, stem + '.png'), label)
        print(f'{split}: {len(pairs)} images')
    out_meta = dict(classes=list(classes))
    if palette is not None:
        out_meta['palette'] = [list(p) for p in palette]
    atomic_write_json(out_meta, osp.join(args.out, 'classes.json'), indent=1)
    print(f'Wrote {args.out} ({len(classes)} classes)')


if __name__ == '__main__':
    main()
