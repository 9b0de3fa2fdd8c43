# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Training cost of three circular paddings in the shift branches
(:class:`~mmbhvit.models.backbones.bhvit.ShiftBranches`, fused form):

* ``F.pad(..., mode='circular')``: what the eager model runs (exported to
  ONNX as a ``Pad`` of mode ``wrap``, which OpenVINO rejects);
* slices + concatenation;
* a gather of wrapped indices: what a traced / exported model runs
  (:func:`mmbhvit.models.layout.wrap_pad`).

    python tools/analysis_tools/benchmark_shift_padding.py \
        [--batch 8] [--channels 64] [--size 56 56] [--repeats 20] [--threads 2]

Times a whole ShiftBranches forward + backward (stage-1 size of a 224 input
by default: 64 channels, 56 x 56, batch 8) with each padding, interleaved
(:func:`mmbhvit.utils.timing.time_interleaved`), after checking that the
outputs are bit-identical; it prints how far the gradients are from
``F.pad``'s (the backward passes add the wrapped copies' gradients in
another order, so they differ by float rounding).
"""
import argparse
import contextlib
import os.path as osp
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))))

from mmbhvit.models.backbones import bhvit as bhvit_module  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import summarize, time_interleaved  # noqa: E402


def circular_pad(x, pad):
    return F.pad(x, (pad, ) * 4, mode='circular')


def slices_pad(x, pad):
    x = torch.cat([x[..., -pad:, :], x, x[..., :pad, :]], dim=-2)
    return torch.cat([x[..., -pad:], x, x[..., :pad]], dim=-1)


def gather_pad(x, pad):
    h, w = x.shape[-2:]
    rows = (torch.arange(h + 2 * pad) - pad) % h
    cols = (torch.arange(w + 2 * pad) - pad) % w
    return x.index_select(-2, rows).index_select(-1, cols)


PADDINGS = {'F.pad circular': circular_pad, 'slices + cat': slices_pad,
            'gather (traced)': gather_pad}


@contextlib.contextmanager
def padding(fn):
    """ShiftBranches.forward pads with ``fn`` inside the block."""
    previous = bhvit_module.wrap_pad
    bhvit_module.wrap_pad = fn
    try:
        yield
    finally:
        bhvit_module.wrap_pad = previous


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--size', type=int, nargs=2, default=(56, 56),
                        metavar=('H', 'W'))
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = bhvit_module.ShiftBranches(args.channels, (1, 2)).train()
    for p in m.parameters():
        p.data.uniform_(-0.2, 0.2)
    x = torch.randn(args.batch, args.channels, *args.size)

    def step(fn):
        xx = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        with padding(fn):
            y = m(xx)
        y.square().sum().backward()
        return [y.detach(), xx.grad] + [p.grad for p in m.parameters()]

    results = {name: step(fn) for name, fn in PADDINGS.items()}
    base = results['F.pad circular']
    for name, res in results.items():
        if not torch.equal(res[0], base[0]):
            print(f'ERROR: {name} gives other outputs than F.pad circular',
                  file=sys.stderr)
            return 1
    times = time_interleaved(
        {name: (lambda fn=fn: step(fn)) for name, fn in PADDINGS.items()},
        repeats=args.repeats, warmup=args.warmup)
    print(f'CPU: {cpu_description()}, {torch.get_num_threads()} threads')
    print(f'ShiftBranches (radii 1, 2) forward + backward, input '
          f'{args.batch}x{args.channels}x{args.size[0]}x{args.size[1]}, '
          f'{args.repeats} interleaved rounds; outputs bit-identical')
    ref = summarize(times['F.pad circular'])['median']
    for name, t in times.items():
        s = summarize(t)
        grad = max((a - b).abs().max().item()
                   for a, b in zip(results[name][1:], base[1:]))
        print(f"  {name:<16} median {1e3 * s['median']:8.2f} ms "
              f"(q1 {1e3 * s['q1']:.2f}, q3 {1e3 * s['q3']:.2f}), "
              f"x{s['median'] / ref:.3f}; max |grad - F.pad's| {grad:.2g}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
