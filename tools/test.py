# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Test (and evaluate) a BHViT segmentor or classifier with the CLI of
mmseg's ``tools/test.py``.

Like ``tools/train.py``: imports ``mmbhvit`` first, checks the test data and
the class count before building the Runner, adapts CPU runs, and loads the
checkpoint strictly: a checkpoint that does not fit the config's model stops
with an error naming the file, the config and the keys.

Example::

    python tools/test.py configs/bhvit/upernet_bhvit_ade20k.py CKPT \
        --show-dir vis --out preds
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
from mmbhvit.utils.data_check import (DataCheckError,  # noqa: E402
                                      check_data_config)
from mmbhvit.apis import (CheckpointMismatchError,  # noqa: E402
                          CheckpointReadError, task_of,
                          use_verified_loading)
from mmbhvit.utils.launch import (add_runner_args,  # noqa: E402
                                  config_from_args, parse_runner_args,
                                  process_group_closed, setup_cpu_runtime)
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a BHViT segmentor (mmseg config) or '
        'classifier (mmpretrain config) from a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help=('if specified, the evaluation metric results will be dumped '
              'into the directory as json'))
    parser.add_argument(
        '--out',
        type=str,
        help='segmentation: the directory to save output prediction for '
        'offline evaluation; classification: a .pkl file for the dumped '
        'predictions')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. '
        'If specified, it will be automatically saved '
        'to the work_dir/timestamp/show_dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--tta', action='store_true', help='Test time augmentation')
    parser.add_argument(
        '--skip-data-check',
        action='store_true',
        help='do not check every test image/annotation before testing '
        '(present, readable header, matching sizes, no empty split); '
        'folders, class names and counts are still checked')
    add_runner_args(parser)
    return parse_runner_args(parser, argv)


def trigger_visualization_hook(cfg, args):
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise RuntimeError(
            'VisualizationHook must be included in default_hooks, e.g. '
            '"visualization=dict(type=\'SegVisualizationHook\')"')
    hook = default_hooks['visualization']
    # both hooks draw every 50th / 5000th batch by default: draw them all
    hook['interval'] = 1
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if task_of(cfg) == 'classification':
        # mmpretrain's VisualizationHook: `enable`, images to `out_dir`
        hook['enable'] = True
        if args.show_dir:
            hook['out_dir'] = args.show_dir
    else:
        hook['draw'] = True
        if args.show_dir:
            cfg.visualizer['save_dir'] = args.show_dir
    return cfg


def setup_outputs(cfg, args) -> list:
    """``--tta`` and ``--out``; returns metrics to add to the test evaluator.

    Segmentation (mmseg): ``--out DIR`` writes the predicted label maps as
    PNGs. Classification (mmpretrain): ``--out FILE.pkl`` dumps the
    predictions (mmengine's ``DumpResults``), as mmpretrain's tool does.
    """
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError(f'--tta: {osp.basename(args.config)} defines no '
                             '`tta_model` / `tta_pipeline`')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is None:
        return []
    if task_of(cfg) == 'classification':
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out for a classification config is a pickle '
                             f'file (.pkl), got {args.out!r}')
        from mmengine.evaluator import DumpResults
        return [DumpResults(out_file_path=args.out)]
    cfg.test_evaluator['output_dir'] = args.out
    cfg.test_evaluator['keep_results'] = True
    return []


def drop_training_settings(cfg: Config) -> None:
    """Testing needs the test split only.

    The train/val dataloaders stay lazy in the Runner, but mmseg's
    visualization hook reads ``runner.iter``, which builds the train loop
    and hence the train dataset: ``--show-dir`` would fail wherever the
    training data is absent (e.g. evaluating a released checkpoint). The
    Runner wants each group all set or all ``None``.
    """
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper',
                'param_scheduler', 'val_dataloader', 'val_cfg',
                'val_evaluator'):
        cfg[key] = None


def build_cfg(args) -> Config:
    cfg = config_from_args(args)
    cfg.load_from = args.checkpoint
    drop_training_settings(cfg)
    setup_cpu_runtime(cfg)
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    # a distributed run's process group is closed however main ends
    with process_group_closed():
        return run(args)


def run(args):
    cfg = build_cfg(args)
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        sys.stderr.write(f'\nERROR: checkpoint {args.checkpoint} not found.\n')
        sys.exit(2)
    try:
        if task_of(cfg) == 'classification':
            from mmbhvit.utils.cls_data_check import check_cls_config
            check_cls_config(cfg, ('test', ), check_teacher=False,
                             check_files=not args.skip_data_check)
        else:
            check_data_config(cfg, phases=('test', ),
                              check_files=not args.skip_data_check)
        extra_metrics = setup_outputs(cfg, args)
    except (DataCheckError, DatasetMetaError, FileNotFoundError,
            ValueError) as e:
        sys.stderr.write(f'\nERROR ({osp.basename(args.config)}): {e}\n')
        sys.exit(2)

    runner = Runner.from_cfg(cfg)
    if extra_metrics:
        runner.test_evaluator.metrics.extend(extra_metrics)
    use_verified_loading(runner, strict=True)
    try:
        return runner.test()
    except (CheckpointMismatchError, CheckpointReadError) as e:
        sys.stderr.write(f'\nERROR ({osp.basename(args.config)}): {e}\n')
        sys.exit(2)


if __name__ == '__main__':
    main()
