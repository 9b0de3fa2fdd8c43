# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""tools/deployment/benchmark_lce.py without its optional dependencies:
it imports, ``--help`` works, and a missing TensorFlow / larq / LCE gives
an error naming the pip command (absence simulated, so this holds whether
or not they happen to be installed)."""
import os.path as osp
import subprocess
import sys

import pytest
from _helpers import load_script

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = 'tools/deployment/benchmark_lce.py'
OPTIONAL = ('tensorflow', 'larq', 'larq_zoo', 'larq_compute_engine')


@pytest.fixture
def tool():
    return load_script(TOOL)


def test_imports_without_tensorflow(tool):
    for name in OPTIONAL:
        assert name not in vars(tool)
    assert tool.MODELS == ('quicknet', 'quicknet_small', 'birealnet')
    args = tool.parse_args([])
    assert args.model == 'quicknet' and args.threads == [1, 2]
    assert args.size == 224 and args.json is None
    assert args.bconv == ['im2col', 'indirect'] and not args.xnnpack
    assert set(args.bconv) <= set(tool.BCONV_KERNELS)
    args = tool.parse_args(['--model', 'birealnet', '--threads', '1',
                            '--repeats', '5', '--warmup', '1'])
    assert (args.model, args.threads, args.repeats, args.warmup) == \
        ('birealnet', [1], 5, 1)
    with pytest.raises(SystemExit):
        tool.parse_args(['--model', 'resnet'])


def test_help(tool, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ('--model', '--threads', '--repeats', '--warmup', '--json',
                 '--bconv', '--rounds', '--xnnpack', '--tflite'):
        assert flag in out


def test_help_subprocess():
    out = subprocess.run([sys.executable, osp.join(REPO, TOOL), '--help'],
                         capture_output=True, text=True, check=True).stdout
    assert 'quicknet' in out and 'birealnet' in out


@pytest.mark.parametrize('missing', OPTIONAL)
def test_missing_dependency_names_pip_command(tool, monkeypatch, missing):
    # None in sys.modules makes ``import name`` raise ImportError
    monkeypatch.setitem(sys.modules, missing, None)
    # the tool sets these (setdefault) before importing TensorFlow; set
    # them here so monkeypatch restores the environment afterwards
    monkeypatch.setenv('TF_USE_LEGACY_KERAS', '1')
    monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
    with pytest.raises(SystemExit) as e:
        tool.main(['--threads', '1'])
    msg = str(e.value.code)
    assert 'pip install -r requirements/lce-benchmark.txt' in msg
    assert 'larq-compute-engine==0.16.0' in msg
    assert 'own virtualenv' in msg


def test_pip_command_matches_requirements(tool):
    with open(osp.join(REPO, 'requirements', 'lce-benchmark.txt')) as f:
        pins = {line.strip() for line in f
                if line.strip() and not line.startswith('#')}
    for pin in tool.PIP_PACKAGES.split()[2:]:
        if '==' in pin:
            assert pin in pins, pin


def test_cpu_info(tool, tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(
        'processor\t: 0\nmodel name\t: Some Xeon\n'
        'flags\t\t: fpu popcnt avx2 avx512f avx512_vpopcntdq\n\n'
        'processor\t: 1\nmodel name\t: Some Xeon\n'
        'flags\t\t: fpu popcnt avx2 avx512f avx512_vpopcntdq\n')
    info = tool.cpu_info(str(cpuinfo))
    assert info == dict(model='Some Xeon', logical_cpus=2,
                        simd=['popcnt', 'avx2', 'avx512f',
                              'avx512_vpopcntdq'])
    assert 'Some Xeon, 2 logical CPUs' in tool.cpu_line(info)
    missing = tool.cpu_info(str(tmp_path / 'absent'))
    assert missing['model'] == 'unknown' and missing['simd'] == []
