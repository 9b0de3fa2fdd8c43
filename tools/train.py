# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Train a BHViT segmentor (mmseg config) or classifier (mmpretrain config)
with the CLI of mmseg's ``tools/train.py``.

Differences from mmseg's script: ``mmbhvit`` is imported first (mmcv-lite
support, registries), the data are checked before the Runner is built (one
clear message instead of a worker stack trace hours in), runs without CUDA
are adapted (gloo, SyncBN -> BN, ``--amp`` falls back to float32 with a
warning), and checkpoints are loaded strictly (``load_from`` and
``--resume``, see :func:`mmbhvit.apis.use_verified_loading`; set
``allow_partial_load=True`` in the config to fine-tune from a different
model on purpose) with weights-only loading under torch >= 2.6.

Example::

    python tools/train.py configs/bhvit/upernet_bhvit_ade20k.py \
        --cfg-options model.backbone.init_cfg.checkpoint=PATH
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
# CPU runs: OpenMP threads that busy-wait collapse on a shared CPU.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import mmbhvit  # noqa: E402,F401  (before mmseg: mmcv-lite shim, registries)
from mmbhvit.datasets import DatasetMetaError  # noqa: E402
from mmbhvit.models.checkpoint import check_pretrained_backbone  # noqa: E402
from mmbhvit.models.teacher import check_teacher_checkpoint  # noqa: E402
from mmbhvit.models.finite import NonFiniteError  # noqa: E402
from mmbhvit.utils.data_check import (DataCheckError,  # noqa: E402
                                      check_data_config)
from mmbhvit.apis import (CheckpointMismatchError,  # noqa: E402
                          CheckpointReadError, task_of,
                          use_verified_loading)
from mmbhvit.utils.launch import (add_runner_args,  # noqa: E402
                                  config_from_args, parse_runner_args,
                                  process_group_closed, setup_amp,
                                  setup_cpu_runtime)
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmseg.registry import RUNNERS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a BHViT segmentor (mmseg config) or classifier '
        '(mmpretrain config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        action='store_true',
        default=False,
        help='resume from the latest checkpoint in the work_dir automatically')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (needs a GPU; '
        'ignored with a warning on the CPU)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the actual batch size against the '
        "config's auto_scale_lr.base_batch_size (as mmpretrain's tool)")
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='do not validate during training (as mmpretrain\'s tool)')
    parser.add_argument(
        '--compile',
        action='store_true',
        help='torch.compile the backbone in place (CompileModelHook) after '
        'the first, eager iteration; the second one compiles and is slow; '
        'see README "Training speed" for what it gains')
    parser.add_argument(
        '--skip-data-check',
        action='store_true',
        help='do not check every image/annotation before training (present, '
        'readable header, matching sizes, no empty split); folders, class '
        'names and counts are still checked')
    add_runner_args(parser)
    return parse_runner_args(parser, argv)


def build_cfg(args) -> Config:
    """The config of ``args``, with the CLI overrides applied."""
    cfg = config_from_args(args)
    if args.auto_scale_lr:
        if not isinstance(cfg.get('auto_scale_lr'), dict) or \
                'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError(
                f'--auto-scale-lr: {osp.basename(args.config)} has no '
                '`auto_scale_lr = dict(base_batch_size=N)`; add it (the total '
                'batch size its learning rate was set for)')
        cfg.auto_scale_lr.enable = True
    if args.no_validate:
        # the Runner wants the validation settings all set or all None
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if args.compile:
        hooks = list(cfg.get('custom_hooks', None) or [])
        if not any(h.get('type') == 'CompileModelHook' for h in hooks):
            hooks.append(dict(type='CompileModelHook'))
        cfg.custom_hooks = hooks
    setup_amp(cfg, args.amp)
    setup_cpu_runtime(cfg)
    cfg.resume = args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    # a distributed run's process group is closed however main ends
    with process_group_closed():
        return run(args)


def run(args):
    try:
        cfg = build_cfg(args)
        phases = ('train', 'val') if cfg.get('val_cfg') else ('train', )
        if task_of(cfg) == 'classification':
            from mmbhvit.utils.cls_data_check import check_cls_config
            check_cls_config(cfg, phases,
                             check_files=not args.skip_data_check)
        else:
            check_data_config(cfg, phases,
                              check_files=not args.skip_data_check)
            check_teacher_checkpoint(cfg)  # DistillEncoderDecoder
        # a Pretrained backbone without its file would train from random
        # weights (init_cfg=None asks for that on purpose)
        check_pretrained_backbone(cfg.model)
    except (DataCheckError, DatasetMetaError, FileNotFoundError,
            ValueError) as e:
        sys.stderr.write(f'\nERROR ({osp.basename(args.config)}): {e}\n')
        sys.exit(2)

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    # strict checkpoint loading (load_from, --resume), see mmbhvit.apis
    use_verified_loading(runner,
                         strict=not cfg.get('allow_partial_load', False))
    try:
        runner.train()
    except (CheckpointMismatchError, CheckpointReadError,
            NonFiniteError) as e:
        sys.stderr.write(f'\nERROR ({osp.basename(args.config)}): {e}\n')
        sys.exit(2)


if __name__ == '__main__':
    main()
