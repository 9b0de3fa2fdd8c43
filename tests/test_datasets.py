# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""RS-LVF loader, label checks, bad inputs, the demo data and the data
checks of the tools (no training here)."""
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest

import mmbhvit  # noqa: F401
import mmbhvit.datasets  # noqa: F401
from mmbhvit.datasets import (CheckLabelRange, DatasetMetaError,
                              LabelRangeError, RSLVFDataset)
from mmbhvit.utils.data_check import (DataCheckError, check_data_exists,
                                      check_num_classes)
from mmengine.config import Config
from mmengine.registry import init_default_scope
from _helpers import load_script

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
DEMO_CFG = osp.join(REPO, 'configs', 'bhvit',
                    'upernet_bhvit-tiny_demo-shapes.py')

init_default_scope('mmseg')
DEFAULT_SCOPE = 'mmseg'  # see tests/conftest.py




maker = load_script(
    osp.join(REPO, 'tools', 'dataset_converters', 'make_demo_dataset.py'),
    'make_demo_dataset')

PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='CheckLabelRange'),
    dict(type='PackSegInputs')
]


@pytest.fixture()
def shapes(tmp_path):
    """A fresh small demo dataset per test (tests may damage it)."""
    root = str(tmp_path / 'shapes')
    maker.make_dataset(root, num_train=4, num_val=2, size=48, seed=1)
    return root


def _dataset(root, split='train', **kwargs):
    return RSLVFDataset(
        data_root=root,
        data_prefix=dict(
            img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
        pipeline=PIPELINE,
        **kwargs)


# --------------------------------------------------------------------------
# Class list: from the data, from the config, never guessed
# --------------------------------------------------------------------------
def test_classes_and_palette_come_from_classes_json(shapes):
    ds = _dataset(shapes)
    assert len(ds) == 4
    assert ds.metainfo['classes'] == maker.CLASSES
    assert [list(c) for c in ds.metainfo['palette']] == maker.PALETTE
    sample = ds[0]
    assert tuple(sample['inputs'].shape) == (3, 48, 48)
    seg = sample['data_samples'].gt_sem_seg.data
    assert int(seg.max()) < len(maker.CLASSES)


def test_classes_txt_format(shapes):
    os.remove(osp.join(shapes, 'classes.json'))
    with open(osp.join(shapes, 'classes.txt'), 'w') as f:
        f.write('# one name per line\nbackground\ncircle\n\nsquare\n'
                'triangle\nring\n')
    ds = _dataset(shapes)
    assert ds.metainfo['classes'] == maker.CLASSES
    assert len(ds.metainfo['palette']) == 5  # mmseg draws one per class


def test_config_metainfo_without_file(shapes):
    os.remove(osp.join(shapes, 'classes.json'))
    classes = ('bg', 'a', 'b', 'c', 'd')
    ds = _dataset(shapes, metainfo=dict(classes=classes))
    assert ds.metainfo['classes'] == classes


def test_missing_class_list_is_an_error(shapes):
    os.remove(osp.join(shapes, 'classes.json'))
    with pytest.raises(DatasetMetaError, match='classes.json'):
        _dataset(shapes)


def test_config_and_file_disagree(shapes):
    with pytest.raises(DatasetMetaError, match='disagree'):
        _dataset(shapes, metainfo=dict(classes=('a', 'b', 'c', 'd', 'e')))
    # the same list is fine
    _dataset(shapes, metainfo=dict(classes=maker.CLASSES))


def test_palette_length_mismatch(shapes):
    meta = dict(classes=list(maker.CLASSES), palette=maker.PALETTE[:3])
    with open(osp.join(shapes, 'classes.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(DatasetMetaError, match='3 colours but there are 5'):
        _dataset(shapes)


def test_duplicate_class_names(shapes):
    with open(osp.join(shapes, 'classes.json'), 'w') as f:
        json.dump(dict(classes=['a', 'b', 'a']), f)
    with pytest.raises(DatasetMetaError, match='duplicated'):
        _dataset(shapes)


# --------------------------------------------------------------------------
# Label values, image formats, broken files
# --------------------------------------------------------------------------
def test_label_out_of_range_names_file_and_value(shapes):
    ann = osp.join(shapes, 'ann_dir', 'train', '000002.png')
    label = cv2.imread(ann, cv2.IMREAD_UNCHANGED)
    label[3:6, 3:6] = 7  # 5 classes: 7 is invalid
    label[0, 0] = 255  # the ignore index is fine
    cv2.imwrite(ann, label)
    ds = _dataset(shapes)
    ds[0]  # other files still load
    with pytest.raises(LabelRangeError) as err:
        ds[2]
    assert '000002.png' in str(err.value) and '[7]' in str(err.value)


def test_check_label_range_transform_directly():
    t = CheckLabelRange(num_classes=150)
    ok = dict(gt_seg_map=np.array([[0, 149, 255]], np.uint8))
    assert t(ok) is ok
    with pytest.raises(LabelRangeError, match='reduce_zero_label'):
        t(dict(gt_seg_map=np.array([[150]], np.uint8), seg_map_path='x.png',
               reduce_zero_label=True))
    # inference pipelines have no label: nothing to check, results pass
    # through unchanged
    no_label = dict(img=np.zeros((2, 2, 3)))
    assert t(no_label) is no_label
    with pytest.raises(ValueError, match='num_classes'):
        CheckLabelRange()(dict(gt_seg_map=np.zeros((2, 2), np.uint8)))


@pytest.mark.parametrize('mode', ['gray', 'rgba'])
def test_gray_and_rgba_images_become_3_channels(shapes, mode):
    path = osp.join(shapes, 'img_dir', 'train', '000001.png')
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if mode == 'gray':
        cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    else:
        alpha = np.full(img.shape[:2] + (1, ), 128, np.uint8)
        cv2.imwrite(path, np.concatenate([img, alpha], axis=2))
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert raw.ndim == 2 or raw.shape[2] == 4  # really gray / RGBA on disk
    inputs = _dataset(shapes)[1]['inputs']
    assert tuple(inputs.shape) == (3, 48, 48)


def test_corrupt_image_names_the_file(shapes):
    path = osp.join(shapes, 'img_dir', 'train', '000003.png')
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n this is not an image')
    with pytest.raises(Exception) as err:
        _dataset(shapes)[3]
    assert '000003.png' in str(err.value)


# --------------------------------------------------------------------------
# The demo dataset generator and the RS-LVF converter
# --------------------------------------------------------------------------
def test_demo_dataset_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    maker.make_dataset(a, 3, 1, 40, seed=5)
    maker.make_dataset(b, 3, 1, 40, seed=5)
    maker.make_dataset(c, 3, 1, 40, seed=6)
    rel = osp.join('ann_dir', 'train', '000001.png')
    read = lambda root, p: cv2.imread(osp.join(root, p),  # noqa: E731
                                      cv2.IMREAD_UNCHANGED)
    assert np.array_equal(read(a, rel), read(b, rel))
    assert not np.array_equal(read(a, rel), read(c, rel))
    img = read(a, osp.join('img_dir', 'train', '000001.png'))
    assert img.shape == (40, 40, 3)
    labels = np.concatenate([
        read(a, osp.join('ann_dir', 'train', f'{i:06d}.png')).ravel()
        for i in range(3)
    ])
    # background plus at least two shape classes, nothing out of range
    assert set(np.unique(labels)) <= set(range(5))
    assert len(np.unique(labels)) >= 3


@pytest.mark.slow
def test_rs_lvf_converter(tmp_path):
    src, out = tmp_path / 'src', tmp_path / 'out'
    (src / 'images').mkdir(parents=True)
    (src / 'masks').mkdir()
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    with open(tmp_path / 'classes.json', 'w') as f:
        json.dump(dict(classes=['bg', 'roof', 'tree'], palette=palette), f)
    rng = np.random.default_rng(0)
    for i in range(5):
        idx = rng.integers(0, 3, size=(20, 24))
        colour = np.asarray(palette, np.uint8)[idx]
        if i == 0:
            colour[0, 0] = (255, 255, 255)  # an "ignore" colour
        cv2.imwrite(str(src / 'masks' / f't{i}.png'), colour[..., ::-1])
        cv2.imwrite(str(src / 'images' / f't{i}.jpg'),
                    rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
        if i == 0:
            first = idx
    tool = osp.join(REPO, 'tools', 'dataset_converters', 'rs_lvf.py')
    cmd = [PY, tool, str(src), str(out), '--classes',
           str(tmp_path / 'classes.json'), '--val-ratio', '0.4']
    # white is not in the palette: a clear error first
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode != 0
    assert 't0.png' in bad.stderr and '(255, 255, 255)' in bad.stderr
    done = subprocess.run(cmd + ['--ignore-colour', '255,255,255'],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    n_train = len(os.listdir(out / 'ann_dir' / 'train'))
    n_val = len(os.listdir(out / 'ann_dir' / 'val'))
    assert (n_train, n_val) == (3, 2)
    split = 'train' if (out / 'ann_dir' / 'train' / 't0.png').exists() \
        else 'val'
    label = cv2.imread(str(out / 'ann_dir' / split / 't0.png'),
                       cv2.IMREAD_UNCHANGED)
    expected = first.astype(np.uint8)
    expected[0, 0] = 255
    assert np.array_equal(label, expected)
    # images are written as (Geo)TIFF tiles, whatever the source format
    ds = _dataset(str(out), split='val', img_suffix='.tif')
    assert ds.metainfo['classes'] == ('bg', 'roof', 'tree')
    assert len(ds) == 2 and ds[0]['inputs'].shape[0] == 3


# --------------------------------------------------------------------------
# Data checks done by tools/train.py and tools/test.py
# --------------------------------------------------------------------------
def _demo_cfg(root, **heads):
    cfg = Config.fromfile(DEMO_CFG)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    for head, n in heads.items():
        cfg.model[head].num_classes = n
    return cfg


def test_data_check_missing_folder(tmp_path):
    cfg = _demo_cfg(str(tmp_path / 'nowhere'))
    with pytest.raises(DataCheckError) as err:
        check_data_exists(cfg)
    msg = str(err.value)
    assert str(tmp_path / 'nowhere') in msg
    assert 'rs_lvf.py' in msg  # how to prepare the data


def test_data_check_num_classes(shapes):
    check_num_classes(_demo_cfg(shapes))
    with pytest.raises(DataCheckError) as err:
        check_num_classes(_demo_cfg(shapes, auxiliary_head=7))
    msg = str(err.value)
    assert 'auxiliary_head.num_classes=7' in msg and '5 classes' in msg
    assert '--cfg-options' in msg


def test_data_check_ade20k_classes():
    cfg = Config.fromfile(
        osp.join(REPO, 'configs', 'bhvit', 'upernet_bhvit_ade20k.py'))
    check_num_classes(cfg)  # 150 = ADE20KDataset's classes
    cfg.model.decode_head.num_classes = 151
    with pytest.raises(DataCheckError, match='150 classes'):
        check_num_classes(cfg)
