# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Data checks before the first iteration (tools/train.py, tools/test.py):
every image has its annotation, sizes match, no empty split, headers are
readable, classification class names match the folders; image headers are
read without decoding pixels."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

import mmbhvit  # noqa: F401
import mmbhvit.datasets  # noqa: F401
from mmbhvit.utils import data_check
from mmbhvit.utils.cls_data_check import (check_cls_config,
                                          compare_class_names)
from mmbhvit.utils.data_check import DataCheckError, check_data_config
from mmbhvit.utils.image_header import (ImageFileError, check_image_file,
                                        read_image_header)
from mmengine.config import Config
from _helpers import load_tool, make_shapes

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
CONFIGS = osp.join(REPO, 'configs', 'bhvit')
SEG_CFG = osp.join(CONFIGS, 'upernet_bhvit-tiny_demo-shapes.py')
ADE_CFG = osp.join(CONFIGS, 'upernet_bhvit_ade20k.py')
CLS_CFG = osp.join(CONFIGS, 'bhvit-reduced_demo-cls.py')
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

cls_maker = load_tool('dataset_converters/make_demo_cls_dataset.py')


@pytest.fixture()
def shapes(tmp_path):
    """A fresh demo-shapes dataset (4 train, 2 val, 48x48 PNG)."""
    return make_shapes(tmp_path, num_train=4, size=48, seed=1)


@pytest.fixture()
def textures(tmp_path):
    """A fresh demo classification dataset (5 class folders, 2 train and 1
    val image each, 16x16 PNG)."""
    root = str(tmp_path / 'textures')
    cls_maker.make_dataset(root, num_train=2, num_val=1, size=16)
    return root


def seg_cfg(root, path=SEG_CFG, **dataset):
    cfg = Config.fromfile(path)
    for loader in LOADERS:
        cfg[loader].dataset.data_root = root
        cfg[loader].dataset.update(dataset)
    return cfg


def cls_cfg(root, classes=None, **dataset):
    cfg = Config.fromfile(CLS_CFG)
    for loader in LOADERS:
        cfg[loader].dataset.data_root = root
        if classes is not None:
            cfg[loader].dataset.metainfo.classes = classes
        cfg[loader].dataset.update(dataset)
    return cfg


def seg_error(cfg, phases=('train', 'val'), **kwargs) -> str:
    with pytest.raises(DataCheckError) as err:
        check_data_config(cfg, phases, **kwargs)
    return str(err.value)


def cls_error(cfg, phases=('train', 'val')) -> str:
    with pytest.raises(DataCheckError) as err:
        check_cls_config(cfg, phases, check_teacher=False)
    return str(err.value)


def _path(root, kind, split, i):
    return osp.join(root, kind, split, f'{i:06d}.png')


def _jpeg_with_orientation(path, width, height, orientation):
    img = Image.fromarray(np.full((height, width, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes())


# --------------------------------------------------------------------------
# Image headers
# --------------------------------------------------------------------------
@pytest.mark.parametrize('ext', ['png', 'jpg', 'tif', 'bmp', 'webp', 'gif',
                                 'ppm'])
def test_header_sizes_agree_with_pillow(tmp_path, ext):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (21, 37, 3), np.uint8))
    path = str(tmp_path / f'a.{ext}')
    img.save(path)
    header = read_image_header(path)
    assert header.size == (37, 21) == Image.open(path).size
    assert header.loaded_size == (37, 21)


@pytest.mark.parametrize('ext', ['png', 'jpg', 'tif', 'webp'])
def test_exif_orientation_gives_the_loaded_size(tmp_path, ext):
    import mmcv
    img = Image.fromarray(np.zeros((21, 37, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap
    path = str(tmp_path / f'a.{ext}')
    img.save(path, exif=exif.tobytes())
    header = read_image_header(path)
    assert (header.size, header.orientation) == ((37, 21), 6)
    assert header.loaded_size == (21, 37)
    with open(path, 'rb') as f:
        data = f.read()
    for backend in ('cv2', 'pillow'):  # what LoadImageFromFile gets
        loaded = mmcv.imfrombytes(data, flag='color', backend=backend)
        assert loaded.shape[:2] == (37, 21)  # (H, W) = loaded_size reversed
    # label maps are loaded 'unchanged': rotated only in TIFF files
    for backend in ('cv2', 'pillow'):  # LoadAnnotations uses pillow
        loaded = mmcv.imfrombytes(data, flag='unchanged', backend=backend)
        assert loaded.shape[1::-1] == header.unchanged_size
    assert header.unchanged_size == ((21, 37) if ext == 'tif' else (37, 21))


def test_header_reads_only_the_header(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (600, 800, 3), np.uint8)
    png, jpg = str(tmp_path / 'big.png'), str(tmp_path / 'big.jpg')
    cv2.imwrite(png, big)
    cv2.imwrite(jpg, big)
    read = []
    real_pread = os.pread

    def counting_pread(fd, n, offset):
        data = real_pread(fd, n, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, 'pread', counting_pread)
    for path in (png, jpg):
        read.clear()
        assert read_image_header(path).size == (800, 600)
        assert os.path.getsize(path) > 100_000
        assert sum(read) <= 2 * 4096, (path, read)


@pytest.mark.parametrize('damage, expected', [
    ('empty', 'empty file (0 bytes)'),
    ('truncated', 'truncated'),
    ('header_only', 'truncated'),
    ('text', 'not an image'),
])
@pytest.mark.parametrize('ext', ['png', 'jpg'])
def test_unreadable_image_is_named(tmp_path, damage, expected, ext):
    path = str(tmp_path / f'bad.{ext}')
    cv2.imwrite(path, np.full((40, 60, 3), 7, np.uint8))
    with open(path, 'rb') as f:
        data = f.read()
    data = {'empty': b'', 'truncated': data[:len(data) * 2 // 3],
            'header_only': data[:20], 'text': b'this is not an image'}[damage]
    with open(path, 'wb') as f:
        f.write(data)
    with pytest.raises(ImageFileError) as err:
        read_image_header(path)
    assert str(err.value).startswith(path) and expected in str(err.value)
    # each of these would also fail when loaded (cv2 returns None/raises)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) \
        if data else None
    assert img is None


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image_header(str(tmp_path / 'nope.png'))
    with pytest.raises(ImageFileError, match='no such file'):
        check_image_file(str(tmp_path / 'nope.png'))
    with pytest.raises(ImageFileError, match='a folder'):
        read_image_header(str(tmp_path))


# --------------------------------------------------------------------------
# Segmentation: demo shapes / RS-LVF layout
# --------------------------------------------------------------------------
def test_correct_dataset_passes(shapes):
    check_data_config(seg_cfg(shapes))


def test_missing_annotations_listed_with_count(shapes, monkeypatch):
    for i in (1, 3):
        os.remove(_path(shapes, 'ann_dir', 'train', i))
    msg = seg_error(seg_cfg(shapes))
    assert 'train split' in msg and '2 annotations missing' in msg
    for i in (1, 3):
        assert _path(shapes, 'ann_dir', 'train', i) in msg
        assert _path(shapes, 'img_dir', 'train', i) in msg  # its image
    assert '--skip-data-check' in msg
    # more problems than listed: the first few plus the count of the rest
    monkeypatch.setattr(data_check, 'MAX_LISTED', 1)
    msg = seg_error(seg_cfg(shapes))
    assert _path(shapes, 'ann_dir', 'train', 1) in msg
    assert _path(shapes, 'ann_dir', 'train', 3) not in msg
    assert '... and 1 more' in msg


def test_size_mismatch_names_file_and_sizes(shapes):
    ann = _path(shapes, 'ann_dir', 'val', 1)
    cv2.imwrite(ann, np.zeros((40, 48), np.uint8))  # H=40, W=48
    msg = seg_error(seg_cfg(shapes))
    assert 'val split' in msg and 'size mismatch' in msg
    assert f'{_path(shapes, "img_dir", "val", 1)} is 48x48' in msg
    assert f'{ann} is 48x40' in msg


def test_exif_rotated_image_against_its_annotation(shapes):
    """A JPEG stored 48x40 with EXIF orientation 6 is loaded 40x48: its
    annotation must be 40x48 (label maps are not rotated)."""
    for split, n in (('train', 4), ('val', 2)):
        for i in range(n):
            os.remove(_path(shapes, 'img_dir', split, i))
            _jpeg_with_orientation(
                _path(shapes, 'img_dir', split, i)[:-4] + '.jpg', 48, 40, 6)
            cv2.imwrite(_path(shapes, 'ann_dir', split, i),
                        np.zeros((48, 40), np.uint8))
    check_data_config(seg_cfg(shapes, img_suffix='.jpg'), ('train', 'val'))
    cv2.imwrite(_path(shapes, 'ann_dir', 'train', 2),
                np.zeros((40, 48), np.uint8))
    msg = seg_error(seg_cfg(shapes, img_suffix='.jpg'))
    assert '000002.jpg is 40x48 (stored 48x40, turned by its orientation ' \
        'tag 6 when loaded)' in msg and '000002.png is 48x40' in msg


def test_unreadable_files_are_named(shapes):
    open(_path(shapes, 'img_dir', 'train', 0), 'wb').close()
    ann = _path(shapes, 'ann_dir', 'train', 2)
    with open(ann, 'rb') as f:
        data = f.read()
    with open(ann, 'wb') as f:
        f.write(data[:len(data) // 2])
    msg = seg_error(seg_cfg(shapes))
    assert '2 files unreadable' in msg
    assert (f'{_path(shapes, "img_dir", "train", 0)}: empty file (0 bytes)'
            '   (image)') in msg
    assert f'{ann}: the PNG does not end with its IEND chunk' in msg
    assert '(annotation)' in msg


def test_empty_split_names_split_folder_and_suffix(shapes):
    val_dir = osp.join(shapes, 'img_dir', 'val')
    shutil.rmtree(val_dir)
    os.makedirs(val_dir)
    cv2.imwrite(osp.join(val_dir, 'x.jpg'), np.zeros((4, 4, 3), np.uint8))
    msg = seg_error(seg_cfg(shapes))
    assert 'The val split (val_dataloader, RSLVFDataset) is empty' in msg
    assert val_dir in msg and "'.png'" in msg
    assert "1 '.jpg'" in msg  # what the folder holds instead
    # all problems at once: another empty split and a missing annotation
    os.remove(_path(shapes, 'ann_dir', 'train', 0))
    cfg = seg_cfg(shapes)
    cfg.test_dataloader.dataset.data_prefix.img_path = 'ann_dir/val'
    cfg.test_dataloader.dataset.img_suffix = '.tif'
    msg = seg_error(cfg, ('train', 'val', 'test'))
    assert 'The test split (test_dataloader, RSLVFDataset) is empty' in msg
    assert 'The val split' in msg and '1 annotation missing' in msg


def test_ann_file_split(shapes):
    ann_file = osp.join(shapes, 'train.txt')
    with open(ann_file, 'w') as f:
        f.write('000000\n000002\n000009\n')
    cfg = seg_cfg(shapes)
    cfg.train_dataloader.dataset.ann_file = 'train.txt'
    msg = seg_error(cfg, ('train', ))
    assert '1 image file missing' in msg
    assert _path(shapes, 'img_dir', 'train', 9) in msg
    assert '1 of 3 samples' in msg
    open(ann_file, 'w').close()
    msg = seg_error(cfg, ('train', ))
    assert 'train split' in msg and 'is empty' in msg and ann_file in msg


def test_annotations_not_loaded_are_not_required(shapes):
    """A test split without labels (no LoadAnnotations in its pipeline)."""
    shutil.rmtree(osp.join(shapes, 'ann_dir', 'val'))
    os.makedirs(osp.join(shapes, 'ann_dir', 'val'))
    cfg = seg_cfg(shapes)
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]
    check_data_config(cfg, ('test', ))
    assert 'annotations missing' in seg_error(seg_cfg(shapes), ('val', ))


def test_skip_file_check(shapes):
    os.remove(_path(shapes, 'ann_dir', 'train', 0))
    check_data_config(seg_cfg(shapes), ('train', ), check_files=False)


def test_many_files_log_progress(shapes, monkeypatch):
    logged = []
    monkeypatch.setattr(data_check, 'LOG_MIN_SAMPLES', 2)
    monkeypatch.setattr(data_check, 'print_log',
                        lambda msg, **kw: logged.append(msg))
    check_data_config(seg_cfg(shapes), ('train', ))
    out = '\n'.join(logged)
    assert 'Data check: reading the headers of 8 files of the train split' \
        in out and '--skip-data-check' in out and 'read in' in out


def test_ade20k_layout(tmp_path):
    """ADE20K: .jpg images, .png annotations, reduce_zero_label."""
    root = tmp_path / 'ADEChallengeData2016'
    for split in ('training', 'validation'):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(2):
            name = f'ADE_{split[:5]}_{i:08d}'
            cv2.imwrite(str(root / 'images' / split / f'{name}.jpg'),
                        np.zeros((30, 50, 3), np.uint8))
            cv2.imwrite(str(root / 'annotations' / split / f'{name}.png'),
                        np.ones((30, 50), np.uint8))
    cfg = seg_cfg(str(root), ADE_CFG)
    check_data_config(cfg, ('train', 'val'))
    missing = root / 'annotations' / 'validation' / 'ADE_valid_00000001.png'
    missing.unlink()
    msg = seg_error(cfg)
    assert 'val split' in msg and str(missing) in msg


# --------------------------------------------------------------------------
# Classification: class names against folders, files
# --------------------------------------------------------------------------
def test_classification_correct_dataset_passes(textures):
    check_cls_config(cls_cfg(textures), ('train', 'val'), check_teacher=False)


def test_mmpretrain_numbers_sorted_folders_whatever_the_names(textures):
    """What the class check guards against: given ``classes``, mmpretrain
    only compares their number with the folders; labels follow the sorted
    folder names, so names in another order are silently swapped."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import DATASETS
    init_default_scope('mmpretrain')
    swapped = ('checker', 'blobs', 'dots', 'hstripes', 'vstripes')
    ds = DATASETS.build(dict(type='ImageNet', data_root=textures,
                             split='train', metainfo=dict(classes=swapped),
                             pipeline=[]))
    first = ds.get_data_info(0)
    assert '/blobs/' in first['img_path'] and first['gt_label'] == 0
    assert ds.metainfo['classes'][0] == 'checker'  # the wrong name


def test_class_order_mismatch_is_an_error(textures):
    swapped = ('checker', 'blobs', 'dots', 'hstripes', 'vstripes')
    msg = cls_error(cls_cfg(textures, swapped))
    assert 'train split' in msg and 'swapped' in msg
    assert "label 0: folder 'blobs' named 'checker'" in msg
    assert "label 1: folder 'checker' named 'blobs'" in msg
    assert str(tuple(cls_maker.CLASSES)) in msg  # the fix


def test_class_names_differ_from_folders(textures):
    msg = cls_error(cls_cfg(textures, ('blobs', 'checker', 'dots',
                                       'hstripes', 'vertical')))
    assert "classes without a folder: ['vertical']" in msg
    assert "folders not in the classes: ['vstripes']" in msg
    msg = cls_error(cls_cfg(textures, ('blobs', 'checker', 'dots')))
    assert '(3)' in msg and '(5)' in msg
    assert "folders not in the classes: ['hstripes', 'vstripes']" in msg


def test_val_split_missing_a_class_folder(textures):
    shutil.rmtree(osp.join(textures, 'val', 'dots'))
    msg = cls_error(cls_cfg(textures))
    assert 'val split' in msg and "classes without a folder: ['dots']" in msg


def test_folder_classes_differ_between_splits(textures):
    """Without ``classes``, each split numbers its own folders."""
    shutil.rmtree(osp.join(textures, 'val', 'dots'))
    cfg = cls_cfg(textures)
    for loader in LOADERS:
        ds = cfg[loader].dataset
        ds.type = 'CustomDataset'
        ds.data_prefix = ds.pop('split')
        ds.pop('metainfo')
    msg = cls_error(cfg)
    assert 'train split' in msg and 'val split' in msg
    assert "only in train: ['dots']" in msg


def test_builtin_imagenet_classes_against_folders(textures):
    cfg = cls_cfg(textures)
    for loader in LOADERS:
        cfg[loader].dataset.pop('metainfo')
    msg = cls_error(cfg)
    assert '1000 built-in classes' in msg and '5 class folders' in msg


def test_other_naming_scheme_is_a_warning_only():
    folders = ['n01440764', 'n01443537']
    assert compare_class_names(folders, folders, 'x') is None
    warning = compare_class_names(['tench', 'goldfish'], folders, 'x')
    assert "'n01440764' -> 'tench'" in warning


def test_classification_empty_split(textures):
    for folder in cls_maker.CLASSES:
        for name in os.listdir(osp.join(textures, 'val', folder)):
            os.remove(osp.join(textures, 'val', folder, name))
    msg = cls_error(cls_cfg(textures))
    assert 'The val split (val_dataloader, ImageNet) is empty' in msg
    assert osp.join(textures, 'val') in msg and '.png' in msg


def test_classification_unreadable_image(textures):
    folder = osp.join(textures, 'train', 'dots')
    bad = osp.join(folder, sorted(os.listdir(folder))[0])
    open(bad, 'wb').close()
    msg = cls_error(cls_cfg(textures))
    assert f'{bad}: empty file (0 bytes)' in msg and 'train split' in msg


def test_classification_ann_file(textures):
    """ImageNet(split='val') reads meta/val.txt when it exists."""
    lines = ['blobs/blobs_000000.png 0', 'dots/missing.png 2',
             f'vstripes/{os.listdir(osp.join(textures, "val", "vstripes"))[0]}'
             ' 7']
    with open(osp.join(textures, 'meta', 'val.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.makedirs(osp.join(textures, 'val', 'blobs'), exist_ok=True)
    shutil.copy(
        osp.join(textures, 'train', 'blobs',
                 sorted(os.listdir(osp.join(textures, 'train', 'blobs')))[0]),
        osp.join(textures, 'val', 'blobs', 'blobs_000000.png'))
    msg = cls_error(cls_cfg(textures), ('val', ))
    assert '1 image file missing' in msg
    assert osp.join(textures, 'val', 'dots', 'missing.png') in msg
    assert '1 label out of range' in msg and 'label 7' in msg
    assert 'meta/val.txt' in msg and '2 of 3 samples' in msg


# --------------------------------------------------------------------------
# The tools
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_train_stops_before_the_runner_on_a_missing_annotation(shapes,
                                                               tmp_path):
    missing = _path(shapes, 'ann_dir', 'train', 2)
    os.remove(missing)
    work_dir = tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run(
        [PY, osp.join(REPO, 'tools', 'train.py'), SEG_CFG, '--work-dir',
         str(work_dir), '--cfg-options',
         f'train_dataloader.dataset.data_root={shapes}',
         f'val_dataloader.dataset.data_root={shapes}'],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert missing in done.stderr and 'annotation missing' in done.stderr
    assert not work_dir.exists()  # the Runner (which creates it) never ran


@pytest.mark.parametrize('tool, extra', [('train.py', []),
                                         ('test.py', ['ckpt.pth'])])
def test_tools_take_skip_data_check(tool, extra):
    module = load_tool(tool)
    args = module.parse_args([SEG_CFG, *extra, '--skip-data-check'])
    assert args.skip_data_check
    assert not module.parse_args([SEG_CFG, *extra]).skip_data_check


@pytest.mark.slow
def test_image_demo_names_an_undecodable_image(tmp_path):
    img = tmp_path / 'empty.png'
    img.write_bytes(b'')
    done = subprocess.run(
        [PY, osp.join(REPO, 'demo', 'image_demo.py'), str(img), SEG_CFG],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0
    assert f'{img}: empty file (0 bytes)' in done.stderr
