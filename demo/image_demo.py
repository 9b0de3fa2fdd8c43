# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Segment one image with a BHViT config and save a coloured overlay.

Example::

    python demo/image_demo.py demo.png \
        configs/bhvit/upernet_bhvit-tiny_demo-shapes.py \
        --checkpoint work_dirs/demo/iter_600.pth --out-file overlay.png

With the packed 1-bit engine as the backbone (``tools/deployment/
export_binary.py`` writes the file; the heads keep the checkpoint's
weights)::

    python demo/image_demo.py demo.png CONFIG --checkpoint CKPT \
        --backend packed --packed-model bhvit.packed.pth
"""
import os.path as osp
import sys
import warnings
from argparse import ArgumentParser

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmbhvit  # noqa: E402,F401  (before mmseg: mmcv-lite shim, registries)
import mmbhvit.datasets  # noqa: E402,F401
import numpy as np  # noqa: E402
from mmengine.config import Config  # noqa: E402

from mmbhvit.apis import (CheckpointMismatchError,  # noqa: E402
                          CheckpointReadError, build_model)

from mmseg.apis import inference_model, show_result_pyplot  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description='BHViT segmentation of one image')
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--checkpoint',
        default=None,
        help='checkpoint file (default: none, random weights with a warning)')
    parser.add_argument(
        '--out-file', default='result.png', help='path of the overlay PNG')
    parser.add_argument(
        '--device', default='cpu', help='device used for inference')
    parser.add_argument(
        '--opacity',
        type=float,
        default=0.5,
        help='opacity of the painted segmentation map, in (0, 1]')
    parser.add_argument(
        '--with-labels',
        action='store_true',
        default=False,
        help='write class names on the segments')
    parser.add_argument('--title', default='result', help='figure title')
    parser.add_argument(
        '--backend',
        choices=['pytorch', 'packed'],
        default='pytorch',
        help='backbone used for inference: the PyTorch model, or the '
        'packed 1-bit engine (needs --packed-model)')
    parser.add_argument(
        '--packed-model',
        default=None,
        help='file written by tools/deployment/export_binary.py '
        '(with --backend packed)')
    args = parser.parse_args(argv)
    if args.backend == 'packed':
        if args.packed_model is None:
            parser.error('--backend packed needs --packed-model FILE '
                         '(written by tools/deployment/export_binary.py)')
        if not osp.isfile(args.packed_model):
            parser.error(f'packed model not found: {args.packed_model}')
        if args.device != 'cpu':
            parser.error('the packed engine runs on the CPU only; use '
                         '--device cpu with --backend packed')
    elif args.packed_model is not None:
        parser.error('--packed-model is only used with --backend packed')
    return args


def fallback_meta(cfg: Config, num_classes: int) -> dict:
    """Class names and palette when the checkpoint brings none: from the
    config's test dataset if it can be read, else ``class_0 ...``."""
    from mmbhvit.utils.data_check import dataset_classes
    try:
        ds_cfg = cfg.test_dataloader.dataset
        classes = dataset_classes(ds_cfg)
        if classes is not None and len(classes) == num_classes:
            palette = (ds_cfg.get('metainfo') or {}).get('palette')
            if palette is None:
                from mmseg.registry import DATASETS
                palette = DATASETS.get(ds_cfg.type).METAINFO.get('palette')
            if palette is not None and len(palette) == num_classes:
                return dict(classes=classes, palette=palette)
    except Exception:  # no data / metadata: use generic names
        pass
    rng = np.random.default_rng(42)
    return dict(
        classes=tuple(f'class_{i}' for i in range(num_classes)),
        palette=rng.integers(0, 256, size=(num_classes, 3)).tolist())


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.img):
        raise SystemExit(f'Image not found: {args.img}')
    # a 0-byte / truncated / non-image file: named now, not a cv2 assertion
    from mmbhvit.utils.image_header import ImageFileError, check_image_file
    try:
        check_image_file(args.img)
    except ImageFileError as e:
        raise SystemExit(f'ERROR: cannot read the image {e}')
    if not 0 < args.opacity <= 1:
        raise SystemExit(f'--opacity must be in (0, 1], got {args.opacity}')
    cfg = Config.fromfile(args.config)
    if args.checkpoint is None:
        warnings.warn('No --checkpoint given: the model has random weights, '
                      'the segmentation is meaningless.')
    # strict: a checkpoint of another model is an error, not a bad picture
    try:
        model = build_model(cfg, args.checkpoint, device=args.device,
                            init_scope=True)
    except (CheckpointMismatchError, CheckpointReadError) as e:
        raise SystemExit(f'ERROR: {e}')
    if args.backend == 'packed':
        from mmbhvit.deploy.mmseg_backend import use_packed_backbone
        from mmbhvit.deploy.spec import PackedFormatError
        try:
            # the file must fit the config (full spec) and, when the
            # checkpoint is given, hold its backbone weights (probe outputs)
            use_packed_backbone(
                model, args.packed_model,
                verify='outputs' if args.checkpoint else 'spec')
        except PackedFormatError as e:
            raise SystemExit(f'ERROR: {e}')
        if args.checkpoint is None:
            warnings.warn('--backend packed without --checkpoint: the heads '
                          'have random weights.')
    if getattr(model, 'dataset_meta', None) is None:
        model.dataset_meta = fallback_meta(cfg,
                                           model.decode_head.num_classes)
    result = inference_model(model, args.img)
    show_result_pyplot(
        model,
        args.img,
        result,
        title=args.title,
        opacity=args.opacity,
        with_labels=args.with_labels,
        draw_gt=False,
        show=False,
        out_file=args.out_file)
    print(f'Saved the overlay to {args.out_file} '
          f'(backbone: {args.backend})')


if __name__ == '__main__':
    main()
