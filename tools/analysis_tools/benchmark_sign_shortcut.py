# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Backward of a binary projection's input, read by the sign and by the
residual shortcut, in the two forms the model can run:

* ``one pass``: :class:`~mmbhvit.models.binary.ShiftedSignShortcut`
  (``sign_shortcut_backward``: window term plus the shortcut's gradient,
  divided by the group size, in one pass);
* ``apart``: the two consumers separately, as autograd runs them without
  it: the sign's window (``sign_ste_backward``), the mean's backward
  (``grad / ratio`` broadcast over each group) and the sum of the two.

    python tools/analysis_tools/benchmark_sign_shortcut.py \\
        [--batch 8] [--channels 512] [--size 56 56] [--ratio 8] \\
        [--repeats 15] [--threads 2] [--default-malloc]

Default: the input of a stage-1 MLP reduce layer of BHViT-small at 224
(512 channels, 56 x 56, batch 8, groups of 8 channels). The forms are timed
interleaved (:func:`mmbhvit.utils.timing.time_interleaved`) after checking
that their input gradients are equal.
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))))

from mmbhvit.models.binary import fused  # noqa: E402
from mmbhvit.utils.malloc import keep_freed_memory  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import (median_lines,  # noqa: E402
                                   time_interleaved)


def forms(ops, x, bias, grad, grad_shortcut, ratio):
    """name -> a callable giving the input gradient."""
    n, c = x.shape[:2]

    def apart():
        grad_x = ops.sign_ste_backward(grad, x, bias)[0]
        if ratio == 1:
            return grad_x + grad_shortcut
        spread = grad_shortcut.unsqueeze(2).expand(
            n, c // ratio, ratio, *x.shape[2:]) / ratio
        return grad_x + spread.reshape(x.shape)

    def one_pass():
        return ops.sign_shortcut_backward(grad, x, bias, grad_shortcut,
                                          ratio)[0]

    return {'one pass': one_pass, 'apart': apart}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--channels', type=int, default=512)
    parser.add_argument('--size', type=int, nargs=2, default=(56, 56),
                        metavar=('H', 'W'))
    parser.add_argument('--ratio', type=int, default=8,
                        help='channels per group of the mean shortcut (1: '
                        'the identity)')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--default-malloc', action='store_true',
                        help="leave glibc's allocator settings as they are "
                        '(by default freed memory is kept, as tools/train.py '
                        'does: mmbhvit.utils.malloc.keep_freed_memory)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = fused.ops_for(torch.zeros(1, 1, 1, 1))
    if ops is None:
        print(f'the one-pass kernels cannot run: '
              f'{fused.unavailable_reason() or "switched off"}',
              file=sys.stderr)
        return 1
    if args.ratio < 1 or args.channels % args.ratio:
        print(f'--ratio must divide --channels ({args.channels}), got '
              f'{args.ratio}', file=sys.stderr)
        return 1
    if not args.default_malloc:  # as tools/train.py: no fresh pages
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, args.channels, *args.size)
    x, grad = torch.randn(shape), torch.randn(shape)
    bias = torch.randn(args.channels) * 0.1
    grad_shortcut = torch.randn(args.batch, args.channels // args.ratio,
                                *args.size)
    cases = forms(ops, x, bias, grad, grad_shortcut, args.ratio)
    first, second = (f() for f in cases.values())
    if not torch.equal(first, second):
        print('ERROR: the two forms give different gradients',
              file=sys.stderr)
        return 1
    times = time_interleaved(cases, repeats=args.repeats,
                             warmup=args.warmup)
    print(f'CPU: {cpu_description()}, {torch.get_num_threads()} threads')
    print(f'input gradient of sign(x + b) and a '
          f'{"mean" if args.ratio > 1 else "identity"} shortcut, x '
          f'{"x".join(map(str, shape))}, ratio {args.ratio}, '
          f'{args.repeats} interleaved rounds (equal gradients)')
    print('\n'.join(median_lines(times, 10)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
