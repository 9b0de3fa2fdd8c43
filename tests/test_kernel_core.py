# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The kernel core (csrc/core, csrc/kernels) on its own: its C++ test
program (csrc/tests/test_kernels.cpp, no Python, no torch) against the
golden outputs of the PyTorch fallback, natively with each kernel set
forced and, where the cross tools are installed, for aarch64 under qemu;
the goldens being current; the kernel sets and paths the Python module
reports; the warning when the engine falls back to PyTorch.

CI also runs all of this through ``make test-kernels``.
"""
import filecmp
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from mmbhvit.deploy import ops as deploy_ops
from _helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CSRC = osp.join(ROOT, 'csrc')
GOLDENS = osp.join(CSRC, 'tests', 'goldens')
SETS = ('avx512', 'avx2', 'popcnt', 'neon', 'generic')
X86_SETS = ('avx512', 'avx2', 'popcnt', 'generic')
HAS_EXT = deploy_ops.extension_available()
LINE = re.compile(r'^(pass: (\w+) \((\d+) cases\)|skipped: (\w+) \((.+)\))$')


def _make(target, timeout=900):
    if shutil.which('make') is None or shutil.which('g++') is None:
        pytest.skip('make and g++ are needed to build the C++ kernel test')
    done = subprocess.run(['make', '-C', CSRC, target], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _lines(stdout):
    """The result lines of test_kernels, each checked against the format."""
    out = [ln for ln in stdout.splitlines()
           if ln.startswith(('pass:', 'skipped:', 'FAIL:'))]
    for ln in out:
        assert LINE.match(ln), ln
    return out


def test_goldens_are_current(tmp_path):
    """write_kernel_goldens.py still writes the committed files byte for
    byte (same fallback arithmetic, same seeds)."""
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import write_kernel_goldens
    finally:
        sys.path.pop(0)
    write_kernel_goldens.main(['--out', str(tmp_path)])
    with open(osp.join(GOLDENS, 'MANIFEST')) as f:
        names = f.read().split()
    with open(tmp_path / 'MANIFEST') as f:
        assert f.read().split() == names
    for name in names:
        assert filecmp.cmp(osp.join(GOLDENS, name), tmp_path / name,
                           shallow=False), name


def test_cpp_kernels_native_every_set_forced():
    """Every x86 set forced on its own: it passes, or it is reported
    skipped by name with the reason (the CPU lacks a feature / not built
    for this target); the sets the Python module runs must pass."""
    _make('build/native/test_kernels')
    exe = osp.join(CSRC, 'build', 'native', 'test_kernels')
    n_cases = len(open(osp.join(GOLDENS, 'MANIFEST')).read().split())
    runs_here = set(deploy_ops.load_extension().available_isas()
                    if HAS_EXT else [])
    for s in SETS:
        done = subprocess.run([exe, '--sets', s], capture_output=True,
                              text=True, timeout=600)
        lines = _lines(done.stdout)
        assert len(lines) == 1 or done.returncode == 1, done.stdout
        m = LINE.match(lines[-1])
        if m.group(2) is not None:
            assert done.returncode == 0, done.stdout
            assert m.group(2) == s and int(m.group(3)) == n_cases
        else:
            assert done.returncode == 2, done.stdout  # named, but skipped
            assert m.group(4) == s
            assert re.fullmatch(r'CPU lacks \S+|not built for this target',
                                m.group(5)), m.group(5)
            assert s not in runs_here, f'{s}: Python runs it, C++ skips it'
        if s in runs_here:
            assert m.group(2) == s, f'{s} runs in Python but not here'
    # the x86 sets are built on x86-64; NEON and generic on aarch64
    if os.uname().machine in ('x86_64', 'AMD64'):
        assert 'generic' in runs_here or not HAS_EXT


@pytest.mark.skipif(
    shutil.which('aarch64-linux-gnu-g++') is None
    or shutil.which('qemu-aarch64') is None,
    reason='no aarch64 cross compiler / qemu-aarch64 (Debian packages '
    'g++-aarch64-linux-gnu qemu-user; `make test-kernels` installs them)')
def test_cpp_kernels_aarch64_under_qemu():
    """NEON (and the generic set) cross-compiled and run under qemu user
    emulation: correctness only, qemu says nothing about speed."""
    lines = _lines(_make('test-aarch64', timeout=1800))
    assert [ln.split(' (')[0] for ln in lines] == ['pass: neon',
                                                   'pass: generic']


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_module_reports_sets_and_paths():
    ext = deploy_ops.load_extension()
    sets = ext.kernel_sets()
    assert [name for name, _ in sets] == list(SETS)
    runs = [name for name, why in sets if not why]
    assert runs == ext.available_isas() and 'generic' in runs
    assert ext.isa() == runs[0] or os.environ.get('MMBHVIT_KERNELS')
    old = ext.isa()
    try:
        for s in runs:
            ext.set_isa(s)
            paths = dict(ext.kernel_paths())
            assert set(paths) >= {'proj/ffn', 'msgdc', 'merge', 'attn_scores',
                                  'attn_context', 'conv (heads)'}
            assert all(paths.values())
        for name, why in sets:
            if why:
                with pytest.raises(RuntimeError, match=re.escape(why)):
                    ext.set_isa(name)
    finally:
        ext.set_isa(old)


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_every_set_agrees_through_python():
    """The sets the Python module runs give identical results (the popcnt
    set is not among test_deploy.py's parametrised sets)."""
    from mmbhvit.deploy.ops import kernel_words
    from mmbhvit.deploy.packing import pack_bits
    ext = deploy_ops.load_extension()
    g = torch.Generator().manual_seed(0)
    cin, cout = 100, 36
    x = torch.randn(5, 7, cin, generator=g)
    wt = kernel_words(pack_bits(torch.rand(cout, cin, generator=g) > .5), 1,
                      cin)[0]
    v = [torch.randn(cout, generator=g) for _ in range(5)]
    thr = 0.3 * torch.randn(cin, generator=g)
    q, k, val = (torch.randn(2, 13, 48, generator=g) for _ in range(3))
    p = torch.softmax(torch.randn(2, 3, 13, 13, generator=g), -1)
    cv = [torch.randn(48, generator=g) for _ in range(5)]
    step, zero = torch.full((3, ), 0.2), torch.full((3, ), 0.1)
    old = ext.isa()
    outs = {}
    try:
        for s in ext.available_isas():
            ext.set_isa(s)
            outs[s] = (ext.proj(x, thr, wt, cout, *v, 0, None),
                       ext.attn_scores(q, k, cv[0], cv[1], 3, 0.25),
                       ext.attn_context(p, q, k, val, cv[0], 3, 0, 3, step,
                                        zero, [], *cv[1:]))
    finally:
        ext.set_isa(old)
    for s, o in outs.items():
        for a, b in zip(o, outs['generic']):
            assert torch.equal(a, b), s


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_attention_map_from_the_softmax_table():
    """float32 ``attn_scores(..., table=)``: the attention map, equal bit
    for bit to its fallback on every kernel set (rows of 1-130 keys, 1-8
    heads, 1-2 words per head), rows summing to 1, and closer to the
    float64 softmax than float32 ``torch.softmax`` of the same scores;
    the row sums are the left-to-right sums the kernels take. A float64
    query or a table of the wrong length is refused by name."""
    from mmbhvit.deploy.blocks.msmha import softmax_table, table_softmax
    from mmbhvit.deploy.packing import bits_to_pm1
    ext = deploy_ops.load_extension()
    g = torch.Generator().manual_seed(3)
    old = ext.isa()
    try:
        for b, t, c, h in ((4, 53, 256, 4), (1, 50, 512, 8), (3, 7, 24, 3),
                           (2, 130, 96, 1), (1, 1, 8, 2), (2, 33, 320, 2)):
            q, k = (torch.randn(b, t, c, generator=g) for _ in range(2))
            tq, tk = (0.3 * torch.randn(c, generator=g) for _ in range(2))
            d = c // h
            table = softmax_table(d, d**-0.5)
            qs, ks = (bits_to_pm1(x > thr, torch.float32).view(
                b, t, h, d).transpose(1, 2) for x, thr in ((q, tq), (k, tk)))
            dots = qs @ ks.transpose(-2, -1)
            ref = table_softmax(dots, table)
            e = table[((dots.amax(-1, keepdim=True) - dots) / 2).long()]
            total = torch.zeros(e.shape[:-1], dtype=torch.float64)
            for j in range(t):
                total = total + e[..., j]
            assert torch.equal(e.cumsum(-1)[..., -1], total)
            for s in ext.available_isas():
                ext.set_isa(s)
                out = ext.attn_scores(q, k, tq, tk, h, d**-0.5, table)
                assert torch.equal(out, ref), (s, b, t, c, h)
            assert torch.allclose(ref.double().sum(-1),
                                  torch.ones(b, h, t, dtype=torch.float64),
                                  atol=1e-6)
            p64 = torch.softmax(dots.double() * d**-0.5, -1)
            aten = torch.softmax(dots * d**-0.5, -1)
            if t > 1:
                err = ((ref.double() - p64) / p64).pow(2).mean().sqrt()
                err_aten = ((aten.double() - p64) / p64).pow(2).mean().sqrt()
                assert err < 0.7 * err_aten, (err, err_aten)
        with pytest.raises(RuntimeError, match='float32 only'):
            ext.attn_scores(q.double(), k.double(), tq.double(), tk.double(),
                            h, d**-0.5, table)
        with pytest.raises(RuntimeError, match='head dim \\+ 1'):
            ext.attn_scores(q, k, tq, tk, h, d**-0.5, table[:-1])
    finally:
        ext.set_isa(old)


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_attention_in_one_pass_matches_scores_then_context():
    """``attention`` (the one pass a float32 block runs) gives the bits of
    ``attn_scores(..., table)`` then ``attn_context`` on every kernel set:
    LSQ levels looked up by count (2 planes: 8 at a time; 3 planes, 1
    plane: one by one), and the map row kept for GSB and for a step <= 0
    (levels then not monotone in the count); 1-2 words of keys, head
    dims not multiples of 8. The cases reach every level (else equal
    outputs would prove little). float64 and a short table are refused."""
    from mmbhvit.deploy.blocks.msmha import softmax_table
    ext = deploy_ops.load_extension()
    g = torch.Generator().manual_seed(5)
    gsb = [0.05, 0.7, 0.5, 0.25, 0.3, 0.6]
    cases = (  # b, t, c, heads, mode, levels, step, scale factor
        (4, 53, 256, 4, 0, 3, 0.08, 1.0), (1, 50, 512, 8, 0, 3, 0.02, 2.0),
        (2, 74, 96, 2, 0, 3, 0.05, 3.0), (2, 13, 48, 3, 0, 7, 0.04, 1.0),
        (3, 130, 64, 4, 0, 2, 0.01, 4.0), (1, 20, 36, 3, 0, 1, 0.05, 2.0),
        (2, 37, 40, 2, 1, 0, 0.1, 1.0), (1, 9, 64, 1, 0, 3, -0.1, 1.0))
    old = ext.isa()
    try:
        for b, t, c, h, mode, levels, step0, f in cases:
            q, k, v = (torch.randn(b, t, c, generator=g) for _ in range(3))
            thr = [0.3 * torch.randn(c, generator=g) for _ in range(3)]
            d = c // h
            table = softmax_table(d, f * d**-0.5)
            step = step0 * (1 + 0.5 * torch.rand(h, generator=g))
            zero = torch.rand(h, generator=g) - 0.5
            ep = [torch.randn(c, generator=g) for _ in range(4)]
            gs = gsb if mode == 1 else []
            if mode == 0 and step0 > 0:
                p = ext.attn_scores(q, k, thr[0], thr[1], h, 0.1, table)
                u = p * levels / step.view(1, -1, 1, 1) + zero.view(
                    1, -1, 1, 1)
                lv = torch.round(u).clamp(0, levels)
                assert set(lv.unique().tolist()) == set(range(levels + 1))
            for s in ext.available_isas():
                ext.set_isa(s)
                p = ext.attn_scores(q, k, thr[0], thr[1], h, 0.1, table)
                ref = ext.attn_context(p, q, k, v, thr[2], h, mode, levels,
                                       step, zero, gs, *ep)
                out = ext.attention(q, k, v, *thr, h, table, mode, levels,
                                    step, zero, gs, *ep)
                assert torch.equal(out, ref), (s, b, t, c, h, mode, levels)
        with pytest.raises(RuntimeError, match='float32 only'):
            ext.attention(*(x.double() for x in (q, k, v, *thr)), h, table,
                          mode, levels, step.double(), zero.double(), gs,
                          *(x.double() for x in ep))
        with pytest.raises(RuntimeError, match='head dim \\+ 1'):
            ext.attention(q, k, v, *thr, h, table[:-1], mode, levels, step,
                          zero, gs, *ep)
    finally:
        ext.set_isa(old)


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_kernel_benchmark_cases_run():
    """Every op of ``benchmark_binary.py --kernels`` runs once and gives
    finite outputs (the benchmark itself is not a test)."""
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import benchmark_binary
    finally:
        sys.path.pop(0)
    ext = deploy_ops.load_extension()
    cases = benchmark_binary.kernel_cases(torch.float32)
    names = [name for name, _, _ in cases]
    assert any(n.startswith('head conv3x3') for n in names)
    for name, macs, call in cases:
        out = call(ext)
        outs = out if isinstance(out, (list, tuple)) else [out]
        # float ops (named so) count no binary MACs, binary ops some
        assert (macs == 0) == name.endswith('(float)'), name
        assert all(torch.isfinite(o).all() for o in outs), name
    assert any(n.startswith('shift stage1') for n in names)
    assert any(n.startswith('attn tokens stage3') for n in names)


@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
def test_kernel_benchmark_against_another_build(tmp_path, capsys):
    """``--kernels --against SO --ops ...``: the selected ops timed with this
    build and another one (here a copy of it) in the same rounds (median
    and fastest round), then the paired ratio per op; a missing file, a
    file that is not an extension and a filter that matches nothing are
    refused by name."""
    import shutil
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import benchmark_binary
    finally:
        sys.path.pop(0)
    ext = deploy_ops.load_extension()
    copy = tmp_path / 'before_binary_ops.so'
    shutil.copy(ext.__file__, copy)
    rows = benchmark_binary.benchmark_kernels(
        ['generic'], (1, ), rounds=2, min_time=0.0,
        ops=['q/k/v', 'attn stage4'], against=str(copy))
    out = capsys.readouterr().out
    names = {'proj q/k/v stage3 212x256', 'attn stage4 1x50x512 h8 q.k',
             'attn stage4 1x50x512 h8 map',
             'attn stage4 1x50x512 h8 context',
             'attn stage4 1x50x512 h8 1 pass'}
    assert {r[0] for r in rows} == names and len(rows) == 2 * len(names)
    # the fastest round beside the median: never slower, never a larger
    # share of the peak read from a slower time
    assert 'best of peak' in out
    assert all(r[6] <= r[3] and (r[7] >= r[5] or r[5] != r[5])
               for r in rows)
    assert f'against build: {copy}' in out
    ratios = out.split('this / against')[1].splitlines()[1:]
    assert {line[:32].strip() for line in ratios} == names
    # 2 rounds: a ratio, no interval
    assert all(float(line[32:].split()[2]) > 0 and line.endswith(
        'too few rounds for an interval') for line in ratios), ratios
    # the copy is a module of its own with its own kernel-set choice (the
    # same module, or shared C++ state, would time one build twice)
    other = benchmark_binary.load_other_build(str(copy), ext)
    assert other is not ext and other.__name__ != ext.__name__
    mine = ext.isa()
    other.set_isa('generic')
    try:
        assert ext.isa() == mine and other.isa() == 'generic'
    finally:
        other.set_isa(mine)
    with pytest.raises(SystemExit, match='no such file'):
        benchmark_binary.benchmark_kernels(against=str(tmp_path / 'x.so'))
    (tmp_path / 'bad.so').write_text('not a library')
    with pytest.raises(SystemExit, match='not a loadable build'):
        benchmark_binary.benchmark_kernels(against=str(tmp_path / 'bad.so'))
    with pytest.raises(SystemExit, match='no kernel case matches'):
        benchmark_binary.benchmark_kernels(['generic'], (1, ),
                                           ops=['no such op'])


def test_median_interval_of_paired_ratios():
    """The interval around a median ratio: the order statistics of the
    binomial table (15 rounds: the 4th and 12th values, 96.5 % coverage;
    5 rounds: none), whatever the order of the values; the verdict says
    faster / slower only when the interval excludes 1."""
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import benchmark_binary as bb
    finally:
        sys.path.pop(0)
    values = [0.80 + 0.01 * i for i in range(15)][::-1]
    assert bb.median_interval(values) == (values[11], values[3])
    assert bb.median_interval(values[:5]) is None
    assert bb.median_interval([1.0] * 6) == (1.0, 1.0)  # 6: 1st and 6th
    assert bb.median_interval(list(range(100)))[0] == 39  # ranks 40, 61
    assert bb.median_interval(list(range(100)))[1] == 60
    assert bb.ratio_verdict((0.9, 0.99)) == 'faster'
    assert bb.ratio_verdict((1.01, 1.2)) == 'slower'
    assert bb.ratio_verdict((0.95, 1.02)) == 'no difference shown'
    assert bb.ratio_verdict(None).startswith('too few')


def test_against_skips_ops_an_older_build_lacks():
    """A case whose op the other build does not have (a build from before
    the op existed) is left out instead of stopping the comparison; a case
    that fails otherwise still raises."""
    from types import SimpleNamespace
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import benchmark_binary as bb
    finally:
        sys.path.pop(0)
    old = SimpleNamespace(shift=lambda: 1)
    assert bb._runs(lambda b: b.shift(), old)
    assert not bb._runs(lambda b: b.stem(), old)
    with pytest.raises(ZeroDivisionError):
        bb._runs(lambda b: 1 / 0, old)


def test_against_refuses_builds_that_are_not_separate():
    """Two "builds" that are one module, or whose kernel-set choice follows
    each other (exported C++ symbols bound across the two), are refused by
    name instead of timing one build twice."""
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import benchmark_binary
    finally:
        sys.path.pop(0)

    class Build:
        def __init__(self, state):
            self.state = state

        def isa(self):
            return self.state['isa']

        def set_isa(self, name):
            self.state['isa'] = name

        def available_isas(self):
            return ['avx2', 'generic']

    shared = {'isa': 'avx2'}
    this = Build(shared)
    with pytest.raises(SystemExit, match='installed module itself'):
        benchmark_binary.check_separate_builds(this, this, 'x.so')
    with pytest.raises(SystemExit, match='share their kernel state'):
        benchmark_binary.check_separate_builds(this, Build(shared), 'x.so')
    assert shared['isa'] == 'avx2'  # the probe is undone
    benchmark_binary.check_separate_builds(this, Build({'isa': 'avx2'}),
                                           'x.so')


def test_fallback_warns_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(deploy_ops, '_EXT_TRIED', True)
    monkeypatch.setattr(deploy_ops, '_EXT', None)
    monkeypatch.setattr(deploy_ops, '_EXT_ERROR',
                        "ModuleNotFoundError: No module named "
                        "'mmbhvit._binary_ops'")
    monkeypatch.setattr(deploy_ops, '_FALLBACK_WARNED', False)
    with pytest.warns(RuntimeWarning) as rec:
        assert deploy_ops.resolve_backend('auto') == 'torch'
    msg = str(rec[0].message)
    assert "No module named 'mmbhvit._binary_ops'" in msg
    assert 'build isolation' in msg and '--no-build-isolation' in msg
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert deploy_ops.resolve_backend('auto') == 'torch'  # once
    with pytest.raises(RuntimeError, match='--no-build-isolation'):
        deploy_ops.resolve_backend('cpp')


def test_extension_from_an_older_source_is_refused_by_name(monkeypatch):
    """A build that lacks an op the Python side calls, or an argument
    that an op gained later (``out`` of ffn, ``table`` of attn_scores), is
    not used at all: the reason names what is missing and says to
    rebuild."""
    import types
    import mmbhvit

    def op(doc):
        def f(*a):
            return None
        f.__doc__ = doc
        return f

    for lacking, message in (('proj_norm', 'without proj_norm; rebuild it'),
                             ('MSMHAPlan', 'without MSMHAPlan; rebuild it'),
                             ('ffn.out', r'without ffn\(\.\.\., out=\); '
                              'rebuild it'),
                             ('attn_scores.table',
                              r'without attn_scores\(\.\.\., table=\); '
                              'rebuild it')):
        stale = types.ModuleType('mmbhvit._binary_ops')
        for name in deploy_ops.ENGINE_OPS:
            if name != lacking:
                setattr(stale, name, op(f'{name}(x: Tensor, out: Optional['
                                        'Tensor] = None, table: Optional['
                                        'Tensor] = None) -> Tensor'))
        if lacking == 'ffn.out':
            stale.ffn = op('ffn(x: Tensor, residual: Tensor) -> Tensor')
        if lacking == 'attn_scores.table':
            stale.attn_scores = op('attn_scores(q: Tensor, k: Tensor, '
                                   'scale: float) -> Tensor')
        monkeypatch.setitem(sys.modules, 'mmbhvit._binary_ops', stale)
        monkeypatch.setattr(mmbhvit, '_binary_ops', stale, raising=False)
        monkeypatch.setattr(deploy_ops, '_EXT_TRIED', False)
        monkeypatch.setattr(deploy_ops, '_EXT', None)
        monkeypatch.setattr(deploy_ops, '_EXT_ERROR', None)
        assert deploy_ops.load_extension() is None
        assert re.search(message, deploy_ops.extension_error())
        with pytest.raises(RuntimeError, match=message):
            deploy_ops.resolve_backend('cpp')
    # the real build names the arguments in its signatures
    if HAS_EXT:
        monkeypatch.undo()
        ext = deploy_ops.load_extension()
        assert deploy_ops.stale_build_reason(ext, deploy_ops.ENGINE_OPS) \
            is None


def test_info_command():
    done = subprocess.run([sys.executable, '-m', 'mmbhvit.deploy.info'],
                          capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.startswith('CPU: ')
    training = re.search(r'^training kernels \(sign/STE, RPReLU\): (.*)$',
                         out, re.M)
    assert training, out
    if HAS_EXT:
        assert training.group(1) == 'in use on CPU'
        for s in SETS:
            assert re.search(rf'^  {s} +(runs here|CPU lacks \S+|not built '
                             'for this target)$', out, re.M), s
        assert re.search(r'^in use: \w+ \(', out, re.M)
        for op in ('proj/ffn', 'msgdc', 'merge', 'attn_scores',
                   'attn_context'):
            assert re.search(rf'^  {re.escape(op)}: \S', out, re.M), op
    else:
        assert 'NOT available' in out and '--no-build-isolation' in out
        assert training.group(1).startswith('NOT available')


@pytest.mark.parametrize('c,ratio,tokens,unit', [(64, 8, 133, False),
                                                 (64, 8, 133, True),
                                                 (128, 8, 70, True),
                                                 (192, 4, 5, False)])
def test_mlp_nibble_table_gives_the_same_numbers(c, ratio, tokens, unit):
    """The AVX2 MLP expansion read from the nibble table (blocks of 64
    tokens, reduction tiles of 4, both with remainders here) gives the
    popcount path's numbers bit for bit (also where post_scale is 1 and
    its product is left out), and the other kernel sets ignore the table;
    shapes without a table get an empty one, a table of the wrong size is
    refused by name."""
    from mmbhvit.deploy.ops import kernel_words
    from mmbhvit.deploy.packing import pack_bits
    ext = deploy_ops.load_extension()
    if ext is None or 'avx2' not in ext.available_isas():
        pytest.skip('needs the AVX2 kernels')
    g = torch.Generator().manual_seed(c + tokens)
    hid = c * ratio

    def args(cin, cout):
        w = pack_bits(torch.rand(cout, cin, generator=g) > 0.5)
        return [0.3 * torch.randn(cin, generator=g),
                kernel_words(w, 1, cin)[0]] + [
                    torch.randn(cout, generator=g) for _ in range(5)]

    x = torch.randn(tokens, c, generator=g)
    res = torch.randn(tokens, c, generator=g)
    e, r = args(c, hid), args(hid, c)
    if unit:  # no LayerScale after the expansion: post_scale 1 (skipped)
        e[5] = torch.ones(hid)
    lut = ext.nibble_lut(e[1], c, hid)
    assert lut.dtype == torch.int8 and lut.numel() == 4 * c * hid
    mine = ext.isa()
    try:
        ext.set_isa('avx2')
        plain = ext.ffn(x, res, e, hid, 2, r, 3)
        table = ext.ffn(x, res, e, hid, 2, r, 3, lut)
        ext.set_isa('generic')
        generic = ext.ffn(x, res, e, hid, 2, r, 3, lut)
    finally:
        ext.set_isa(mine)
    assert torch.isfinite(plain).all()
    assert torch.equal(table, plain) and torch.equal(generic, plain)
    for cin in (96, 256):  # not a multiple of 64 / sums beyond int8
        w = kernel_words(pack_bits(torch.ones(64, cin) > 0), 1, cin)[0]
        assert ext.nibble_lut(w, cin, 64).numel() == 0
    with pytest.raises(RuntimeError, match='not the nibble table'):
        ext.ffn(x, res, e, hid, 2, r, 3, lut[:-32])


def test_nibble_table_benchmark_runs_and_checks_its_engines(capsys):
    """tools/deployment/benchmark_nibble_tables.py on the reduced demo
    classifier (stage 3: a 64 -> 256 MLP takes a table): the two engines
    give equal logits, and the run prints both timings and their ratio."""
    ext = deploy_ops.load_extension()
    if ext is None or ext.isa() != 'avx2':
        pytest.skip('the tables are read by the AVX2 kernels only')
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    try:
        import benchmark_nibble_tables as tool
    finally:
        sys.path.pop(0)
    config = osp.join(ROOT, 'configs', 'bhvit', 'bhvit-reduced_demo-cls.py')
    assert tool.main(['--config', config, '--repeats', '2', '--warmup', '0',
                      '--size', '64']) == 0
    out = capsys.readouterr().out
    assert '2 MLPs with a table' in out and '(equal logits)' in out
    assert 'with / without, paired:' in out
    # the CPU line names the SIMD level (AVX-512 here when the AVX2 set is
    # forced with MMBHVIT_KERNELS=avx2)
    assert re.search(r'SIMD (AVX2|AVX-512)', out)


# --------------------------------------------------------------------------
# tools/deployment/perf_breakdown.py
# --------------------------------------------------------------------------
_SO = '_binary_ops.cpython-311-x86_64-linux-gnu.so'
_NS = 'mmbhvit::avx2::(anonymous namespace)::'
PERF_REPORT = '\n'.join([
    '# Overhead  Shared Object  Symbol',
    f'    60.00%  {_SO}  [.] {_NS}proj_tile8<1, true, false>   -   -',
    f'    10.00%  {_SO}  [.] {_NS}shift<float>   -   -',
    f'     5.00%  {_SO}  [.] mmbhvit::(anonymous namespace)::shift',
    '     5.00%  libtorch_cpu.so  [.] at::native::AVX2::RowwiseMoments<f>',
    '     4.00%  libtorch_cpu.so  [.] at::native::view',
    '     4.00%  libtorch_cpu.so  [.] at::TensorBase::data_ptr<float>',
    '    12.00%  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault', ''])


def test_perf_breakdown_groups_samples_by_function():
    tool = load_tool('deployment/perf_breakdown.py')
    rows = tool.parse_report(PERF_REPORT)
    assert len(rows) == 7 and rows[0][2].endswith('false>')
    share, members = tool.breakdown(rows)
    binary, engine, aten, rest = tool.GROUPS
    assert share == {binary: 60., engine: 10., aten: 5., rest: 25.}
    # the shift binding (outside the kernel namespaces) is not the kernel
    assert any('(anonymous namespace)::shift' in s for _, s in members[rest])
    assert tool.function_name('ns::(anonymous namespace)::f<a<b>, c>') == 'f'


def test_perf_breakdown_names_kernels_that_exist():
    """The float kernels the tool names are exactly the functions of
    csrc/core/ops/{shift,stem,tokens}.h (a new or renamed one would
    otherwise count as binary), and its binding float work exists."""
    tool = load_tool('deployment/perf_breakdown.py')
    defined = set()
    for name in tool.FLOAT_HEADERS:
        src = open(osp.join(ROOT, 'csrc', 'core', 'ops', name)).read()
        defined |= set(re.findall(
            r'^(?:[A-Z_]+ )?(?:inline )?[\w:<>]+ +(\w+)\(', src, re.M))
    assert defined == tool.FLOAT_FUNCS
    src = open(osp.join(ROOT, 'csrc', 'binary_ops.cpp')).read()
    for name in tool.BINDING_FLOAT_FUNCS:
        assert re.search(rf'\b{name}\s*[(<]', src), name


def test_perf_breakdown_without_perf(monkeypatch, capsys):
    tool = load_tool('deployment/perf_breakdown.py')
    monkeypatch.setattr(tool.shutil, 'which', lambda name: None)
    assert tool.main([]) == 1
    assert 'needs Linux perf' in capsys.readouterr().err


def _perf_can_sample() -> bool:
    perf = shutil.which('perf')
    if perf is None:
        return False
    try:
        r = subprocess.run([perf, 'record', '-q', '-e', 'cpu-clock', '-o',
                            os.devnull, '--', 'true'], capture_output=True,
                           timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EXT, reason='packed-bit C++ kernels not built')
@pytest.mark.parametrize('config', ['bhvit-reduced_demo-cls.py',
                                    'fpn_bhvit-tiny_demo-shapes.py'])
def test_perf_breakdown_samples_a_forward(config, capsys):
    # probed here, not at collection: a perf run on every test collection
    if not _perf_can_sample():
        pytest.skip('perf missing or not allowed to sample here')
    tool = load_tool('deployment/perf_breakdown.py')
    assert tool.main([osp.join(ROOT, 'configs', 'bhvit', config), '--size',
                      '64', '--seconds', '1', '--frequency', '1000']) == 0
    out = capsys.readouterr().out
    shares = {g: float(re.search(rf'([\d.]+) %\s+[\d.]+ ms  {re.escape(g)}',
                                 out).group(1)) for g in tool.GROUPS}
    assert abs(sum(shares.values()) - 100) < 0.5
    assert shares['binary kernels'] > 10  # the kernels were found
    assert ('(backbone)' in out) == config.startswith('fpn')
