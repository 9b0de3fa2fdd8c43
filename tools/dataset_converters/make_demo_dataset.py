# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Generate the "demo shapes" segmentation dataset (no downloads).

Textured backgrounds (gradients, stripes, smooth noise, checkerboards) with
3-6 randomly placed, scaled, rotated and coloured shapes per image:
circles, squares, triangles and rings. Shapes overlap (later ones occlude
earlier ones, in the image and in the labels) and may leave the frame.
Each shape class has its own hue range (jittered in hue, saturation and
brightness, sometimes shaded), while the backgrounds are weakly saturated
textures of any hue: colour helps, but the network still has to separate
shapes from textured, occluded surroundings, and circles from rings. This
keeps the task learnable by a binary network trained from scratch in a
few CPU minutes. The output uses the mmseg / RS-LVF layout read by
``RSLVFDataset``::

    OUT_DIR/classes.json            {"classes": [...], "palette": [...]}
    OUT_DIR/img_dir/{train,val}/000000.png   RGB images
    OUT_DIR/ann_dir/{train,val}/000000.png   uint8 class indices

The output only depends on the arguments (same seed -> same files), not on
``--nproc`` (threads that encode and write the images; the samples are
drawn in order in the main thread).

Example::

    python tools/dataset_converters/make_demo_dataset.py data/demo_shapes \
        --num-train 400 --num-val 60 --size 96 --seed 0 --nproc 4
"""
import argparse
import colorsys
import os
import os.path as osp

import cv2
import numpy as np

from mmbhvit.utils.io import atomic_write_json, write_image
from mmbhvit.utils.progress import produce_consume

CLASSES = ('background', 'circle', 'square', 'triangle', 'ring')
PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25],
           [0, 130, 200]]


#: Hue (degrees) around which each shape class is coloured, +-HUE_JITTER.
CLASS_HUES = {1: 0., 2: 120., 3: 220., 4: 50.}
HUE_JITTER = 15.


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _background_colour(rng):
    """A weakly saturated colour of any hue."""
    return _hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.2, 0.9))


def _class_colour(rng, cls):
    hue = (CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER)) / 360
    return _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0))


def _background(rng, size):
    """A float32 ``size x size x 3`` texture in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = _background_colour(rng), _background_colour(rng)
    kind = rng.integers(0, 4)
    if kind == 0:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == 1:  # sinusoidal stripes
        a = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq *
                               (np.cos(a) * xx + np.sin(a) * yy))
    elif kind == 2:  # smooth noise
        coarse = rng.random((int(rng.integers(3, 9)), ) * 2).astype(
            np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0, 1)
    else:  # checkerboard
        cells = int(rng.integers(3, 9))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(
            np.float32)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return img


def _polygon(cx, cy, r, n, angle):
    a = angle + np.arange(n) * 2 * np.pi / n
    pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)
    return np.round(pts).astype(np.int32)


def _shape_mask(rng, cls, size):
    """Binary mask of one shape of class ``cls`` (1..4)."""
    mask = np.zeros((size, size), np.uint8)
    r = rng.uniform(0.1, 0.25) * size
    cx, cy = rng.uniform(-0.05, 1.05, size=2) * size
    angle = rng.uniform(0, 2 * np.pi)
    if cls == 1:  # circle
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
    elif cls == 2:  # square (rotated)
        cv2.fillPoly(mask, [_polygon(cx, cy, r * 1.2, 4, angle)], 1)
    elif cls == 3:  # triangle (rotated)
        cv2.fillPoly(mask, [_polygon(cx, cy, r * 1.3, 3, angle)], 1)
    else:  # ring: a disc with a hole showing what lies beneath
        thickness = max(2, int(r * rng.uniform(0.3, 0.5)))
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, thickness)
    return mask.astype(bool)


def make_sample(rng, size):
    """One ``(image uint8 HxWx3 RGB, label uint8 HxW)`` pair."""
    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(1, len(CLASSES)))
        mask = _shape_mask(rng, cls, size)
        if mask.sum() < 4:
            continue
        colour = _class_colour(rng, cls)
        shade = rng.uniform(0.75, 1.0, size=(size, size, 1)).astype(
            np.float32) if rng.random() < 0.5 else 1.0
        img[mask] = (colour * shade)[mask] if np.ndim(shade) else colour
        label[mask] = cls
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _samples(out_dir, num_train, num_val, size, seed):
    """``(image path, annotation path, image, label)`` of every sample, in
    file order, drawn from one random stream."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(out_dir, 'img_dir', split)
        ann_dir = osp.join(out_dir, 'ann_dir', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(count):
            img, label = make_sample(rng, size)
            name = f'{i:06d}.png'
            yield (osp.join(img_dir, name), osp.join(ann_dir, name), img,
                   label)


def _write_sample(sample) -> None:
    img_path, ann_path, img, label = sample
    write_image(img_path, img[..., ::-1])  # RGB->BGR
    write_image(ann_path, label)


def make_dataset(out_dir, num_train=400, num_val=60, size=96, seed=0,
                 nproc=1, progress=False):
    """Write the dataset to ``out_dir`` and return the class list.

    The samples are drawn in order from one random stream (``seed``);
    ``nproc`` threads encode and write them, so the files are the same
    whatever ``nproc``. ``progress``: draw a progress bar (stderr).
    """
    produce_consume(
        _samples(out_dir, num_train, num_val, size, seed), _write_sample,
        total=num_train + num_val, nproc=nproc, progress=progress)
    atomic_write_json(dict(classes=list(CLASSES), palette=PALETTE),
                      osp.join(out_dir, 'classes.json'), indent=1)
    return list(CLASSES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate the synthetic "demo shapes" segmentation '
        'dataset (mmseg layout, classes.json metadata).')
    parser.add_argument('out_dir', help='output folder')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=60)
    parser.add_argument('--size', type=int, default=96,
                        help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--nproc', type=int, default=1,
                        help='threads encoding and writing the images (the '
                        'files do not depend on it)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.size < 32:
        raise SystemExit('--size must be at least 32 (BHViT needs 32x32).')
    if args.nproc < 1:
        raise SystemExit(f'--nproc must be at least 1, got {args.nproc}.')
    classes = make_dataset(args.out_dir, args.num_train, args.num_val,
                           args.size, args.seed, nproc=args.nproc,
                           progress=True)
    print(f'Wrote {args.num_train} train + {args.num_val} val images '
          f'({args.size}x{args.size}, classes {classes}) to {args.out_dir}')


if __name__ == '__main__':
    main()
