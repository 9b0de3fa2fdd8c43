# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""tools/train.py, tools/test.py, torchrun multi-process training and
demo/image_demo.py, run as a user would (subprocesses, tiny settings)."""
import os
import os.path as osp
import socket
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from _helpers import load_script, make_shapes

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
TRAIN = osp.join(REPO, 'tools', 'train.py')
TEST = osp.join(REPO, 'tools', 'test.py')
DEMO_CFG = osp.join(REPO, 'configs', 'bhvit',
                    'upernet_bhvit-tiny_demo-shapes.py')




@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('data'), num_train=8)


def _options(root, iters, *extra):
    """--cfg-options for a tiny, deterministic run on ``root`` (the model
    as shipped: head dropout 0.1)."""
    return [
        '--cfg-options',
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}',
        f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
        'train_dataloader.batch_size=2', 'default_hooks.checkpoint.interval=2',
        'default_hooks.checkpoint.max_keep_ckpts=-1',
        'default_hooks.logger.interval=1', *extra
    ]


def _run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
    return subprocess.run([PY, *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=kwargs.get('cwd', REPO))


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=False)[
        'state_dict']


# --------------------------------------------------------------------------
# Clear errors before any training
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_train_without_ade20k_says_where_and_how(tmp_path):
    config = osp.join(REPO, 'configs/bhvit/upernet_bhvit_ade20k.py')
    done = _run([TRAIN, config,
                 '--work-dir', str(tmp_path)], cwd=str(tmp_path))
    assert done.returncode == 2
    err = done.stderr
    assert 'data/ade/ADEChallengeData2016' in err
    assert str(tmp_path) in err  # where relative paths were resolved
    assert 'ADEChallengeData2016.zip' in err  # how to get the data
    assert 'Traceback' not in err


@pytest.mark.slow
def test_train_with_wrong_num_classes(data_root, tmp_path):
    done = _run([
        TRAIN, DEMO_CFG, '--work-dir',
        str(tmp_path), *_options(data_root, 1,
                                 'model.decode_head.num_classes=9')
    ])
    assert done.returncode == 2
    assert 'model.decode_head.num_classes=9' in done.stderr
    assert '5 classes' in done.stderr and 'Traceback' not in done.stderr


@pytest.mark.slow
def test_test_without_data(tmp_path):
    ckpt = tmp_path / 'fake.pth'
    ckpt.write_bytes(b'')
    done = _run([TEST, osp.join(REPO, 'configs/bhvit/fpn_bhvit_rs-lvf.py'),
                 str(ckpt)],
                cwd=str(tmp_path))
    assert done.returncode == 2
    assert 'data/rs_lvf' in done.stderr and 'classes.json' in done.stderr


# --------------------------------------------------------------------------
# --amp on the CPU, tools/test.py and dist_test.sh on the result
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_amp_on_cpu_then_test_tool(data_root, tmp_path):
    """--amp on the CPU warns and trains in float32; tools/test.py and
    tools/dist_test.sh evaluate the result. (--resume, straight vs killed
    and resumed, is tests/test_resume.py.)"""
    straight = tmp_path / 'train'
    done = _run([TRAIN, DEMO_CFG, '--work-dir', str(straight), '--amp',
                 *_options(data_root, 2)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert '--amp ignored' in done.stdout + done.stderr
    ckpt = torch.load(straight / 'iter_2.pth', map_location='cpu',
                      weights_only=False)
    assert all(v.dtype != torch.float16 and v.dtype != torch.bfloat16
               for v in ckpt['state_dict'].values())

    # tools/test.py evaluates the checkpoint and writes predictions
    out, show = tmp_path / 'preds', tmp_path / 'show'
    done = _run([
        TEST, DEMO_CFG,
        str(straight / 'iter_2.pth'), '--work-dir',
        str(tmp_path / 'test'), '--out',
        str(out), '--show-dir',
        str(show), '--cfg-options',
        f'test_dataloader.dataset.data_root={data_root}'
    ])
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'mIoU' in done.stdout + done.stderr
    assert len(list(out.glob('*.png'))) == 2
    assert len(list(show.rglob('*.png'))) == 2

    # tools/dist_test.sh: the same evaluation split over 2 processes
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=PY,
               PORT=str(_free_port()))
    done = subprocess.run([
        'bash', osp.join(REPO, 'tools', 'dist_test.sh'), DEMO_CFG,
        str(straight / 'iter_2.pth'), '2', '--work-dir',
        str(tmp_path / 'dist_test'), '--cfg-options',
        f'test_dataloader.dataset.data_root={data_root}'
    ], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'mIoU' in done.stdout + done.stderr
    usage = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), DEMO_CFG],
        capture_output=True, text=True)
    assert usage.returncode == 2 and 'usage:' in usage.stderr


def test_tools_close_the_process_group_they_start(tmp_path, monkeypatch):
    """tools/train.py and tools/test.py run inside process_group_closed: a
    gloo group left alive at exit can abort the process (SIGABRT after the
    results were printed, seen in CI with dist_test.sh)."""
    import torch.distributed as dist
    from mmbhvit.utils.launch import process_group_closed
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, 'barrier',
                        lambda *a, **k: barriers.append(1) or
                        real_barrier(*a, **k))

    def start(name):
        dist.init_process_group('gloo', init_method=f'file://{tmp_path}/'
                                f'{name}', rank=0, world_size=1)

    with process_group_closed():       # a finished run: barrier, close
        start('a')
    assert not dist.is_initialized() and barriers == [1]
    with pytest.raises(SystemExit):    # a run leaving on an error
        with process_group_closed():
            start('b')
            sys.exit(2)
    assert not dist.is_initialized() and barriers == [1]
    start('c')                         # the caller's group stays
    try:
        with process_group_closed():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    for script in (TRAIN, TEST):
        assert 'with process_group_closed():' in open(script).read()


# --------------------------------------------------------------------------
# Two processes (torchrun, gloo on the CPU): both ranks end identical
# --------------------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    sys.path.insert(0, {tools!r})
    import train
    from mmengine.runner import Runner
    args = train.parse_args(sys.argv[1:])
    cfg = train.build_cfg(args)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.module
    kinds = sorted({{type(m).__name__ for m in model.modules()
                    if 'BatchNorm' in type(m).__name__}})
    torch.save(dict(params={{k: v.detach().clone() for k, v in
                             model.named_parameters()}},
                    bn=kinds, world=torch.distributed.get_world_size()),
               os.path.join(cfg.work_dir,
                            f'rank{{torch.distributed.get_rank()}}.pt'))
    from mmbhvit.utils.launch import close_process_group
    close_process_group()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_training_ranks_agree(data_root, tmp_path):
    script = tmp_path / 'rank_train.py'
    script.write_text(RANK_SCRIPT.format(tools=osp.join(REPO, 'tools')))
    work = tmp_path / 'work'
    done = _run([
        '-m', 'torch.distributed.run', '--nproc_per_node=2',
        f'--master_port={_free_port()}',
        str(script), DEMO_CFG, '--launcher', 'pytorch', '--work-dir',
        str(work), *_options(
            data_root, 3, 'model.backbone.norm_cfg.type=SyncBN',
            'model.decode_head.norm_cfg.type=SyncBN',
            'model.auxiliary_head.norm_cfg.type=SyncBN',
            # the default 'lsq' binarizer: its data-driven initial step must
            # come out the same on both ranks
            'model.backbone.attn_binarizer=lsq',
            'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None')
    ])
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    if not torch.cuda.is_available():
        assert 'SyncBN config(s) replaced by BN' in log
    r0 = torch.load(work / 'rank0.pt', weights_only=False)
    r1 = torch.load(work / 'rank1.pt', weights_only=False)
    assert r0['world'] == r1['world'] == 2
    if not torch.cuda.is_available():
        assert r0['bn'] == ['BatchNorm2d']
    assert r0['params'].keys() == r1['params'].keys()
    for k in r0['params']:
        assert torch.equal(r0['params'][k], r1['params'][k]), k
    # and training did change them (the checkpoint after 2 of 3 iterations)
    mid = _weights(work / 'iter_2.pth')
    changed = [k for k in r0['params'] if not torch.equal(
        r0['params'][k], mid[k])]
    assert len(changed) > 100


@pytest.mark.slow
def test_image_demo_writes_overlay(tmp_path, data_root):
    img = osp.join(data_root, 'img_dir', 'val', '000000.png')
    out = tmp_path / 'overlay.png'
    done = _run([
        osp.join(REPO, 'demo', 'image_demo.py'), img, DEMO_CFG, '--out-file',
        str(out), '--device', 'cpu', '--opacity', '0.6', '--title', 'x'
    ])
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'random weights' in done.stderr
    overlay = cv2.imread(str(out))
    assert overlay.shape == (64, 64, 3)
    assert (overlay != cv2.imread(img)).any()  # something was painted


@pytest.mark.slow
def test_image_demo_packed_backend_matches_pytorch(tmp_path, data_root):
    """A checkpoint exported with tools/deployment/export_binary.py runs in
    the demo with ``--backend packed`` and paints the same segmentation."""
    import mmbhvit.datasets  # noqa: F401  (mmcv-lite shim, CheckLabelRange)
    from mmseg.apis import init_model

    from mmbhvit.checkpoint_io import save_slim_checkpoint
    from mmbhvit.testing.deploy import calibrate_random_model
    torch.manual_seed(0)
    model = init_model(DEMO_CFG, None, device='cpu')
    calibrate_random_model(model, (64, 64), seed=1)
    ckpt, packed = str(tmp_path / 'model.pth'), str(tmp_path / 'm.packed')
    save_slim_checkpoint(model.state_dict(), ckpt)
    done = _run([
        osp.join(REPO, 'tools', 'deployment', 'export_binary.py'), DEMO_CFG,
        ckpt, packed
    ])
    assert done.returncode == 0, done.stderr[-3000:]

    img = osp.join(data_root, 'img_dir', 'val', '000001.png')
    overlays = {}
    for backend in ('pytorch', 'packed'):
        out = str(tmp_path / f'{backend}.png')
        extra = ['--packed-model', packed] if backend == 'packed' else []
        done = _run([
            osp.join(REPO, 'demo', 'image_demo.py'), img, DEMO_CFG,
            '--checkpoint', ckpt, '--out-file', out, '--opacity', '1',
            '--backend', backend, *extra
        ])
        assert done.returncode == 0, done.stderr[-3000:]
        assert f'backbone: {backend}' in done.stdout
        overlays[backend] = cv2.imread(out)
    assert overlays['packed'].shape == (64, 64, 3)
    # opacity 1: the overlay is the palette image of the labels; float32
    # sign flips may move a few border pixels, never the picture
    same = (overlays['packed'] == overlays['pytorch']).all(-1).mean()
    assert same > 0.97, same
    # and the picture is not trivial (several classes painted)
    assert len(np.unique(overlays['packed'].reshape(-1, 3), axis=0)) > 1


def test_image_demo_backend_arguments(tmp_path):
    demo = load_script(osp.join(REPO, 'demo', 'image_demo.py'), 'image_demo')
    base = ['img.png', DEMO_CFG]
    assert demo.parse_args(base).backend == 'pytorch'
    for extra, message in [
        (['--backend', 'packed'], 'needs --packed-model'),
        (['--backend', 'packed', '--packed-model', 'missing.pth'],
         'packed model not found: missing.pth'),
        (['--packed-model', 'x.pth'], 'only used with --backend packed'),
        (['--backend', 'onnx'], 'invalid choice'),
    ]:
        with pytest.raises(SystemExit) as err:
            demo.parse_args(base + extra)
        assert err.value.code == 2
    packed = tmp_path / 'p.pth'
    packed.write_bytes(b'')
    with pytest.raises(SystemExit):
        demo.parse_args(base + ['--backend', 'packed', '--packed-model',
                                str(packed), '--device', 'cuda:0'])


# --------------------------------------------------------------------------
# SLURM launch scripts (srun replaced by a recorder: no cluster here)
# --------------------------------------------------------------------------
def test_slurm_scripts_build_the_srun_call(tmp_path):
    fake = tmp_path / 'bin'
    fake.mkdir()
    record = tmp_path / 'srun.txt'
    (fake / 'srun').write_text(
        '#!/usr/bin/env bash\n'
        f'printf "%s\\n" "MASTER_PORT=$MASTER_PORT" "$@" > {record}\n')
    (fake / 'srun').chmod(0o755)
    env = dict(os.environ, PATH=f'{fake}:{os.environ["PATH"]}', GPUS='2',
               PORT='29611')
    done = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'slurm_train.sh'), 'gpu', 'bhvit',
         DEMO_CFG, '--cfg-options', 'train_cfg.max_iters=2'],
        capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    assert args[0] == 'MASTER_PORT=29611'
    assert '--partition=gpu' in args and '--job-name=bhvit' in args
    # fewer GPUs than a node has: one node, one task per GPU
    assert '--gres=gpu:2' in args and '--ntasks=2' in args
    assert '--ntasks-per-node=2' in args
    script = args.index(osp.join(REPO, 'tools', 'train.py'))
    assert args[script - 1] == '-u'
    assert args[script + 1:] == [DEMO_CFG, '--launcher', 'slurm',
                                 '--cfg-options', 'train_cfg.max_iters=2']
    done = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'slurm_test.sh'), 'gpu', 'bhvit',
         DEMO_CFG, 'ckpt.pth'], capture_output=True, text=True,
        env=dict(env, GPUS='16'))
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    assert '--ntasks=16' in args and '--ntasks-per-node=8' in args
    assert args[-4:] == [DEMO_CFG, 'ckpt.pth', '--launcher', 'slurm']
    for script in ('slurm_train.sh', 'slurm_test.sh'):
        usage = subprocess.run(
            ['bash', osp.join(REPO, 'tools', script), 'gpu'],
            capture_output=True, text=True, env=env)
        assert usage.returncode == 2 and 'usage:' in usage.stderr
