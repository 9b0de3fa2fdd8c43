# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The shipped segmentation configs: they build, run inference, draw, carry
the documented settings; and the demo learns (mIoU well above the
majority-class baseline)."""
import glob
import json
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import mmbhvit  # noqa: F401
import mmbhvit.datasets  # noqa: F401
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from mmseg.apis import inference_model, init_model, show_result_pyplot

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# the segmentation configs (configs/bhvit also holds mmpretrain ones)
CONFIGS = sorted(
    glob.glob(osp.join(REPO, 'configs', 'bhvit', 'upernet_*.py')) +
    glob.glob(osp.join(REPO, 'configs', 'bhvit', 'fpn_*.py')))
PY = sys.executable

init_default_scope('mmseg')
DEFAULT_SCOPE = 'mmseg'  # see tests/conftest.py


def test_expected_configs_exist():
    names = {osp.basename(c) for c in CONFIGS}
    for name in ('upernet_bhvit_ade20k.py', 'fpn_bhvit_ade20k.py',
                 'upernet_bhvit_rs-lvf.py', 'fpn_bhvit_rs-lvf.py',
                 'upernet_bhvit-tiny_ade20k.py',
                 'upernet_bhvit-tiny_demo-shapes.py'):
        assert name in names


@pytest.fixture(scope='module')
def image_file(tmp_path_factory):
    """A non-square 96x128 test image (a gradient with a disc)."""
    path = str(tmp_path_factory.mktemp('img') / 'input.png')
    yy, xx = np.mgrid[0:96, 0:128]
    img = np.stack([xx * 2, yy * 2, 255 - xx], axis=-1).astype(np.uint8)
    cv2.circle(img, (80, 40), 20, (0, 0, 255), -1)
    cv2.imwrite(path, img)
    return path


@pytest.mark.parametrize('config', CONFIGS, ids=osp.basename)
@pytest.mark.slow
def test_config_builds_infers_and_draws(config, image_file, tmp_path):
    cfg = Config.fromfile(config)
    assert 'mmbhvit' in cfg.custom_imports['imports']
    assert cfg.model.backbone.type == 'BHViT'
    # run at the image's own size (the 512-pixel test resize is slow on CPU)
    cfg.test_pipeline = [
        t for t in cfg.test_pipeline if t['type'] != 'Resize'
    ]
    bands = cfg.model.backbone.get('in_channels', 3)
    if bands != 3:  # an N-band config (RS-LVF R, G, B, near infrared)
        rgb = cv2.imread(image_file)
        image_file = str(tmp_path / 'input.tif')
        cv2.imwrite(image_file, np.dstack([rgb[..., i % 3]
                                           for i in range(bands)]))
    model = init_model(cfg, None, device='cpu')
    n = model.decode_head.num_classes
    model.dataset_meta = dict(
        classes=[f'c{i}' for i in range(n)],
        palette=[[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256]
                 for i in range(n)])
    result = inference_model(model, image_file)
    pred = result.pred_sem_seg.data
    assert tuple(pred.shape) == (1, 96, 128)
    assert int(pred.max()) < n
    assert tuple(result.seg_logits.data.shape) == (n, 96, 128)
    out_file = str(tmp_path / 'overlay.png')
    drawn = show_result_pyplot(
        model, image_file, result, show=False, out_file=out_file)
    assert drawn.shape == (96, 128, 3)
    assert cv2.imread(out_file).shape == (96, 128, 3)


def test_ade20k_upernet_settings():
    cfg = Config.fromfile(
        osp.join(REPO, 'configs', 'bhvit', 'upernet_bhvit_ade20k.py'))
    model = cfg.model
    assert model.type == 'EncoderDecoder'
    assert model.backbone.arch == 'small'
    assert model.backbone.init_cfg == dict(
        type='Pretrained', checkpoint=None, prefix='backbone.')
    assert model.decode_head.type == 'UPerHead'
    assert model.decode_head.in_channels == [64, 128, 256, 512]
    assert model.decode_head.norm_cfg.type == 'SyncBN'
    assert model.auxiliary_head.type == 'FCNHead'
    assert model.auxiliary_head.in_index == 2
    assert model.auxiliary_head.in_channels == 256
    assert model.data_preprocessor.size == (512, 512)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_dataloader.dataset.data_root == \
        'data/ade/ADEChallengeData2016'
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    train_types = [t['type'] for t in cfg.train_pipeline]
    assert train_types.index('CheckLabelRange') == \
        train_types.index('LoadAnnotations') + 1
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.01
    warmup, poly = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and poly.type == 'PolyLR'
    assert poly.end == 160000


def test_no_weight_decay_on_norms_pos_embed_and_binary_scalars():
    cfg = Config.fromfile(
        osp.join(REPO, 'configs', 'bhvit', 'upernet_bhvit-tiny_ade20k.py'))
    cfg.model.backbone.attn_binarizer = 'gsb'  # it has 0-d parameters
    from mmseg.registry import MODELS
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            decay[names[id(p)]] = group['weight_decay']
    zero = [n for n in decay if 'pos_embed' in n or 'binarizer' in n
            or '.norm' in n or n.endswith('.bias')]
    assert any(n.endswith('binarizer.alpha') for n in zero)
    assert all(decay[n] == 0 for n in zero)
    # binary and full-precision conv weights keep the decay
    assert decay['backbone.stages.0.0.ffn.expand.conv.weight'] == 0.01
    assert decay['decode_head.conv_seg.weight'] == 0.01


@pytest.mark.slow
def test_demo_learns_well_above_majority_baseline(tmp_path):
    """A small run of tools/demo/run_demo.py (the `make demo` script)."""
    work = tmp_path / 'work'
    cmd = [
        PY, osp.join(REPO, 'tools', 'demo', 'run_demo.py'), '--data-root',
        str(tmp_path / 'data'), '--work-dir',
        str(work), '--num-train', '48', '--num-val', '12', '--size', '64',
        '--iters', '90', '--batch-size', '8', '--num-vis', '2',
        '--log-interval', '40'
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(work / 'demo_result.json') as f:
        result = json.load(f)
    baseline = result['majority_baseline_mIoU']
    assert 10 < baseline < 25  # background is most of each image
    assert result['mIoU'] > baseline + 30, result
    assert 'validation mIoU' in done.stdout
    preds = sorted((work / 'predictions').glob('*.png'))
    assert len(preds) == 2
    row = cv2.imread(str(preds[0]))
    assert row.shape[1] == 3 * 64 + 2 * 4  # input | gt | prediction
    curve = cv2.imread(result['training_curve'])  # loss and accuracy panels
    assert curve is not None and curve.shape[0] > curve.shape[1] // 2
    assert torch.load(
        result['checkpoint'], map_location='cpu',
        weights_only=False)['meta']['dataset_meta']['classes'][0] == \
        'background'
