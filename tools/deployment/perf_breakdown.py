# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Where an unprofiled packed-engine forward spends its time, by CPU
samples: Linux ``perf`` samples the process (``cpu-clock``, no hardware
counters needed) while it runs forwards, and each sample's function is
put in one of four groups:

* **binary kernels**: the popcount kernels (1x1 projections and MLPs,
  MSGDC, patch merging, the attention products, packing of signs, and
  the float epilogues inside them);
* **float kernels (engine)**: the engine's own float kernels (stem, shift
  branches, attention tokens);
* **float kernels (ATen / MKL)**: library float work (LayerNorm, the
  head's linear layer, softmax in float64, ...);
* **everything else**: the Python interpreter, argument conversion and
  checks in the bindings, memory allocation, libc, the OS.

Unlike ``benchmark_binary.py --profile`` (hooks around every op, which
also makes blocks run op by op), nothing is added to the forward, so it
measures the path users run. Needs ``perf`` (Debian: ``apt-get install
linux-perf``) and permission to attach to the process (root, or
``kernel.perf_event_paranoid`` <= 1).

Example::

    MMBHVIT_KERNELS=avx2 python tools/deployment/perf_breakdown.py \\
        configs/bhvit/bhvit-small_2xb128_in1k.py --threads 1 --seconds 15
"""
import argparse
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Dict, List, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

GROUPS = ('binary kernels', 'float kernels (engine)',
          'float kernels (ATen / MKL)', 'everything else')

#: the float kernels' functions (the last component of a C++ symbol,
#: template arguments dropped): those defined in csrc/core/ops/shift.h,
#: stem.h and tokens.h (a test keeps the two lists equal); every other
#: function in a kernel unit's namespace is part of a binary op
FLOAT_FUNCS = {
    'shift', 'shift_run', 'shift_pixels', 'shift_channel', 'wrap_index',
    'stem', 'stem_block', 'stem_channel', 'stem_row', 'stem_row_channel',
    'stem_epilogue', 'stem_epilogue_step', 'gelu_rational', 'splat',
    'window_tokens', 'merged_tokens', 'merged_means', 'untokens',
    'pool_pixel'}
FLOAT_HEADERS = ('shift.h', 'stem.h', 'tokens.h')
#: float work in the bindings (csrc/binary_ops.cpp): the next block norm
#: written after a projection
BINDING_FLOAT_FUNCS = {'affine_rows'}
#: library symbols that are float work (the rest of those libraries is
#: dispatch and tensor bookkeeping)
LIBRARY_FLOAT = re.compile(
    r'mkl_(?!serv)|dnnl|Vectorized|vec::|RowwiseMoments|LayerNorm|softmax'
    r'|gemm|gemv|at::native::(?!.*(empty|resize|copy_impl|fill_|view'
    r'|transpose|as_strided|reshape|permute|alias))')
ENGINE_SO = '_binary_ops'
#: the kernel units' namespaces (csrc/kernels/kernels_*.cpp): what is
#: outside them in the extension is the bindings (checks, tensor set-up)
KERNEL_NS = re.compile(r'^mmbhvit::(avx2|avx512|popcnt|generic|neon)::')


def function_name(symbol: str) -> str:
    """``ns::(anonymous namespace)::proj_tile8<1, true>`` → ``proj_tile8``
    (the name after the last ``::`` outside template arguments)."""
    depth, out = 0, []
    for ch in symbol:
        if ch == '<':
            depth += 1
        elif ch == '>':
            depth -= 1
        elif depth == 0:
            out.append(ch)
    name = ''.join(out)
    cut = name.rfind('::')
    name = name[cut + 2:] if cut >= 0 else name
    return name.split('(')[0].strip()


def classify(dso: str, symbol: str) -> str:
    """The group (one of :data:`GROUPS`) of a sample in ``symbol`` of the
    shared object ``dso``."""
    if ENGINE_SO in dso and symbol.startswith('mmbhvit::'):
        name = function_name(symbol)
        if KERNEL_NS.match(symbol):
            return GROUPS[1] if name in FLOAT_FUNCS else GROUPS[0]
        if name in BINDING_FLOAT_FUNCS:
            return GROUPS[1]
        return GROUPS[3]  # the bindings: checks, tensor set-up
    if 'libtorch_cpu' in dso and LIBRARY_FLOAT.search(symbol):
        return GROUPS[2]
    return GROUPS[3]


def parse_report(text: str) -> List[Tuple[float, str, str]]:
    """``(percent, dso, symbol)`` rows of ``perf report --no-children
    --sort dso,symbol --stdio -g none`` output."""
    rows = []
    for line in text.splitlines():
        m = re.match(r'\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)'
                     r'(\s+-)*\s*$', line)  # empty columns print as '-'
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3)))
    return rows


def breakdown(rows) -> Tuple[Dict[str, float], Dict[str, list]]:
    """Percent per group, and each group's ``(percent, symbol)`` rows
    largest first."""
    share: Dict[str, float] = {g: 0.0 for g in GROUPS}
    members: Dict[str, list] = defaultdict(list)
    for pct, dso, sym in rows:
        g = classify(dso, sym)
        share[g] += pct
        members[g].append((pct, sym if g != GROUPS[3] else
                           f'{osp.basename(dso)}: {sym}'))
    for g in members:
        members[g].sort(reverse=True)
    return share, dict(members)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', nargs='?',
                   default='configs/bhvit/bhvit-small_2xb128_in1k.py',
                   help='mmpretrain classifier config (default: '
                   'BHViT-small), or an mmseg segmentor config (its '
                   'backbone is sampled)')
    p.add_argument('--checkpoint', help='trained checkpoint (default: '
                   'random, calibrated)')
    p.add_argument('--size', type=int,
                   help='input size (default 224 for classifiers, 512 for '
                   'segmentors)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seconds', type=float, default=15.,
                   help='sampling time (default 15)')
    p.add_argument('--frequency', type=int, default=4000,
                   help='samples per second (default 4000)')
    p.add_argument('--top', type=int, default=6,
                   help='functions listed per group (default 6)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    perf = shutil.which('perf')
    if perf is None:
        print('perf_breakdown needs Linux perf (Debian: apt-get install '
              'linux-perf); not found in PATH', file=sys.stderr)
        return 1
    import torch

    from mmbhvit.apis import build_model, task_of
    from mmbhvit.deploy.engine import PackedBHViT, PackedClassifier
    from mmbhvit.deploy.export import export_model
    from mmbhvit.deploy.ops import load_extension
    from mmbhvit.testing.deploy import calibrate_random_model
    from mmbhvit.utils.sysinfo import cpu_description
    torch.set_num_threads(args.threads)
    classifier = task_of(args.config) == 'classification'
    size = args.size or (224 if classifier else 512)
    binary = build_model(args.config, args.checkpoint, student_only=True)
    if args.checkpoint is None:  # random weights made realistic
        torch.manual_seed(0)
        calibrate_random_model(binary, (128, 128))
    packed = export_model(binary.eval())
    engine = (PackedClassifier(packed) if classifier else
              PackedBHViT(packed)).eval()
    x = torch.randn(1, 3, size, size,
                    generator=torch.Generator().manual_seed(0))
    ext = load_extension()
    stop = threading.Event()
    count = [0, 0.0]

    def run():
        with torch.no_grad():
            t0 = time.perf_counter()
            while not stop.is_set():
                engine(x)
                count[0] += 1
            count[1] = time.perf_counter() - t0

    with torch.no_grad():
        for _ in range(5):  # warm-up, plans built
            engine(x)
    with tempfile.TemporaryDirectory(prefix='mmbhvit_perf_') as tmp:
        data = osp.join(tmp, 'perf.data')
        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.2)
        rec = subprocess.run(
            [perf, 'record', '-q', '-e', 'cpu-clock', '-F',
             str(args.frequency), '-p', str(os.getpid()), '-o', data, '--',
             'sleep', str(args.seconds)], capture_output=True, text=True)
        stop.set()
        worker.join()
        if rec.returncode != 0 or not osp.exists(data):
            print(f'perf record failed ({rec.returncode}): '
                  f'{rec.stderr.strip()}', file=sys.stderr)
            return 1
        rep = subprocess.run(
            [perf, 'report', '-i', data, '--no-children', '--sort',
             'dso,symbol', '--stdio', '-g', 'none'],
            capture_output=True, text=True)
    rows = parse_report(rep.stdout)
    if rep.returncode != 0 or not rows:
        print(f'perf report gave no samples ({rep.returncode}): '
              f'{rep.stderr.strip()[:500]}', file=sys.stderr)
        return 1
    share, members = breakdown(rows)
    total = sum(share.values())
    ms = 1e3 * count[1] / max(count[0], 1)
    print(f'CPU: {cpu_description()}; kernel set '
          f'{ext.isa() if ext is not None else "none (PyTorch fallback)"}'
          f'; {args.threads} thread(s)')
    print(f'{args.config}{"" if classifier else " (backbone)"}, batch 1, '
          f'{size}x{size}: {count[0]} forwards, {ms:.2f} ms each (while '
          f'sampled); {args.seconds:g} s at {args.frequency} Hz')
    # shares of the CPU time of all the process's threads: with more than
    # one, threads waiting for work (spinning) count too
    cpu_ms = ms * args.threads
    print(f'share of CPU time, CPU ms per forward ({args.threads} x wall):')
    for g in GROUPS:
        pct = 100 * share[g] / max(total, 1e-9)
        print(f'{pct:6.1f} %  {pct * cpu_ms / 100:6.2f} ms  {g}')
        for p, sym in members.get(g, [])[:args.top]:
            print(f'             {100 * p / total:5.2f} %  {sym[:100]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
