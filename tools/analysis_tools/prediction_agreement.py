# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""How alike two segmentors predict: pixel agreement and each one's mIoU.

    python tools/analysis_tools/prediction_agreement.py \
        CONFIG_A CHECKPOINT_A CONFIG_B CHECKPOINT_B \
        [--img-dir data/demo_shapes/img_dir/val] \
        [--ann-dir data/demo_shapes/ann_dir/val] [--threads N]

Both models are built with :func:`mmbhvit.apis.build_model` (checkpoints
verified against their configs) and run with mmseg's ``inference_model`` on
every image of ``--img-dir``. Prints the share of pixels the two label
alike, and, with ``--ann-dir`` (label PNGs of the same names), each model's
pixel accuracy and mIoU over those images (IoU per class over all pixels
together; classes absent from both labels and predictions are left out, as
mmseg's ``IoUMetric`` does). E.g. a binary decode head against the
full-precision one, each trained by ``tools/demo/run_demo.py``: the configs
dumped in the two work dirs and their ``iter_*.pth``.
"""
import argparse
import glob
import os
import os.path as osp
import sys

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, REPO)

import mmbhvit  # noqa: E402,F401  (before mmseg: mmcv-lite shim)
import mmbhvit.datasets  # noqa: E402,F401  (transforms of the configs)


def areas(pred: np.ndarray, label: np.ndarray, num_classes: int,
          ignore_index: int = 255) -> list:
    """mmseg's per-class areas of one image (``IoUMetric.
    intersect_and_union``: intersection, union, prediction, label) over
    the pixels whose label is not ``ignore_index``; labels it cannot count
    are refused by name instead of being dropped."""
    import torch
    from mmseg.evaluation.metrics import IoUMetric
    if pred.shape != label.shape:
        raise ValueError(f'prediction {pred.shape} and label {label.shape} '
                         f'differ in shape')
    counted = label[label != ignore_index]
    if counted.size and (counted.max() >= num_classes or counted.min() < 0):
        raise ValueError(f'label values outside 0..{num_classes - 1} (and '
                         f'not the ignore index {ignore_index})')
    return list(IoUMetric.intersect_and_union(
        torch.from_numpy(pred.astype(np.int64)),
        torch.from_numpy(label.astype(np.int64)), num_classes, ignore_index))


def scores(total: list) -> dict:
    """``mIoU`` and ``aAcc`` (in %) of summed :func:`areas`, by mmseg's
    ``IoUMetric.total_area_to_metrics`` (classes absent from both labels
    and predictions are left out of the mean)."""
    from mmseg.evaluation.metrics import IoUMetric
    metrics = IoUMetric.total_area_to_metrics(*total, metrics=['mIoU'])
    return dict(mIoU=float(100 * np.nanmean(np.asarray(metrics['IoU']))),
                aAcc=float(100 * metrics['aAcc']))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config_a')
    parser.add_argument('checkpoint_a')
    parser.add_argument('config_b')
    parser.add_argument('checkpoint_b')
    parser.add_argument('--img-dir', default=osp.join(
        REPO, 'data', 'demo_shapes', 'img_dir', 'val'))
    parser.add_argument('--ann-dir', default=osp.join(
        REPO, 'data', 'demo_shapes', 'ann_dir', 'val'),
        help="label PNGs named as the images ('' to skip mIoU)")
    parser.add_argument('--suffix', default='.png')
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args(argv)

    import cv2
    import torch
    from mmseg.apis import inference_model

    from mmbhvit.apis import build_model
    from mmbhvit.utils.progress import progress_bar

    if args.threads:
        torch.set_num_threads(args.threads)
    images = sorted(glob.glob(osp.join(args.img_dir, '*' + args.suffix)))
    if not images:
        raise SystemExit(f'no *{args.suffix} images in {args.img_dir}')
    models = [build_model(args.config_a, args.checkpoint_a, init_scope=True),
              build_model(args.config_b, args.checkpoint_b, init_scope=True)]
    classes = [m.dataset_meta.get('classes') if m.dataset_meta else None
               for m in models]
    num_classes = [m.decode_head.num_classes for m in models]
    if num_classes[0] != num_classes[1]:
        raise SystemExit(f'the models predict {num_classes[0]} and '
                         f'{num_classes[1]} classes: not comparable')
    n = num_classes[0]
    same = total = 0
    totals = [None, None]  # summed areas of each model
    bar = progress_bar(len(images))
    for path in images:
        bar.update()
        preds = [inference_model(m, path).pred_sem_seg.data[0].numpy()
                 for m in models]
        same += int((preds[0] == preds[1]).sum())
        total += preds[0].size
        if args.ann_dir:
            name = osp.splitext(osp.basename(path))[0] + '.png'
            label = cv2.imread(osp.join(args.ann_dir, name),
                               cv2.IMREAD_UNCHANGED)
            if label is None:
                raise SystemExit(f'no readable label {name} in '
                                 f'{args.ann_dir}')
            for i, p in enumerate(preds):
                a = areas(p, label, n)
                totals[i] = a if totals[i] is None else [
                    t + x for t, x in zip(totals[i], a)]
    result = dict(images=len(images), pixel_agreement=100 * same / total)
    print(f'{len(images)} images, {total} pixels: the two models label '
          f'{result["pixel_agreement"]:.2f} % of the pixels alike')
    if args.ann_dir:
        for key, total, cfg in zip('ab', totals,
                                   (args.config_a, args.config_b)):
            for name, value in scores(total).items():
                result[f'{name}_{key}'] = value
            print(f'  {key}: mIoU {result[f"mIoU_{key}"]:.2f}, pixel '
                  f'accuracy {result[f"aAcc_{key}"]:.2f}  ({cfg})')
    if classes[0] and classes[1] and list(classes[0]) != list(classes[1]):
        print(f'note: the class names differ: {classes[0]} / {classes[1]}')
    return result


if __name__ == '__main__':
    main()
