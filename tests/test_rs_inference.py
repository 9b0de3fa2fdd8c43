# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Remote sensing end to end: a generated georeferenced 16-bit 4-band
2000x2000 scene and its mask -> tools/dataset_converters/rs_lvf.py (tiles)
-> tools/train.py (a few iterations of a reduced 4-band config, validated
with sliding windows) -> tools/rs_inference.py over the whole scene (and
with the packed 1-bit backbone). The streamed, blended output equals
mmseg's sliding-window inference over the whole scene: no seams."""
import os
import os.path as osp
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch

# requirements/tests.txt installs it (via optional.txt): a missing rasterio
# fails here, loudly, rather than skipping
import rasterio  # noqa: E402

from mmbhvit.datasets import geo  # noqa: E402
from mmbhvit.datasets.geo_synth import make_scene  # noqa: E402
from _helpers import REPO, load_tool  # noqa: E402

DEFAULT_SCOPE = 'mmseg'
PY = sys.executable
PALETTE = [[0, 0, 0], [0, 200, 0], [128, 128, 128], [0, 0, 255]]
BASE = osp.join(REPO, 'configs', 'bhvit', 'fpn_bhvit-tiny_rs-lvf-rgbn.py')
#: A reduced 4-band config: BHViT with 16..128 channels and one block per
#: stage, 128-pixel crops, sliding windows of 128 every 96 pixels.
CONFIG = f'''
_base_ = {BASE!r}
norm_cfg = dict(type='BN', requires_grad=True)
crop = (128, 128)
dims = [16, 32, 64, 128]
model = dict(
    data_preprocessor=dict(size=crop),
    backbone=dict(arch=dict(_delete_=True, embed_dims=dims,
                            depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4],
                            mlp_ratios=[2, 2, 2, 2]),
                  img_size=128, drop_path_rate=0., norm_cfg=norm_cfg,
                  init_cfg=None),
    neck=dict(in_channels=dims, out_channels=16),
    decode_head=dict(in_channels=[16] * 4, channels=16, num_classes=4,
                     norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=crop, stride=(96, 96)))
train_pipeline = [
    dict(type='LoadRSImage'),
    dict(type='LoadAnnotations'),
    dict(type='CheckLabelRange'),
    dict(type='RandomCrop', crop_size=crop),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandomGainBias', prob=0.5),
    dict(type='PackSegInputs')
]
train_dataloader = dict(batch_size=2, num_workers=0,
                        persistent_workers=False,
                        dataset=dict(data_root=DATA,
                                     pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=DATA))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=6, val_interval=6)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=6))
optim_wrapper = dict(optimizer=dict(lr=1e-3))
randomness = dict(seed=0)
'''

tool = load_tool('rs_inference.py')


def _run(args):
    env = dict(os.environ, OMP_NUM_THREADS='2',
               OMP_WAIT_POLICY='PASSIVE')
    done = subprocess.run([PY, *args], capture_output=True, text=True,
                          env=env, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Raw scenes, converted data, config and a checkpoint of 6
    iterations."""
    root = tmp_path_factory.mktemp('rs')
    src = root / 'raw'
    for d in ('images/train', 'images/val', 'masks/train', 'masks/val'):
        (src / d).mkdir(parents=True)
    big = str(src / 'images/train/big.tif')
    make_scene(big, str(src / 'masks/train/big.tif'), (2000, 2000), seed=0)
    make_scene(str(src / 'images/val/v.tif'), str(src / 'masks/val/v.png'),
               (300, 260), seed=5, palette=PALETTE)
    (root / 'classes.json').write_text(
        '{"classes": ["field", "forest", "road", "water"], "palette": ' +
        str(PALETTE) + '}')
    data = root / 'data'
    load_tool('dataset_converters/rs_lvf.py').main([
        str(src), str(data), '--classes', str(root / 'classes.json'),
        '--tile', '256', '--overlap', '32', '--nproc', '2'])
    config = root / 'rs_small.py'
    config.write_text(f'DATA = {str(data)!r}\n' + textwrap.dedent(CONFIG))
    work = root / 'work'
    done = _run([osp.join('tools', 'train.py'), str(config), '--work-dir',
                 str(work)])
    assert 'mIoU' in done.stdout + done.stderr  # validated (slide mode)
    return dict(root=root, big=big, val=str(src / 'images/val/v.tif'),
                data=data, config=str(config),
                ckpt=str(work / 'iter_6.pth'))


@pytest.fixture(scope='module')
def model(trained):
    return tool.build(trained['config'], trained['ckpt'])


@pytest.mark.slow
def test_scene_inference_keeps_crs_transform_and_size(trained):
    root = trained['root']
    out = str(root / 'pred' / 'big_mask.tif')
    # 9 x 9 windows of 256 (the config's 128 would make 21 x 21)
    _run(['tools/rs_inference.py', trained['big'], trained['config'],
          trained['ckpt'], out, '--window', '256', '--stride', '218'])
    with rasterio.open(out) as pred, rasterio.open(trained['big']) as src:
        assert pred.crs == src.crs and pred.crs.to_epsg() == 32633
        assert pred.transform == src.transform
        assert (pred.width, pred.height) == (src.width, src.height) == \
            (2000, 2000)
        assert pred.count == 1 and pred.dtypes == ('uint8', )
        assert pred.colormap(1)[3][:3] == tuple(PALETTE[3])
        mask = pred.read(1)
    assert mask.max() < 4
    overview = cv2.imread(str(root / 'pred' / 'big_mask.png'))
    assert overview.shape == (1024, 1024, 3)
    # the overview is the mask sampled at the centres of its pixels,
    # coloured with the palette
    idx = ((np.arange(1024) + 0.5) * 2000 / 1024).astype(int)
    expected = np.asarray(PALETTE, np.uint8)[mask[idx][:, idx]]
    assert np.array_equal(overview[..., ::-1], expected)


def _reference(model, scene):
    """mmseg's sliding-window inference over the whole scene in memory."""
    norm = geo.BandNorm.from_dict(model.dataset_meta['band_norm'])
    img = geo.read_raster(scene)
    h, w = img.shape[1:]
    x = torch.from_numpy(norm.apply(img, channel_axis=0))[None]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))
    with torch.no_grad():
        logits = model.inference(tool.Preprocess(model)(x), [meta])
    return logits[0].argmax(0).numpy().astype(np.uint8)


@pytest.mark.slow
def test_streamed_windows_equal_whole_scene_slide_inference(
        trained, model, tmp_path, monkeypatch):
    ref = _reference(model, trained['val'])
    reads = []
    real_read = geo.read_raster

    def recording_read(path, bands=None, window=None, out_shape=None):
        reads.append(window)
        return real_read(path, bands, window, out_shape)

    monkeypatch.setattr(geo, 'read_raster', recording_read)
    for batch in (1, 3):
        out = str(tmp_path / f'v{batch}.tif')
        done = tool.infer_scene(model, trained['val'], out,
                                batch_size=batch, log=lambda *a: None)
        assert done['window'] == 128 and done['stride'] == 96
        with rasterio.open(out) as pred:
            mask = pred.read(1)
        # 3 x 3 overlapping windows on 300x260: the logits averaged where
        # they overlap, exactly as mmseg's slide_inference
        assert done['windows'] == 9
        assert np.array_equal(mask, ref), (mask != ref).mean()
        assert len(np.unique(ref)) > 1  # not a constant prediction
    # streamed: every read is one row of windows, never the scene
    assert reads and all(w is not None and w[3] <= 128 for w in reads)


@pytest.mark.slow
def test_scene_inference_with_packed_backbone(trained, model, tmp_path):
    packed = str(tmp_path / 'small.packed.pth')
    load_tool('deployment/export_binary.py').main(
        [trained['config'], trained['ckpt'], packed])
    float_out, packed_out = str(tmp_path / 'f.tif'), str(tmp_path / 'p.tif')
    tool.main([trained['val'], trained['config'], trained['ckpt'],
               packed_out, '--packed', packed])
    tool.infer_scene(model, trained['val'], float_out, log=lambda *a: None)
    with rasterio.open(float_out) as a, rasterio.open(packed_out) as b:
        assert b.crs == a.crs and b.transform == a.transform
        agree = (a.read(1) == b.read(1)).mean()
    assert agree >= 0.999, agree


@pytest.mark.slow
def test_scene_inference_clear_errors(trained, tmp_path):
    model = tool.build(trained['config'], trained['ckpt'])  # changed below
    with pytest.raises(ValueError, match=r'model takes 4 band\(s\)'):
        tool.infer_scene(model, trained['val'], str(tmp_path / 'x.tif'),
                         bands=[1, 2, 3], log=lambda *a: None)
    model.dataset_meta = {k: v for k, v in model.dataset_meta.items()
                          if k != 'band_norm'}
    with pytest.raises(geo.RasterError, match='no band normalisation'):
        tool.infer_scene(model, trained['val'], str(tmp_path / 'x.tif'),
                         log=lambda *a: None)
    assert not osp.exists(tmp_path / 'x.tif')
    # the converter's bands.json given explicitly works
    tool.infer_scene(model, trained['val'], str(tmp_path / 'y.tif'),
                     band_norm_file=str(trained['data'] / 'bands.json'),
                     log=lambda *a: None)
    assert osp.exists(tmp_path / 'y.tif')
