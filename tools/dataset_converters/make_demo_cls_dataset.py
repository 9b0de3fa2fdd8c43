# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Generate the "demo textures" classification dataset (no downloads).

Five texture classes, each drawn with two random colours, a random scale,
phase and a small random rotation, plus pixel noise:

* ``blobs``    - thresholded smooth noise;
* ``checker``  - a checkerboard;
* ``dots``     - a grid of discs;
* ``hstripes`` / ``vstripes`` - horizontal / vertical stripes.

Colours carry no class information. The classes are easy enough for the
reduced BHViT to beat chance clearly within a CPU minute, which is all the
demo has to show. The output uses the ImageNet folder layout read by
mmpretrain's ``ImageNet`` / ``CustomDataset``::

    OUT_DIR/train/<class>/<class>_000000.png
    OUT_DIR/val/<class>/<class>_000000.png
    OUT_DIR/meta/classes.txt          one class name per line

File names are unique across classes, as ImageNet's are (tools that name
their outputs after the image, e.g. ``tools/test.py --show-dir``, rely on
it). The files only depend on the arguments (same seed -> same files), not
on ``--nproc`` (threads that encode and write the images).

Example::

    python tools/dataset_converters/make_demo_cls_dataset.py data/demo_cls \
        --num-train 80 --num-val 20 --size 64 --seed 0
"""
import argparse
import os
import os.path as osp

import cv2
import numpy as np

from mmbhvit.utils.io import atomic_write, write_image
from mmbhvit.utils.progress import produce_consume

# Sorted: readers of the folder layout number the classes in folder order.
CLASSES = ('blobs', 'checker', 'dots', 'hstripes', 'vstripes')
MAX_TILT = np.deg2rad(15)


def _coords(size: int, rng):
    """Pixel coordinates rotated by a small random angle, shifted randomly,
    in units of the image side."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = rng.uniform(-MAX_TILT, MAX_TILT)
    u = np.cos(a) * xx - np.sin(a) * yy + rng.uniform(0, 1)
    v = np.sin(a) * xx + np.cos(a) * yy + rng.uniform(0, 1)
    return u, v


def texture(name: str, size: int, rng) -> np.ndarray:
    """A float32 ``size x size`` map in [0, 1] of texture ``name``."""
    u, v = _coords(size, rng)
    if name in ('hstripes', 'vstripes'):
        freq = rng.uniform(3, 8)
        along = v if name == 'hstripes' else u
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * along)
    elif name == 'checker':
        cells = rng.uniform(3, 7)
        t = ((np.floor(u * cells) + np.floor(v * cells)) % 2)
    elif name == 'dots':
        cells = rng.uniform(3, 7)
        du, dv = (u * cells) % 1 - 0.5, (v * cells) % 1 - 0.5
        t = (np.sqrt(du**2 + dv**2) < rng.uniform(0.2, 0.35))
    elif name == 'blobs':
        cells = int(rng.integers(3, 6))
        coarse = rng.random((cells, cells)).astype(np.float32)
        smooth = cv2.resize(coarse, (size, size),
                            interpolation=cv2.INTER_CUBIC)
        t = smooth > np.median(smooth)
    else:
        raise ValueError(f'unknown texture {name!r}')
    return t.astype(np.float32)


def make_image(name: str, size: int, rng) -> np.ndarray:
    """An RGB uint8 image of texture ``name``."""
    t = texture(name, size, rng)[..., None]
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    if np.abs(c0 - c1).sum() < 150:  # keep the texture visible
        c1 = 255 - c0
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _images(out_dir: str, num_train: int, num_val: int, size: int,
            seed: int):
    """``(path, RGB image)`` of every image, in file order; one random
    stream per split."""
    for offset, (split, num) in enumerate((('train', num_train),
                                           ('val', num_val))):
        rng = np.random.default_rng([seed, offset])
        for name in CLASSES:
            folder = osp.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(num):
                yield (osp.join(folder, f'{name}_{i:06d}.png'),
                       make_image(name, size, rng))


def _write(item) -> None:
    path, img = item
    write_image(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def make_dataset(out_dir: str, num_train: int = 80, num_val: int = 20,
                 size: int = 64, seed: int = 0, nproc: int = 1,
                 progress: bool = False) -> dict:
    """Write the dataset; return ``{split: number of images}``.

    The images are drawn in order (one random stream per split); ``nproc``
    threads encode and write them, so the files are the same whatever
    ``nproc``. ``progress``: draw a progress bar (stderr).
    """
    counts = {'train': num_train * len(CLASSES),
              'val': num_val * len(CLASSES)}
    produce_consume(_images(out_dir, num_train, num_val, size, seed), _write,
                    total=sum(counts.values()), nproc=nproc,
                    progress=progress)
    os.makedirs(osp.join(out_dir, 'meta'), exist_ok=True)
    with atomic_write(osp.join(out_dir, 'meta', 'classes.txt'), 'w') as f:
        f.write('\n'.join(CLASSES) + '\n')
    return counts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate the synthetic "demo textures" classification '
        'dataset in the ImageNet folder layout')
    parser.add_argument('out_dir', help='output folder, e.g. data/demo_cls')
    parser.add_argument('--num-train', type=int, default=80,
                        help='training images per class')
    parser.add_argument('--num-val', type=int, default=20,
                        help='validation images per class')
    parser.add_argument('--size', type=int, default=64, help='image side')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--nproc', type=int, default=1,
                        help='threads encoding and writing the images (the '
                        'files do not depend on it)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.nproc < 1:
        raise SystemExit(f'--nproc must be at least 1, got {args.nproc}.')
    counts = make_dataset(args.out_dir, args.num_train, args.num_val,
                          args.size, args.seed, nproc=args.nproc,
                          progress=True)
    print(f'wrote {counts} images of {len(CLASSES)} classes '
          f'{list(CLASSES)} to {args.out_dir}')


if __name__ == '__main__':
    main()
