# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Check a classification (mmpretrain) config before a Runner is built.

The classification counterpart of :mod:`mmbhvit.utils.data_check`: a missing
ImageNet folder or teacher checkpoint ends with one message that says where
it looked and how to fix it, instead of a stack trace from inside the
dataset or the first training iteration.
"""
import os
import os.path as osp
from typing import List, Tuple

from .data_check import DataCheckError, _join, missing_data_error
from .data_check import _cfg_get as _get
from .data_check import iter_datasets as _leaf_datasets

#: How to get each dataset type, shown when its files are missing.
CLS_PREPARE_HINTS = {
    'ImageNet':
    ('ImageNet-1k is read in the mmpretrain layout:\n'
     '  DATA_ROOT/train/<wnid>/*.JPEG      (1000 class folders)\n'
     '  DATA_ROOT/val/<wnid>/*.JPEG        (or flat val/*.JPEG with '
     'DATA_ROOT/meta/val.txt "file label" lines)\n'
     'See https://mmpretrain.readthedocs.io/en/latest/user_guides/'
     'dataset_prepare.html#imagenet. For a small synthetic dataset in this '
     'layout: python tools/dataset_converters/make_demo_cls_dataset.py '
     'data/demo_cls'),
}
CLS_GENERIC_HINT = ('Prepare the data in the layout the config expects '
                    '(CustomDataset: DATA_ROOT/<split or data_prefix>/'
                    '<class>/<image>).')


def cls_dataset_paths(dataset_cfg) -> List[Tuple[str, str]]:
    """``(description, path)`` of what an mmpretrain ImageNet /
    CustomDataset config reads: ``data_root``, the image folder
    (``data_prefix``, else ``split``) and ``ann_file``."""
    root = _get(dataset_cfg, 'data_root') or ''
    prefix = _get(dataset_cfg, 'data_prefix') or ''
    if isinstance(prefix, dict):
        prefix = prefix.get('img_path', '') or prefix.get('img', '')
    split = _get(dataset_cfg, 'split') or ''
    paths = []
    if root:
        paths.append(('data_root', root))
    folder = prefix or split
    if folder:
        paths.append(('images', _join(root, folder)))
    ann_file = _get(dataset_cfg, 'ann_file')
    if ann_file:
        paths.append(('ann_file', _join(root, ann_file)))
    return paths


def check_cls_data_exists(cfg, phases=('train', 'val', 'test')) -> None:
    """Raise :class:`DataCheckError` if a dataset folder or file of the
    ``{phase}_dataloader`` datasets of ``cfg`` is missing."""
    missing, types = [], []
    for phase in phases:
        loader = _get(cfg, f'{phase}_dataloader')
        if loader is None:
            continue
        for ds in _leaf_datasets(_get(loader, 'dataset')):
            for what, path in cls_dataset_paths(ds):
                if osp.exists(path):
                    continue
                item = f'  {path}   ({phase}_dataloader {what})'
                if item not in missing:
                    missing.append(item)
                ds_type = _get(ds, 'type', '?')
                if ds_type not in types:
                    types.append(ds_type)
    if not missing:
        return
    raise missing_data_error(types, missing,
                             [CLS_PREPARE_HINTS.get(t, CLS_GENERIC_HINT)
                              for t in types])


def check_teacher_checkpoint(cfg) -> None:
    """Raise :class:`DataCheckError` if ``cfg.model`` distils from a teacher
    whose checkpoint is not set or missing (unless
    ``allow_random_teacher``)."""
    model = _get(cfg, 'model') or {}
    if _get(model, 'teacher') is None or _get(model, 'allow_random_teacher'):
        return
    path = _get(model, 'teacher_checkpoint')
    if path is not None and ('://' in path or osp.isfile(path)):
        return
    where = ('is not set' if path is None else
             f'not found: {path} (resolved from {os.getcwd()})')
    raise DataCheckError(
        f'The distillation teacher checkpoint (model.teacher_checkpoint) '
        f'{where}. Set it with --cfg-options model.teacher_checkpoint=PATH '
        '(for the BHViT configs the DeiT-small weights of mmpretrain; see '
        'configs/bhvit/README_classification.md), or distil from a random '
        'teacher with model.allow_random_teacher=True (tests/demos only).')


def check_cls_config(cfg, phases=('train', 'val', 'test'),
                     check_teacher: bool = True) -> None:
    """Run :func:`check_cls_data_exists` and, for training,
    :func:`check_teacher_checkpoint`."""
    check_cls_data_exists(cfg, phases)
    if check_teacher:
        check_teacher_checkpoint(cfg)
