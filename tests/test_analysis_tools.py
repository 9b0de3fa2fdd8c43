# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The analysis CLIs (get_flops, benchmark, analyze_logs) and the model
index."""
import glob
import json
import os.path as osp

import pytest
import torch
import yaml
from _helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ARCH = ("dict(_delete_=True, embed_dims=[16, 32, 64, 128], "
        "depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], "
        "mlp_ratios=[2, 2, 2, 2])")


def _tool(name):
    return load_tool(f'analysis_tools/{name}.py')


@pytest.fixture
def cls_config(tmp_path):
    """A reduced BHViT classifier config on top of the repo's base."""
    path = tmp_path / 'tiny_cls.py'
    base = osp.join(ROOT, 'configs/_base_/models/bhvit_small.py')
    path.write_text(
        f'_base_ = [{base!r}]\n'
        "default_scope = 'mmpretrain'\n"
        f'model = dict(backbone=dict(arch={ARCH}, img_size=64, '
        'binary_merge=True),\n'
        '             head=dict(num_classes=5, in_channels=128))\n')
    return str(path)


@pytest.fixture
def seg_config(tmp_path):
    """A reduced BHViT + semantic FPN config on top of the repo's base."""
    path = tmp_path / 'tiny_seg.py'
    base = osp.join(ROOT, 'configs/_base_/models/fpn_bhvit.py')
    path.write_text(
        f'_base_ = [{base!r}]\n'
        "default_scope = 'mmseg'\n"
        f'model = dict(backbone=dict(arch={ARCH}, init_cfg=None),\n'
        '             neck=dict(in_channels=[16, 32, 64, 128], '
        'out_channels=16),\n'
        '             decode_head=dict(in_channels=[16, 16, 16, 16], '
        'channels=8, num_classes=3))\n')
    return str(path)


# --------------------------------------------------------------------------
# get_flops.py
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_get_flops_cli(cls_config, seg_config, tmp_path, capsys):
    get_flops = _tool('get_flops')
    out = tmp_path / 'cls.json'
    reports = get_flops.main(
        [cls_config, '--shape', '64', '64', '--both', '--json', str(out)])
    text = capsys.readouterr().out
    assert '| **total** |' in text and 'stage4' in text
    assert 'softmax' in text  # listed among the ops that are not counted
    binary, fp = json.loads(out.read_text())
    assert binary['input_shape'] == [1, 3, 64, 64]
    assert not binary['full_precision'] and fp['full_precision']
    total = {r['name']: r for r in binary['rows']}['total']
    fp_total = {r['name']: r for r in fp['rows']}['total']
    assert total['bops'] > 0 and fp_total['bops'] == 0
    assert total['ops'] == pytest.approx(total['bops'] / 64 + total['flops'])
    assert fp_total['flops'] == total['flops'] + total['binary_macs']
    assert reports[0].total.binary_params == total['binary_params'] > 0

    seg, = get_flops.main([seg_config, '--shape', '64', '64'])
    assert seg.task == 'segmentation'
    names = [r.name for r in seg.rows]
    assert names[-1] == 'total' and 'neck' in names and 'decode_head' in names
    assert seg.row('neck').bops == 0 and seg.row('neck').flops > 0


# --------------------------------------------------------------------------
# benchmark.py
# --------------------------------------------------------------------------
@pytest.mark.parametrize('which', ['cls', 'seg'])
def test_benchmark_cli(which, cls_config, seg_config, tmp_path, capsys):
    benchmark = _tool('benchmark')
    config = cls_config if which == 'cls' else seg_config
    out = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    try:
        report = benchmark.main([
            config, '--batch', '2', '--shape', '64', '64', '--repeats', '2',
            '--warmup', '1', '--threads', '1', '--json', str(out)
        ])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert report['threads'] == 1 and '1 threads' in text
    assert report['task'] == ('classification' if which == 'cls' else
                              'segmentation')
    cases = [(r['model'], r['batch']) for r in report['results']]
    assert sorted(cases) == sorted([('binary', 1), ('full precision', 1),
                                    ('binary', 2), ('full precision', 2)])
    for r in report['results']:
        assert len(r['times']) == 2
        assert r['min'] <= r['median'] <= r['max']
    assert [r['batch'] for r in report['ratios']] == [1, 2]
    assert '| binary | 2 |' in text and 'binary / full precision' in text
    assert json.loads(out.read_text())['repeats'] == 2


def test_benchmark_forward_outputs():
    """The timed calls produce logits (cls) and full-size maps (seg)."""
    benchmark = _tool('benchmark')
    model = torch.nn.Module()
    model.forward = lambda x, mode: (x.mean((2, 3)), mode)
    out, mode = benchmark.make_forward(model, 'classification', (8, 8))(
        torch.ones(2, 3, 8, 8))
    assert mode == 'tensor' and out.shape == (2, 3)
    seen = {}
    model.encode_decode = lambda x, metas: seen.update(metas=metas)
    benchmark.make_forward(model, 'segmentation', (16, 24))(
        torch.ones(3, 3, 16, 24))
    assert len(seen['metas']) == 3
    assert seen['metas'][0]['img_shape'] == (16, 24)


# --------------------------------------------------------------------------
# analyze_logs.py
# --------------------------------------------------------------------------
def _write_log(path, losses, mious, val_every=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(env_info='x'))]  # a non-scalar record
    for i, loss in enumerate(losses, 1):
        lines.append(json.dumps(dict(lr=0.01, loss=loss, iter=i * 10,
                                     step=i * 10)))
        if i % val_every == 0:
            lines.append(json.dumps(dict(mIoU=mious[i // val_every - 1],
                                         aAcc=90.0, step=i * 10)))
    path.write_text('\n'.join(lines) + '\n')


def test_plot_curve(tmp_path, capsys):
    analyze_logs = _tool('analyze_logs')
    log1 = tmp_path / 'run_a' / '20250101_000000' / 'vis_data' / \
        'scalars.json'
    log2 = tmp_path / 'run_b' / '20250101_000000' / 'vis_data' / \
        'scalars.json'
    _write_log(log1, [2.0, 1.5, 1.2, 1.0], [10.0, 20.0])
    _write_log(log2, [2.5, 2.0, 1.8, 1.7], [5.0, 8.0])
    out = tmp_path / 'curve.png'
    series = analyze_logs.main([
        'plot_curve', str(log1), str(log2), '--keys', 'loss', 'mIoU',
        '--out', str(out)
    ])
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert list(series) == ['loss', 'mIoU']
    assert series['loss']['run_a/20250101_000000'] == ([10, 20, 30, 40],
                                                       [2.0, 1.5, 1.2, 1.0])
    assert series['mIoU']['run_b/20250101_000000'] == ([20, 40], [5.0, 8.0])

    with pytest.raises(SystemExit) as exc:
        analyze_logs.main(['plot_curve', str(log1), '--keys', 'loss',
                           'accuracy/top1', '--out', str(tmp_path / 'x.png')])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'accuracy/top1' not found" in err
    assert 'mIoU' in err and 'loss' in err  # the available keys are listed
    assert not (tmp_path / 'x.png').exists()


# --------------------------------------------------------------------------
# model index
# --------------------------------------------------------------------------
def _metafile_models():
    with open(osp.join(ROOT, 'model-index.yml')) as f:
        index = yaml.safe_load(f)
    models = []
    for meta in index['Import']:
        with open(osp.join(ROOT, meta)) as f:
            models += yaml.safe_load(f)['Models']
    return models


def test_metafile_configs_exist_and_cover_the_zoo():
    models = _metafile_models()
    assert models
    for m in models:
        assert osp.isfile(osp.join(ROOT, m['Config'])), m['Config']
        # null until a checkpoint is published, then the file's URL
        assert 'Weights' in m, m['Name']
        assert m['Weights'] is None or str(m['Weights']).endswith('.pth'), m
        assert m['Metadata']['Parameters'] > 0 and m['Metadata']['FLOPs'] > 0
    listed = {osp.basename(m['Config']) for m in models}
    zoo = {osp.basename(p) for p in glob.glob(
        osp.join(ROOT, 'configs/bhvit/*.py')) if 'demo' not in p}
    assert zoo <= listed, f'configs missing from metafile.yml: {zoo - listed}'


def test_metafile_results():
    reported = {'bhvit-small_2xb128_in1k': 68.4,
                'bhvit-small-fpmerge_2xb128_in1k': 70.1,
                'bhvit-tiny_2xb128_in1k': 64.0,
                'bhvit-tiny-fpmerge_2xb128_in1k': 66.0}
    for m in _metafile_models():
        result, = m['Results']
        if result['Task'] == 'Image Classification':
            assert result['Metrics'] == {
                'Top 1 Accuracy': reported[m['Name']]}
        else:
            # no verified segmentation numbers: none may be printed
            assert result['Task'] == 'Semantic Segmentation'
            assert not result['Metrics']


def test_model_index_is_valid():
    modelindex = pytest.importorskip('modelindex')
    index = modelindex.load(osp.join(ROOT, 'model-index.yml'))
    errors = [e for e in index.collect_check_errors() if e['errors']]
    assert not errors, errors
    assert len(index.models) == len(_metafile_models())


# --------------------------------------------------------------------------
# prediction_agreement.py
# --------------------------------------------------------------------------
def test_prediction_agreement_miou_is_mmsegs():
    """The tool's mIoU is mmseg's IoUMetric figure over all images together
    (ignore index and classes absent from both left out), and labels it
    cannot count are refused by name."""
    import numpy as np
    tool = _tool('prediction_agreement')
    rng = np.random.default_rng(0)
    total, inter, union = None, np.zeros(5), np.zeros(5)
    for _ in range(3):
        label = rng.integers(0, 4, (12, 10))   # class 4 never occurs
        label[0, :3] = 255
        pred = np.where(rng.random((12, 10)) < 0.7, label % 255,
                        rng.integers(0, 4, (12, 10)))
        a = tool.areas(pred, label, 5)
        total = a if total is None else [t + x for t, x in zip(total, a)]
        keep = label != 255
        for c in range(5):  # the definition, pixel by pixel
            p, g = pred[keep] == c, label[keep] == c
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    assert float(total[3].sum()) == 3 * (120 - 3)
    present = union > 0
    got = tool.scores(total)
    assert np.isclose(got['mIoU'],
                      100 * (inter[present] / union[present]).mean())
    assert not present[4]
    with pytest.raises(ValueError, match='differ in shape'):
        tool.areas(np.zeros((2, 2)), np.zeros((2, 3)), 5)
    with pytest.raises(ValueError, match='outside 0..4'):
        tool.areas(np.zeros((2, 2)), np.full((2, 2), 7), 5)
