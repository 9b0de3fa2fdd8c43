# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Classification pretraining: binary weight regularization, distillation,
the regularization switch, the configs, and an end-to-end CPU demo (teacher
-> distilled student -> inference and hand-off to segmentation)."""
import glob
import json
import os.path as osp
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch import nn

import mmbhvit  # noqa: F401
import mmbhvit.engine  # noqa: F401  (registers RegLossSwitchHook)
from mmbhvit.checkpoint_io import resume_safe_globals
from mmbhvit.engine import RegLossSwitchHook
from mmbhvit.models.binary import BinaryConv2d, binary_conv_layers
from mmbhvit.models.classifiers import (DistillImageClassifier,
                                        TeacherCheckpointError)
from mmbhvit.models.losses import BinaryWeightRegLoss
from mmbhvit.models.teacher import check_teacher_checkpoint
from mmbhvit.utils.cls_data_check import (check_cls_config,
                                          check_cls_data_exists)
from mmbhvit.utils.data_check import DataCheckError
from _helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(ROOT, 'configs', 'bhvit')
FIXTURES = osp.join(ROOT, '..', 'shared', 'fixtures', 'bhvit_reference')
REDUCED_ARCH = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                    num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
TINY_TEACHER = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels=8, base_channels=8,
                  out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=5, in_channels=64))
IN1K_CONFIGS = {
    # name: (arch, binary_merge)
    'bhvit-small_2xb128_in1k': ('small', True),
    'bhvit-small-fpmerge_2xb128_in1k': ('small', False),
    'bhvit-tiny_2xb128_in1k': ('tiny', True),
    'bhvit-tiny-fpmerge_2xb128_in1k': ('tiny', False),
}



def _build(cfg, scope='mmpretrain'):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(cfg)


def _student(**kwargs):
    cfg = dict(
        type='DistillImageClassifier',
        backbone=dict(type='BHViT', arch=REDUCED_ARCH, img_size=32,
                      binary_merge=True, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=128),
        teacher=TINY_TEACHER,
        allow_random_teacher=True)
    cfg.update(kwargs)
    return _build(cfg)


def _batch(n=4, size=32, seed=0):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 5, (n, ), generator=g)
    return x, y, [DataSample().set_gt_label(int(i)) for i in y]


def _w_dev(model):
    reg = model.reg_loss
    with torch.no_grad():
        return float(reg.distance(reg.binary_weights(model)))


# --------------------------------------------------------------------------
# BinaryWeightRegLoss
# --------------------------------------------------------------------------
class _Merge(nn.Module):
    """Stands for a patch-merging module (excluded by type in a test)."""

    def __init__(self):
        super().__init__()
        self.conv = BinaryConv2d(1, 1, 2, bias=False)


class _Toy(nn.Module):

    def __init__(self):
        super().__init__()
        self.a = BinaryConv2d(1, 1, 2, bias=False)       # 1-bit: counted
        self.b = BinaryConv2d(1, 2, 1, bias=False)       # 1-bit: counted
        self.fp = BinaryConv2d(1, 1, 1, weight_bits=32)  # 32-bit: not
        self.plain = nn.Conv2d(1, 1, 1)                  # not binary
        self.merge = _Merge()                            # 1-bit, nested
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([0.5, -2., 1., 0.]).view(
                1, 1, 2, 2))
            self.b.weight.fill_(-0.25)
            self.fp.weight.fill_(5.)
            self.plain.weight.fill_(5.)
            self.merge.conv.weight.copy_(torch.tensor([3., 1., 1., 1.]).view(
                1, 1, 2, 2))


def test_reg_loss_value_equals_hand_computation():
    toy = _Toy()
    # | |w| - 1 | means: a (0.5+1+0+1)/4, b 0.75, merge (2+0+0+0)/4
    a, b, merge = 0.625, 0.75, 0.5
    reg = BinaryWeightRegLoss(loss_weight=0.1, enabled=True)
    assert [n for n, _ in reg.binary_layers(toy)] == ['a', 'b', 'merge.conv']
    assert reg(toy).item() == pytest.approx(0.1 * (a + b + merge) / 3)
    for spec in (_Merge, '_Merge'):
        excl = BinaryWeightRegLoss(loss_weight=0.1, enabled=True,
                                   exclude_within=(spec, ))
        assert excl(toy).item() == pytest.approx(0.1 * (a + b) / 2)
    # gradient of 0.1 * mean_t mean_i | |w| - 1 |
    reg(toy).backward()
    # d/dw = 0.1 / 3 tensors / 4 elements * sign(|w| - 1) * sign(w)
    expected = 0.1 / 3 / 4 * torch.tensor([-1., -1., 0., 0.])
    assert torch.allclose(toy.a.weight.grad.flatten(), expected)
    assert toy.fp.weight.grad is None and toy.plain.weight.grad is None


def test_reg_loss_disabled_is_zero_and_switchable():
    toy = _Toy()
    reg = BinaryWeightRegLoss(loss_weight=0.1)
    assert not reg.enabled
    off = reg(toy)
    assert off.item() == 0 and not off.requires_grad
    reg.set_enabled(True)
    assert reg(toy).item() > 0
    assert BinaryWeightRegLoss(enabled=True)(nn.Linear(2, 2)).item() == 0
    with pytest.raises(TypeError, match='exclude_within'):
        BinaryWeightRegLoss(exclude_within=(3, ))


def test_reg_loss_finds_every_binary_layer_of_bhvit_by_type():
    from mmbhvit.models import BHViT
    model = BHViT(REDUCED_ARCH, binary_merge=True)
    names = [n for n, _ in BinaryWeightRegLoss().binary_layers(model)]
    # MSGDC 3 + FFN 2 (stages 1-2), Q/K/V/proj 4 + FFN 2 (stages 3-4), 3
    # binary merges
    assert len(names) == 2 * 5 + 2 * 6 + 3 == 25
    assert names == [n for n, _ in binary_conv_layers(model, weight_bits=1)]
    no_merge = [n for n, _ in BinaryWeightRegLoss(
        exclude_within=('PatchMerging', )).binary_layers(model)]
    assert len(no_merge) == 22
    assert not any(n.startswith('downsamples') for n in no_merge)
    fp32 = BHViT(REDUCED_ARCH, weight_bits=32, act_bits=32)
    assert list(BinaryWeightRegLoss().binary_layers(fp32)) == []


@pytest.mark.skipif(
    not osp.isdir(osp.join(FIXTURES, 'tiny_binary_embed_recu')),
    reason='official reference fixtures not available')
@pytest.mark.slow
def test_reg_loss_reproduces_official_name_based_selection():
    """The official code picks tensors by name (cov1/2/3, dense, query, key,
    value); that equals our type-based selection minus the binary patch
    merging, which the names miss."""
    from mmbhvit.converters import (convert_official_state_dict,
                                    official_flags_to_backbone_cfg)
    from mmbhvit.testing.parity import build_classifier
    fixture = osp.join(FIXTURES, 'tiny_binary_embed_recu')
    with open(osp.join(fixture, 'config.json')) as f:
        meta = json.load(f)
    official = torch.load(osp.join(fixture, 'state_dict.pt'),
                          map_location='cpu', weights_only=True)
    patterns = ('cov1.weight', 'cov2.weight', 'cov3.weight', 'dense.weight',
                'query.weight', 'key.weight', 'value.weight')
    chosen = [v.double() for k, v in official.items()
              if any(p in k for p in patterns)]
    official_value = torch.stack([(w.abs() - 1).abs().mean()
                                  for w in chosen]).mean().item()

    backbone = official_flags_to_backbone_cfg(meta['model_config'],
                                              meta['flags'])
    assert backbone['binary_merge']
    model = build_classifier(backbone, int(meta['flags']['num_labels']))
    conv = convert_official_state_dict(
        official, num_heads=backbone['arch']['num_heads'])
    model.load_state_dict(conv.state_dict, strict=True)
    model.double()
    like_official = BinaryWeightRegLoss(
        loss_weight=1., enabled=True, exclude_within=('PatchMerging', ))
    assert len(like_official.binary_weights(model)) == len(chosen)
    assert like_official(model).item() == pytest.approx(official_value,
                                                        rel=1e-12)
    paper = BinaryWeightRegLoss(loss_weight=1., enabled=True)
    assert len(paper.binary_weights(model)) == len(chosen) + 3
    assert abs(paper(model).item() - official_value) > 1e-6


# --------------------------------------------------------------------------
# DistillImageClassifier
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_distill_loss_terms_and_weights():
    model = _student(reg_phase_loss_weights=dict(cls=0., distill=0.9))
    model.init_weights()
    model.train()
    x, y, samples = _batch()
    losses = model.loss(x, samples)
    assert {'loss_cls', 'loss_distill', 'loss_reg',
            'binary_w_dev'} <= set(losses)
    with torch.no_grad():
        logits = model(x, mode='tensor')
        t_prob = F.softmax(model.teacher(x, mode='tensor'), dim=-1)
    ce = F.cross_entropy(logits, y)
    kd = -(t_prob * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    assert losses['loss_cls'].item() == pytest.approx(0.1 * ce.item(),
                                                      rel=1e-5)
    assert losses['loss_distill'].item() == pytest.approx(0.8 * kd.item(),
                                                          rel=1e-5)
    assert losses['loss_reg'].item() == 0
    w_dev = _w_dev(model)
    assert losses['binary_w_dev'].item() == pytest.approx(w_dev)

    model.set_reg_loss_enabled(True)
    assert model.reg_loss_enabled
    losses = model.loss(x, samples)
    assert losses['loss_reg'].item() == pytest.approx(0.1 * w_dev, rel=1e-6)
    assert losses['loss_cls'].item() == 0  # reg phase: official weights
    assert losses['loss_distill'].item() == pytest.approx(0.9 * kd.item(),
                                                          rel=1e-5)
    # the sum mmengine optimises gives the student gradients
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_teacher_is_frozen_and_outside_the_state_dict():
    model = _student()
    model.init_weights()
    teacher = model.teacher
    assert teacher is not None and not teacher.training
    student_keys = set(model.state_dict())
    assert not any('teacher' in k for k in student_keys)
    plain = _build(dict(type='ImageClassifier', backbone=dict(
        type='BHViT', arch=REDUCED_ARCH, img_size=32, binary_merge=True,
        out_indices=(3, )), neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=128)))
    assert student_keys == set(plain.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    model.train()
    assert model.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x, _, samples = _batch()
    losses = model.loss(x, samples)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert all(p.grad is None for p in teacher.parameters())
    model.double()
    assert next(teacher.parameters()).dtype == torch.float64


def test_missing_teacher_checkpoint_is_an_error(tmp_path):
    model = _student(allow_random_teacher=False)
    with pytest.raises(TeacherCheckpointError, match='is not set'):
        model.init_weights()
    x, _, samples = _batch()
    with pytest.raises(TeacherCheckpointError):
        model.loss(x, samples)
    # inference never needs the teacher
    assert len(model.predict(x)) == 4 and model.teacher is None

    missing = str(tmp_path / 'deit-small.pth')
    model = _student(allow_random_teacher=False, teacher_checkpoint=missing)
    with pytest.raises(TeacherCheckpointError, match='deit-small.pth'):
        model.init_weights()
    cfg = Config(dict(model=dict(teacher=TINY_TEACHER,
                                 teacher_checkpoint=missing)))
    with pytest.raises(DataCheckError, match='teacher_checkpoint'):
        check_teacher_checkpoint(cfg)
    cfg.model.allow_random_teacher = True
    check_teacher_checkpoint(cfg)

    # a checkpoint of another model is refused, a matching one loaded
    wrong = tmp_path / 'wrong.pth'
    torch.save({'state_dict': {'backbone.foo': torch.zeros(1)}}, wrong)
    with pytest.raises(KeyError, match='does not match the teacher'):
        _student(teacher_checkpoint=str(wrong)).init_weights()
    teacher = _build(TINY_TEACHER)
    right = tmp_path / 'right.pth'
    torch.save({'state_dict': teacher.state_dict()}, right)
    model = _student(teacher_checkpoint=str(right),
                     allow_random_teacher=False)
    from mmengine.logging.history_buffer import HistoryBuffer
    with resume_safe_globals():  # the launcher's context stays armed
        model.init_weights()
        assert HistoryBuffer in torch.serialization.get_safe_globals()
    for k, v in teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k


# --------------------------------------------------------------------------
# RegLossSwitchHook
# --------------------------------------------------------------------------
def _fake_runner(model, max_epochs, iters_per_epoch, epoch=0):
    return SimpleNamespace(
        model=model, train_loop=None, max_epochs=max_epochs,
        max_iters=max_epochs * iters_per_epoch, epoch=epoch,
        iter=epoch * iters_per_epoch)


def _simulate(hook, runner, iters_per_epoch):
    """Drive the hook like a train loop; return the first index (epoch,
    iteration) trained with L_re on."""
    hook.before_train(runner)
    first = None
    for epoch in range(runner.epoch, runner.max_epochs):
        runner.epoch = epoch
        hook.before_train_epoch(runner)
        for i in range(iters_per_epoch):
            runner.iter = epoch * iters_per_epoch + i
            hook.before_train_iter(runner, i)
            if runner.model.reg_loss_enabled and first is None:
                first = (epoch, runner.iter)
    return first


@pytest.mark.parametrize('kwargs,expected', [
    (dict(by_epoch=True), (9, 45)),                    # last 10% of epochs
    (dict(by_epoch=False), (9, 45)),                   # 0.9 * 50 iterations
    (dict(by_epoch=False, begin_ratio=0.75), (7, 38)),  # ceil(37.5)
    (dict(by_epoch=True, begin_ratio=0.75), (8, 40)),   # ceil(7.5)
    (dict(by_epoch=False, begin=12), (2, 12)),
    (dict(by_epoch=True, begin_ratio=1.0), None),       # never
])
def test_hook_switches_at_the_right_point(kwargs, expected):
    model = _student()
    runner = _fake_runner(model, max_epochs=10, iters_per_epoch=5)
    assert _simulate(RegLossSwitchHook(**kwargs), runner, 5) == expected


def test_hook_on_resume_and_errors():
    model = _student()
    model.set_reg_loss_enabled(True)  # the hook owns the state
    runner = _fake_runner(model, max_epochs=10, iters_per_epoch=5, epoch=3)
    RegLossSwitchHook(by_epoch=True).before_train(runner)
    assert not model.reg_loss_enabled
    runner = _fake_runner(model, max_epochs=10, iters_per_epoch=5, epoch=9)
    RegLossSwitchHook(by_epoch=True).before_train(runner)
    assert model.reg_loss_enabled  # resumed inside the L_re phase
    plain = _build(TINY_TEACHER)
    with pytest.raises(TypeError, match='set_reg_loss_enabled'):
        RegLossSwitchHook().before_train(_fake_runner(plain, 10, 5))
    with pytest.raises(ValueError):
        RegLossSwitchHook(begin_ratio=1.5)


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------
def _is_in(name, pipeline):
    return any(t['type'] == name for t in pipeline)


@pytest.mark.parametrize('name', sorted(IN1K_CONFIGS))
def test_imagenet_configs_follow_the_recipe(name):
    cfg = Config.fromfile(osp.join(CONFIGS, f'{name}.py'))
    arch, binary_merge = IN1K_CONFIGS[name]
    assert cfg.default_scope == 'mmpretrain'
    assert 'mmbhvit' in cfg.custom_imports['imports']
    assert cfg.auto_scale_lr.base_batch_size == 256
    assert cfg.train_dataloader.batch_size == 128
    assert cfg.train_cfg.max_epochs == 100
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 5e-4, 0.)
    assert [s['type'] for s in cfg.param_scheduler] == ['CosineAnnealingLR']
    train = cfg.train_dataloader.dataset.pipeline
    assert [t['type'] for t in train] == [
        'LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'PackInputs']
    assert train[1]['scale'] == 224
    test = cfg.test_dataloader.dataset.pipeline
    assert test[1]['scale'] == 256 and test[2]['crop_size'] == 224
    assert 'augments' not in (cfg.model.get('train_cfg') or {})
    assert cfg.train_dataloader.dataset.data_root == 'data/imagenet'
    hooks = [h for h in cfg.custom_hooks if h.type == 'RegLossSwitchHook']
    assert len(hooks) == 1 and hooks[0].begin_ratio == 0.9

    model = _build(cfg.model)
    assert isinstance(model, DistillImageClassifier)
    assert model.backbone.binary_merge == binary_merge
    assert model.backbone.arch['depths'] == (
        [3, 4, 8, 4] if arch == 'small' else [2, 2, 6, 2])
    assert model.backbone.final_norm and model.backbone.out_indices == (3, )
    assert model.base_loss_weights == dict(cls=0.1, distill=0.8)
    assert model.reg_loss.loss_weight == 0.1 and not model.reg_loss.enabled
    assert model.head.num_classes == 1000
    teacher = cfg.model.teacher
    assert teacher.backbone.arch == 'deit-small'
    assert model.teacher is None  # built by init_weights, not by the config
    assert not model.allow_random_teacher


@pytest.mark.slow
def test_config_custom_imports_register_everything():
    """A fresh interpreter that only runs the config's custom_imports (as the
    Runner does) finds every type the classification configs use."""
    code = '\n'.join([
        'from mmengine.config import Config',
        'from mmengine.utils import import_modules_from_strings',
        'cfg = Config.fromfile("configs/bhvit/bhvit-small_2xb128_in1k.py")',
        'import_modules_from_strings(**cfg.custom_imports)',
        'from mmpretrain.registry import HOOKS, MODELS',
        'assert HOOKS.get("RegLossSwitchHook") is not None',
        'for t in ("DistillImageClassifier", "BinaryWeightRegLoss", "BHViT"):',
        '    assert MODELS.get(t) is not None, t',
    ])
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_deit_small_teacher_config_builds():
    cfg = Config.fromfile(osp.join(CONFIGS, 'bhvit-small_2xb128_in1k.py'))
    teacher = _build(cfg.model.teacher)
    assert teacher.backbone.embed_dims == 384
    assert len(teacher.backbone.layers) == 12
    with torch.no_grad():
        out = teacher.eval()(torch.randn(1, 3, 224, 224), mode='tensor')
    assert out.shape == (1, 1000)


@pytest.mark.skipif(not osp.isdir(osp.join(FIXTURES, 'tiny_default')),
                    reason='official reference fixtures not available')
@pytest.mark.slow
def test_base_model_config_gives_the_official_logits():
    from mmbhvit.converters import (convert_official_state_dict,
                                    official_flags_to_backbone_cfg)
    fixture = osp.join(FIXTURES, 'tiny_default')
    with open(osp.join(fixture, 'config.json')) as f:
        meta = json.load(f)
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', '_base_', 'models', 'bhvit_small.py'))
    backbone = official_flags_to_backbone_cfg(meta['model_config'],
                                              meta['flags'])
    backbone.pop('type')
    cfg.model.backbone.update(backbone)
    cfg.model.head.num_classes = int(meta['flags']['num_labels'])
    model = _build(cfg.model)
    official = torch.load(osp.join(fixture, 'state_dict.pt'),
                          map_location='cpu', weights_only=True)
    conv = convert_official_state_dict(official,
                                       num_heads=backbone['arch']['num_heads'])
    model.load_state_dict(conv.state_dict, strict=True)
    model.double().eval()
    x = torch.load(osp.join(fixture, 'input.pt'), weights_only=True).double()
    ref = torch.load(osp.join(fixture, 'logits.pt'), weights_only=True)
    with torch.no_grad():
        logits = model(x, mode='tensor')
    assert (logits - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_missing_imagenet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(osp.join(CONFIGS, 'bhvit-small_2xb128_in1k.py'))
    with pytest.raises(DataCheckError) as err:
        check_cls_config(cfg, ('train', 'val'))
    msg = str(err.value)
    assert 'data/imagenet/train' in msg and 'data/imagenet/val' in msg
    assert str(tmp_path) in msg and 'ImageNet-1k' in msg
    load_tool('dataset_converters/make_demo_cls_dataset.py').make_dataset(
        str(tmp_path / 'data' / 'imagenet'), num_train=1, num_val=1, size=8)
    check_cls_data_exists(cfg, ('train', 'val'))  # now present
    with pytest.raises(DataCheckError, match='deit-small'):
        check_cls_config(cfg, ('train', 'val'))   # the teacher is missing


# --------------------------------------------------------------------------
# End to end on the demo data
# --------------------------------------------------------------------------
class _WeightRecorder(Hook):
    """Records (iteration, L_re distance, L_re on) after every step."""

    def __init__(self):
        self.rows = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        model = runner.model
        self.rows.append((runner.iter, _w_dev(model),
                          model.reg_loss_enabled))


def _demo_cfg(name, work_dir, data_root, **options):
    cfg = Config.fromfile(osp.join(CONFIGS, name))
    cfg.work_dir = str(work_dir)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = str(data_root)
    cfg.merge_from_dict(options)
    cfg.log_level = 'WARNING'
    return cfg


def _train(cfg, *hooks):
    runner = Runner.from_cfg(cfg)
    for hook in hooks:
        runner.register_hook(hook)
    # tools/train.py trains inside the same context (mmengine checkpoints
    # under torch's weights-only loading)
    with resume_safe_globals():
        runner.train()
    return runner.message_hub.get_scalar('val/accuracy/top1').current()


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add overhead
    try:
        yield _run_demo(tmp_path_factory.mktemp('demo_cls'))
    finally:
        torch.set_num_threads(threads)


def _run_demo(root):
    data = root / 'data'
    load_tool('dataset_converters/make_demo_cls_dataset.py').make_dataset(
        str(data), num_train=80, num_val=20, size=64, seed=0)
    teacher_acc = _train(
        _demo_cfg('resnet18-w16_demo-cls.py', root / 'teacher', data))
    teacher_ckpt = root / 'teacher' / 'epoch_10.pth'

    recorder = _WeightRecorder()
    student_acc = _train(
        _demo_cfg('bhvit-reduced_demo-cls.py', root / 'student', data,
                  **{'model.teacher_checkpoint': str(teacher_ckpt)}),
        recorder)

    # control: the same last two epochs from the switch-point checkpoint,
    # with L_re never switched on
    control = _WeightRecorder()
    _train(
        _demo_cfg('bhvit-reduced_demo-cls.py', root / 'control', data,
                  **{'model.teacher_checkpoint': str(teacher_ckpt),
                     'load_from': str(root / 'student' / 'epoch_6.pth'),
                     'resume': True,
                     'custom_hooks': [dict(type='RegLossSwitchHook',
                                           begin_ratio=1.0)]}), control)
    return SimpleNamespace(
        data=data, teacher_acc=teacher_acc, student_acc=student_acc,
        rows=recorder.rows, control_rows=control.rows,
        student_ckpt=str(root / 'student' / 'epoch_8.pth'))


@pytest.mark.slow
def test_demo_distillation_beats_chance(demo):
    chance = 100 / 5
    assert demo.teacher_acc >= 60, demo.teacher_acc
    assert demo.student_acc >= chance + 25, demo.student_acc


@pytest.mark.slow
def test_demo_reg_switch_and_pull_towards_one(demo):
    iters_per_epoch = 400 // 16
    first_on = next(i for i, _, on in demo.rows if on)
    assert first_on == 6 * iters_per_epoch  # begin_ratio 0.75 of 8 epochs
    assert len(demo.rows) == 8 * iters_per_epoch
    at_switch = demo.rows[first_on - 1][1]
    final = demo.rows[-1][1]
    # the control resumed at the switch point, from the same weights
    assert len(demo.control_rows) == 2 * iters_per_epoch
    assert not any(on for _, _, on in demo.control_rows)
    control_final = demo.control_rows[-1][1]
    # L_re pulls |w| towards 1: the distance falls during the L_re phase
    # and ends clearly below the run without it
    assert final < at_switch - 1e-3, (at_switch, final)
    assert final < control_final - 1e-3, (control_final, final)
    assert control_final > at_switch - 5e-4


@pytest.mark.slow
def test_demo_checkpoint_hands_off_to_segmentation(demo):
    from mmseg.registry import MODELS as SEG_MODELS
    ckpt = demo.student_ckpt
    cfg = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375], bgr_to_rgb=True, size=(64, 64)),
        backbone=dict(
            type='BHViT', arch=REDUCED_ARCH, img_size=64, binary_merge=True,
            out_indices=(0, 1, 2, 3), final_norm=False,
            init_cfg=dict(type='Pretrained', checkpoint=ckpt,
                          prefix='backbone.')),
        decode_head=dict(
            type='FCNHead', in_channels=128, in_index=3, channels=16,
            num_convs=1, concat_input=False, num_classes=3,
            norm_cfg=dict(type='BN', requires_grad=True),
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        seg = SEG_MODELS.build(cfg)
    with resume_safe_globals():
        state = torch.load(ckpt, map_location='cpu')['state_dict']
    pretrained = {k[len('backbone.'):]: v for k, v in state.items()
                  if k.startswith('backbone.')}
    own = seg.backbone.state_dict()
    assert set(own) == set(pretrained) - {
        k for k in pretrained if k.startswith('norm.')}
    assert not all(torch.equal(own[k], pretrained[k]) for k in own)
    with resume_safe_globals():  # as in tools/train.py
        seg.init_weights()
    for k, v in seg.backbone.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
    with torch.no_grad():
        out = seg.eval()(torch.randn(1, 3, 64, 64), mode='tensor')
    assert out.shape == (1, 3, 2, 2)


@pytest.mark.slow
def test_demo_checkpoint_with_mmpretrain_inference_api(demo):
    from mmpretrain.apis import ImageClassificationInferencer
    demo_cfg = Config.fromfile(osp.join(CONFIGS, 'bhvit-reduced_demo-cls.py'))
    # the shipped ImageNet config, reduced to the demo's model
    cfg = Config.fromfile(osp.join(CONFIGS, 'bhvit-small_2xb128_in1k.py'))
    cfg.model.backbone.arch = REDUCED_ARCH
    cfg.model.backbone.img_size = 64
    cfg.model.head.update(num_classes=5, in_channels=128, topk=(1, ))
    cfg.test_dataloader.dataset.pipeline = (
        demo_cfg.test_dataloader.dataset.pipeline)
    classes = demo_cfg.classes
    images = sorted(glob.glob(str(demo.data / 'val' / '*' / '*.png')))
    labels = [classes.index(osp.basename(osp.dirname(p))) for p in images]
    preds = {}
    for name, config in (('in1k', cfg), ('demo', demo_cfg)):
        with resume_safe_globals():
            inferencer = ImageClassificationInferencer(
                model=config, pretrained=demo.student_ckpt, device='cpu')
        assert inferencer.model.teacher is None
        results = inferencer(images, batch_size=25)
        preds[name] = [r['pred_label'] for r in results]
        assert all(r['pred_class'] in classes for r in results)
        assert all(abs(sum(r['pred_scores']) - 1) < 1e-4 for r in results)
    assert preds['in1k'] == preds['demo']
    accuracy = sum(p == t for p, t in zip(preds['in1k'], labels)) / len(labels)
    assert accuracy >= 0.45, accuracy


@pytest.mark.slow
def test_demo_checkpoint_with_the_test_tool(demo, tmp_path):
    """tools/test.py on a classification config: top-1, --out dumps the
    predictions (.pkl), --show-dir draws every image."""
    import pickle
    tool = load_tool('test.py')
    config = osp.join(CONFIGS, 'bhvit-reduced_demo-cls.py')
    data = f'test_dataloader.dataset.data_root={demo.data}'
    out, show = tmp_path / 'preds.pkl', tmp_path / 'show'
    metrics = tool.main([
        config, demo.student_ckpt, '--work-dir', str(tmp_path / 'work'),
        '--out', str(out), '--show-dir', str(show), '--cfg-options', data
    ])
    assert metrics['accuracy/top1'] >= 45, metrics
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    n = len(glob.glob(str(demo.data / 'val' / '*' / '*.png')))
    assert n > 0 and len(preds) == n
    assert all('pred_label' in p for p in preds)
    assert len(list(show.rglob('*.png'))) == n
    with pytest.raises(SystemExit):  # --out of a classifier is a .pkl
        tool.main([config, demo.student_ckpt, '--out', str(tmp_path / 'x'),
                   '--cfg-options', data])
