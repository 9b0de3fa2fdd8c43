# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""What verifying a packed file costs when it is loaded (format v2).

Exports the model of CONFIG (random weights made realistic, or
``--checkpoint``) to a temporary file, then times, interleaved and
repeated (:mod:`mmbhvit.utils.timing`): the bare ``torch.load`` of the file, :func:`load_packed` (the
same load plus every check: digests, manifest, spec) and building the
engine from the verified dict (shape checks against the spec, kernel
layouts). Prints the CPU model and SIMD level with the medians.

Example::

    python tools/deployment/benchmark_packed_load.py \
        configs/bhvit/bhvit-small_2xb128_in1k.py --repeats 7
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mmbhvit.apis import build_model  # noqa: E402
from mmbhvit.deploy.engine import load_engine  # noqa: E402
from mmbhvit.deploy.export import (export_model, load_packed,  # noqa: E402
                                   save_packed)
from mmbhvit.testing.deploy import calibrate_random_model  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import summarize, time_interleaved  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', nargs='?',
                   default=osp.join(ROOT, 'configs/bhvit/'
                                    'bhvit-small_2xb128_in1k.py'))
    p.add_argument('--checkpoint', default=None)
    p.add_argument('--repeats', type=int, default=7)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = build_model(args.config, args.checkpoint, student_only=True)
    if args.checkpoint is None:
        torch.manual_seed(0)
        calibrate_random_model(model, (128, 128))
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'model.packed.pth')
        save_packed(export_model(model), path)
        verified = load_packed(path)
        times = time_interleaved({
            'torch.load': lambda: torch.load(path, map_location='cpu',
                                             weights_only=True),
            'load_packed (load + verify)': lambda: load_packed(path),
            'engine build (verified dict)': lambda: load_engine(verified),
        }, args.repeats, warmup=1)
        size = os.path.getsize(path)
    print(f'CPU: {cpu_description()}; torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads')
    print(f'{osp.basename(args.config)}: packed file {size / 1e6:.1f} MB, '
          f"{len(verified['tensors'])} tensors; median of {args.repeats}")
    medians = {n: summarize(t)['median'] for n, t in times.items()}
    for name, median in medians.items():
        print(f'  {name:30s} {median * 1e3:8.1f} ms')
    extra = medians['load_packed (load + verify)'] - medians['torch.load']
    print(f'  verification alone             {extra * 1e3:8.1f} ms')
    return medians


if __name__ == '__main__':
    main()
