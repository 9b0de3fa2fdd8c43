# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""tools/deployment/as_avx2_cpu.py: an AVX2-only CPUID view of an x86-64
CPU for the AVX2 goals of the speed benchmarks."""
import os
import os.path as osp
import signal
import subprocess
import sys

import pytest

from mmbhvit.utils import sysinfo

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
import as_avx2_cpu  # noqa: E402

TOOL = osp.join(ROOT, 'tools', 'deployment', 'as_avx2_cpu.py')
HERE_REASON = as_avx2_cpu.unavailable_reason()
needs_cpuid_faulting = pytest.mark.skipif(
    HERE_REASON is not None, reason=f'no AVX2 view here: {HERE_REASON}')


def _cpuinfo(flags):
    return f'processor\t: 0\nmodel name\t: X\nflags\t\t: {" ".join(flags)}\n'


def test_unavailable_reason_names_what_is_missing():
    ok = _cpuinfo(['fpu', 'avx2', 'avx512f', 'cpuid_fault'])
    linux = dict(machine='x86_64', system='Linux')
    assert as_avx2_cpu.unavailable_reason(ok, **linux) is None
    why = as_avx2_cpu.unavailable_reason(_cpuinfo(['avx2', 'avx512f']),
                                         **linux)
    assert 'cpuid_fault' in why
    assert 'AVX2' in as_avx2_cpu.unavailable_reason(
        _cpuinfo(['avx', 'cpuid_fault']), **linux)
    assert 'x86-64 Linux' in as_avx2_cpu.unavailable_reason(
        ok, machine='aarch64', system='Linux')
    assert 'x86-64 Linux' in as_avx2_cpu.unavailable_reason(
        ok, machine='x86_64', system='Darwin')


def test_command_env_preloads_first_once_and_drops_faulthandler():
    env = as_avx2_cpu.command_env(
        '/x/lib.so', {'LD_PRELOAD': 'a.so /x/lib.so', 'PYTHONFAULTHANDLER':
                      '1', 'KEEP': 'y'})
    assert env['LD_PRELOAD'] == '/x/lib.so a.so'
    assert 'PYTHONFAULTHANDLER' not in env and env['KEEP'] == 'y'


def test_refuses_to_run_where_it_cannot_mask(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(as_avx2_cpu, 'unavailable_reason',
                        lambda: 'no cpuid_fault flag')
    marker = tmp_path / 'ran'
    code = as_avx2_cpu.main(['--', sys.executable, '-c',
                             f'open({str(marker)!r}, "w")'])
    assert code == 2 and not marker.exists()
    assert 'no cpuid_fault flag; nothing was run' in capsys.readouterr().err


def test_cpuid_view_needs_the_library_loaded(monkeypatch):
    # the variable alone (e.g. inherited without the preload) is not enough
    monkeypatch.setenv('MMBHVIT_CPUID_VIEW', 'avx2')
    assert sysinfo.cpuid_view() is None
    assert 'CPUID view' not in sysinfo.cpu_description()


@needs_cpuid_faulting
def test_library_is_built_once(tmp_path):
    lib = as_avx2_cpu.build_library(str(tmp_path))
    mtime = os.stat(lib).st_mtime_ns
    assert as_avx2_cpu.build_library(str(tmp_path)) == lib
    assert os.stat(lib).st_mtime_ns == mtime
    assert os.listdir(tmp_path) == [as_avx2_cpu.LIBRARY_NAME]


def _under_view(code, **kw):
    return subprocess.run([sys.executable, TOOL, '--', sys.executable, '-c',
                           code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, **kw)


@needs_cpuid_faulting
def test_every_library_sees_avx2_only():
    code = '\n'.join([
        'import torch',
        'from mmbhvit.utils.sysinfo import cpu_description, cpuid_view',
        'from mmbhvit.deploy.ops import load_extension',
        'print("torch", torch.backends.cpu.get_cpu_capability())',
        'print("view", cpuid_view())',
        'print("cpu", cpu_description())',
        'from mmbhvit.models.binary import fused',
        'print("int8", fused.int8_products_fast())',
        'ext = load_extension()',
        'print("ext", ext.isa() if ext else None,',
        '      ",".join(ext.available_isas()) if ext else "")',
    ])
    done = _under_view(code)
    assert done.returncode == 0, done.stderr
    out = dict(line.split(' ', 1) for line in done.stdout.splitlines())
    assert out['torch'] == 'AVX2'
    assert out['view'] == 'avx2'
    assert out['int8'] == 'False'  # torch._int_mm would be a plain loop
    if 'avx512f' in open('/proc/cpuinfo').read():
        assert 'SIMD AVX2 (CPUID view of an AVX-512 CPU)' in out['cpu']
    if out['ext'] != 'None ':  # the packed kernels are built
        isa, available = out['ext'].split(' ')
        assert isa == 'avx2' and 'avx512' not in available


@needs_cpuid_faulting
def test_a_real_segfault_still_kills_the_process():
    done = _under_view('import ctypes; ctypes.string_at(0)')
    assert done.returncode == -signal.SIGSEGV, (done.returncode,
                                                done.stderr)


def test_fp32_conv_benchmark_flags_rates_above_the_avx2_ceiling(
        monkeypatch, capsys):
    """benchmark_fp32_conv.py times each installed fp32 engine (names the
    missing ones) and flags a rate above the AVX2 FMA ceiling."""
    import benchmark_fp32_conv as bench
    from mmbhvit.deploy.ops import load_extension
    if load_extension() is None:
        pytest.skip('mmbhvit._binary_ops is not built: no clock, no ceiling')
    monkeypatch.setattr(bench, 'AVX2_FMA_FLOPS_PER_CYCLE', 1e-6)
    assert bench.main(['--cin', '8', '--cout', '8', '--size', '8',
                       '--repeats', '1']) == 0
    out = capsys.readouterr().out
    assert 'AVX2 FMA ceiling' in out
    lines = {line.split()[0]: line for line in out.splitlines()
             if line.startswith(('PyTorch', 'ONNX', 'OpenVINO'))}
    assert set(lines) == {'PyTorch', 'ONNX', 'OpenVINO'}
    assert 'above the AVX2 ceiling' in lines['PyTorch']
    for name in ('ONNX', 'OpenVINO'):
        assert ('GFLOP/s' in lines[name]) != ('skipped' in lines[name])
