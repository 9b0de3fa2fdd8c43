# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""tools/mmseg_tool.py: mmseg's own tool scripts on mmbhvit configs, under
mmcv-lite (CI) and full mmcv (`make test-full-mmcv`)."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from _helpers import REPO, load_tool, make_shapes
from mmbhvit.compat import is_lite_mmcv

CONFIG = osp.join(REPO, 'configs', 'bhvit',
                  'upernet_bhvit-tiny_demo-shapes.py')
TOOL = osp.join(REPO, 'tools', 'mmseg_tool.py')


@pytest.fixture(scope='module')
def tool():
    return load_tool('mmseg_tool.py')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('mmseg_tools'), num_train=3,
                       num_val=2, size=48)


def _data_options(root):
    return ['--cfg-options'] + [
        f'{loader}.dataset.data_root={root}'
        for loader in ('train_dataloader', 'val_dataloader',
                       'test_dataloader')
    ]


def test_names_resolve_and_unknown_names_list_the_tools(tool):
    tools = tool.available_tools()
    assert tool.resolve_tool('print_config') == tools['misc/print_config']
    assert tool.resolve_tool('tools/analysis_tools/confusion_matrix.py') \
        == tools['analysis_tools/confusion_matrix']
    with pytest.raises(tool.UnknownToolError) as err:
        tool.resolve_tool('browse_dataset')  # misc/ and analysis_tools/
    assert 'analysis_tools/browse_dataset' in str(err.value) and \
        'misc/browse_dataset' in str(err.value)
    with pytest.raises(tool.UnknownToolError) as err:
        tool.resolve_tool('no_such_tool')
    assert "unknown tool 'no_such_tool'" in str(err.value)
    assert 'misc/print_config' in str(err.value)
    assert 'analysis_tools/confusion_matrix' in str(err.value)
    with pytest.raises(tool.UnknownToolError, match='tools/train.py'):
        tool.resolve_tool('train')


def test_unknown_tool_exits_2(tool, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(['nope'])
    assert exc.value.code == 2
    assert 'misc/print_config' in capsys.readouterr().err


def test_print_config(tool, shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the script dumps example.py here
    tool.main(['print_config', CONFIG] + _data_options(shapes))
    out = capsys.readouterr().out
    assert "type='RSLVFDataset'" in out and "type='BHViT'" in out
    assert f"data_root='{shapes}'" in out
    assert (tmp_path / 'example.py').is_file()


def test_browse_dataset_writes_one_picture_per_image(tool, shapes, tmp_path):
    from mmseg.registry import DATASETS
    from mmseg.visualization import SegLocalVisualizer
    add_datasample = SegLocalVisualizer.add_datasample
    out = tmp_path / 'browse'
    tool.main(['analysis_tools/browse_dataset', CONFIG, '--not-show',
               '--output-dir', str(out)] + _data_options(shapes))
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(osp.join(shapes, 'img_dir', 'train')))
    picture = cv2.imread(str(out / names[0]))
    assert picture is not None and picture.shape[:2] == (48, 48)
    # the patches stay in place for no longer than the tool runs
    assert 'build' not in vars(DATASETS)
    assert SegLocalVisualizer.add_datasample is add_datasample


def test_confusion_matrix_with_the_datasets_classes(tool, shapes, tmp_path):
    # predictions = ground truth: the matrix is the identity
    pred = tmp_path / 'pred'
    shutil.copytree(osp.join(shapes, 'ann_dir', 'val'), pred)
    out = tmp_path / 'cm'
    tool.main(['confusion_matrix', CONFIG, str(pred), str(out)] +
              _data_options(shapes))
    assert cv2.imread(str(out / 'confusion_matrix.png')) is not None

    # what the tool read: the dataset's own classes (classes.json), and
    # its confusion matrix of the labels with themselves is diagonal
    script = tool.resolve_tool('confusion_matrix')
    import runpy

    from mmengine.config import Config
    from mmseg.registry import DATASETS
    namespace = runpy.run_path(script, run_name='mmseg_confusion_matrix')
    cfg = Config.fromfile(CONFIG)
    cfg.test_dataloader.dataset.data_root = shapes
    with tool.instance_metainfo():
        dataset = DATASETS.build(cfg.test_dataloader.dataset)
    with open(osp.join(shapes, 'classes.json')) as f:
        classes = json.load(f)['classes']
    assert list(dataset.METAINFO['classes']) == classes
    labels = [cv2.imread(str(pred / n), cv2.IMREAD_UNCHANGED)
              for n in sorted(os.listdir(pred))]
    matrix = namespace['calculate_confusion_matrix'](dataset, labels)
    assert matrix.shape == (len(classes), len(classes))
    assert np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0
    assert matrix.sum() == sum(label.size for label in labels)


@pytest.mark.slow
def test_cli_in_a_fresh_process(shapes, tmp_path):
    out = subprocess.run(
        [sys.executable, TOOL, 'print_config', CONFIG] +
        _data_options(shapes), capture_output=True, text=True, cwd=tmp_path,
        timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "type='RSLVFDataset'" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not is_lite_mmcv(), reason='full mmcv: mmseg\'s tools '
                    'import without mmbhvit')
def test_mmseg_script_alone_fails_under_mmcv_lite(tool, tmp_path):
    """What the launcher is for: the bare script stops at import."""
    out = subprocess.run(
        [sys.executable, tool.resolve_tool('print_config'), CONFIG],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "No module named 'mmcv._ext'" in out.stderr
