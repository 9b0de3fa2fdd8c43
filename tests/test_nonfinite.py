# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Non-finite values and bad inputs: NaN/inf in training stops before any
weight or BatchNorm statistic changes (NonFiniteCheckHook), NaN/inf at
inference is an error (PyTorch backbone, packed engine), half/bfloat16
inputs are cast, an empty batch is refused."""
import logging
import os
import os.path as osp
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _helpers import REPO, make_shapes

import mmbhvit  # noqa: F401
from mmbhvit.apis import build_model
from mmbhvit.engine import NonFiniteCheckHook
from mmbhvit.models import BHViT
from mmbhvit.models.binary.fused import fused_kernels
from mmbhvit.models.finite import NonFiniteError, all_finite

SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                  num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
DEMO_CFG = osp.join(REPO, 'configs', 'bhvit',
                    'upernet_bhvit-tiny_demo-shapes.py')


def _quiet():
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


def _classifier_cfg(loss_weight=1.0, **backbone):
    return dict(
        type='ImageClassifier',
        backbone=dict(type='BHViT', arch=SMALL_ARCH, out_indices=(3, ),
                      **backbone),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=128,
                  loss=dict(type='CrossEntropyLoss',
                            loss_weight=loss_weight)))


def _build(model_cfg):
    _quiet()
    torch.manual_seed(0)
    return build_model(dict(default_scope='mmpretrain',
                            model=model_cfg)).train()


def _cls_batch(n=2, size=32, nan_at=None, seed=0):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    if nan_at is not None:
        x[nan_at, 1, 3, 4] = float('nan')
    samples = [
        DataSample(metainfo=dict(img_path=f'img_{i}.png')).set_gt_label(i % 3)
        for i in range(n)
    ]
    return dict(inputs=x, data_samples=samples)


def _optim(model):
    from mmengine.optim import OptimWrapper
    return OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2))


def _guard(model, optim_wrapper, iteration, **kw):
    """The hook as the Runner drives it, at 0-based ``iteration``."""
    hook = NonFiniteCheckHook(**kw)
    runner = SimpleNamespace(model=model, optim_wrapper=optim_wrapper,
                             iter=iteration, epoch=0)
    hook.before_train(runner)
    hook.before_train_iter(runner, iteration)
    return hook, runner


def _state(model):
    """Every parameter and buffer (persistent or not), cloned."""
    state = {f'param {n}': p.detach().clone()
             for n, p in model.named_parameters()}
    state.update({f'buffer {n}': b.clone()
                  for n, b in model.named_buffers()})
    return state


def _assert_bitwise_equal(before, after):
    assert before.keys() == after.keys()
    changed = [
        k for k in before
        if before[k].dtype != after[k].dtype or not torch.equal(
            before[k].reshape(-1).view(torch.uint8),
            after[k].reshape(-1).view(torch.uint8))
    ]
    assert not changed, f'{len(changed)} changed, e.g. {changed[:5]}'


def _bn_buffers(model):
    return [n for n, _ in model.named_buffers()
            if n.endswith(('running_mean', 'running_var'))]


# --------------------------------------------------------------------------
# Training: the hook, on one train_step at a time
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_pixel_stops_before_any_change_and_names_iteration_and_file():
    model = _build(_classifier_cfg())
    ow = _optim(model)
    hook, runner = _guard(model, ow, 0)
    model.train_step(_cls_batch(), ow)  # a healthy step first
    runner.iter = 4
    hook.before_train_iter(runner, 4)
    before = _state(model)
    with pytest.raises(NonFiniteError) as err:
        model.train_step(_cls_batch(nan_at=1, seed=1), ow)
    msg = str(err.value)
    assert 'Non-finite input at training iteration 5' in msg
    assert 'batch index 1 (img_1.png): 1 NaN of 3072 values' in msg
    _assert_bitwise_equal(before, _state(model))
    assert len(_bn_buffers(model)) > 20
    # training goes on with good data
    model.train_step(_cls_batch(seed=2), ow)
    assert all(all_finite(b) for b in model.buffers())


def test_epoch_based_loop_names_epoch_and_batch():
    from mmengine.runner import EpochBasedTrainLoop
    model = _build(_classifier_cfg())
    ow = _optim(model)
    hook = NonFiniteCheckHook()
    runner = SimpleNamespace(model=model, optim_wrapper=ow, iter=41, epoch=1,
                             train_loop=object.__new__(EpochBasedTrainLoop))
    hook.before_train(runner)
    hook.before_train_iter(runner, 2)
    with pytest.raises(NonFiniteError, match=r'at training iteration 42 '
                       r'\(epoch 2, batch 3 of the epoch\): inputs'):
        model.train_step(_cls_batch(nan_at=0), ow)
    hook.detach()
    with pytest.raises(NonFiniteError, match='BHViT got a non-finite'):
        model.train_step(_cls_batch(nan_at=0), ow)  # the backbone's check


def test_inf_loss_with_finite_input_restores_bn_and_first_step_lsq_init():
    """The forward has updated the running statistics and the LSQ quantizers'
    data-driven initial step before the loss is known: all of it is put
    back, bit for bit, and the next good step initialises LSQ as usual."""
    model = _build(_classifier_cfg(attn_binarizer='lsq'))
    ow = _optim(model)
    hook, _ = _guard(model, ow, 0)
    lsq = [m for m in model.modules() if hasattr(m, 'initialized')]
    assert lsq and all(not m.initialized.any() for m in lsq)
    loss_module = model.head.loss_module
    loss_module.loss_weight = float('inf')
    before = _state(model)
    with pytest.raises(NonFiniteError) as err:
        model.train_step(_cls_batch(), ow)
    msg = str(err.value)
    assert 'Non-finite loss at training iteration 1' in msg
    assert 'loss = inf' in msg and 'input batch was finite' in msg
    _assert_bitwise_equal(before, _state(model))
    loss_module.loss_weight = 1.0
    model.train_step(_cls_batch(), ow)
    assert all(m.initialized.all() for m in lsq)
    assert all(not torch.equal(m.step, torch.ones_like(m.step)) for m in lsq)


def test_nan_loss_term_in_segmentation_is_named():
    _quiet()
    torch.manual_seed(0)
    model = build_model(DEMO_CFG, cfg_options=_small_seg_options()).train()
    from mmengine.optim import OptimWrapper
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    _guard(model, ow, 2)
    model.auxiliary_head.loss_decode.loss_weight = float('nan')
    before = _state(model)
    with pytest.raises(NonFiniteError,
                       match=r'training iteration 3: aux\.loss_ce = nan'):
        model.train_step(_seg_batch(), ow)
    _assert_bitwise_equal(before, _state(model))


@pytest.mark.slow
def test_distill_classifier_input_and_loss():
    teacher = dict(type='ImageClassifier',
                   backbone=dict(type='ResNet', depth=18, base_channels=8,
                                 num_stages=1, out_indices=(0, ),
                                 strides=(1, ), dilations=(1, )),
                   neck=dict(type='GlobalAveragePooling'),
                   head=dict(type='LinearClsHead', num_classes=3,
                             in_channels=8))
    cfg = dict(_classifier_cfg(), type='DistillImageClassifier',
               teacher=teacher, allow_random_teacher=True)
    model = _build(cfg)
    model.build_teacher()
    ow = _optim(model)
    hook, runner = _guard(model, ow, 6)
    model.train_step(_cls_batch(), ow)
    before = _state(model)
    with pytest.raises(NonFiniteError, match='input at training iteration 7'):
        model.train_step(_cls_batch(nan_at=0), ow)
    _assert_bitwise_equal(before, _state(model))
    model.base_loss_weights['distill'] = float('inf')
    with pytest.raises(NonFiniteError, match=r'loss_distill = inf'):
        model.train_step(_cls_batch(), ow)
    _assert_bitwise_equal(before, _state(model))


@pytest.mark.slow
def test_nonfinite_gradient_with_check_grads():
    model = _build(_classifier_cfg())
    ow = _optim(model)
    _guard(model, ow, 9, check_grads=True)
    model.train_step(_cls_batch(), ow)
    name, param = next((n, p) for n, p in model.named_parameters()
                       if n.endswith('head.fc.weight'))
    handle = param.register_hook(lambda g: g * float('nan'))
    before = _state(model)
    with pytest.raises(NonFiniteError) as err:
        model.train_step(_cls_batch(), ow)
    handle.remove()
    msg = str(err.value)
    assert 'Non-finite gradient at training iteration 10' in msg
    assert name in msg
    _assert_bitwise_equal(before, _state(model))


@pytest.mark.slow
def test_ddp_wrapped_model(tmp_path):
    """MMDistributedDataParallel (gloo, one process): the hook sits on the
    wrapper, whose train_step is the one the Runner calls."""
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel
    model = _build(_classifier_cfg())
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg',
                            rank=0, world_size=1)
    try:
        ddp = MMDistributedDataParallel(module=model)
        ow = _optim(ddp)
        hook, runner = _guard(ddp, ow, 0)
        ddp.train_step(_cls_batch(), ow)
        runner.iter = 1
        hook.before_train_iter(runner, 1)
        before = _state(model)
        with pytest.raises(NonFiniteError, match='input at training '
                           'iteration 2: inputs .*img_1.png'):
            ddp.train_step(_cls_batch(nan_at=1), ow)
        model.head.loss_module.loss_weight = float('inf')
        with pytest.raises(NonFiniteError, match='loss at training '
                           'iteration 2: loss = inf'):
            ddp.train_step(_cls_batch(), ow)
        _assert_bitwise_equal(before, _state(model))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_amp_loss_scaler_overflow_is_not_an_error(monkeypatch):
    """With AmpOptimWrapper, inf gradients from a too large loss scale are
    the scaler's business (step skipped, scale lowered): no error, even with
    check_grads. A non-finite loss still stops."""
    from mmengine.optim.optimizer import amp_optimizer_wrapper as amp
    monkeypatch.setattr(amp, 'is_cuda_available', lambda: True)
    model = _build(_classifier_cfg())
    ow = amp.AmpOptimWrapper(
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        dtype='bfloat16')
    _guard(model, ow, 0, check_grads=True)
    ow.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.**8)
    model.train_step(_cls_batch(), ow)  # a normal step
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ow.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.**127)
    model.head.loss_module.loss_weight = 4.  # finite loss, inf once scaled
    model.train_step(_cls_batch(), ow)  # inf gradients: step skipped
    assert ow.loss_scaler.get_scale() == 2.**126
    assert all(torch.equal(p, params[n]) for n, p in
               model.named_parameters())
    model.head.loss_module.loss_weight = float('inf')
    with pytest.raises(NonFiniteError, match='Non-finite loss'):
        model.train_step(_cls_batch(), ow)


DIST_SCRIPT = textwrap.dedent('''
    import os, sys, logging
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import test_nonfinite as t
    from mmengine.model import MMDistributedDataParallel
    from mmbhvit.models.finite import NonFiniteError
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    model = t._build(t._classifier_cfg())
    ddp = MMDistributedDataParallel(module=model)
    ow = t._optim(ddp)
    hook, runner = t._guard(ddp, ow, 0)
    ddp.train_step(t._cls_batch(seed=rank), ow)
    out = []
    runner.iter = 2
    hook.before_train_iter(runner, 2)
    try:  # rank 1 reads a NaN image: both ranks stop, nobody waits
        ddp.train_step(t._cls_batch(nan_at=1 if rank == 1 else None), ow)
    except NonFiniteError as e:
        out.append(str(e))
    if rank == 0:
        model.head.loss_module.loss_weight = float('inf')
    try:
        ddp.train_step(t._cls_batch(seed=rank), ow)
    except NonFiniteError as e:
        out.append(str(e))
    with open(os.path.join({work!r}, f'rank{{rank}}.txt'), 'w') as f:
        f.write('\\n'.join(out))
    dist.destroy_process_group()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_stop_together(tmp_path):
    script = tmp_path / 'ranks.py'
    script.write_text(DIST_SCRIPT.format(tests=osp.join(REPO, 'tests'),
                                         work=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
        f'--master_port={_free_port()}', str(script)
    ], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        lines = (tmp_path / f'rank{rank}.txt').read_text().splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith('Non-finite input at training iteration '
                                   f'3 on rank(s) [1] (this is rank {rank})')
        assert lines[1].startswith('Non-finite loss at training iteration 3 '
                                   f'on rank(s) [0] (this is rank {rank})')
    assert 'img_1.png' in (tmp_path / 'rank1.txt').read_text()


# --------------------------------------------------------------------------
# Training: a real Runner on the demo segmentation config
# --------------------------------------------------------------------------
def _small_seg_options():
    return {
        'model.backbone.arch': dict(SMALL_ARCH, _delete_=True),
        'model.decode_head.in_channels': [16, 32, 64, 128],
        'model.decode_head.channels': 16,
        'model.auxiliary_head.in_channels': 64,
        'model.auxiliary_head.channels': 16,
    }


def _seg_batch(n=2, size=64):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        s = SegDataSample(metainfo=dict(img_path=f'img_{i}.png',
                                        img_shape=(size, size),
                                        ori_shape=(size, size),
                                        pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 5, (1, size, size), generator=g))
        samples.append(s)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                            generator=g) for _ in range(n)]
    return dict(inputs=inputs, data_samples=samples)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('data'), num_train=6)


def test_every_shipped_config_has_the_check():
    import glob
    from mmengine.config import Config
    configs = sorted(glob.glob(osp.join(REPO, 'configs', 'bhvit', '*.py')))
    assert len(configs) > 10
    for path in configs:
        hooks = Config.fromfile(path).default_hooks
        assert hooks.get('nonfinite_check') == dict(
            type='NonFiniteCheckHook'), path


@pytest.mark.slow
def test_runner_stops_at_the_nan_image(data_root, tmp_path):
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    from mmseg.registry import TRANSFORMS

    poisoned = []

    @TRANSFORMS.register_module(name='_PoisonThirdImage', force=True)
    class PoisonThirdImage:
        """Float image with one NaN pixel for the 3rd sample loaded (batch
        size 2: the first image of iteration 2)."""
        count = 0

        def __call__(self, results):
            PoisonThirdImage.count += 1
            if PoisonThirdImage.count == 3:
                img = results['img'].astype(np.float32)
                img[5, 7, 1] = np.nan
                results['img'] = img
                poisoned.append(results['img_path'])
            return results

    class Recorder(Hook):
        states = []

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            Recorder.states.append(_state(runner.model))

    cfg = Config.fromfile(DEMO_CFG)
    assert cfg.default_hooks.nonfinite_check.type == 'NonFiniteCheckHook'
    cfg.merge_from_dict(_small_seg_options())
    cfg.merge_from_dict({
        'work_dir': str(tmp_path / 'work'),
        'train_dataloader.dataset.data_root': data_root,
        'train_dataloader.batch_size': 2,
        'train_cfg.max_iters': 3, 'train_cfg.val_interval': 100,
        'default_hooks.checkpoint.interval': 100,
        'default_hooks.logger.interval': 1,
        'val_dataloader': None, 'val_cfg': None, 'val_evaluator': None,
        'test_dataloader': None, 'test_cfg': None, 'test_evaluator': None,
    })
    pipeline = cfg.train_dataloader.dataset.pipeline
    pipeline.insert(1, dict(type='_PoisonThirdImage'))
    runner = Runner.from_cfg(cfg)
    runner.register_hook(Recorder(), priority='LOWEST')
    with pytest.raises(NonFiniteError) as err:
        runner.train()
    msg = str(err.value)
    assert len(poisoned) == 1
    assert 'Non-finite input at training iteration 2' in msg
    assert f'({poisoned[0]}): 1 NaN of' in msg
    assert len(Recorder.states) == 1  # iteration 1 ended, 2 did not
    _assert_bitwise_equal(Recorder.states[0], _state(runner.model))


# --------------------------------------------------------------------------
# Inference and bad inputs
# --------------------------------------------------------------------------
def test_backbone_refuses_nonfinite_input_in_eval_and_train():
    model = BHViT(SMALL_ARCH).eval()
    x = torch.randn(3, 3, 32, 48)
    x[2, 0, 0, 0] = float('inf')
    x[2, 1, 4, 4] = float('-inf')
    x[0, 2, 1, 1] = float('nan')
    with pytest.raises(NonFiniteError) as err, torch.no_grad():
        model(x)
    msg = str(err.value)
    assert 'BHViT got a non-finite input batch (shape (3, 3, 32, 48)' in msg
    assert 'batch index 0: 1 NaN of 4608 values' in msg
    assert 'batch index 2: 1 +inf, 1 -inf of 4608 values' in msg
    assert isinstance(err.value, ValueError)
    model.train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(NonFiniteError):
        model(x)
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())


def test_nan_image_in_segmentor_inference_is_an_error():
    _quiet()
    model = build_model(DEMO_CFG, cfg_options=_small_seg_options())
    batch = _seg_batch()
    batch['inputs'][1] = batch['inputs'][1].float()
    batch['inputs'][1][0, 10, 10] = float('nan')
    with pytest.raises(NonFiniteError, match='batch index 1'):
        model.test_step(batch)
    assert len(model.test_step(_seg_batch())) == 2  # finite images work


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16,
                                   torch.float64])
def test_other_float_dtypes_are_cast_to_the_model_dtype(dtype):
    model = BHViT(SMALL_ARCH).eval()
    x = torch.randn(2, 3, 32, 32).to(dtype)
    with torch.no_grad():
        outs = model(x)
        ref = model(x.float())
    for out, r in zip(outs, ref):
        assert out.dtype == torch.float32
        assert torch.equal(out, r)
    x[1, 0, 0, 0] = float('nan')
    with pytest.raises(NonFiniteError, match=f'cast from {dtype}'):
        model(x)


def test_integer_images_and_empty_batch_are_refused():
    model = BHViT(SMALL_ARCH).eval()
    with pytest.raises(TypeError, match='floating-point image batch.*uint8'):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'empty batch \(N = 0'):
        model(torch.zeros(0, 3, 32, 32))


@pytest.mark.slow
def test_tracing_skips_the_data_dependent_check():
    model = BHViT(SMALL_ARCH).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    assert 'isfinite' not in str(traced.inlined_graph)
    # the trace holds the float convolutions: compare with the eager model
    # on the same path (its integer products agree to round-off only)
    with torch.no_grad(), fused_kernels(False):
        assert torch.equal(traced(x)[0], model(x)[0])


def test_packed_engine_refuses_nonfinite_input():
    from mmbhvit.deploy import PackedBHViT, export_model
    torch.manual_seed(0)
    backbone = BHViT(SMALL_ARCH)
    backbone.init_weights()
    engine = PackedBHViT(export_model(backbone.eval()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert len(engine(x)) == 4
    x[1, 0, 3, 3] = float('nan')
    with pytest.raises(NonFiniteError,
                       match='PackedBHViT got a non-finite input.*'
                       'batch index 1: 1 NaN'):
        engine(x)
