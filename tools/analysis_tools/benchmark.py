# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""CPU inference latency and throughput of a config: the binary model and
its full-precision counterpart side by side.

    python tools/analysis_tools/benchmark.py CONFIG [--batch 8]
        [--shape H W] [--repeats 10] [--warmup 2] [--threads T]
        [--json OUT]

Measures, in one process and interleaved, four cases: {binary model,
full-precision counterpart (``weight_bits=act_bits=32`` on the backbone)}
× {batch 1 (latency), batch N (throughput)}. Every round runs each case
once, in an order that is reversed every other round, so machine noise and
warm caches hit all cases alike (:mod:`mmbhvit.utils.timing`); the
binary/full-precision time ratio (per round, then the median) is the figure
to compare across machines.

Classification configs time ``model(x, mode='tensor')`` (backbone, neck,
head: the logits); segmentation configs time
``model.encode_decode(x, metas)`` (backbone, neck, decode head and the
resize of the logits to the input, mmseg's whole-image inference). Inputs
are random tensors already normalised (the data preprocessor is not
timed); the models run in eval mode under ``torch.inference_mode``.

Binary layers are emulated in floating point (sign + float convolution, the
weights binarized at every call): no bit-packed kernels are used, so the
ratio measures the emulation overhead, not the speed of a binary engine.
"""
import argparse
import functools
import os.path as osp
import statistics
import sys
from typing import Callable

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmbhvit.apis import build_model  # noqa: E402
from mmbhvit.utils.io import atomic_write_json  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import summarize, time_interleaved  # noqa: E402

MODELS = ('binary', 'full precision')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='CPU latency / throughput, binary vs full precision')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--batch', type=int, default=8,
                        help='batch size of the throughput runs')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        default=None,
                        help='input size (default 224 224 for classification,'
                        ' 512 512 for segmentation)')
    parser.add_argument('--repeats', type=int, default=10,
                        help='timed rounds (each runs every case once)')
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed rounds before the timed ones')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads (default: torch\'s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, metavar='OUT',
                        help='also write the results to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config (key=value)')
    args = parser.parse_args(argv)
    for name in ('batch', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1')
    if args.warmup < 0:
        parser.error('--warmup must be >= 0')
    return args


def make_forward(model, task: str, shape) -> Callable:
    """The timed call: logits of a classifier, full-size segmentation
    logits of a segmentor."""
    if task == 'classification':
        return lambda x: model(x, mode='tensor')
    meta = dict(img_shape=tuple(shape), ori_shape=tuple(shape),
                pad_shape=tuple(shape))
    return lambda x: model.encode_decode(x, [meta] * x.shape[0])


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    forwards, task = {}, None
    for name in MODELS:
        model = build_model(
            args.config, full_precision=name != 'binary',
            cfg_options=args.cfg_options, student_only=True)
        task = model.task
        shape = tuple(args.shape) if args.shape else (
            (224, 224) if task == 'classification' else (512, 512))
        forwards[name] = make_forward(model, task, shape)
    in_channels = getattr(model.backbone, 'in_channels', 3)
    inputs = {b: torch.randn(b, in_channels, *shape)
              for b in sorted({1, args.batch})}
    cases = {(m, b): functools.partial(forwards[m], inputs[b])
             for b in sorted({1, args.batch}) for m in MODELS}
    def progress(done: int, total: int) -> None:
        print(f'  round {done}/{total}'
              + (' (warm-up)' if done <= args.warmup else ''),
              file=sys.stderr, flush=True)

    print(f'timing {len(cases)} cases, {args.warmup} warm-up + '
          f'{args.repeats} interleaved rounds ...', file=sys.stderr,
          flush=True)
    with torch.inference_mode():
        times = time_interleaved(cases, args.repeats, args.warmup,
                                 on_round=progress)

    results = []
    for model_name, batch in cases:
        s = summarize(times[(model_name, batch)])
        results.append(dict(model=model_name, batch=batch,
                            times=times[(model_name, batch)], **s,
                            images_per_s=batch / s['median']))
    ratios = []
    for batch in sorted({1, args.batch}):
        b, f = times[('binary', batch)], times[('full precision', batch)]
        paired = [x / y for x, y in zip(b, f)]
        ratios.append(
            dict(batch=batch, paired_median=statistics.median(paired),
                 paired_min=min(paired), paired_max=max(paired),
                 of_medians=statistics.median(b) / statistics.median(f)))
    return dict(config=args.config, task=task, shape=list(shape),
                batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                threads=torch.get_num_threads(), torch=torch.__version__,
                cpu=cpu_description(), results=results, ratios=ratios)


def render(report: dict) -> str:
    h, w = report['shape']
    lines = [
        f'{osp.basename(report["config"])} ({report["task"]}), input {h}×{w}'
        f', CPU {report["cpu"]}, {report["threads"]} threads, torch '
        f'{report["torch"]}, {report["repeats"]} interleaved rounds after '
        f'{report["warmup"]} warm-up', '',
        '| model | batch | median (ms) | min (ms) | max (ms) | IQR (ms) | '
        'images/s |', '|---|---|---|---|---|---|---|'
    ]
    for r in report['results']:
        lines.append(f'| {r["model"]} | {r["batch"]} | '
                     f'{r["median"] * 1e3:.1f} | {r["min"] * 1e3:.1f} | '
                     f'{r["max"] * 1e3:.1f} | {r["iqr"] * 1e3:.1f} | '
                     f'{r["images_per_s"]:.2f} |')
    lines += [
        '', '| batch | time ratio binary / full precision: median of '
        'per-round ratios (min–max) | ratio of medians |', '|---|---|---|'
    ]
    for r in report['ratios']:
        lines.append(f'| {r["batch"]} | {r["paired_median"]:.2f} '
                     f'({r["paired_min"]:.2f}–{r["paired_max"]:.2f}) | '
                     f'{r["of_medians"]:.2f} |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print(render(report))
    if args.json:
        atomic_write_json(report, args.json, indent=2)
        print(f'\nresults written to {args.json}')
    return report


if __name__ == '__main__':
    main()
