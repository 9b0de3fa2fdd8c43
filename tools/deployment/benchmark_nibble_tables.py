# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Packed classifier with and without the MLP nibble tables, in one process.

The AVX2 kernels read an MLP expansion with 64-192 inputs (stages 1-2 of
BHViT-small/tiny) from a per-layer table of int8 rows (4 x cin x hidden
bytes, derived from the packed weights when the engine is built). This tool
builds two engines from one export, drops the tables of the second, checks
that both give the same logits and times them interleaved:

    python tools/deployment/benchmark_nibble_tables.py \\
        [--config configs/bhvit/bhvit-small_2xb128_in1k.py] \\
        [--threads 1] [--repeats 40] [--size 224]

The weights are a random initialisation made realistic by
``calibrate_random_model`` (as benchmark_binary.py without a checkpoint).
Prints the medians, the paired ratio (median over rounds of with / without)
and the tables' size.
"""
import argparse
import os.path as osp
import statistics
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))))

from mmbhvit.apis import build_model  # noqa: E402
from mmbhvit.deploy.blocks.proj import PackedFFN  # noqa: E402
from mmbhvit.deploy.engine import PackedClassifier  # noqa: E402
from mmbhvit.deploy.export import export_model  # noqa: E402
from mmbhvit.deploy.ops import load_extension, named_ops  # noqa: E402
from mmbhvit.testing.deploy import calibrate_random_model  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import (median_lines,  # noqa: E402
                                   time_interleaved)

DEFAULT_CONFIG = 'configs/bhvit/bhvit-small_2xb128_in1k.py'


def table_ops(engine):
    """The engine's MLPs that hold a nibble table."""
    return [op for _, op in named_ops(engine)
            if isinstance(op, PackedFFN) and op.expand_lut is not None
            and op.expand_lut.numel() > 0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=40)
    parser.add_argument('--warmup', type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ext = load_extension()
    if ext is None or ext.isa() != 'avx2':
        print('the nibble tables are read by the AVX2 kernels only; this '
              f'process runs {"no kernels" if ext is None else ext.isa()}',
              file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    model = build_model(args.config, None, student_only=True)
    torch.manual_seed(0)
    calibrate_random_model(model, (128, 128))
    packed = export_model(model.eval())
    with_tables = PackedClassifier(packed).eval()
    without = PackedClassifier(packed).eval()
    ops = table_ops(without)
    if not ops:
        print(f'no MLP of {args.config} takes a nibble table',
              file=sys.stderr)
        return 1
    size = sum(op.expand_lut.numel() for op in ops)
    for op in ops:  # before any forward: an MLP's plan binds its table
        op.expand_lut = None
    x = torch.randn(1, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(with_tables(x), without(x)):
            print('ERROR: the engines with and without the tables give '
                  'different logits', file=sys.stderr)
            return 1
        times = time_interleaved(
            {'with tables': lambda: with_tables(x),
             'without': lambda: without(x)},
            repeats=args.repeats, warmup=args.warmup)
    ratio = statistics.median(
        a / b for a, b in zip(times['with tables'], times['without']))
    print(f'CPU: {cpu_description()}, {args.threads} threads')
    print(f'{args.config}, batch 1, {args.size}x{args.size}: {len(ops)} '
          f'MLPs with a table, {size / 2**20:.2f} MiB; '
          f'{args.repeats} interleaved rounds (equal logits)')
    print('\n'.join(median_lines(times, 12)))
    print(f'  with / without, paired: {ratio:.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
