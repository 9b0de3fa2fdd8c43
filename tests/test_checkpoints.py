# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Trustworthy artefacts: one model builder with strict loading for every
tool, atomic writes that survive a full disk, a converter that says what it
was given."""
import errno
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from _helpers import load_tool, make_shapes

from mmbhvit.apis import (CheckpointMismatchError, CheckpointReadError,
                          build_model, load_weights, task_of)
from mmbhvit.checkpoint_io import save_slim_checkpoint
from mmbhvit.utils.io import (DiskFullError, atomic_torch_save, atomic_write,
                              write_image)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
SEG_CFG = osp.join(REPO, 'configs/bhvit/upernet_bhvit-tiny_demo-shapes.py')
CLS_CFG = osp.join(REPO, 'configs/bhvit/bhvit-reduced_demo-cls.py')
SMALL = {'model.backbone.arch': 'small'}


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    return subprocess.run([PY, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope='module')
def seg_ckpt(tmp_path_factory):
    """A slim checkpoint of the demo segmentor (BHViT-tiny)."""
    torch.manual_seed(0)
    model = build_model(SEG_CFG)
    path = str(tmp_path_factory.mktemp('ckpt') / 'tiny.pth')
    save_slim_checkpoint(model.state_dict(), path,
                         meta=dict(dataset_meta=dict(classes=list('abcde'))))
    return path


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('data'), num_train=2)


def _small_config(folder) -> str:
    """The demo config with a BHViT-small backbone (same widths)."""
    path = str(folder / 'small.py')
    with open(path, 'w') as f:
        f.write(f"_base_ = ['{SEG_CFG}']\nmodel = dict(backbone=dict("
                "arch='small'))\n")
    return path


@pytest.fixture(scope='module')
def junk_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('junk')
    files = dict(unrelated=str(root / 'unrelated.pth'),
                 text=str(root / 'text.pth'), empty=str(root / 'empty.pth'),
                 truncated=str(root / 'truncated.pth'))
    torch.save({'state_dict': {'foo.bar': torch.zeros(3)}},
               files['unrelated'])
    with open(files['text'], 'w') as f:
        f.write('not a checkpoint')
    open(files['empty'], 'wb').close()
    return files


# --------------------------------------------------------------------------
# task_of / build_model / load_weights
# --------------------------------------------------------------------------
def test_task_of():
    assert task_of(SEG_CFG) == 'segmentation'
    assert task_of(CLS_CFG) == 'classification'
    # without default_scope: from the model type
    assert task_of(dict(model=dict(type='EncoderDecoder'))) == 'segmentation'
    assert task_of(dict(model=dict(type='ImageClassifier'))) == \
        'classification'
    with pytest.raises(ValueError, match='neither mmseg nor mmpretrain'):
        task_of(dict(default_scope='mmdet', model=dict(type='X')))
    with pytest.raises(ValueError, match='cannot tell the task'):
        task_of(dict(model=dict(type='NoSuchModel')))


def test_build_model_loads_strictly_and_keeps_meta(seg_ckpt):
    model = build_model(SEG_CFG, seg_ckpt)
    assert not model.training and model.task == 'segmentation'
    assert model.dataset_meta['classes'] == list('abcde')
    saved = torch.load(seg_ckpt, weights_only=True)['state_dict']
    own = model.state_dict()
    assert set(saved) == set(own)
    assert all(torch.equal(saved[k], own[k]) for k in saved)


def test_checkpoint_of_another_arch_is_refused(seg_ckpt):
    """Case 2: a BHViT-tiny checkpoint into a BHViT-small model."""
    with pytest.raises(CheckpointMismatchError) as info:
        build_model(SEG_CFG, seg_ckpt, cfg_options=SMALL)
    msg = str(info.value)
    assert seg_ckpt in msg and 'upernet_bhvit-tiny_demo-shapes.py' in msg
    # the count and the first keys (stages 1-2 of small have more blocks)
    assert 'missing keys 611: backbone.stages.0.2.' in msg
    assert '... and 603 more' in msg and 'allow_partial_load' in msg


def test_shape_mismatch_is_named(seg_ckpt, tmp_path):
    sd = torch.load(seg_ckpt, weights_only=True)['state_dict']
    sd['decode_head.conv_seg.weight'] = sd['decode_head.conv_seg.weight'][:3]
    path = str(tmp_path / 'cut.pth')
    save_slim_checkpoint(sd, path)
    with pytest.raises(CheckpointMismatchError,
                       match=r'shape mismatches 1: decode_head\.conv_seg\.'
                       r'weight: checkpoint \(3, 128, 1, 1\) vs model '
                       r'\(5, 128, 1, 1\)'):
        build_model(SEG_CFG, path)


def test_unrelated_and_unreadable_files_are_refused(junk_files):
    with pytest.raises(CheckpointMismatchError, match='share no key'):
        build_model(SEG_CFG, junk_files['unrelated'])
    # the explicit opt-out does not accept a file sharing nothing either
    model = build_model(SEG_CFG)
    with pytest.raises(CheckpointMismatchError, match='share no key'):
        load_weights(model, junk_files['unrelated'], strict=False)
    for kind in ('text', 'empty'):
        with pytest.raises(CheckpointReadError,
                           match=f'cannot read checkpoint .*{kind}.pth'):
            build_model(SEG_CFG, junk_files[kind])
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        build_model(SEG_CFG, '/nowhere.pth')


def test_partial_load_is_an_explicit_opt_out(seg_ckpt):
    """Fine-tuning from a different model: strict=False loads what fits
    and warns with the rest."""
    torch.manual_seed(1)
    model = build_model(SEG_CFG, cfg_options=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match='matching tensors only'):
        load_weights(model, seg_ckpt, strict=False)
    saved = torch.load(seg_ckpt, weights_only=True)['state_dict']
    after = model.state_dict()
    head = 'decode_head.conv_seg.weight'
    assert torch.equal(after[head], saved[head])
    new = 'backbone.stages.0.2.ffn.expand.conv.weight'  # absent in tiny
    assert new not in saved and torch.equal(after[new], before[new])


def test_distillation_student_has_the_same_keys():
    """Deployment builds the student of a distillation config; its keys
    are those of a checkpoint of the distillation model (teacher apart)."""
    full = build_model(CLS_CFG)
    student = build_model(CLS_CFG, student_only=True)
    assert type(full).__name__ == 'DistillImageClassifier'
    assert type(student).__name__ == 'ImageClassifier'
    assert set(full.state_dict()) == set(student.state_dict())


# --------------------------------------------------------------------------
# Tools: export, test, image demo refuse a checkpoint of another model
# --------------------------------------------------------------------------
def test_export_refuses_mismatched_checkpoints(seg_ckpt, junk_files,
                                               tmp_path):
    """Case 1: export_binary.py wrote random weights and exited 0."""
    tool = load_tool('deployment/export_binary.py')
    out = str(tmp_path / 'x.packed.pth')
    with pytest.raises(CheckpointMismatchError, match='share no key'):
        tool.main([SEG_CFG, junk_files['unrelated'], out])
    with pytest.raises(CheckpointMismatchError, match='missing keys 611'):
        tool.main([_small_config(tmp_path), seg_ckpt, out])
    assert not osp.exists(out)


@pytest.mark.slow
def test_tools_exit_with_a_clear_error(seg_ckpt, data_root, tmp_path):
    """Case 2 through the command lines: tools/test.py and the image demo
    stop (exit code != 0) and name the checkpoint."""
    root = data_root
    done = _run([
        'tools/test.py', SEG_CFG, seg_ckpt, '--work-dir',
        str(tmp_path / 'w'), '--cfg-options', 'model.backbone.arch=small',
        f'test_dataloader.dataset.data_root={root}'
    ])
    assert done.returncode == 2, done.stderr[-2000:]
    assert 'does not fit the model' in done.stderr
    assert seg_ckpt in done.stderr
    assert not re.search(r'mIoU: \d', done.stdout + done.stderr)
    img = osp.join(root, 'img_dir', 'val', '000000.png')
    done = _run(['demo/image_demo.py', img, _small_config(tmp_path), '--checkpoint',
                 seg_ckpt, '--out-file', str(tmp_path / 'o.png')])
    assert done.returncode != 0 and 'does not fit the model' in done.stderr
    assert not osp.exists(tmp_path / 'o.png')


@pytest.mark.slow
def test_train_load_from_is_strict_unless_opted_out(seg_ckpt, data_root,
                                                    tmp_path):
    """mmengine loads ``load_from`` non-strictly: a fine-tune from the
    wrong checkpoint went ahead silently. Now it stops before the first
    iteration; ``allow_partial_load=True`` is the documented opt-out."""
    options = [
        f'load_from={seg_ckpt}', 'model.backbone.arch=small',
        f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}',
        'train_cfg.max_iters=1', 'train_dataloader.batch_size=2',
        'default_hooks.checkpoint.interval=1'
    ]
    done = _run(['tools/train.py', SEG_CFG, '--work-dir',
                 str(tmp_path / 'strict'), '--cfg-options', *options])
    assert done.returncode == 2, done.stderr[-2000:]
    assert 'does not fit the model' in done.stderr
    assert 'allow_partial_load=True' in done.stderr
    assert not (tmp_path / 'strict' / 'iter_1.pth').exists()
    done = _run(['tools/train.py', SEG_CFG, '--work-dir',
                 str(tmp_path / 'partial'), '--cfg-options', *options,
                 'allow_partial_load=True'])
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'matching tensors only' in done.stderr
    assert (tmp_path / 'partial' / 'iter_1.pth').exists()


# --------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------
def test_converter_names_what_it_was_given(seg_ckpt, junk_files, tmp_path,
                                           capsys):
    """Case 8: an already converted or a non-BHViT file printed a bare
    key."""
    tool = load_tool('model_converters/bhvit2mmbhvit.py')
    out = str(tmp_path / 'out.pth')
    assert tool.main([seg_ckpt, out]) == 1
    assert 'already an mmbhvit checkpoint' in capsys.readouterr().err
    assert tool.main([junk_files['unrelated'], out]) == 1
    err = capsys.readouterr().err
    assert 'not an official BHViT' in err and "'foo.bar'" in err
    assert tool.main([junk_files['text'], out]) == 1
    assert 'cannot read' in capsys.readouterr().err
    assert not osp.exists(out)


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------
class _FillsUp:
    """A save function that writes ``limit`` bytes, then fails as a full
    disk does."""

    def __init__(self, limit):
        self.limit = limit

    def __call__(self, obj, f):
        f.write(b'x' * self.limit)
        raise OSError(errno.ENOSPC, 'No space left on device')


def test_atomic_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / 'model.pth')
    atomic_torch_save({'w': torch.arange(10)}, path)
    good = open(path, 'rb').read()
    with pytest.raises(DiskFullError, match='no space left .*model.pth'):
        atomic_torch_save({'w': torch.zeros(1)}, path, save=_FillsUp(4096))
    assert open(path, 'rb').read() == good
    assert os.listdir(tmp_path) == ['model.pth']  # no temporary left
    # any other error: re-raised as is, previous file intact too
    with pytest.raises(RuntimeError, match='boom'):
        with atomic_write(path) as f:
            f.write(b'partial')
            raise RuntimeError('boom')
    assert open(path, 'rb').read() == good
    with pytest.raises(ValueError, match='whole files'):
        with atomic_write(path, 'a'):
            pass


def test_write_image_raises_instead_of_returning_false(tmp_path):
    import numpy as np
    path = str(tmp_path / 'a.png')
    write_image(path, np.zeros((4, 4, 3), np.uint8))
    assert osp.getsize(path) > 0
    with pytest.raises(ValueError, match='no file extension'):
        write_image(str(tmp_path / 'noext'), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match='cannot encode'):
        write_image(str(tmp_path / 'b.png'), np.zeros((4, 4, 7), np.uint8))


def _mount_tmpfs(folder, size):
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                           'tmpfs', str(folder)], capture_output=True)
    return done.returncode == 0


def test_real_full_disk(tmp_path):
    """A real full file system (a small tmpfs; needs root, as in CI):
    torch's writer reports 'unexpected pos', we report the full disk, and
    the previous file survives."""
    folder = tmp_path / 'small_fs'
    folder.mkdir()
    if not _mount_tmpfs(folder, '256k'):
        pytest.skip('cannot mount a tmpfs here (not root)')
    try:
        path = str(folder / 'slim.pth')
        save_slim_checkpoint({'w': torch.ones(1000)}, path)
        good = open(path, 'rb').read()
        with pytest.raises(DiskFullError, match='no space left'):
            save_slim_checkpoint({'w': torch.ones(200_000)}, path)
        assert open(path, 'rb').read() == good
        assert os.listdir(folder) == ['slim.pth']
    finally:
        subprocess.run(['umount', str(folder)], check=True)


# --------------------------------------------------------------------------
# No accidental random-backbone fine-tunes; mmpretrain's launch options
# --------------------------------------------------------------------------
def test_pretrained_backbone_without_a_file_is_an_error(tmp_path):
    from mmbhvit.models import BHViT
    from mmbhvit.models.checkpoint import PretrainedCheckpointError
    arch = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
    model = BHViT(arch, init_cfg=dict(type='Pretrained', checkpoint=None,
                                      prefix='backbone.'))
    with pytest.raises(PretrainedCheckpointError,
                       match='without a checkpoint.*init_cfg=None'):
        model.init_weights()


def test_train_refuses_a_random_backbone_unless_asked(data_root, tmp_path):
    """The segmentation configs fine-tune an ImageNet backbone: without
    its file the run stops before the Runner is built (it used to train
    160k iterations from random weights after a warning)."""
    cfg = str(tmp_path / 'pretrained_none.py')
    with open(cfg, 'w') as f:
        # the demo's init_cfg is None, which a dict cannot be merged into
        f.write(f"_base_ = ['{SEG_CFG}']\nmodel = dict(backbone=dict("
                "_delete_=True, type='BHViT', arch='tiny', norm_cfg=dict("
                "type='BN'), init_cfg=dict(type='Pretrained', "
                "checkpoint=None, prefix='backbone.')))\n")
    done = _run(['tools/train.py', cfg, '--work-dir', str(tmp_path / 'w'),
                 '--cfg-options',
                 f'train_dataloader.dataset.data_root={data_root}',
                 f'val_dataloader.dataset.data_root={data_root}'])
    assert done.returncode == 2, done.stderr[-2000:]
    assert 'Pretrained without a checkpoint' in done.stderr
    assert 'model.backbone.init_cfg.checkpoint=PATH' in done.stderr
    assert 'Traceback' not in done.stderr
    assert not (tmp_path / 'w').exists()  # stopped before the Runner


def test_train_auto_scale_lr_and_no_validate():
    train = load_tool('train.py')
    in1k = osp.join(REPO, 'configs/bhvit/bhvit-small_2xb128_in1k.py')
    args = train.parse_args([in1k, '--auto-scale-lr', '--no-validate'])
    cfg = train.build_cfg(args)
    assert cfg.auto_scale_lr.enable is True
    assert cfg.auto_scale_lr.base_batch_size == 256
    assert cfg.val_cfg is None and cfg.val_dataloader is None
    assert cfg.val_evaluator is None
    args = train.parse_args([SEG_CFG, '--auto-scale-lr'])
    with pytest.raises(ValueError, match='has no `auto_scale_lr'):
        train.build_cfg(args)
