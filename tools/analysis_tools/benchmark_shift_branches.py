# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Training cost of the shift branches
(:class:`~mmbhvit.models.backbones.bhvit.ShiftBranches`), forward +
backward, in the forms the model can run:

* ``WrapDepthwiseConv``: what eager CPU training runs
  (:func:`mmbhvit.models.layout.wrap_depthwise_conv`: its own backward,
  the kernel gradient only on the taps the branches use);
* the plain circular depthwise convolution under autograd, with each
  circular padding: ``F.pad(..., mode='circular')`` (what runs with the
  CPU training paths switched off, and on other devices), slices +
  concatenation, and a gather of wrapped indices (what a traced /
  exported model runs, :func:`mmbhvit.models.layout.wrap_pad`);
* the rolls of :meth:`ShiftBranches.forward_rolls` (the direct form).

    python tools/analysis_tools/benchmark_shift_branches.py \\
        [--batch 8] [--channels 64] [--size 56 56] [--repeats 20] [--threads 2]

Default: the stage-1 size of a 224 input (64 channels, 56 x 56, batch 8).
The forms are timed interleaved (:func:`mmbhvit.utils.timing.time_interleaved`)
after checking that the outputs agree; it prints how far each form's
gradients are from the plain ``F.pad`` form's (other summation orders, so
they differ by float rounding).
"""
import argparse
import contextlib
import os.path as osp
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))))

from mmbhvit.models import layout  # noqa: E402
from mmbhvit.models.backbones import bhvit as bhvit_module  # noqa: E402
from mmbhvit.models.binary import fused  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import summarize, time_interleaved  # noqa: E402


def slices_pad(x, pad):
    x = torch.cat([x[..., -pad:, :], x, x[..., :pad, :]], dim=-2)
    return torch.cat([x[..., -pad:], x, x[..., :pad]], dim=-1)


def gather_pad(x, pad):
    h, w = x.shape[-2:]
    rows = (torch.arange(h + 2 * pad) - pad) % h
    cols = (torch.arange(w + 2 * pad) - pad) % w
    return x.index_select(-2, rows).index_select(-1, cols)


@contextlib.contextmanager
def plain(pad_fn):
    """The plain expression (training paths off), padded by ``pad_fn``."""
    previous = layout.wrap_pad
    layout.wrap_pad = pad_fn
    try:
        with fused.fused_kernels(False):
            yield
    finally:
        layout.wrap_pad = previous


@contextlib.contextmanager
def rolls(m):
    with m.unfused():
        yield


BASE = 'plain, F.pad circular'


def forms(m):
    """name -> a context manager factory selecting that form."""
    return {
        'WrapDepthwiseConv': contextlib.nullcontext,
        BASE: lambda: plain(
            lambda x, pad: F.pad(x, (pad, ) * 4, mode='circular')),
        'plain, slices + cat': lambda: plain(slices_pad),
        'plain, gather (traced)': lambda: plain(gather_pad),
        'rolls': lambda: rolls(m),
    }


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
    cases = forms(m)

    def step(name):
        xx = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        with cases[name]():
            y = m(xx)
        y.square().sum().backward()
        return [y.detach(), xx.grad] + [p.grad for p in m.parameters()]

    results = {name: step(name) for name in cases}
    base = results[BASE]
    for name, res in results.items():
        if not torch.allclose(res[0], base[0], rtol=1e-5, atol=1e-5):
            print(f'ERROR: {name} gives other outputs than {BASE}',
                  file=sys.stderr)
            return 1
    times = time_interleaved(
        {name: (lambda name=name: step(name)) for name in cases},
        repeats=args.repeats, warmup=args.warmup)
    print(f'CPU: {cpu_description()}, {torch.get_num_threads()} threads')
    print(f'ShiftBranches (radii 1, 2) forward + backward, input '
          f'{args.batch}x{args.channels}x{args.size[0]}x{args.size[1]}, '
          f'{args.repeats} interleaved rounds')
    ref = summarize(times[BASE])['median']
    for name, t in times.items():
        s = summarize(t)
        out = (results[name][0] - base[0]).abs().max().item()
        grad = max(((a - b).abs().max() / b.abs().max()).item()
                   for a, b in zip(results[name][1:], base[1:]))
        print(f"  {name:<24} median {1e3 * s['median']:8.2f} ms "
              f"(q1 {1e3 * s['q1']:.2f}, q3 {1e3 * s['q3']:.2f}), "
              f"x{s['median'] / ref:.3f}; max |out - plain| {out:.2g}, "
              f"max relative |grad - plain| {grad:.2g}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
