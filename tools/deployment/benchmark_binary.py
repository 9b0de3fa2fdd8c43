# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Batch-1 CPU latency of (a) the PyTorch fp32 counterpart, (b) the PyTorch
binary model (simulated 1-bit), (c) the packed engine and the fp32 baselines
(d) ONNX Runtime and (e) OpenVINO (the fp32 counterpart exported to ONNX;
those installed), side by side; or, with ``--kernels``, the binary ops of
the packed engine one by one.

Examples::

    # BHViT-small classifier at 224 and BHViT-small + UPerNet at 512
    python tools/deployment/benchmark_binary.py --profile
    # one config, trained weights, 2 threads only
    python tools/deployment/benchmark_binary.py \\
        configs/bhvit/upernet_bhvit_ade20k.py --checkpoint iter_160000.pth \\
        --threads 2
    # README rows: whole segmentor at 512, 1 and 2 threads, every baseline,
    # OPs backbone / head, speed-ups vs each fp32 engine and the fastest
    python tools/deployment/benchmark_binary.py \\
        configs/bhvit/upernet_bhvit_ade20k.py --threads 1 2 --markdown
    # per-op kernel timings at BHViT-small / 224 shapes: every kernel set
    # this CPU runs, 1 and 2 threads, binary MACs per second and the
    # fraction of this CPU's AVX2 popcount peak
    python tools/deployment/benchmark_binary.py --kernels
    # a kernel change, side by side in one process: this build against a
    # copy of the extension saved before the change, MLP ops only
    python tools/deployment/benchmark_binary.py --kernels --sets avx2 \
        --threads 1 --ops ffn --against /tmp/before.so

Results and their discussion: docs/deployment.md.
"""
import os
import os.path as osp
import sys
from typing import Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

#: AVX2 XOR-popcount of 256 bits (one register of 4 outputs x 64 input
#: bits, with the nibble table): vpxor, vpsrlw, 2 vpand, 2 vpshufb,
#: 2 vpaddb = 8 vector-ALU uops; Intel (Ice Lake and newer) and AMD Zen 3
#: issue 256-bit integer ALU uops on 3 resp. 4 ports, vpshufb on 2 of them.
AVX2_UOPS_PER_256_BITS = 8


def avx2_peak_per_cycle(vector_ports: Optional[int] = None) -> float:
    """Binary MACs per cycle and core of the AVX2 popcount loop: 256 bits
    per ``AVX2_UOPS_PER_256_BITS / vector_ports`` cycles (3 ports: 96,
    4: 128); by default this CPU's ports
    (:func:`mmbhvit.utils.sysinfo.vector_alu_ports`)."""
    if vector_ports is None:
        from mmbhvit.utils.sysinfo import vector_alu_ports
        vector_ports = vector_alu_ports()
    return 256.0 * vector_ports / AVX2_UOPS_PER_256_BITS


def median_interval(values, level: float = 0.95):
    """A distribution-free interval for the median of ``values`` (i.i.d.
    rounds): the order statistics ``k`` and ``n + 1 - k`` (1-based) with
    ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``, so the interval holds
    the median with probability >= ``level``. ``None`` with too few values
    (fewer than 6 for 95 %)."""
    from math import comb
    n = len(values)
    tail, k = 0.0, 0
    while k < n and tail + comb(n, k) / 2**n <= (1 - level) / 2:
        tail += comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    s = sorted(values)
    return s[k - 1], s[n - k]


def ratio_verdict(ratio_interval) -> str:
    """'faster' / 'slower' when the interval of this / against excludes 1,
    else that the rounds show no difference."""
    if ratio_interval is None:
        return 'too few rounds for an interval'
    lo, hi = ratio_interval
    if hi < 1:
        return 'faster'
    if lo > 1:
        return 'slower'
    return 'no difference shown'


def _visited_taps(size: int, d: int) -> int:
    """Number of (position, tap) pairs of a 3-tap dilated 1-d window on
    ``size`` positions with zero padding ``d`` that fall inside."""
    return sum(1 for p in range(size) for k in (-1, 0, 1)
               if 0 <= p + k * d < size)


def kernel_cases(dtype):
    """(name, binary MACs, call) at BHViT-small / 224 shapes (batch 1);
    float ops (shift branches) have 0 binary MACs."""
    import torch

    from mmbhvit.deploy.blocks.msmha import softmax_table
    from mmbhvit.deploy.ops import kernel_words, lane_words, stale_build_reason
    from mmbhvit.deploy.packing import pack_bits

    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    def words(rows, n):
        return pack_bits(torch.rand(rows, n, generator=g) > 0.5)

    def proj_args(cin, cout):
        return [rand(cin, scale=0.3), kernel_words(words(cout, cin), 1,
                                                   cin)[0]] + [
            rand(cout) for _ in range(5)]

    cases = []

    def ffn(name, tokens, c, ratio):
        hid = c * ratio
        x, res = rand(tokens, c), rand(tokens, c)
        e, r = proj_args(c, hid), proj_args(hid, c)
        e[5] = torch.ones(hid, dtype=dtype)  # no LayerScale: post_scale 1
        luts = {}  # the engine's nibble table, per build (older: none)

        def call(ext):
            if ext not in luts:
                luts[ext] = (ext.nibble_lut(e[1], c, hid)
                             if hasattr(ext, 'nibble_lut') else None)
            if luts[ext] is None:
                return ext.ffn(x, res, e, hid, 2, r, 3)
            return ext.ffn(x, res, e, hid, 2, r, 3, luts[ext])

        cases.append((name, tokens * 2 * c * hid, call))

    def proj(name, tokens, cin, cout):
        x = rand(tokens, cin)
        t = proj_args(cin, cout)
        t[5] = torch.ones(cout, dtype=dtype)  # q/k/v: no LayerScale
        cases.append((name, tokens * cin * cout, lambda ext: ext.proj(
            x, t[0], t[1], cout, *t[2:], 1 if cin == cout else 0, None)))

    def msgdc(name, h, w, c, dils=(1, 3, 5), groups=4):
        cg = c // groups
        x = rand(1, h, w, c)
        vec = [rand(c) for _ in range(7)]
        wb = [words(c, 9 * cg) for _ in dils]
        wt = [kernel_words(b, 9, cg) for b in wb]
        lane = [lane_words(b, cg) for b in wb]
        abs_ = [[rand(c) for _ in dils] for _ in range(3)]
        macs = sum(_visited_taps(h, d) * _visited_taps(w, d)
                   for d in dils) * c * cg
        cases.append((name, macs, lambda ext: ext.msgdc(
            x, vec[0], vec[1], vec[2], groups, list(dils), wt, abs_[0],
            abs_[1], abs_[2], vec[3], vec[4], vec[5], vec[6], lane)))

    def merge(name, h, w, cin, cout):
        x = rand(1, h, w, cin)
        wt = kernel_words(words(cout, 4 * cin), 4, cin)
        v = [rand(cout) for _ in range(4)]
        thr, pos = rand(cin, scale=0.3), rand(h // 2, w // 2, cout)
        cases.append((name, (h // 2) * (w // 2) * 4 * cin * cout,
                      lambda ext: ext.merge(x, thr, wt, cout, *v, pos)))

    def attention(name, windows, t, c, heads):
        q, k, v = rand(windows, t, c), rand(windows, t, c), rand(
            windows, t, c)
        thr = [rand(c, scale=0.3) for _ in range(3)]
        d = c // heads
        cases.append((name + ' q.k', windows * heads * t * t * d,
                      lambda ext: ext.attn_scores(q, k, thr[0], thr[1],
                                                  heads, d**-0.5)))
        if dtype == torch.float32:
            # the attention map as the engine computes it with this build:
            # from the softmax table, or (a build without it) ATen's softmax
            table = softmax_table(d, d**-0.5)

            def attention_map(ext):
                if stale_build_reason(ext, ('attn_scores', )) is None:
                    return ext.attn_scores(q, k, thr[0], thr[1], heads,
                                           d**-0.5, table)
                return torch.softmax(ext.attn_scores(
                    q, k, thr[0], thr[1], heads, d**-0.5), -1)

            cases.append((name + ' map',
                          windows * heads * t * t * d, attention_map))
        p = torch.softmax(rand(windows, heads, t, t, scale=3.0), -1)
        step = (0.05 + 0.25 * torch.rand(heads, generator=g)).to(dtype)
        zero = (torch.rand(heads, generator=g) - 0.5).to(dtype)
        ep = [rand(c) for _ in range(4)]
        # LSQ with 3 levels: two bit planes, each a binary t x t x d product
        cases.append((name + ' context', 2 * windows * heads * t * t * d,
                      lambda ext: ext.attn_context(p, q, k, v, thr[2], heads,
                                                   0, 3, step, zero, [],
                                                   *ep)))
        if dtype == torch.float32:
            # q, k, v to the context as a block runs it with this build: in
            # one pass, or (a build without it) map, then context
            def attention_pass(ext):
                if stale_build_reason(ext, ('attention', )) is None:
                    return ext.attention(q, k, v, *thr, heads, table, 0, 3,
                                         step, zero, [], *ep)
                return ext.attn_context(attention_map(ext), q, k, v, thr[2],
                                        heads, 0, 3, step, zero, [], *ep)

            cases.append((name + ' 1 pass',
                          3 * windows * heads * t * t * d, attention_pass))

    def conv(name, h, w, cin, cout, k=3):
        from mmbhvit.deploy.blocks.conv import conv_shortcut
        from mmbhvit.deploy.ops import SHORTCUTS
        x = rand(1, h, w, cin)
        wt = kernel_words(words(cout, k * k * cin), k * k, cin)
        v = [rand(cout) for _ in range(5)]
        thr = rand(cin, scale=0.3)
        sc = SHORTCUTS[conv_shortcut(cin, cout)]
        macs = (_visited_taps(h, 1) * _visited_taps(w, 1) * cin * cout
                if k == 3 else h * w * k * k * cin * cout)
        cases.append((name, macs, lambda ext: ext.conv(x, thr, wt, cout, k,
                                                        *v, sc)))

    def shift(name, h, w, c, radii=(1, 2)):
        from mmbhvit.deploy.blocks.shift import shift_taps
        taps = shift_taps(radii)
        x, res = rand(1, h, w, c), rand(1, h, w, c)
        dy, dx = (torch.tensor([t[i] for t in taps], dtype=torch.int32)
                  for i in (0, 1))
        wk, bias = rand(len(taps), c), rand(c)
        cases.append((name, 0, lambda ext: ext.shift(x, res, dy, dx, wk,
                                                      bias)))

    def tokens(name, h, w, c, s=7):
        # MSMHA's norm1, window partition and pooled merged tokens
        x, scale, bias, mix = rand(1, h, w, c), rand(c), rand(c), rand(c)
        rest = 1 - mix
        cases.append((name, 0, lambda ext: ext.attn_tokens(
            x, scale, bias, mix, rest, s)))

    def stem(name, h, w, cout):
        from mmbhvit.deploy.blocks.stem import stem_taps
        x = rand(1, 3, h, w)
        wt = stem_taps(rand(cout, 3, 4, 4, scale=0.3)).contiguous()
        bias, pos = rand(cout), rand(h // 4, w // 4, cout)
        cases.append((name, 0, lambda ext: ext.stem(x, wt, bias, pos, True)))

    msgdc('msgdc stage1 56x56x64', 56, 56, 64)
    msgdc('msgdc stage2 28x28x128', 28, 28, 128)
    ffn('ffn stage1 3136x64 r8', 3136, 64, 8)
    ffn('ffn stage2 784x128 r8', 784, 128, 8)
    ffn('ffn stage3 196x256 r4', 196, 256, 4)
    ffn('ffn stage4 49x512 r4', 49, 512, 4)
    proj('proj q/k/v stage3 212x256', 212, 256, 256)
    merge('merge 56x56 64->128', 56, 56, 64, 128)
    merge('merge 28x28 128->256', 28, 28, 128, 256)
    merge('merge 14x14 256->512', 14, 14, 256, 512)
    attention('attn stage3 4x53x256 h4', 4, 53, 256, 4)
    attention('attn stage4 1x50x512 h8', 1, 50, 512, 8)
    shift('shift stage1 56x56x64 (float)', 56, 56, 64)
    shift('shift stage2 28x28x128 (float)', 28, 28, 128)
    shift('shift stage3 14x14x256 (float)', 14, 14, 256)
    shift('shift stage4 7x7x512 (float)', 7, 7, 512)
    stem('stem 224x224 3->64 gelu+pos (float)', 224, 224, 64)
    tokens('attn tokens stage3 14x14x256 (float)', 14, 14, 256)
    tokens('attn tokens stage4 7x7x512 (float)', 7, 7, 512)
    # binary heads: UPerNet's fpn_bottleneck (4 x 512 -> 512; at 512x512 it
    # runs at 128x128, here at 32x32), a Semantic FPN 3x3 (128 -> 128) and
    # the FPN neck's first 3x3 as at 512x512 (256 -> 256 at 1/4)
    conv('head conv3x3 32x32 2048->512', 32, 32, 2048, 512)
    conv('head conv3x3 64x64 128->128', 64, 64, 128, 128)
    conv('head conv3x3 128x128 256->256', 128, 128, 256, 256)
    return cases


#: the name the other build is imported under: not the installed module's
#: (Python hands back the already loaded module for the same name)
OTHER_BUILD_MODULE = 'mmbhvit_against_build._binary_ops'


def load_other_build(path: str, this=None):
    """Another build of the extension (e.g. a copy of
    ``mmbhvit/_binary_ops*.so`` made before a change) as a second module
    beside the installed one (``this``), for a side-by-side timing in one
    process. Refused unless the two are separate: distinct modules whose
    kernel-set choice does not follow each other (a build that exports its
    C++ symbols, i.e. one from before mmbhvit hid them, can bind the other's
    calls to its own kernels)."""
    import importlib.util
    if not osp.isfile(path):
        raise SystemExit(f'--against {path}: no such file')
    spec = importlib.util.spec_from_file_location(OTHER_BUILD_MODULE, path)
    if spec is None:  # not an extension module's file name
        raise SystemExit(f'--against {path}: not a compiled extension '
                         '(expected a _binary_ops*.so file)')
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:
        raise SystemExit(f'--against {path}: not a loadable build of '
                         f'mmbhvit._binary_ops for this Python and torch '
                         f'({e})') from None
    for name in ('set_isa', 'isa', 'available_isas'):
        if not hasattr(module, name):
            raise SystemExit(f'--against {path}: the module has no {name}, '
                             'not a build of the packed-bit kernels')
    if this is not None:
        check_separate_builds(this, module, path)
    return module


def _runs(call, build) -> bool:
    """Whether ``build`` has the op that ``call`` runs."""
    try:
        call(build)
    except AttributeError:
        return False
    return True


def check_separate_builds(this, other, path: str) -> None:
    """SystemExit unless ``other`` keeps its own kernel-set choice: set to
    another set than ``this`` runs, ``this`` must not follow."""
    if other is this:
        raise SystemExit(f'--against {path}: Python returned the installed '
                         'module itself, the comparison would time one '
                         'build twice')
    mine, theirs = this.isa(), other.isa()
    probe = next((s for s in other.available_isas() if s != mine), None)
    if probe is None:
        return  # one kernel set: nothing to tell apart, nothing to mix up
    other.set_isa(probe)
    followed = this.isa() == probe
    other.set_isa(theirs)
    this.set_isa(mine)
    if followed:
        raise SystemExit(
            f'--against {path}: the two builds share their kernel state '
            '(one of them exports its C++ symbols, built before mmbhvit '
            'compiled with -fvisibility=hidden), so one build\'s kernels '
            'would run for both; rebuild the older one from a commit that '
            'hides them')


def benchmark_kernels(sets=None, threads=(1, 2), rounds=15, min_time=0.02,
                      clock='wall', ops=None, against=None):
    """Interleaved timings: every round times every (threads, set, op) once
    (the median of the rounds is reported), so drift and other load on the
    cores spread over all candidates alike. ``clock='cpu'`` times the
    process's CPU time instead of the wall clock (for 1 thread: the time the
    kernels actually ran, whatever else shares the cores; with more threads
    it also counts threads waiting at the end of a parallel region).
    ``ops``: only the ops whose name contains one of these strings.
    ``against``: the path of another build of the extension, timed in the
    same rounds (alternating first with this one); its rows are marked and
    the paired ratio (median over rounds of this build / that one) per op
    follows."""
    import time

    import torch

    from mmbhvit.deploy.ops import load_extension
    from mmbhvit.utils.sysinfo import cpu_description

    timer = time.perf_counter if clock == 'wall' else time.process_time
    ext = load_extension()
    if ext is None:
        from mmbhvit.deploy.ops import extension_error
        raise SystemExit(f'the packed-bit kernels are not built: '
                         f'{extension_error()}')
    builds = {'this': ext}
    if against is not None:
        builds['against'] = load_other_build(against, ext)
    sets = sets or ext.available_isas()
    for s in sets:
        for label, b in builds.items():
            if s not in b.available_isas():
                raise SystemExit(f'kernel set {s!r} is not available in '
                                 f'the {label} build')
    old_sets = {label: b.isa() for label, b in builds.items()}
    old_threads = torch.get_num_threads()
    cases = kernel_cases(torch.float32)
    if ops:
        cases = [c for c in cases if any(o in c[0] for o in ops)]
    # an older build may lack newer ops (probed on the selected cases only)
    if against is not None:
        lacking = [c[0] for c in cases if not _runs(c[2], builds['against'])]
        if lacking:
            print(f'not in the against build, skipped: {", ".join(lacking)}')
        cases = [c for c in cases if c[0] not in lacking]
    if ops and not cases:
        raise SystemExit(f'--ops {ops}: no kernel case matches')
    hz = ext.cpu_clock_hz()
    peak = avx2_peak_per_cycle() * hz
    times = {}
    try:
        # calls per timing, sized once on the fastest set with 1 thread
        reps = {}
        ext.set_isa(sets[0])
        torch.set_num_threads(1)
        for name, _, call in cases:
            call(ext)
            t0 = time.perf_counter()
            call(ext)
            reps[name] = max(1, int(min_time / max(time.perf_counter() - t0,
                                                   1e-6)))
        for r in range(rounds):
            order = list(builds) if r % 2 == 0 else list(builds)[::-1]
            for nt in threads:
                torch.set_num_threads(nt)
                for s in sets:
                    for label in order:
                        b = builds[label]
                        b.set_isa(s)
                        for name, _, call in cases:
                            n = reps[name]
                            t0 = timer()
                            for _ in range(n):
                                call(b)
                            dt = (timer() - t0) / n
                            if clock == 'cpu':
                                dt /= nt  # CPU seconds of nt threads
                            times.setdefault((name, s, nt, label),
                                             []).append(dt)
    finally:
        for label, b in builds.items():
            b.set_isa(old_sets[label])
        torch.set_num_threads(old_threads)
    print(f'CPU: {cpu_description()}')
    print(f'clock (dependent-add chain): {hz / 1e9:.2f} GHz; AVX2 '
          f'popcount peak {avx2_peak_per_cycle():.0f} binary MACs/cycle/core'
          f' = {peak / 1e9:.0f} G/s per core')
    print(f'median of {rounds} interleaved rounds, float32, batch 1, '
          f'{clock} clock' + (' (CPU time / threads)' if clock == 'cpu' else
                               '') +
          f'; fraction = achieved / (AVX2 peak x threads); best = the '
          f'fastest round (what the op reaches undisturbed on a shared '
          f'host); load average {os.getloadavg()[0]:.1f}')
    head = f'{"op":32s} {"set":8s} {"thr":>3s} {"time us":>9s} ' \
           f'{"GMAC/s":>8s} {"of AVX2 peak":>12s} {"best us":>9s} ' \
           f'{"best of peak":>12s}'
    print(head)
    print('-' * len(head))
    rows = []
    for label in builds:
        if against is not None:
            print(f'{label} build: ' + (ext.__file__ if label == 'this'
                                        else against))
        for name, macs, _ in cases:
            for s in sets:
                for nt in threads:
                    ts = sorted(times[(name, s, nt, label)])
                    t, best = ts[len(ts) // 2], ts[0]
                    rate = macs / t
                    frac = rate / (peak * nt) if peak else float('nan')
                    frac_best = (macs / best / (peak * nt) if peak else
                                 float('nan'))
                    rows.append((name, s, nt, t, rate, frac, best,
                                 frac_best))
                    rate_s, frac_s, best_s = (
                        (f'{rate / 1e9:8.1f}', f'{frac:11.0%}',
                         f'{frac_best:11.0%}') if macs else
                        (f'{"-":>8s}', f'{"-":>11s}', f'{"-":>11s}'))
                    print(f'{name:32s} {s:8s} {nt:3d} {t * 1e6:9.1f} '
                          f'{rate_s} {frac_s}  {best * 1e6:9.1f}  '
                          f'{best_s}')
    if against is not None:
        print('this / against, median over the rounds of the per-round '
              'ratio (drift between rounds does not move it), its 95 % '
              'interval (order statistics) and what that shows:')
        for name, _, _ in cases:
            for s in sets:
                for nt in threads:
                    pairs = sorted(
                        a / b for a, b in zip(times[(name, s, nt, 'this')],
                                              times[(name, s, nt,
                                                     'against')]))
                    ci = median_interval(pairs)
                    ci_s = (f'{ci[0]:.3f}-{ci[1]:.3f}' if ci else
                            f'{"-":>11s}')
                    print(f'{name:32s} {s:8s} {nt:3d} '
                          f'{pairs[len(pairs) // 2]:9.3f} {ci_s:>11s}  '
                          f'{ratio_verdict(ci)}')
    return rows


def main_kernels(argv):
    import argparse
    parser = argparse.ArgumentParser(
        description='per-op timings of the packed-bit kernels')
    parser.add_argument('--kernels', action='store_true')
    parser.add_argument('--sets', nargs='*', default=None,
                        help='kernel sets (default: all this CPU runs)')
    parser.add_argument('--threads', nargs='*', type=int, default=[1, 2])
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help='wall clock (latency; default) or the process '
                        "CPU time (robust to other jobs on the cores)")
    parser.add_argument('--ops', nargs='*', default=None,
                        help='only the ops whose name contains one of these '
                        "strings (e.g. 'ffn stage1')")
    parser.add_argument('--against', default=None, metavar='SO',
                        help='another build of the extension (a copy of '
                        'mmbhvit/_binary_ops*.so from before a change), '
                        'timed in the same process and rounds; prints the '
                        'paired ratio per op')
    args = parser.parse_args(argv)
    benchmark_kernels(args.sets, tuple(args.threads), args.rounds,
                      clock=args.clock, ops=args.ops, against=args.against)
    return 0


if __name__ == '__main__':
    if '--kernels' in sys.argv[1:]:
        sys.exit(main_kernels(sys.argv[1:]))
    from mmbhvit.deploy.benchmark import main
    sys.exit(main())
