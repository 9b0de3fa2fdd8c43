# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Cost of the per-file data check of ``tools/train.py`` / ``tools/test.py``.

    python tools/analysis_tools/benchmark_data_check.py --num 20000 \
        --workers 1,2,4,8,16 --repeats 3

Generates ``--num`` small PNG image/annotation pairs (``--size`` pixels
square) in a temporary folder, in the RS-LVF / demo-shapes layout
(``img_dir/train``, ``ann_dir/train``, ``classes.json``), and times:

* listing the split (the dataset's own ``load_data_list``);
* reading every header (:func:`mmbhvit.utils.data_check.scan_samples`) with
  each number of ``--workers`` threads, page cache warm (files just
  written) and, where the OS allows it, cold (``posix_fadvise(DONTNEED)``
  on every file first: data pages dropped; directory and inode caches stay
  warm, so a real cold disk or a network file system is slower still);
* the complete check ``check_data_config`` on a config of that split;
* for comparison, Pillow's lazy ``Image.open(path).size`` on every file,
  one thread.

Prints the machine (CPU model from ``/proc/cpuinfo`` and its SIMD level),
the medians (min-max) of ``--repeats`` runs, the rate per file and what it
means for ADE20K (20,210 training pairs) and ImageNet (1.28 M images).
``--json FILE`` also writes the numbers.
"""
import argparse
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import mmbhvit  # noqa: E402,F401
import mmbhvit.datasets  # noqa: E402,F401  (registers RSLVFDataset)
from mmbhvit.utils import data_check  # noqa: E402
from mmbhvit.utils.data_check import (build_lazy_dataset,  # noqa: E402
                                      check_data_config, default_workers,
                                      scan_samples)
from mmbhvit.utils.io import atomic_write, atomic_write_json  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description, cpu_info  # noqa: E402
from mmbhvit.utils.timing import summarize  # noqa: E402

ADE20K_TRAIN_PAIRS = 20210
IMAGENET_TRAIN_IMAGES = 1281167


def make_dataset(root: str, num: int, size: int, seed: int = 0) -> None:
    """``num`` PNG image/annotation pairs (a few distinct contents,
    cycled: the check reads headers, content does not matter)."""
    img_dir = osp.join(root, 'img_dir', 'train')
    ann_dir = osp.join(root, 'ann_dir', 'train')
    os.makedirs(img_dir)
    os.makedirs(ann_dir)
    atomic_write_json(dict(classes=['background', 'thing']),
                      osp.join(root, 'classes.json'))
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(16):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        label = (rng.random((size, size)) > 0.5).astype(np.uint8)
        images.append(cv2.imencode('.png', img)[1].tobytes())
        labels.append(cv2.imencode('.png', label)[1].tobytes())
    for i in range(num):
        with atomic_write(osp.join(img_dir, f'{i:07d}.png'), sync=False) as f:
            f.write(images[i % 16])
        with atomic_write(osp.join(ann_dir, f'{i:07d}.png'), sync=False) as f:
            f.write(labels[i % 16])


def dataset_cfg(root: str) -> dict:
    return dict(
        type='RSLVFDataset', data_root=root,
        data_prefix=dict(img_path='img_dir/train',
                         seg_map_path='ann_dir/train'),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations')])


def drop_page_cache(paths) -> bool:
    """Ask the kernel to drop the cached data pages of ``paths``; False
    when the OS has no ``posix_fadvise``."""
    if not hasattr(os, 'posix_fadvise'):
        return False
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def timed(fn, repeats: int, before=None) -> list:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times) -> str:
    s = summarize(times)
    return f"{s['median']:7.3f} s  ({s['min']:.3f}-{s['max']:.3f})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num', type=int, default=20000,
                        help='image/annotation pairs (default 20000)')
    parser.add_argument('--size', type=int, default=64,
                        help='image side in pixels (default 64)')
    parser.add_argument('--workers', default='1,2,4,8,16',
                        help='thread counts to time, comma-separated')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--no-cold', action='store_true',
                        help='skip the runs with the page cache dropped')
    parser.add_argument('--json', help='also write the numbers to this file')
    parser.add_argument('--tmp-dir', default=None,
                        help='where to generate the files (default: the '
                        'system temporary folder)')
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(',')]

    from mmengine.config import Config
    from PIL import Image

    cpu = cpu_info()
    print(f'CPU: {cpu_description()}')
    print(f'Python {platform.python_version()}, default threads of the '
          f'check: {default_workers()}')
    result = dict(cpu=cpu, num_pairs=args.num, size=args.size, runs={})
    with tempfile.TemporaryDirectory(dir=args.tmp_dir,
                                     prefix='data_check_') as root:
        start = time.perf_counter()
        make_dataset(root, args.num, args.size)
        print(f'Generated {args.num} {args.size}x{args.size} PNG pairs in '
              f'{root} ({time.perf_counter() - start:.1f} s)')
        ds_cfg = dataset_cfg(root)
        dataset = build_lazy_dataset(ds_cfg, 'mmseg')
        samples = []

        def listing():
            samples[:] = [(i['img_path'], i['seg_map_path'])
                          for i in dataset.load_data_list()]

        runs = result['runs']
        runs['listing'] = timed(listing, args.repeats)
        files = [p for pair in samples for p in pair]
        print(f'\n{2 * len(samples)} files, {args.repeats} repeats, median '
              '(min-max):')
        print(f'  list the split (load_data_list)        '
              f'{summary(runs["listing"])}')

        def scan(n):
            problems = scan_samples(samples, 'the benchmark', workers=n)
            assert not problems, problems[:3]

        cold_ok = not args.no_cold and hasattr(os, 'posix_fadvise')
        log_min = data_check.LOG_MIN_SAMPLES
        data_check.LOG_MIN_SAMPLES = float('inf')  # no log lines in loops
        for n in workers:
            runs[f'headers_warm_{n}'] = timed(lambda: scan(n), args.repeats)
            print(f'  read headers, {n:2d} threads, warm cache  '
                  f'{summary(runs[f"headers_warm_{n}"])}')
            if cold_ok:
                runs[f'headers_cold_{n}'] = timed(
                    lambda: scan(n), args.repeats,
                    before=lambda: drop_page_cache(files))
                print(f'  read headers, {n:2d} threads, cold pages  '
                      f'{summary(runs[f"headers_cold_{n}"])}')

        def pillow():
            for path in files:
                with Image.open(path) as img:
                    img.size

        runs['pillow_open_1'] = timed(pillow, args.repeats)
        print(f'  Pillow Image.open().size, 1 thread     '
              f'{summary(runs["pillow_open_1"])}')

        cfg = Config(dict(train_dataloader=dict(dataset=ds_cfg)))
        data_check.LOG_MIN_SAMPLES = log_min  # as users see it

        def full():
            check_data_config(cfg, phases=('train', ))

        runs['check_data_config'] = timed(full, args.repeats)
        print(f'  check_data_config (build, list, read)  '
              f'{summary(runs["check_data_config"])}')

    full_s = statistics.median(runs['check_data_config'])
    per_file = full_s / (2 * args.num)
    result['per_file_us'] = per_file * 1e6
    best_cold = min((statistics.median(v) for k, v in runs.items()
                     if k.startswith('headers_cold')), default=None)
    ade = 2 * ADE20K_TRAIN_PAIRS * per_file
    print(f'\nComplete check: {per_file * 1e6:.1f} us per file (default '
          f'threads, warm cache). At that rate: ADE20K training split '
          f'({ADE20K_TRAIN_PAIRS} pairs) {ade:.1f} s, ImageNet training '
          f'split ({IMAGENET_TRAIN_IMAGES} images) '
          f'{IMAGENET_TRAIN_IMAGES * per_file:.0f} s.')
    if best_cold is not None:
        print(f'Cold data pages, best thread count: '
              f'{best_cold / (2 * args.num) * 1e6:.1f} us per file (local '
              'disk; a network file system can be much slower).')
    if args.json:
        atomic_write_json(result, args.json, indent=1)
    return result


if __name__ == '__main__':
    main()
