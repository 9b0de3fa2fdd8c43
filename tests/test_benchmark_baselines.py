# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The fp32 baselines of the latency benchmark (mmbhvit.deploy.benchmark):
ONNX Runtime / OpenVINO forms, the speed-ups against each fp32 form and the
fastest one, the OPs split backbone / head, the markdown rows and the skip
message of a missing runtime."""
import os.path as osp

import pytest
import torch

import mmbhvit  # noqa: F401
from mmbhvit.deploy import benchmark as bench

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_SEG = osp.join(ROOT, 'configs/bhvit/upernet_bhvit-tiny_demo-shapes.py')


def _runs(**medians):
    return {name: dict(median_ms=v, q1_ms=v, q3_ms=v, min_ms=v, n=1)
            for name, v in medians.items()}


def test_speedups_definition():
    runs = _runs(**{
        '(a) pytorch fp32 full model': 30.0,
        '(b) pytorch binary full model': 50.0,
        '(c) packed backbone + pytorch heads (BN folded, channels-last)': 10.0,
        '(d) onnxruntime fp32 full model': 20.0,
        '(e) openvino fp32 full model': 25.0,
        '(a) pytorch fp32 backbone': 12.0,
        '(c) packed engine backbone': 4.0,
    })
    sp = bench.speedups(runs)
    full = sp['full model']
    assert full['(a) pytorch fp32 full model'] == pytest.approx(3.0)
    assert full['(d) onnxruntime fp32 full model'] == pytest.approx(2.0)
    assert full['fastest fp32'] == pytest.approx(2.0)
    assert full['fastest fp32 form'] == '(d) onnxruntime fp32 full model'
    # the binary simulation is not an fp32 baseline
    assert '(b) pytorch binary full model' not in full
    assert sp['backbone']['fastest fp32'] == pytest.approx(3.0)


def test_missing_runtime_is_skipped_with_message(monkeypatch):
    pytest.importorskip('onnx', reason='onnx not installed (mmbhvit[onnx])')
    from mmbhvit.deploy import onnx as onnx_mod
    monkeypatch.setattr(onnx_mod, 'available_runtimes',
                        lambda: ('onnxruntime', ))
    run, skipped = bench.resolve_baselines(None)
    assert run == ['onnxruntime']
    assert len(skipped) == 1 and 'openvino is not installed' in skipped[0]
    assert 'pip install openvino' in skipped[0]
    monkeypatch.setattr(onnx_mod, 'available_runtimes', lambda: ())
    run, skipped = bench.resolve_baselines(['openvino'])
    assert run == [] and 'pip install openvino' in skipped[0]
    with pytest.raises(ValueError, match='unknown baseline'):
        bench.resolve_baselines(['tensorrt'])


def test_cli_prints_skip_line(monkeypatch, capsys):
    """--no-baselines / a missing runtime: the CLI says so before timing
    (stopped right after by a failing model build)."""
    pytest.importorskip('onnx', reason='onnx not installed (mmbhvit[onnx])')
    from mmbhvit.deploy import onnx as onnx_mod
    monkeypatch.setattr(onnx_mod, 'available_runtimes', lambda: ())

    def stop(*args, **kwargs):
        raise RuntimeError('stop here')

    monkeypatch.setattr(bench, 'build_pair', stop)
    with pytest.raises(RuntimeError, match='stop here'):
        bench.main([DEMO_SEG, '--threads', '1'])
    out = capsys.readouterr().out
    assert 'CPU: ' in out
    assert 'skipping the onnxruntime fp32 baseline' in out
    assert 'skipping the openvino fp32 baseline' in out
    assert 'fp32 baselines: none' in out


@pytest.mark.slow
def test_segmentor_baselines_ops_and_markdown():
    pytest.importorskip('onnx', reason='onnx not installed (mmbhvit[onnx])')
    runtimes, _ = bench.resolve_baselines(None)
    if not runtimes:
        pytest.skip('neither onnxruntime nor openvino is installed')
    binary, fp = bench.build_pair(DEMO_SEG, calib_size=(64, 64))
    res = bench.benchmark_task('seg', binary, fp, (64, 64), [1], iters=1,
                               warmup=0, profile=False, baselines=runtimes)
    res['config'] = DEMO_SEG
    runs = res['runs'][1]
    for runtime in runtimes:
        for group in ('backbone', 'full model'):
            name = f'{bench.BASELINES[runtime]} {group}'
            assert runs[name]['median_ms'] > 0 and runs[name]['n'] == 1
    # the fastest-fp32 speed-up is its definition
    full = res['speedups'][1]['full model']
    packed = [s['median_ms'] for k, s in runs.items()
              if k.startswith('(c)') and bench._group(k) == 'full model'][0]
    fp32 = [s['median_ms'] for k, s in runs.items()
            if k.startswith(('(a)', '(d)', '(e)'))
            and bench._group(k) == 'full model']
    assert len(fp32) == 1 + len(runtimes)
    assert full['fastest fp32'] == pytest.approx(min(fp32) / packed)
    # OPs: backbone + head = total, both parts counted
    ops = res['ops']
    assert ops['backbone_ops'] > 0 and ops['head_ops'] > 0
    assert ops['backbone_ops'] + ops['head_ops'] == pytest.approx(
        ops['total_ops'])
    assert ops['backbone_bops'] > 0 and ops['head_bops'] == 0
    text = bench.format_result(res)
    assert 'vs the fastest fp32 engine' in text and 'head' in text
    md = bench.markdown_rows([res]).splitlines()
    assert md[0].startswith('CPU: ')
    row = md[-1].split('|')[1:-1]
    header = md[2].split('|')[1:-1]
    assert len(row) == len(header) and row[2].strip() == '1'
    assert row[0].strip() == osp.basename(DEMO_SEG)
    assert row[-1].strip() == f"{full['fastest fp32']:.2f}x"
    for runtime, col in (('onnxruntime', 'ORT fp32 ms'),
                         ('openvino', 'OpenVINO fp32 ms')):
        cell = row[[h.strip() for h in header].index(col)].strip()
        assert (cell != '–') == (runtime in runtimes)
    # the fp32 model is left as it was (eval, no export hooks left)
    assert not fp.training
    with torch.no_grad():
        assert fp(torch.zeros(1, 3, 64, 64), mode='tensor').shape[1] == 5
