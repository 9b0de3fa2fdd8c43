# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Tests of mmbhvit.checkpoint_io: slim checkpoints and reading full mmengine
training checkpoints with ``torch.load(weights_only=True)``."""
import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmbhvit import checkpoint_io

needs_weights_only_default = pytest.mark.skipif(
    not hasattr(torch.serialization, 'safe_globals'),
    reason='torch < 2.6 does not load weights-only by default')


def test_old_import_path_serves_the_same_functions():
    """``mmbhvit.compat`` held these before the split; scripts import them
    from there."""
    from mmbhvit import compat
    from mmbhvit.compat import resume_safe_globals, save_slim_checkpoint

    assert save_slim_checkpoint is checkpoint_io.save_slim_checkpoint
    assert resume_safe_globals is checkpoint_io.resume_safe_globals
    for name in checkpoint_io.__all__:
        assert getattr(compat, name) is getattr(checkpoint_io, name)
    with pytest.raises(AttributeError, match='no_such_name'):
        compat.no_such_name  # noqa: B018


class TinyNet(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def test_slim_checkpoint_loads_weights_only(tmp_path):
    from mmengine.runner import load_checkpoint

    model = TinyNet()
    big = torch.arange(10000.)
    state = dict(model.state_dict(), view=big[:3])
    meta = dict(
        arch='tiny',
        epoch=np.int64(3),
        acc=np.float32(0.5),
        flag=np.bool_(True),
        classes=('a', 'b'),
        palette=np.array([[1, 2, 3]]))
    path = str(tmp_path / 'sub' / 'slim.pth')
    checkpoint_io.save_slim_checkpoint(state, path, meta=meta)

    loaded = torch.load(path, map_location='cpu', weights_only=True)
    assert set(loaded) == {'meta', 'state_dict'}
    assert loaded['meta'] == dict(
        arch='tiny',
        epoch=3,
        acc=0.5,
        flag=True,
        classes=('a', 'b'),
        palette=[[1, 2, 3]])
    assert type(loaded['meta']['epoch']) is int
    assert type(loaded['meta']['flag']) is bool
    torch.testing.assert_close(loaded['state_dict']['view'], big[:3])
    assert os.path.getsize(path) < 20000  # not the 40 kB storage of `big`

    target = TinyNet()
    load_checkpoint(target, path, map_location='cpu', strict=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value)


def test_slim_checkpoint_rejects_objects(tmp_path):
    with pytest.raises(TypeError, match=r"meta\['obj'\]"):
        checkpoint_io.save_slim_checkpoint({'w': torch.ones(1)},
                                           str(tmp_path / 'x.pth'),
                                           meta=dict(obj=object()))
    with pytest.raises(TypeError, match='not a tensor'):
        checkpoint_io.save_slim_checkpoint({'w': [1.0]},
                                           str(tmp_path / 'y.pth'))


def test_restricted_getattr_only_serves_history_buffer():
    from mmengine.logging.history_buffer import HistoryBuffer

    assert checkpoint_io._history_buffer_getattr(
        HistoryBuffer, 'mean') is HistoryBuffer.mean
    for obj, name in [(os, 'system'), (HistoryBuffer, '__init__'),
                      (HistoryBuffer, '_statistics_methods'),
                      (HistoryBuffer, 'register_statistics')]:
        with pytest.raises(pickle.UnpicklingError):
            checkpoint_io._history_buffer_getattr(obj, name)


@pytest.fixture
def restore_mmengine_globals():
    """Drop the DefaultScope/MessageHub/MMLogger instances a test's Runners
    create: a leftover DefaultScope('mmengine') would make later
    ``mmseg.registry.MODELS.build(...)`` calls look in the wrong registry."""
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope

    classes = (DefaultScope, MessageHub, MMLogger)
    saved = {cls: dict(cls._instance_dict) for cls in classes}
    yield
    for cls in classes:
        for name in set(cls._instance_dict) - set(saved[cls]):
            instance = cls._instance_dict.pop(name)
            for handler in getattr(instance, 'handlers', [])[:]:
                handler.close()
                instance.removeHandler(handler)


def _toy_runner(work_dir, max_iters, name, **kwargs):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import Dataset

    class ToyModel(BaseModel):

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs, labels, mode='tensor'):
            out = self.linear(inputs).squeeze(-1)
            if mode == 'loss':
                return dict(loss=((out - labels)**2).mean())
            return out

    class ToyData(Dataset):

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return dict(
                inputs=torch.full((2, ), i / 8), labels=torch.tensor(i / 8))

    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=name,
        train_dataloader=dict(
            dataset=ToyData(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            collate_fn=dict(type='default_collate'),
            batch_size=4,
            num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(
            type='MultiStepLR', milestones=[1], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=1),
            checkpoint=dict(
                type='CheckpointHook', interval=2, by_epoch=False)),
        randomness=dict(seed=0),
        default_scope='mmengine',
        **kwargs)


@needs_weights_only_default
def test_resume_full_runner_checkpoint(tmp_path, restore_mmengine_globals):
    from mmengine.logging import HistoryBuffer
    from mmengine.registry import DefaultScope

    first = _toy_runner(tmp_path, 2, 'compat_first')
    first.train()
    ckpt = str(tmp_path / 'iter_2.pth')
    assert osp.isfile(ckpt)
    saved = torch.load(ckpt, map_location='cpu', weights_only=False)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe

    # torch's default (weights-only) refuses the full training state ...
    second = _toy_runner(tmp_path, 4, 'compat_plain', resume=True,
                         load_from=ckpt)
    with pytest.raises(pickle.UnpicklingError):
        second.train()

    # ... and reads it in resume_safe_globals() (still weights-only)
    third = _toy_runner(tmp_path, 4, 'compat_resumed', resume=True,
                        load_from=ckpt)
    resumed_weights = []
    third.register_hook(_RecordWeights(resumed_weights), priority='HIGHEST')
    with checkpoint_io.resume_safe_globals():
        third.train()
    assert third.iter == 4
    torch.testing.assert_close(resumed_weights[0],
                               saved['state_dict']['linear.weight'])
    loss_buffer = third.message_hub.log_scalars['train/loss']
    assert isinstance(loss_buffer, HistoryBuffer)
    assert len(loss_buffer.data[0]) == 4  # 2 resumed + 2 new iterations
    assert third.message_hub.get_info('iter') == 3

    assert DefaultScope.get_current_instance().scope_name == 'mmengine'

    # the allow-list does not outlive the block
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location='cpu')

    # nested blocks (a tool's and a model's) keep the outer one armed
    with checkpoint_io.resume_safe_globals():
        with checkpoint_io.resume_safe_globals():
            torch.load(ckpt, map_location='cpu')
        torch.load(ckpt, map_location='cpu')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location='cpu')


def _RecordWeights(store):
    """A hook recording the weight when the training loop (re)starts."""
    from mmengine.hooks import Hook

    class RecordWeights(Hook):

        def before_train(self, runner):
            store.append(runner.model.linear.weight.detach().clone())

    return RecordWeights()
