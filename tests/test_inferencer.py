# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""mmbhvit.apis.inferencer: mmseg's MMSegInferencer with strict loading and
the class names of the checkpoint or of the config's dataset."""
import json
import os.path as osp
import warnings

import numpy as np
import pytest
import torch
from mmengine.config import Config

from _helpers import REPO, make_shapes
from mmbhvit.apis import CheckpointMismatchError, build_model, inferencer
from mmbhvit.checkpoint_io import save_slim_checkpoint

CONFIG = osp.join(REPO, 'configs', 'bhvit',
                  'upernet_bhvit-tiny_demo-shapes.py')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('inferencer'), num_train=2,
                       num_val=2, size=48)


def _config(root):
    cfg = Config.fromfile(CONFIG)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    return cfg


def _dataset_meta(root):
    with open(osp.join(root, 'classes.json')) as f:
        meta = json.load(f)
    return tuple(meta['classes']), meta['palette']


def _image(root):
    return osp.join(root, 'img_dir', 'val', '000000.png')


@pytest.fixture(scope='module')
def checkpoint(shapes, tmp_path_factory):
    """A slim checkpoint of the demo model without ``dataset_meta``."""
    torch.manual_seed(0)
    model = build_model(_config(shapes))
    path = str(tmp_path_factory.mktemp('ckpt') / 'demo.pth')
    save_slim_checkpoint(model.state_dict(), path, meta=dict(note='test'))
    return path


def test_without_weights_the_names_are_the_datasets(shapes):
    classes, palette = _dataset_meta(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from mmseg.apis import MMSegInferencer
        plain = MMSegInferencer(model=_config(shapes), device='cpu')
    # the problem: mmseg falls back to Cityscapes' 19 names
    assert plain.model.dataset_meta['classes'][0] == 'road'

    seg = inferencer(_config(shapes))
    assert tuple(seg.model.dataset_meta['classes']) == classes
    assert seg.model.dataset_meta['palette'] == palette
    assert tuple(seg.visualizer.dataset_meta['classes']) == classes

    # the drawn picture uses the dataset's colours: with opacity 1 and no
    # labels every pixel is the palette colour of its predicted class
    result = seg(_image(shapes), return_vis=True, opacity=1.0,
                 with_labels=False)
    pred, vis = result['predictions'], result['visualization']
    assert pred.shape == vis.shape[:2] == (48, 48)
    expected = np.asarray(palette, np.uint8)[pred]
    np.testing.assert_array_equal(vis, expected)


def test_the_checkpoints_names_come_first(shapes, checkpoint, tmp_path):
    # a checkpoint without dataset_meta: the config's dataset
    seg = inferencer(_config(shapes), checkpoint)
    assert tuple(seg.model.dataset_meta['classes']) == \
        _dataset_meta(shapes)[0]
    # with dataset_meta (as training checkpoints have): those names
    named = str(tmp_path / 'named.pth')
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    meta = dict(classes=['bg', 'o', 'sq', 'tri', 'ring'],
                palette=[[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12],
                         [13, 14, 15]])
    save_slim_checkpoint(state['state_dict'], named,
                         meta=dict(dataset_meta=meta))
    seg = inferencer(_config(shapes), named)
    assert list(seg.model.dataset_meta['classes']) == meta['classes']
    assert seg.model.dataset_meta['palette'] == meta['palette']
    # and explicit arguments over both
    seg = inferencer(_config(shapes), named, classes=list('abcde'),
                     palette=[[0, 0, i] for i in range(5)])
    assert list(seg.visualizer.dataset_meta['classes']) == list('abcde')


def test_strict_loading_and_clear_errors(shapes, checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    state['state_dict'].pop('decode_head.conv_seg.weight')
    broken = str(tmp_path / 'other.pth')
    save_slim_checkpoint(state['state_dict'], broken)
    with pytest.raises(CheckpointMismatchError,
                       match='decode_head.conv_seg.weight'):
        inferencer(_config(shapes), broken)

    # no checkpoint names and a dataset without classes.json
    cfg = _config(osp.join(str(tmp_path), 'missing'))
    with pytest.raises(ValueError, match='No class names') as err:
        inferencer(cfg)
    assert 'classes.json' in str(err.value)

    with pytest.raises(ValueError, match='3 class names .* 5 output classes'):
        inferencer(_config(shapes), classes=list('abc'),
                   palette=[[0, 0, 0]] * 3)
    with pytest.raises(ValueError, match='together'):
        inferencer(_config(shapes), classes=list('abcde'))
