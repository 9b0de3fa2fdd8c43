# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Exact resume (``ExactResumeHook``): a run killed between two checkpoints
and resumed with ``--resume`` ends bit-identical to an uninterrupted run.

* the hook on its own: states survive a weights-only checkpoint round trip
  and give back the same next draws; an older checkpoint (no states) resumes
  with a warning; CUDA states are handled when CUDA is absent;
* small in-process Runner runs (dropout, NumPy/Python/torch augmentation,
  validation between checkpoints) for the loop kinds and dataloader workers
  the configs can use: iteration-based with an ``InfiniteSampler``,
  epoch-based resumed at an epoch end and in the middle of an epoch, with
  ``num_workers`` 0 and 2;
* the real thing (slow): ``tools/train.py`` with the shipped segmentation
  and classification demo configs (only sizes and lengths shrunk), SIGKILLed
  after a checkpoint, resumed, and every tensor of the final checkpoint
  (weights, buffers, optimizer state) compared with ``torch.equal``.
"""
import copy
import gc
import os
import os.path as osp
import random
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _helpers import load_tool, make_shapes
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmbhvit.checkpoint_io import resume_safe_globals
from mmbhvit.engine.hooks.exact_resume import (CHECKPOINT_KEY,
                                               ExactResumeHook,
                                               get_random_state,
                                               set_random_state)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
TRAIN = osp.join(REPO, 'tools', 'train.py')
SEG_CFG = osp.join(REPO, 'configs', 'bhvit',
                   'upernet_bhvit-tiny_demo-shapes.py')
CLS_CFG = osp.join(REPO, 'configs', 'bhvit', 'bhvit-reduced_demo-cls.py')


def _draws():
    """The next numbers of every generator the hook restores."""
    return (random.random(), np.random.rand(3).tolist(),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def _weights_only_load(path):
    """How ``--resume`` reads a checkpoint under torch >= 2.6."""
    with resume_safe_globals():
        return torch.load(path, map_location='cpu', weights_only=True)


def _log_text(work_dir):
    """Everything mmengine logged into ``work_dir``."""
    text = ''
    for root, _, files in os.walk(work_dir):
        for name in files:
            if name.endswith('.log'):
                with open(osp.join(root, name)) as f:
                    text += f.read()
    return text


def _flatten(obj, prefix=''):
    """(path, leaf) pairs of nested dicts / lists / tuples."""
    if isinstance(obj, dict):
        for key in obj:
            yield from _flatten(obj[key], f'{prefix}/{key}')
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _flatten(item, f'{prefix}/{i}')
    else:
        yield prefix, obj


def _training_state_differences(a, b):
    """Compare the weights, buffers, optimizer and scheduler states of two
    checkpoints bitwise; return (number of tensors compared, the paths that
    differ)."""
    assert a['state_dict'].keys() == b['state_dict'].keys()
    compared, differ = 0, []
    for part in ('state_dict', 'optimizer', 'param_schedulers'):
        leaves_a = dict(_flatten(a[part], part))
        leaves_b = dict(_flatten(b[part], part))
        assert leaves_a.keys() == leaves_b.keys(), part
        for key, value in leaves_a.items():
            other = leaves_b[key]
            if isinstance(value, torch.Tensor):
                compared += 1
                same = (value.dtype == other.dtype
                        and torch.equal(value, other))
            else:
                same = value == other
            if not same:
                differ.append(key)
    return compared, differ


# --------------------------------------------------------------------------
# The hook on its own
# --------------------------------------------------------------------------
def _stub_runner():
    loader = DataLoader(list(range(10)), batch_size=2, shuffle=False)
    loader.sampler.seed = 7
    return SimpleNamespace(train_dataloader=loader, seed=7, hooks=[])


def test_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    hook = ExactResumeHook()
    checkpoint = {'meta': {'iter': 3, 'epoch': 0}}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _draws()  # somewhere in the streams, with a cached Gaussian
    hook.before_save_checkpoint(_stub_runner(), checkpoint)
    expected = _draws()
    path = tmp_path / 'ckpt.pth'
    torch.save(checkpoint, path)

    # plain types and tensors only: loads weights-only even without the
    # allow-list of mmengine's classes
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    stored = loaded[CHECKPOINT_KEY]
    assert stored['world_size'] == 1 and len(stored['rng']) == 1
    assert stored['rng'][0]['cuda'] is None  # no CUDA here
    assert stored['data']['sampler_seed'] == 7

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert _draws() != expected  # really perturbed
    assert set_random_state(stored['rng'][0]) == []
    assert _draws() == expected


def test_cuda_states_without_cuda_are_reported(monkeypatch):
    state = get_random_state()
    state['cuda'] = [torch.zeros(16, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    expected = _draws()
    torch.manual_seed(5)
    problems = set_random_state(state)  # the rest is restored all the same
    assert len(problems) == 1 and 'CUDA is not available' in problems[0]
    assert _draws() == expected


def test_cuda_states_are_saved_and_restored_per_device(monkeypatch):
    devices = [torch.full((16, ), i, dtype=torch.uint8) for i in range(2)]
    restored = {}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: devices)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 3)
    monkeypatch.setattr(torch.cuda, 'set_rng_state',
                        lambda s, device: restored.update({device: s}))
    state = get_random_state()
    assert [s.tolist() for s in state['cuda']] == [d.tolist()
                                                  for d in devices]
    problems = set_random_state(state)
    assert sorted(restored) == [0, 1]
    assert torch.equal(restored[1], devices[1])
    assert problems and '2 CUDA device(s), this machine has 3' in problems[0]


# --------------------------------------------------------------------------
# In-process Runner runs: loop kinds, workers, validation, old checkpoints
# --------------------------------------------------------------------------
class _NoisyData(Dataset):
    """Samples augmented with Python, NumPy and torch random numbers (in
    the main process or in dataloader workers)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        x = torch.full((4, ), i / 10) + torch.rand(4) + random.random()
        x += torch.from_numpy(np.random.randn(4).astype(np.float32))
        return dict(inputs=x, target=torch.tensor(float(i % 3)))


def _toy_model():
    from mmengine.model import BaseModel

    class DropoutNet(BaseModel):

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5),
                nn.Linear(32, 1))

        def forward(self, inputs, target=None, mode='tensor'):
            out = self.net(inputs).squeeze(1)
            if mode == 'loss':
                return dict(loss=((out - target)**2).mean())
            return [SimpleNamespace(pred=p) for p in out]

    return DropoutNet()


def _toy_metric():
    from mmengine.evaluator import BaseMetric

    class Mean(BaseMetric):

        def process(self, data_batch, data_samples):
            self.results += [float(s.pred) for s in data_samples]

        def compute_metrics(self, results):
            return dict(mean=float(np.mean(results)))

    return Mean()


class _Interrupt(Exception):
    pass


def _stop_after(n_iters):
    """A hook that stops the process (as a kill would) after ``n_iters``
    iterations, once their checkpoint is written."""
    from mmengine.hooks import Hook

    class Stop(Hook):
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            if runner.iter + 1 == n_iters:
                raise _Interrupt

    return Stop()


def _toy_runner(work_dir, loop, num_workers=0, persistent=False,
                resume=False, stop_after=None, exact_hook=True, seed=0,
                load_from=None):
    from mmengine.runner import Runner
    if loop == 'iter':
        sampler = dict(type='InfiniteSampler', shuffle=True)
        train_cfg = dict(by_epoch=False, max_iters=9, val_interval=3)
        checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=3)
    else:
        sampler = dict(type='DefaultSampler', shuffle=True)
        train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=1)
        if loop == 'epoch':
            checkpoint = dict(type='CheckpointHook', interval=1)
        else:  # 'mid-epoch': checkpoints every 3 iterations, 4 an epoch
            checkpoint = dict(type='CheckpointHook', by_epoch=False,
                              interval=3)
    loader = dict(
        dataset=_NoisyData(), sampler=sampler, batch_size=3,
        num_workers=num_workers, persistent_workers=persistent,
        collate_fn=dict(type='default_collate'))
    hooks = [ExactResumeHook()] if exact_hook else []
    if stop_after:
        hooks.append(_stop_after(stop_after))
    torch.manual_seed(0)  # the model is built before the Runner seeds
    return Runner(
        model=_toy_model(), work_dir=str(work_dir),
        train_dataloader=loader,
        val_dataloader=dict(loader, num_workers=0, persistent_workers=False,
                            sampler=dict(type='DefaultSampler',
                                         shuffle=False)),
        val_evaluator=[_toy_metric()],
        train_cfg=train_cfg, val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01,
                                          momentum=0.9)),
        default_hooks=dict(checkpoint=checkpoint,
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks, randomness=dict(seed=seed), resume=resume,
        load_from=load_from,
        default_scope='mmengine', experiment_name=f'toy_{time.time_ns()}')


def _end_workers():
    """End the dataloader workers of finished or interrupted toy runs now.

    Left to garbage collection, torch joins each persistent worker for its
    5 s status interval here before terminating it: only time lost.
    """
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
    for obj in gc.get_objects():
        if type(obj) is _MultiProcessingDataLoaderIter:
            for worker in getattr(obj, '_workers', []):
                if worker.is_alive():
                    worker.terminate()
    gc.collect()


def _toy_straight_and_resumed(tmp_path, loop, stop_after, **kwargs):
    straight = _toy_runner(tmp_path / 'straight', loop, **kwargs)
    straight.train()
    final = straight.model.state_dict()
    del straight
    _end_workers()
    with pytest.raises(_Interrupt):
        _toy_runner(tmp_path / 'resumed', loop, stop_after=stop_after,
                    **kwargs).train()
    _end_workers()
    resumed = _toy_runner(tmp_path / 'resumed', loop, resume=True, **kwargs)
    with resume_safe_globals():
        resumed.train()
    _end_workers()
    return final, resumed.model.state_dict(), _log_text(tmp_path /
                                                        'resumed')


@pytest.mark.parametrize('loop, stop_after, num_workers, persistent', [
    ('iter', 4, 0, False),        # resumed at iteration 3 of 9
    ('iter', 4, 2, True),         # the same with 2 persistent workers
    ('epoch', 6, 0, False),       # 4 batches an epoch: resumed after epoch 1
    ('mid-epoch', 8, 0, False),   # resumed after batch 2 of epoch 2
    ('mid-epoch', 8, 2, False),   # the same with 2 workers
    ('mid-epoch', 13, 0, False),  # resumed after the last batch of epoch 3
])
@pytest.mark.slow
def test_toy_resume_is_exact(tmp_path, loop, stop_after, num_workers,
                             persistent):
    final, resumed, log = _toy_straight_and_resumed(
        tmp_path, loop, stop_after, num_workers=num_workers,
        persistent=persistent)
    assert 'random states of the interrupted run restored' in log
    assert 'NOT continue exactly' not in log
    if loop == 'mid-epoch':
        assert 'replaying them (loaded, not trained)' in log
    for key in final:
        assert torch.equal(final[key], resumed[key]), key


def test_toy_resume_without_the_hook_differs(tmp_path):
    """The comparison above can fail: without the hook (mmengine alone),
    the resumed run ends elsewhere."""
    final, resumed, _ = _toy_straight_and_resumed(
        tmp_path, 'iter', 4, exact_hook=False)
    assert not all(torch.equal(final[k], resumed[k]) for k in final)


def test_old_checkpoint_resumes_with_a_warning(tmp_path):
    with pytest.raises(_Interrupt):
        _toy_runner(tmp_path, 'iter', stop_after=4).train()
    path = tmp_path / 'iter_3.pth'
    checkpoint = _weights_only_load(path)
    assert CHECKPOINT_KEY in checkpoint
    del checkpoint[CHECKPOINT_KEY]  # as written before ExactResumeHook
    torch.save(checkpoint, path)
    runner = _toy_runner(tmp_path, 'iter', resume=True)
    with resume_safe_globals():
        runner.train()
    log = _log_text(tmp_path)
    assert re.search(r'does NOT continue exactly .*holds no random states',
                     log), log[-2000:]
    assert runner.iter == 9  # and training went on to the end


def test_persistent_workers_in_epochs_are_reported(tmp_path):
    with pytest.raises(_Interrupt):
        _toy_runner(tmp_path, 'epoch', num_workers=1, persistent=True,
                    stop_after=5).train()
    _end_workers()
    runner = _toy_runner(tmp_path, 'epoch', num_workers=1, persistent=True,
                         resume=True)
    with resume_safe_globals():
        runner.train()
    del runner
    _end_workers()
    assert 'persistent dataloader workers' in _log_text(tmp_path)


def test_resume_with_another_seed_is_reported(tmp_path):
    with pytest.raises(_Interrupt):
        _toy_runner(tmp_path, 'epoch', stop_after=6).train()
    runner = _toy_runner(tmp_path, 'epoch', resume=True, seed=1)
    with resume_safe_globals():
        runner.train()
    assert 'resume with --cfg-options randomness.seed=0' in _log_text(
        tmp_path)


def test_load_from_restores_nothing(tmp_path):
    """Fine-tuning from a checkpoint (``load_from`` without resume) starts
    from the run's own seed, whether the file holds random states or not."""
    with pytest.raises(_Interrupt):
        _toy_runner(tmp_path / 'a', 'iter', stop_after=4).train()
    with_states = tmp_path / 'a' / 'iter_3.pth'
    checkpoint = _weights_only_load(with_states)
    del checkpoint[CHECKPOINT_KEY]
    without_states = tmp_path / 'without.pth'
    torch.save(checkpoint, without_states)
    finals = []
    for name, path in (('b', with_states), ('c', without_states)):
        runner = _toy_runner(tmp_path / name, 'iter', load_from=str(path))
        with resume_safe_globals():
            runner.train()
        assert runner.iter == 9  # trained from iteration 0
        assert 'ExactResumeHook' not in _log_text(tmp_path / name).split(
            'Load checkpoint from')[1]
        finals.append(runner.model.state_dict())
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_every_config_keeps_the_hook():
    """A config that sets its own ``custom_hooks`` replaces the list of its
    base runtime; each must still list ExactResumeHook."""
    from mmengine.config import Config
    folder = osp.join(REPO, 'configs', 'bhvit')
    names = sorted(n for n in os.listdir(folder) if n.endswith('.py'))
    assert len(names) > 10
    for name in names:
        cfg = Config.fromfile(osp.join(folder, name))
        types = [h['type'] for h in cfg.get('custom_hooks', [])]
        assert 'ExactResumeHook' in types, name


# --------------------------------------------------------------------------
# tools/train.py, SIGKILL between two checkpoints, --resume
# --------------------------------------------------------------------------
def _start(args, log_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE',
               PYTHONUNBUFFERED='1')
    log = open(log_path, 'w')
    try:
        return subprocess.Popen([PY, TRAIN, *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    finally:
        log.close()  # the child keeps its own descriptor


def _finish(proc, log_path, timeout=600):
    proc.wait(timeout=timeout)
    with open(log_path) as f:
        log = f.read()
    assert proc.returncode == 0, log[-4000:]
    return log


def _kill_between_checkpoints(proc, work_dir, log_path, checkpoint,
                              later_iteration, timeout=600):
    """SIGKILL ``proc`` once ``checkpoint`` is completely written (mmengine
    names it in ``last_checkpoint`` after saving it) and the log shows a
    later iteration (``later_iteration``, a regex); return the name of the
    checkpoint a resume starts from."""
    last = osp.join(work_dir, 'last_checkpoint')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail('training ended before it was killed:\n' +
                            f.read()[-3000:])
        if osp.exists(last):
            with open(last) as f:
                saved = osp.basename(f.read().strip())
            with open(log_path) as f:
                log = f.read()
            if saved and saved != checkpoint:  # we were too slow
                break
            if saved == checkpoint and re.search(later_iteration, log):
                break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail('timeout waiting for the first checkpoint')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open(last) as f:
        return osp.basename(f.read().strip())


def _kill_and_resume(tmp_path, config, options, final, checkpoint,
                     later_iteration, old_checkpoint_too=False):
    """Run ``config`` straight and, in parallel, a run killed after
    ``checkpoint``; resume the latter; return both final checkpoints."""
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    p_straight = _start([config, '--work-dir', str(straight), *options],
                        tmp_path / 'straight.log')
    p_killed = _start([config, '--work-dir', str(killed), *options],
                      tmp_path / 'killed.log')
    start = _kill_between_checkpoints(p_killed, str(killed),
                                      tmp_path / 'killed.log', checkpoint,
                                      later_iteration)
    assert start != final and not (killed / final).exists()

    resumed = [('resumed', killed)]
    if old_checkpoint_too:
        # the same checkpoint without the random states, as older versions
        # wrote it
        old = tmp_path / 'old'
        old.mkdir()
        ckpt = _weights_only_load(killed / start)
        del ckpt[CHECKPOINT_KEY]
        torch.save(ckpt, old / start)
        (old / 'last_checkpoint').write_text(str(old / start))
        resumed.append(('old', old))
    procs = [(name, _start([config, '--work-dir', str(work), '--resume',
                            *options], tmp_path / f'{name}.log'))
             for name, work in resumed]
    _finish(p_straight, tmp_path / 'straight.log')
    logs = {name: _finish(p, tmp_path / f'{name}.log') for name, p in procs}
    return start, logs


@pytest.fixture(scope='module')
def seg_data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('data'), num_train=8)


@pytest.mark.slow
def test_killed_segmentation_run_resumes_bit_identical(seg_data, tmp_path):
    """The shipped demo config (decode/auxiliary head dropout 0.1, LSQ
    attention with data-dependent initialisation, random flips), 6
    iterations, a checkpoint and a validation every 2."""
    options = [
        '--cfg-options', f'train_dataloader.dataset.data_root={seg_data}',
        f'val_dataloader.dataset.data_root={seg_data}',
        f'test_dataloader.dataset.data_root={seg_data}',
        'train_cfg.max_iters=6', 'train_cfg.val_interval=2',
        'train_dataloader.batch_size=2',
        'default_hooks.checkpoint.interval=2',
        'default_hooks.checkpoint.max_keep_ckpts=-1',
        'default_hooks.logger.interval=1'
    ]
    start, logs = _kill_and_resume(
        tmp_path, SEG_CFG, options, 'iter_6.pth', 'iter_2.pth',
        r'Iter\(train\) \[\s*3/6\]', old_checkpoint_too=True)
    assert 'random states of the interrupted run restored' in logs['resumed']
    assert 'holds no random states' in logs['old']

    straight = torch.load(tmp_path / 'straight' / 'iter_6.pth',
                          map_location='cpu', weights_only=False)
    resumed = _weights_only_load(tmp_path / 'killed' / 'iter_6.pth')
    assert resumed['state_dict'].keys() == straight['state_dict'].keys()
    # the shipped configuration is what was trained
    cfg_text = resumed['meta']['cfg']
    assert re.search(r'dropout_ratio=0\.1', cfg_text)
    flags = [v for k, v in resumed['state_dict'].items()
             if k.endswith('binarizer.initialized')]
    assert flags and all(v.item() == 1 for v in flags)  # LSQ data init
    mid = _weights_only_load(tmp_path / 'killed' / start)['state_dict']
    moved = [k for k, v in resumed['state_dict'].items()
             if v.is_floating_point() and not torch.equal(v, mid[k])]
    assert len(moved) > 100  # the resumed iterations changed the weights

    compared, differ = _training_state_differences(straight, resumed)
    assert compared > 1000
    assert not differ, (f'{len(differ)} of {compared} tensors differ, e.g. '
                        f'{differ[:5]}')
    # without the states (an older checkpoint) it would not be exact
    old = torch.load(tmp_path / 'old' / 'iter_6.pth', map_location='cpu',
                     weights_only=False)
    _, differ = _training_state_differences(straight, old)
    assert len(differ) > 100


@pytest.fixture(scope='module')
def cls_data(tmp_path_factory):
    """Demo textures (5 classes x 4 training images) and a teacher
    checkpoint for the distillation config."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    from mmbhvit.checkpoint_io import save_slim_checkpoint
    root = tmp_path_factory.mktemp('cls')
    load_tool('dataset_converters/make_demo_cls_dataset.py').make_dataset(
        str(root / 'data'), num_train=4, num_val=1, size=64, seed=0)
    teacher_cfg = copy.deepcopy(Config.fromfile(CLS_CFG).model.teacher)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        teacher = MODELS.build(teacher_cfg)
    teacher.init_weights()
    save_slim_checkpoint(teacher.state_dict(), str(root / 'teacher.pth'))
    return root


@pytest.mark.slow
def test_killed_classification_run_resumes_bit_identical(cls_data, tmp_path):
    """The shipped distillation demo config (teacher, RandomResizedCrop and
    flips, LSQ attention, the weight regularization switched on in the last
    epoch), 4 epochs of 5 iterations, a checkpoint and a validation after
    every epoch; killed during epoch 2, resumed at the end of epoch 1."""
    data = cls_data / 'data'
    options = [
        '--cfg-options', f'train_dataloader.dataset.data_root={data}',
        f'val_dataloader.dataset.data_root={data}',
        f'test_dataloader.dataset.data_root={data}',
        f'model.teacher_checkpoint={cls_data / "teacher.pth"}',
        'train_dataloader.batch_size=4', 'train_cfg.max_epochs=4',
        'train_cfg.val_interval=1', 'default_hooks.logger.interval=1'
    ]
    start, logs = _kill_and_resume(
        tmp_path, CLS_CFG, options, 'epoch_4.pth', 'epoch_1.pth',
        r'Epoch\(train\)\s*\[2\]\[\s*2/5\]')
    log = logs['resumed']
    assert 'random states of the interrupted run restored' in log
    assert 'teacher loaded from' in log
    assert 'switched ON at epoch 3' in log  # L_re after the resume

    straight = torch.load(tmp_path / 'straight' / 'epoch_4.pth',
                          map_location='cpu', weights_only=False)
    resumed = _weights_only_load(tmp_path / 'killed' / 'epoch_4.pth')
    mid = _weights_only_load(tmp_path / 'killed' / start)['state_dict']
    moved = [k for k, v in resumed['state_dict'].items()
             if v.is_floating_point() and not torch.equal(v, mid[k])]
    assert len(moved) > 50
    compared, differ = _training_state_differences(straight, resumed)
    assert compared > 200
    assert not differ, (f'{len(differ)} of {compared} tensors differ, e.g. '
                        f'{differ[:5]}')
