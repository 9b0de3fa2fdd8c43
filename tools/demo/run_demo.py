# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The embedded demo (``make demo``): BHViT-tiny + UPerNet on the CPU.

1. generates the synthetic "demo shapes" dataset into ``--data-root`` if it
   is not there (``tools/dataset_converters/make_demo_dataset.py``);
2. trains ``configs/bhvit/upernet_bhvit-tiny_demo-shapes.py`` with the
   mmengine Runner (iteration based, its usual logging and checkpoint);
3. evaluates mIoU on the validation split and compares it with the
   majority-class baseline (predict the most frequent class everywhere);
4. reloads the checkpoint with ``mmbhvit.apis.build_model`` and writes
   ``input | ground truth | prediction`` PNGs for a few validation images.

Outputs go to ``--work-dir`` (``work_dirs/demo`` by default), among them
``demo_result.json`` (mIoU, baseline, wall time) and ``predictions/*.png``.
"""
import argparse
import glob
import importlib.util
import os
import os.path as osp
import sys
import time

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, REPO)
# OpenMP threads that busy-wait at barriers collapse when the CPU is shared
# (minutes per iteration); passive waiting costs little on an idle machine.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

import mmbhvit  # noqa: E402,F401  (before mmseg: mmcv-lite shim, registries)
import mmbhvit.datasets  # noqa: E402,F401
from mmbhvit.models.teacher import check_teacher_checkpoint  # noqa: E402
from mmbhvit.utils.data_check import check_data_config  # noqa: E402
from mmbhvit.utils.io import atomic_write_json, write_image  # noqa: E402
from mmbhvit.utils.launch import setup_cpu_runtime  # noqa: E402

CONFIG = osp.join(REPO, 'configs', 'bhvit',
                  'upernet_bhvit-tiny_demo-shapes.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train and evaluate BHViT-tiny + UPerNet on generated '
        'shapes, on the CPU.')
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--data-root', default=osp.join(REPO, 'data',
                                                        'demo_shapes'))
    parser.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs',
                                                       'demo'))
    parser.add_argument('--iters', type=int, default=None,
                        help='training iterations (default: the config)')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='training batch size (default: the config)')
    parser.add_argument('--lr', type=float, default=None,
                        help='AdamW learning rate (default: the config)')
    parser.add_argument('--num-train', type=int, default=400,
                        help='images generated for training (new data only)')
    parser.add_argument('--num-val', type=int, default=60,
                        help='images generated for validation (new data '
                        'only)')
    parser.add_argument('--size', type=int, default=96,
                        help='side of the generated images (new data only)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-vis', type=int, default=6,
                        help='validation images drawn to predictions/')
    parser.add_argument('--doc-image', default=None,
                        help='also save a small overview PNG here')
    parser.add_argument('--log-interval', type=int, default=None)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: torch default)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings (key=value, as in '
                        'tools/train.py), e.g. model.teacher_checkpoint=PATH '
                        'for the distillation config')
    return parser.parse_args(argv)


def _load_tool(rel: str):
    """``tools/<rel>`` as a module (the tools are scripts, not a
    package)."""
    path = osp.join(REPO, 'tools', rel)
    name = osp.splitext(osp.basename(rel))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_dataset(args) -> None:
    if osp.isfile(osp.join(args.data_root, 'classes.json')) and glob.glob(
            osp.join(args.data_root, 'ann_dir', 'val', '*.png')):
        print(f'Using the existing dataset in {args.data_root}')
        return
    print(f'Generating the demo dataset in {args.data_root} ...')
    _load_tool('dataset_converters/make_demo_dataset.py').make_dataset(
        args.data_root, args.num_train, args.num_val, args.size, args.seed,
        nproc=2, progress=True)


def majority_baseline(ann_dir: str, num_classes: int,
                      ignore_index: int = 255) -> dict:
    """mIoU of predicting the most frequent class everywhere (as IoUMetric
    computes it: classes absent from both prediction and labels are NaN and
    left out of the mean)."""
    counts = np.zeros(num_classes, np.int64)
    for path in sorted(glob.glob(osp.join(ann_dir, '*.png'))):
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        label = label[label != ignore_index]
        counts += np.bincount(label.ravel(), minlength=num_classes)[
            :num_classes]
    majority = int(counts.argmax())
    total = counts.sum()
    ious = []
    for c in range(num_classes):
        if c == majority:
            ious.append(counts[c] / total)
        elif counts[c] > 0:
            ious.append(0.0)
    return dict(
        majority_class=majority,
        majority_fraction=float(counts[majority] / total),
        miou=float(np.mean(ious) * 100))


def colourise(label: np.ndarray, palette) -> np.ndarray:
    """RGB image of a label map (ignored pixels white)."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[:len(palette)] = np.asarray(palette, np.uint8)
    return lut[label]


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((16, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], axis=0)


def draw_predictions(model, img_paths, ann_dir, out_dir, palette):
    """Write ``input | ground truth | prediction`` rows; return them."""
    from mmseg.apis import inference_model

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for path in img_paths:
        result = inference_model(model, path)
        pred = result.pred_sem_seg.data[0].cpu().numpy().astype(np.uint8)
        img = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]
        gt = cv2.imread(
            osp.join(ann_dir, osp.basename(path)), cv2.IMREAD_UNCHANGED)
        sep = np.full((img.shape[0], 4, 3), 255, np.uint8)
        row = np.concatenate([
            img, sep, colourise(gt, palette), sep, colourise(pred, palette)
        ], axis=1)
        rows.append(row)
        name = osp.splitext(osp.basename(path))[0]
        write_image(
            osp.join(out_dir, f'{name}.png'),
            _caption(row, 'input | ground truth | prediction')[..., ::-1])
    return rows


def build_cfg(args):
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    cfg.work_dir = args.work_dir
    cfg.launcher = 'none'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = args.data_root
    if args.iters is not None:
        cfg.train_cfg.max_iters = args.iters
        cfg.train_cfg.val_interval = args.iters
        cfg.default_hooks.checkpoint.interval = args.iters
        warmup = min(30, max(1, args.iters // 10))
        cfg.param_scheduler[0].end = warmup
        cfg.param_scheduler[1].begin = warmup
        cfg.param_scheduler[1].end = args.iters
    if args.batch_size is not None:
        cfg.train_dataloader.batch_size = args.batch_size
    if args.lr is not None:
        cfg.optim_wrapper.optimizer.lr = args.lr
    if args.log_interval is not None:
        cfg.default_hooks.logger.interval = args.log_interval
    cfg.randomness = dict(seed=args.seed)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    setup_cpu_runtime(cfg)
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    start = time.time()
    args.data_root = osp.abspath(args.data_root)
    args.work_dir = osp.abspath(args.work_dir)
    ensure_dataset(args)

    from mmengine.runner import Runner
    from mmbhvit.apis import build_model

    cfg = build_cfg(args)
    check_data_config(cfg, phases=('train', 'val'))
    check_teacher_checkpoint(cfg)  # the distillation config
    runner = Runner.from_cfg(cfg)
    train_start = time.time()
    runner.train()
    train_time = time.time() - train_start
    hub = runner.message_hub
    metrics = {
        k: float(hub.get_scalar(f'val/{k}').current())
        for k in ('mIoU', 'mAcc', 'aAcc')
    }
    classes = runner.train_dataloader.dataset.metainfo['classes']
    palette = runner.train_dataloader.dataset.metainfo['palette']
    baseline = majority_baseline(
        osp.join(args.data_root, 'ann_dir', 'val'), len(classes))

    with open(osp.join(args.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    model = build_model(cfg, checkpoint, init_scope=True)
    val_imgs = sorted(
        glob.glob(osp.join(args.data_root, 'img_dir', 'val', '*.png')))
    pred_dir = osp.join(args.work_dir, 'predictions')
    rows = draw_predictions(model, val_imgs[:args.num_vis],
                            osp.join(args.data_root, 'ann_dir', 'val'),
                            pred_dir, palette)
    if args.doc_image and rows:
        overview = np.concatenate(
            [np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)])
             for r in rows[:4]], axis=0)
        overview = _caption(overview, 'input | ground truth | prediction')
        os.makedirs(osp.dirname(osp.abspath(args.doc_image)), exist_ok=True)
        write_image(args.doc_image, overview[..., ::-1],
                    [cv2.IMWRITE_PNG_COMPRESSION, 9])

    curve = osp.join(args.work_dir, 'training_curve.png')
    _load_tool('analysis_tools/analyze_logs.py').plot_curve(
        [osp.join(runner.log_dir, 'vis_data', 'scalars.json')],
        ['loss', 'decode.acc_seg'], curve, legend=['demo'],
        title='BHViT-tiny + UPerNet, demo shapes')

    result = dict(
        mIoU=metrics['mIoU'],
        mAcc=metrics['mAcc'],
        aAcc=metrics['aAcc'],
        majority_baseline_mIoU=baseline['miou'],
        majority_class=classes[baseline['majority_class']],
        majority_fraction=baseline['majority_fraction'],
        iters=cfg.train_cfg.max_iters,
        train_seconds=round(train_time, 1),
        total_seconds=round(time.time() - start, 1),
        checkpoint=checkpoint,
        predictions=pred_dir,
        training_curve=curve,
        classes=list(classes))
    atomic_write_json(result, osp.join(args.work_dir, 'demo_result.json'),
                      indent=1)
    summary = (
        f'\nDemo finished in {result["total_seconds"]:.0f} s '
        f'(training {result["train_seconds"]:.0f} s, {result["iters"]} '
        f'iterations).\n'
        f'  validation mIoU: {result["mIoU"]:.2f}   (majority-class '
        f'baseline: {result["majority_baseline_mIoU"]:.2f}, '
        f'"{result["majority_class"]}" covers '
        f'{100 * result["majority_fraction"]:.1f}% of the pixels)\n'
        f'  checkpoint: {checkpoint}\n'
        f'  predictions (input | ground truth | prediction): {pred_dir}\n'
        f'  training curve (loss, pixel accuracy): {curve}\n'
        f'  metrics: {osp.join(args.work_dir, "demo_result.json")}')
    print(summary, flush=True)
    return result


if __name__ == '__main__':
    main()
