# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Run a command on this x86-64 CPU as if it were AVX2-only.

    python tools/deployment/as_avx2_cpu.py -- \\
        python tools/deployment/benchmark_binary.py CONFIG --threads 1 2

Issues 11 and 12 set speed goals for AVX2-only CPUs (e.g. AMD Zen 3). On an
AVX-512 machine, environment variables limit PyTorch, MKL, oneDNN
(OpenVINO) and mmbhvit's kernels, but not ONNX Runtime, whose MLAS picks
AVX-512 from CPUID with no switch: measured here, an ONNX Runtime 3×3
convolution ran at 99 GFLOP/s per core with those variables set, above
the 68 GFLOP/s an AVX2 core can reach at this clock (docs/deployment.md,
"An AVX2-only CPU on an AVX-512 machine").

This launcher instead hides the AVX-512 family, AVX-VNNI and AMX from the
CPUID instruction itself (``avx2_cpu/avx2_cpu.c``, preloaded into the
command: Linux's CPUID faulting, ``arch_prctl(ARCH_SET_CPUID)``), so every
library in the process and its children chooses its AVX2 kernels on its
own. It builds the library with the C compiler (``$CC``, else ``cc``)
into ``build/avx2_cpu/`` the first time, and refuses to run (exit status
2, saying why) where CPUID faulting is missing: not x86-64 Linux, or no
``cpuid_fault`` in /proc/cpuinfo. The benchmarks' CPU line then reads
"SIMD AVX2 (CPUID view of an AVX-512 CPU)".

Not emulated: the core itself (its ports, caches and clock stay this
CPU's); and Python's ``faulthandler`` would take the SIGSEGV that CPUID
now raises, so ``PYTHONFAULTHANDLER`` is removed from the command's
environment.
"""
import argparse
import os
import os.path as osp
import platform
import shutil
import subprocess
import sys
from typing import Optional

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
SOURCE = osp.join(HERE, 'avx2_cpu', 'avx2_cpu.c')
LIBRARY_NAME = 'libmmbhvit_avx2_cpu.so'
DEFAULT_BUILD_DIR = osp.join(ROOT, 'build', 'avx2_cpu')


def unavailable_reason(cpuinfo: Optional[str] = None,
                       machine: Optional[str] = None,
                       system: Optional[str] = None) -> Optional[str]:
    """Why CPUID cannot be masked here (None when it can). ``cpuinfo``:
    the text of /proc/cpuinfo (read when None)."""
    machine = machine or platform.machine()
    system = system or platform.system()
    if system != 'Linux' or machine not in ('x86_64', 'AMD64'):
        return (f'CPUID faulting needs x86-64 Linux, this is {system} '
                f'{machine}')
    if cpuinfo is None:
        try:
            with open('/proc/cpuinfo') as f:
                cpuinfo = f.read()
        except OSError as e:
            return f'cannot read /proc/cpuinfo ({e})'
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(':')
        if key.strip() == 'flags':
            flags = set(value.split())
            break
    if 'cpuid_fault' not in flags:
        return ('this CPU (or its hypervisor) does not offer CPUID faulting '
                '(no cpuid_fault flag in /proc/cpuinfo)')
    if 'avx2' not in flags:
        return 'this CPU has no AVX2 to keep'
    return None


def build_library(build_dir: str = DEFAULT_BUILD_DIR) -> str:
    """The preload library, compiled from :data:`SOURCE` when it is missing
    or older than the source; returns its path."""
    out = osp.join(build_dir, LIBRARY_NAME)
    if osp.exists(out) and osp.getmtime(out) >= osp.getmtime(SOURCE):
        return out
    cc = os.environ.get('CC') or 'cc'
    if shutil.which(cc) is None:
        raise RuntimeError(f'no C compiler {cc!r} to build {SOURCE} (set CC '
                           'or install gcc)')
    os.makedirs(build_dir, exist_ok=True)
    tmp = f'{out}.{os.getpid()}.tmp'
    cmd = [cc, '-O2', '-Wall', '-shared', '-fPIC', SOURCE, '-o', tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'building the AVX2-view library failed: '
                           f'{" ".join(cmd)}\n{done.stderr}')
    os.replace(tmp, out)  # whole file or none
    return out


def command_env(library: str, env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's) with ``library`` preloaded first
    and Python's faulthandler off."""
    env = dict(os.environ if env is None else env)
    preload = [p for p in env.get('LD_PRELOAD', '').split() if p]
    env['LD_PRELOAD'] = ' '.join([library] +
                                 [p for p in preload if p != library])
    env.pop('PYTHONFAULTHANDLER', None)
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Run a command with AVX-512, AVX-VNNI and AMX hidden '
        'from CPUID (an AVX2-only view of this x86-64 CPU)')
    parser.add_argument('--build-dir', default=DEFAULT_BUILD_DIR,
                        help='where the preload library is built')
    parser.add_argument('--print-library', action='store_true',
                        help='build the library, print its path and exit')
    parser.add_argument('command', nargs=argparse.REMAINDER,
                        help='the command (after --)')
    args = parser.parse_args(argv)
    if args.command and args.command[0] == '--':
        args.command = args.command[1:]
    if not args.command and not args.print_library:
        parser.error('give the command to run after --')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = unavailable_reason()
    if why is not None:
        print(f'as_avx2_cpu: {why}; nothing was run', file=sys.stderr)
        return 2
    try:
        library = build_library(args.build_dir)
    except RuntimeError as e:
        print(f'as_avx2_cpu: {e}', file=sys.stderr)
        return 2
    if args.print_library:
        print(library)
        return 0
    env = command_env(library)
    try:
        os.execvpe(args.command[0], args.command, env)
    except OSError as e:
        print(f'as_avx2_cpu: cannot run {args.command[0]!r}: {e}',
              file=sys.stderr)
        return 127


if __name__ == '__main__':
    sys.exit(main())
