# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Remote-sensing data: the GeoTIFF converter (tiling, bit depth, bands,
normalisation, georeference, tile index, bad input), the LoadRSImage /
RandomGainBias transforms, RSLVFDataset's bands.json, and RGB-pretrained
stems fitted to N-band models. Small generated scenes, in-process."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

# requirements/tests.txt installs it (via optional.txt): a missing rasterio
# fails here, loudly, rather than skipping
import rasterio  # noqa: E402

import mmbhvit  # noqa: E402,F401
from mmbhvit.datasets import RSLVFDataset, geo  # noqa: E402
from mmbhvit.datasets.geo_synth import (DEFAULT_TRANSFORM,  # noqa: E402
                                        make_scene)
from mmbhvit.datasets.transforms import (LoadRSImage,  # noqa: E402
                                         RandomGainBias)
from _helpers import load_tool  # noqa: E402

DEFAULT_SCOPE = 'mmseg'
CLASSES = ['field', 'forest', 'road', 'water']
PALETTE = [[0, 0, 0], [0, 200, 0], [128, 128, 128], [0, 0, 255]]

converter = load_tool('dataset_converters/rs_lvf.py')


def _classes(tmp_path):
    path = tmp_path / 'classes.json'
    path.write_text(json.dumps(dict(classes=CLASSES, palette=PALETTE)))
    return str(path)


@pytest.fixture()
def raw(tmp_path):
    """Two 16-bit 4-band georeferenced scenes: one with an index GeoTIFF
    mask (train), one with an RGB colour PNG mask (val)."""
    src = tmp_path / 'src'
    for d in ('images/train', 'images/val', 'masks/train', 'masks/val'):
        (src / d).mkdir(parents=True)
    make_scene(str(src / 'images/train/a.tif'),
               str(src / 'masks/train/a.tif'), (300, 260), seed=1)
    make_scene(str(src / 'images/val/b.tif'), str(src / 'masks/val/b.png'),
               (150, 120), seed=2, palette=PALETTE)
    return src


def _convert(raw, out, tmp_path, *extra):
    converter.main([str(raw), str(out), '--classes', _classes(tmp_path),
                    '--tile', '128', '--overlap', '32', *extra])
    return out


def _read(path, window=None, bands=None):
    return geo.read_raster(str(path), bands, window)


# --------------------------------------------------------------------------
# Window grid
# --------------------------------------------------------------------------
@pytest.mark.parametrize('size,tile,stride', [(300, 128, 96), (128, 128, 96),
                                              (100, 128, 96), (1000, 512,
                                                               341)])
def test_window_grid_covers_and_matches_mmseg(size, tile, stride):
    starts = geo.window_starts(size, tile, stride)
    # mmseg's slide_inference grid
    n = max(size - tile + stride - 1, 0) // stride + 1
    ref = [max(min(i * stride + tile, size) - tile, 0) for i in range(n)]
    assert starts == ref
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert starts[-1] + min(tile, size) == size  # flush with the edge


# --------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------
def test_converter_keeps_bit_depth_bands_and_georeference(raw, tmp_path):
    out = _convert(raw, tmp_path / 'out', tmp_path, '--bands', '4,3,2,1')
    index = json.loads((out / 'tiles.json').read_text())
    norm = geo.load_band_norm(str(out / 'bands.json'))
    assert norm.bands == [4, 3, 2, 1] and norm.dtype == 'uint16'
    assert norm.method == 'percentile'
    # 300x260 -> 3 x 3 tiles of 128 (stride 96); the 150x120 val scene
    # 2 x 1 (its height, less than a tile, kept)
    train = [t for t in index['tiles'] if t['split'] == 'train']
    assert len(train) == 9 and len(index['tiles']) == 11
    val = [t for t in index['tiles'] if t['split'] == 'val']
    assert [t['window'] for t in val] == [[0, 0, 128, 120],
                                          [22, 0, 128, 120]]
    scene = raw / 'images/train/a.tif'
    for t in train:
        x, y, w, h = t['window']
        tile = out / 'img_dir/train' / (t['name'] + '.tif')
        with rasterio.open(tile) as ds:
            assert ds.dtypes == ('uint16', ) * 4 and ds.count == 4
            assert (ds.width, ds.height) == (w, h) == (128, 128)
            assert ds.crs.to_epsg() == 32633
            # georeference shifted to the tile: same ground coordinates
            a, _, c, _, e, f = DEFAULT_TRANSFORM
            assert ds.transform.c == pytest.approx(c + a * x)
            assert ds.transform.f == pytest.approx(f + e * y)
            data = ds.read()
        assert np.array_equal(data, _read(scene, t['window'], [4, 3, 2, 1]))
        label = cv2.imread(str(out / 'ann_dir/train' / (t['name'] + '.png')),
                           cv2.IMREAD_UNCHANGED)
        assert np.array_equal(
            label, _read(raw / 'masks/train/a.tif', t['window'])[0])
    # percentiles of the training scene (small: read without decimation)
    full = _read(scene, None, [4, 3, 2, 1]).reshape(4, -1)
    assert norm.low == pytest.approx(np.percentile(full, 2, axis=1))
    assert norm.high == pytest.approx(np.percentile(full, 98, axis=1))
    stretched = norm.apply(full.astype(np.float32), channel_axis=0)
    assert norm.mean == pytest.approx(stretched.mean(1), abs=1e-2)
    # the colour PNG mask of the val scene decoded through the palette
    b_mask = _read(raw / 'masks/val/b.png').transpose(1, 2, 0)
    expected = geo.colour_to_index(b_mask, PALETTE)
    stitched = geo.stitch_tiles(str(out), 'b', str(out / 'ann_dir/val'),
                                str(tmp_path / 'b_stitched.tif'))
    assert np.array_equal(stitched, expected)
    # tiles stitched back = the scene's mask, with its georeference
    mask = geo.stitch_tiles(str(out), 'a', str(out / 'ann_dir/train'),
                            str(tmp_path / 'a_stitched.tif'))
    assert np.array_equal(mask, _read(raw / 'masks/train/a.tif')[0])
    with rasterio.open(tmp_path / 'a_stitched.tif') as ds, \
            rasterio.open(scene) as ref:
        assert ds.crs == ref.crs and ds.transform == ref.transform
    meta = json.loads((out / 'classes.json').read_text())
    assert meta == dict(classes=CLASSES, palette=PALETTE)


def test_converter_parallel_equals_serial_and_whole_scenes(raw, tmp_path):
    one = _convert(raw, tmp_path / 'one', tmp_path)
    two = _convert(raw, tmp_path / 'two', tmp_path, '--nproc', '2')
    names = sorted(os.listdir(one / 'img_dir/train'))
    assert names == sorted(os.listdir(two / 'img_dir/train'))
    for name in names:
        assert np.array_equal(_read(one / 'img_dir/train' / name),
                              _read(two / 'img_dir/train' / name))
    whole = _convert(raw, tmp_path / 'whole', tmp_path, '--tile', '0')
    assert sorted(os.listdir(whole / 'img_dir/train')) == ['a.tif']
    assert _read(whole / 'img_dir/train/a.tif').shape == (4, 260, 300)


def _expect_error(raw, tmp_path, *needles, extra=()):
    with pytest.raises(SystemExit) as err:
        _convert(raw, tmp_path / 'bad', tmp_path, *extra)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    assert not (tmp_path / 'bad' / 'bands.json').exists()
    return msg


def test_converter_size_mismatch(raw, tmp_path):
    mask = str(raw / 'masks/train/a.tif')
    make_scene(str(tmp_path / 'x.tif'), mask, (300, 259), seed=1)
    _expect_error(raw, tmp_path, mask, '300x259', '300x260')


def test_converter_crs_mismatch(raw, tmp_path):
    mask = str(raw / 'masks/train/a.tif')
    make_scene(str(tmp_path / 'x.tif'), mask, (300, 260), seed=1,
               crs='EPSG:4326', transform=(1e-5, 0, 15, 0, -1e-5, 47))
    _expect_error(raw, tmp_path, mask, 'CRS', 'EPSG:4326', 'EPSG:32633')


def test_converter_unsupported_dtype(raw, tmp_path):
    img = str(raw / 'images/train/a.tif')
    data = _read(img).astype(np.float64)
    with rasterio.open(img, 'w', driver='GTiff', width=300, height=260,
                       count=4, dtype='float64') as ds:
        ds.write(data)
    _expect_error(raw, tmp_path, img, 'float64', 'uint16')


def test_converter_colour_not_in_palette(raw, tmp_path):
    mask = raw / 'masks/val/b.png'
    rgb = _read(mask)
    rgb[:, 5, 7] = (255, 255, 255)
    with rasterio.open(mask, 'w', driver='PNG', width=150, height=120,
                       count=3, dtype='uint8') as ds:
        ds.write(rgb)
    msg = _expect_error(raw, tmp_path, str(mask), '(255, 255, 255)')
    assert '--ignore-colour' in msg
    out = _convert(raw, tmp_path / 'ok', tmp_path, '--ignore-colour',
                   '255,255,255')
    stitched = geo.stitch_tiles(str(out), 'b', str(out / 'ann_dir/val'),
                                None)
    assert stitched[5, 7] == 255


def test_converter_bad_band_and_index_values(raw, tmp_path):
    img = str(raw / 'images/train/a.tif')
    _expect_error(raw, tmp_path, img, '4 band(s)', '[5]',
                  extra=('--bands', '1,5'))
    mask = str(raw / 'masks/train/a.tif')
    data = _read(mask)
    data[0, 0, 0] = 9
    with rasterio.open(mask, 'r+') as ds:
        ds.write(data)
    _expect_error(raw, tmp_path, mask, '[9]', '4 classes')


# --------------------------------------------------------------------------
# Transforms and the dataset
# --------------------------------------------------------------------------
def test_dataset_and_load_rs_image_apply_band_norm(raw, tmp_path):
    out = _convert(raw, tmp_path / 'out', tmp_path)
    ds = RSLVFDataset(
        data_root=str(out), img_suffix='.tif',
        data_prefix=dict(img_path='img_dir/train',
                         seg_map_path='ann_dir/train'),
        pipeline=[dict(type='LoadRSImage'), dict(type='LoadAnnotations'),
                  dict(type='CheckLabelRange'),
                  dict(type='RandomGainBias', prob=0.),
                  dict(type='PackSegInputs')])
    norm = geo.load_band_norm(str(out / 'bands.json'))
    assert ds.metainfo['band_norm'] == norm.to_dict()
    info = ds.get_data_info(0)
    sample = ds[0]
    raw_tile = _read(info['img_path']).astype(np.float64)
    low = np.asarray(norm.low)[:, None, None]
    high = np.asarray(norm.high)[:, None, None]
    expected = np.clip((raw_tile - low) / (high - low), 0, 1) * 255
    inputs = sample['inputs'].numpy()
    assert inputs.dtype == np.float32 and inputs.shape == (4, 128, 128)
    assert np.abs(inputs - expected).max() < 1e-3
    # not quantised: 16-bit levels survive between integers
    assert np.any(np.abs(inputs - np.round(inputs)) > 0.01)


def test_load_rs_image_errors_and_rgb_order(raw, tmp_path):
    tile = str(raw / 'images/train/a.tif')
    with pytest.raises(ValueError, match='no band normalisation'):
        LoadRSImage()(dict(img_path=tile))
    three = geo.BandNorm([1, 2, 3], 'uint16', [0.] * 3, [1.] * 3)
    with pytest.raises(ValueError, match=r'4 band\(s\).*for 3'):
        LoadRSImage(band_norm=three.to_dict())(dict(img_path=tile))
    png = str(tmp_path / 'rgb.png')
    bgr = np.zeros((8, 9, 3), np.uint8)
    bgr[..., 2] = 200  # red
    cv2.imwrite(png, bgr)
    img = LoadRSImage()(dict(img_path=png))['img']
    assert img.dtype == np.float32 and img.shape == (8, 9, 3)
    assert img[0, 0].tolist() == [200., 0., 0.]  # R, G, B


def test_random_gain_bias_keeps_float_and_bands():
    img = np.random.default_rng(0).uniform(0, 255, (6, 5, 4)).astype(
        np.float32)
    out = RandomGainBias(prob=1., gain_range=(1.1, 1.1),
                         bias_range=(-3, -3))(dict(img=img.copy()))['img']
    assert out.dtype == np.float32 and out.shape == (6, 5, 4)
    assert np.allclose(out, np.clip(img * 1.1 - 3, 0, 255), atol=1e-4)


def test_band_norm_validation():
    with pytest.raises(ValueError, match='high'):
        geo.BandNorm([1], 'uint16', [5.], [5.])
    with pytest.raises(ValueError, match='2 bands but 1'):
        geo.BandNorm([1, 2], 'uint16', [0.], [1., 2.])
    with pytest.raises(ValueError, match='1-based'):
        geo.parse_bands('0,1')


# --------------------------------------------------------------------------
# RGB-pretrained stem into an N-band model
# --------------------------------------------------------------------------
def test_rgb_stem_expanded_to_four_bands(tmp_path):
    from mmbhvit.apis import CheckpointMismatchError
    from mmbhvit.models import BHViT
    arch = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
    rgb = BHViT(arch=arch, in_channels=3, img_size=64)
    ckpt = str(tmp_path / 'rgb.pth')
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in rgb.state_dict().items()}}, ckpt)
    init = dict(type='Pretrained', checkpoint=ckpt, prefix='backbone.')
    strict = BHViT(arch=arch, in_channels=4, img_size=64, init_cfg=init)
    with pytest.raises(CheckpointMismatchError, match='patch_embed'):
        strict.init_weights()
    four = BHViT(arch=arch, in_channels=4, img_size=64,
                 init_cfg=dict(init, expand_bands='mean'))
    four.init_weights()
    w3 = rgb.patch_embed.conv.weight.detach()
    w4 = four.patch_embed.conv.weight.detach()
    assert torch.allclose(w4[:, :3], w3 * 0.75)
    assert torch.allclose(w4[:, 3], w3.mean(1) * 0.75)
    # an input equal on every band meets the stem as the RGB one did
    x3 = torch.full((1, 3, 8, 8), 0.7)
    x4 = torch.full((1, 4, 8, 8), 0.7)
    assert torch.allclose(four.patch_embed.conv(x4),
                          rgb.patch_embed.conv(x3), atol=1e-5)
    # every other tensor loaded as it is
    for k, v in rgb.state_dict().items():
        if k != 'patch_embed.conv.weight':
            assert torch.equal(four.state_dict()[k], v), k


# --------------------------------------------------------------------------
# tools/rs_inference.py: which bands and normalisation a scene gets
# --------------------------------------------------------------------------
def test_scene_normalisation_is_resolved_or_refused(tmp_path):
    from types import SimpleNamespace
    tool = load_tool('rs_inference.py')
    rgb = str(tmp_path / 'rgb.tif')
    make_scene(rgb, None, (64, 48), bands=3, dtype='uint8', crs=None,
               transform=None)
    model = SimpleNamespace(dataset_meta={},
                            backbone=SimpleNamespace(in_channels=3))
    norm, bands, _ = tool.resolve_norm(model, geo.raster_info(rgb))
    assert bands == [1, 2, 3] and norm.method == 'none'  # 8-bit as is
    model.backbone.in_channels = 4
    with pytest.raises(ValueError, match=r'model takes 4 band\(s\)'):
        tool.resolve_norm(model, geo.raster_info(rgb))
    deep = str(tmp_path / 'deep.tif')
    make_scene(deep, None, (64, 48))
    with pytest.raises(geo.RasterError, match='uint16 scene and no band'):
        tool.resolve_norm(model, geo.raster_info(deep))
    # the checkpoint's normalisation chooses the bands
    model.dataset_meta['band_norm'] = geo.BandNorm(
        [4, 3, 2, 1], 'uint16', [0.] * 4, [9.] * 4).to_dict()
    norm, bands, source = tool.resolve_norm(model, geo.raster_info(deep))
    assert bands == [4, 3, 2, 1] and 'checkpoint' in source
    with pytest.raises(geo.RasterError, match='computed on uint16'):
        tool.resolve_norm(model, geo.raster_info(rgb), bands=[1, 2, 3, 3])
