# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Check mmbhvit against outputs of the official BHViT implementation.

    python tools/analysis_tools/check_parity.py FIXTURE_DIR [FIXTURE_DIR ...]

Each FIXTURE_DIR is in the format of shared/fixtures/bhvit_reference (any
depths and flag combinations). Prints the max abs and max relative
difference of the eval logits, each stage output, the train logits and loss
and the gradient of every parameter; exits 1 if any exceeds the tolerance.
"""
import argparse
import sys
import warnings

from mmbhvit.testing.parity import DEFAULT_TOLERANCE, run_parity


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('fixtures', nargs='+')
    parser.add_argument('--tol', type=float, default=DEFAULT_TOLERANCE,
                        help='max relative difference (default %(default)g)')
    parser.add_argument('--all-grads', action='store_true',
                        help='print every gradient row, not only a summary')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore', category=UserWarning)
    failed = False
    for index, fixture in enumerate(args.fixtures, 1):
        # progress on stderr (a fixture takes seconds): stdout stays the
        # report
        print(f'[{index}/{len(args.fixtures)}] checking {fixture} ...',
              file=sys.stderr, flush=True)
        try:
            result = run_parity(fixture, tolerance=args.tol)
        except (FileNotFoundError, ValueError) as err:
            print(f'error: {err}', file=sys.stderr)
            failed = True
            continue
        print(f'== {fixture}')
        print(f'{"tensor":<70} {"max abs":>11} {"max rel":>11}')
        grads = [r for r in result.rows if r[0].startswith('grad ')]
        for name, diff, rel in result.rows:
            if name.startswith('grad ') and not args.all_grads:
                continue
            print(f'{name:<70} {diff:11.3e} {rel:11.3e}')
        if grads:
            worst = max(grads, key=lambda r: r[2])
            print(f'{"grads: " + str(len(grads)) + " parameters, worst " + worst[0][5:]:<70}'
                  f' {worst[1]:11.3e} {worst[2]:11.3e}')
        for name, diff, rel in result.failures:
            print(f'FAIL {name}: rel {rel:.3e} > {args.tol:g}')
        print('PASS' if result.ok else 'FAIL')
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
