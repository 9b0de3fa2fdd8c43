# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Which packed-bit kernels this machine runs, and how each op computes::

    python -m mmbhvit.deploy.info

Prints the CPU, whether training uses the compiled sign/STE and RPReLU
kernels (:mod:`mmbhvit.models.binary.fused`), whether the C++ kernels (``mmbhvit._binary_ops``) load
(if not: why, and how to build them), every kernel set with the reason it
cannot run here, the set in use (the best one, or the environment variable
``MMBHVIT_KERNELS``) and the kernel path of each op with that set.
"""
import os
import sys
from typing import List


def kernel_report() -> List[str]:
    """The lines :func:`main` prints."""
    from ..utils.sysinfo import cpu_description
    from .ops import BUILD_HINT, extension_error, load_extension

    lines = [f'CPU: {cpu_description()}', _training_line()]
    ext = load_extension()
    if ext is None:
        lines += [
            f'C++ kernels: NOT available ({extension_error()})',
            'mmbhvit.deploy runs the pure-PyTorch fallback for every op.',
            f'To build them: {BUILD_HINT}.'
        ]
        return lines
    lines.append(f'C++ kernels: {ext.__file__}')
    lines.append('kernel sets (preferred first):')
    for name, why in ext.kernel_sets():
        lines.append(f'  {name:8s} {"runs here" if not why else why}')
    forced = os.environ.get('MMBHVIT_KERNELS')
    chosen = ext.isa()
    how = (f'MMBHVIT_KERNELS={forced}' if forced == chosen else
           'the best set this CPU runs' +
           (f' (MMBHVIT_KERNELS={forced} cannot run here)' if forced else ''))
    lines.append(f'in use: {chosen} ({how})')
    lines.append('kernel path per op:')
    for op, path in ext.kernel_paths():
        lines.append(f'  {op}: {path}')
    return lines


def _training_line() -> str:
    """Whether training uses the one-pass sign/STE and RPReLU kernels."""
    from ..models.binary import fused
    why = fused.unavailable_reason()
    if why is not None:
        return f'training kernels (sign/STE, RPReLU): NOT available ({why})'
    if not fused.enabled():
        return ('training kernels (sign/STE, RPReLU): switched off '
                '(MMBHVIT_FUSED_KERNELS=0)')
    return 'training kernels (sign/STE, RPReLU): in use on CPU'


def main(argv=None) -> int:
    print('\n'.join(kernel_report()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
