# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Tests of mmbhvit.compat: the light mmcv.ops and checkpoint loading."""
import os
import os.path as osp
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmbhvit
from mmbhvit import compat

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COMPAT_FILE = osp.join(REPO_ROOT, 'mmbhvit', 'compat.py')

lite_only = pytest.mark.skipif(
    not compat.is_lite_mmcv(), reason='full mmcv with compiled ops installed')
needs_weights_only_default = pytest.mark.skipif(
    not hasattr(torch.serialization, 'safe_globals'),
    reason='torch < 2.6 does not load weights-only by default')


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                          cwd=REPO_ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=120)


# ---------------------------------------------------------------------------
# mmcv-lite branch (this machine, CI)
# ---------------------------------------------------------------------------


@lite_only
def test_import_mmbhvit_installs_light_ops():
    import mmcv

    assert compat.light_ops_installed()
    assert sys.modules['mmcv.ops'] is mmcv.ops
    assert 'point_sample' in mmcv.ops.PURE_TORCH_OPS
    assert 'sigmoid_focal_loss' in mmcv.ops.COMPILED_OPS
    # installing again is a no-op that reports the same state
    assert compat.install_light_mmcv_ops() is True
    assert sys.modules['mmcv.ops'] is mmcv.ops


@lite_only
def test_mmseg_imports_in_fresh_process():
    result = run_python("""
        import mmbhvit
        import mmseg.models
        from mmseg.apis import init_model, inference_model
        from mmseg.models.losses import focal_loss
        from mmseg.utils import mask_classification
        print('IMPORTS-OK', mmbhvit.compat.light_ops_installed())
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'IMPORTS-OK True' in result.stdout


@lite_only
def test_without_compat_mmseg_models_fails():
    """The failure compat exists for (proves the test above means it)."""
    result = run_python('import mmseg.models')
    assert result.returncode != 0
    assert "No module named 'mmcv._ext'" in result.stderr


@lite_only
def test_point_sample_matches_grid_sample():
    from mmcv.ops import point_sample

    image = torch.tensor([[[[0., 1.], [2., 3.]]]])  # 1x1x2x2
    # (x, y) in [0, 1]: the centre, then the centre of the top-left pixel
    points = torch.tensor([[[0.5, 0.5], [0.25, 0.25], [0.75, 0.25]]])
    out = point_sample(image, points, align_corners=False)
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out, torch.tensor([[[1.5, 0.0, 1.0]]]))

    feats = torch.randn(2, 3, 5, 7)
    coords = torch.rand(2, 11, 2)
    expected = F.grid_sample(
        feats, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0]
    torch.testing.assert_close(point_sample(feats, coords), expected)


@lite_only
@pytest.mark.parametrize('op_name',
                         ['sigmoid_focal_loss', 'nms', 'DeformConv2d'])
def test_compiled_op_raises_clear_error(op_name):
    import mmcv.ops

    op = getattr(mmcv.ops, op_name)  # importing works (mmseg needs it) ...
    assert isinstance(op, type)
    assert not isinstance(nn.Conv2d(1, 1, 1), op)
    with pytest.raises(ModuleNotFoundError) as info:  # ... using it doesn't
        op(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))
    assert isinstance(info.value, compat.MissingCompiledOpError)
    message = str(info.value)
    assert f'mmcv.ops.{op_name}' in message
    assert 'compiled ops' in message and 'mmcv==2.1.0' in message


@lite_only
def test_unguarded_and_guarded_mmseg_users():
    from mmseg.models.decode_heads import psa_head
    from mmseg.models.losses import focal_loss

    # focal_loss.py imports sigmoid_focal_loss at module level
    with pytest.raises(compat.MissingCompiledOpError, match='sigmoid_focal'):
        focal_loss._sigmoid_focal_loss(
            torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 2.0, 0.25,
            None, 'none')
    # psa_head guards its import; building the head names the missing op
    assert psa_head.PSAMask is not None
    with pytest.raises(compat.MissingCompiledOpError, match='PSAMask'):
        psa_head.PSAHead(
            in_channels=8, channels=4, num_classes=2, mask_size=(5, 5))


@lite_only
def test_pure_ops_are_real():
    from mmcv.ops import CrissCrossAttention

    attention = CrissCrossAttention(16)
    x = torch.randn(1, 16, 4, 5)
    assert attention(x).shape == x.shape


@lite_only
def test_unknown_name_is_import_error():
    with pytest.raises(ImportError, match='no_such_op'):
        from mmcv.ops import no_such_op  # noqa: F401


# ---------------------------------------------------------------------------
# full-mmcv branch (simulated)
# ---------------------------------------------------------------------------


def test_full_mmcv_is_left_alone():
    """With an importable mmcv._ext, compat must not touch mmcv.ops."""
    result = run_python(f"""
        import importlib.machinery, importlib.util, sys, types
        fake_ext = types.ModuleType('mmcv._ext')
        fake_ext.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)
        sys.modules['mmcv._ext'] = fake_ext
        spec = importlib.util.spec_from_file_location(
            'standalone_compat', {COMPAT_FILE!r})
        compat = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compat)  # runs install_light_mmcv_ops()
        assert not compat.is_lite_mmcv()
        assert compat.install_light_mmcv_ops() is False
        assert not compat.light_ops_installed()
        assert 'mmcv.ops' not in sys.modules
        import mmcv
        assert not hasattr(mmcv, 'ops')
        print('FULL-MMCV-UNTOUCHED')
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'FULL-MMCV-UNTOUCHED' in result.stdout


def test_broken_mmcv_ext_falls_back_with_warning():
    """An mmcv._ext that exists but fails to import (wrong torch build)."""
    result = run_python(f"""
        import importlib.abc, importlib.machinery, sys, warnings

        class BrokenExt(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == 'mmcv._ext':
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise ImportError('_ext.so: undefined symbol: fake')

        sys.meta_path.insert(0, BrokenExt())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import importlib.util
            spec = importlib.util.spec_from_file_location(
                'standalone_compat', {COMPAT_FILE!r})
            compat = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(compat)
        assert compat.light_ops_installed()
        assert any('fails to import' in str(w.message) for w in caught)
        from mmcv.ops import nms
        try:
            nms()
        except compat.MissingCompiledOpError as err:
            assert 'undefined symbol: fake' in str(err), err
            print('BROKEN-EXT-OK')
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'BROKEN-EXT-OK' in result.stdout


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


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
    compat.save_slim_checkpoint(state, path, meta=meta)

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
        compat.save_slim_checkpoint({'w': torch.ones(1)},
                                    str(tmp_path / 'x.pth'),
                                    meta=dict(obj=object()))
    with pytest.raises(TypeError, match='not a tensor'):
        compat.save_slim_checkpoint({'w': [1.0]}, str(tmp_path / 'y.pth'))


def test_restricted_getattr_only_serves_history_buffer():
    from mmengine.logging.history_buffer import HistoryBuffer

    assert compat._history_buffer_getattr(HistoryBuffer,
                                          'mean') is HistoryBuffer.mean
    for obj, name in [(os, 'system'), (HistoryBuffer, '__init__'),
                      (HistoryBuffer, '_statistics_methods'),
                      (HistoryBuffer, 'register_statistics')]:
        with pytest.raises(pickle.UnpicklingError):
            compat._history_buffer_getattr(obj, name)


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
    with compat.resume_safe_globals():
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
    with compat.resume_safe_globals():
        with compat.resume_safe_globals():
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


def test_package_version():
    assert mmbhvit.__version__ == '0.1.0'
