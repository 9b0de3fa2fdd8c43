# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""DistillEncoderDecoder: a binary-head segmentor taught by its
full-precision-head counterpart (the shipped demo distillation config)."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmbhvit  # noqa: F401
from mmbhvit.apis import build_model
from mmbhvit.models.segmentors import (DistillEncoderDecoder,
                                       pixel_distill_loss)
from mmbhvit.models.teacher import (TeacherCheckpointError,
                                    check_teacher_checkpoint)
from mmbhvit.utils.data_check import DataCheckError
from _helpers import load_tool, make_shapes

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs', 'bhvit')
DISTILL_CFG = osp.join(CONFIGS,
                       'upernet_bhvit-tiny_demo-shapes-binary-head-distill.py')
STUDENT_CFG = osp.join(CONFIGS,
                       'upernet_bhvit-tiny_demo-shapes-binary-head.py')
TEACHER_CFG = osp.join(CONFIGS, 'upernet_bhvit-tiny_demo-shapes.py')
DEFAULT_SCOPE = 'mmseg'  # see tests/conftest.py


def test_pixel_distill_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 6, 7, generator=g)
    t = torch.randn(2, 5, 6, 7, generator=g)
    assert pixel_distill_loss(s, s).abs() < 1e-6
    for temp in (1.0, 2.0):
        expect = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1),
                          reduction='none').sum(1).mean() * temp**2
        torch.testing.assert_close(pixel_distill_loss(s, t, temp), expect)
    assert pixel_distill_loss(s, t) > 0
    with pytest.raises(ValueError, match='differ'):
        pixel_distill_loss(s, t[:, :4])


def _batch(n=2, size=64, classes=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    samples = []
    for _ in range(n):
        label = torch.randint(0, classes, (1, size, size), generator=g)
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=(size, size),
                                 pad_shape=(size, size)))
        samples.append(sample)
    return x, samples


def _model_cfg(**kwargs):
    cfg = Config.fromfile(DISTILL_CFG).model
    cfg.update(kwargs)
    return cfg


def test_config_names_the_fp_head_teacher():
    cfg = Config.fromfile(DISTILL_CFG)
    assert cfg.model.type == 'DistillEncoderDecoder'
    assert osp.samefile(cfg.model.teacher, TEACHER_CFG)
    assert cfg.model.decode_head.type == 'BinaryUPerHead'


def test_student_learns_from_a_frozen_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = build_model(TEACHER_CFG)
    teacher_ckpt = tmp_path / 'teacher.pth'
    torch.save({'state_dict': teacher.state_dict()}, teacher_ckpt)

    model = MODELS.build(_model_cfg(teacher_checkpoint=str(teacher_ckpt)))
    assert isinstance(model, DistillEncoderDecoder)
    model.init_weights()
    frozen = model.teacher
    assert frozen is not None and not frozen.training
    # the teacher holds the checkpoint's weights, outside the module tree
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(frozen.state_dict()[k], v)
    student_keys = set(build_model(STUDENT_CFG).state_dict())
    assert set(model.state_dict()) == student_keys
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in frozen.parameters())

    model.train()
    assert not frozen.training
    x, samples = _batch()
    losses = model.loss(x, samples)
    assert {'decode.loss_ce', 'aux.loss_ce', 'loss_distill'} <= set(losses)
    assert torch.isfinite(losses['loss_distill']) and \
        losses['loss_distill'] > 0
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())

    # the distillation term alone moves the student's logits
    model.zero_grad()
    model.distill_weight = 1.0
    torch.autograd.backward(model.loss(x, samples)['loss_distill'])
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0

    # the student's weights load strictly into the plain binary-head config
    ckpt = tmp_path / 'student.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    plain = build_model(STUDENT_CFG, str(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(plain(x, mode='tensor'),
                                   model.eval()(x, mode='tensor'))
    deployed = build_model(DISTILL_CFG, str(ckpt), student_only=True)
    assert type(deployed).__name__ == 'EncoderDecoder'


def test_teacher_checkpoint_is_required(tmp_path):
    model = MODELS.build(_model_cfg())
    with pytest.raises(TeacherCheckpointError, match='is not set'):
        model.init_weights()
    x, _ = _batch(1)
    with torch.no_grad():  # inference never needs the teacher
        assert model.eval()(x, mode='tensor').shape[:2] == (1, 5)
    assert model.teacher is None

    cfg = Config.fromfile(DISTILL_CFG)
    with pytest.raises(DataCheckError, match='teacher_checkpoint'):
        check_teacher_checkpoint(cfg)
    cfg.model.teacher_checkpoint = str(tmp_path / 'missing.pth')
    with pytest.raises(DataCheckError, match='missing.pth'):
        check_teacher_checkpoint(cfg)

    # the binary-head model's checkpoint is not the fp-head teacher's
    wrong = tmp_path / 'binary_head.pth'
    torch.save({'state_dict': build_model(STUDENT_CFG).state_dict()}, wrong)
    with pytest.raises(KeyError, match='does not match the teacher'):
        MODELS.build(_model_cfg(teacher_checkpoint=str(wrong))).init_weights()


@pytest.mark.parametrize('kwargs, match', [
    (dict(distill_weight=-1.0), 'distill_weight'),
    (dict(temperature=0.0), 'temperature'),
    (dict(teacher='no/such/config.py'), 'teacher config file not found')])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        MODELS.build(_model_cfg(**kwargs))


def test_train_tool_stops_without_the_teacher(tmp_path, capsys):
    """tools/train.py checks the teacher checkpoint with the data, before
    a Runner is built (not after hours of data loading)."""
    root = make_shapes(tmp_path / 'data', num_train=2)
    train = load_tool('train.py')
    work = tmp_path / 'work'
    with pytest.raises(SystemExit) as stop:
        train.main([DISTILL_CFG, '--work-dir', str(work), '--cfg-options',
                    f'train_dataloader.dataset.data_root={root}',
                    f'val_dataloader.dataset.data_root={root}'])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert 'model.teacher_checkpoint' in err and 'is not set' in err
    assert not work.exists()
