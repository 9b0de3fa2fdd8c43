# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Check a classification (mmpretrain) config before a Runner is built.

The classification counterpart of :mod:`mmbhvit.utils.data_check`: a missing
ImageNet folder or teacher checkpoint ends with one message that says where
it looked and how to fix it, instead of a stack trace from inside the
dataset or the first training iteration. Class names given in the config
are compared with the class folders (mmpretrain numbers the sorted folders
and only counts the names: names in another order would silently swap the
labels), and every image of each split is checked (exists, readable
header; ``ann_file`` labels in range) unless ``--skip-data-check``.
"""
import logging
import os.path as osp
from typing import List, Optional, Tuple

from mmengine.logging import print_log

from ..models.teacher import check_teacher_checkpoint
from .data_check import (MAX_LISTED, DataCheckError, EmptySplitError,
                         _join, _other_files, build_lazy_dataset,
                         format_problems, merge_problems, missing_data_error,
                         raise_reports, scan_samples, split_datasets)
from .data_check import _cfg_get as _get
from .text import first_items
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


# --------------------------------------------------------------------------
# Class names against class folders, then every file of each split
# --------------------------------------------------------------------------
def _listed(names, limit: int = MAX_LISTED) -> str:
    return f'[{first_items(map(repr, names), limit)}]'


def config_classes(dataset_cfg) -> bool:
    """Whether the dataset config names its classes itself
    (``metainfo.classes`` or ``classes``), rather than relying on the
    dataset's defaults or on the folders."""
    metainfo = _get(dataset_cfg, 'metainfo') or {}
    return (_get(metainfo, 'classes') is not None
            or _get(dataset_cfg, 'classes') is not None)


def compare_class_names(classes, folders, where: str) -> Optional[str]:
    """Compare the class names a dataset config gives with its class
    folders.

    mmpretrain's ``CustomDataset`` / ``ImageNet`` (folder layout, no
    ``ann_file``) give label ``i`` to the ``i``-th folder in sorted order
    and call it ``classes[i]``; when ``classes`` is given it only checks
    the count. So the names must be the sorted folder names, in that order.

    Returns:
        None when they agree, a warning text when no name is a folder name
        (another naming scheme, e.g. ImageNet's readable names for wnid
        folders: labels still follow the sorted folders).

    Raises:
        DataCheckError: same names in another order (the labels would be
            swapped), or names and folders that differ in part or in
            number; the message names the differences.
    """
    classes, folders = [str(c) for c in classes], list(folders)
    if classes == folders:
        return None
    common = set(classes) & set(folders)
    if set(classes) == set(folders) and len(classes) == len(folders):
        wrong = [(i, f, c) for i, (f, c) in enumerate(zip(folders, classes))
                 if f != c]
        shown = first_items((f'label {i}: folder {f!r} named {c!r}'
                             for i, f, c in wrong), MAX_LISTED, '; ')
        fix = (f'classes={tuple(folders)!r}' if len(folders) <= 30 else
               'the folder names sorted')
        raise DataCheckError(
            f'{where}: the class names are the folder names in another '
            'order, so the labels would be silently swapped. mmpretrain '
            'gives label i to the i-th class folder in sorted order and '
            f'names it classes[i]; {len(wrong)} of {len(folders)} labels '
            f'would get the wrong name ({shown}). Use {fix}.')
    if not common and len(classes) == len(folders):
        pairs = ', '.join(f'{f!r} -> {c!r}'
                          for f, c in list(zip(folders, classes))[:3])
        return (f'{where}: none of the {len(classes)} class names is a '
                f'folder name; labels follow the sorted folders ({pairs}, '
                '...). Check that the names are in that order.')
    no_folder = [c for c in classes if c not in common]
    no_class = [f for f in folders if f not in common]
    diffs = []
    if no_folder:
        diffs.append(f'classes without a folder: {_listed(no_folder)}')
    if no_class:
        diffs.append(f'folders not in the classes: {_listed(no_class)}')
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        diffs.append(f'duplicated class names: {_listed(twice)}')
    raise DataCheckError(
        f'{where}: the class names of the config ({len(classes)}) and the '
        f'class folders ({len(folders)}) differ; ' + '; '.join(diffs) +
        '. Labels come from the sorted folder names: make the classes '
        'exactly those names, in that order.')


def _default_classes_vs_folders(classes, folders, where: str) -> None:
    """A dataset with built-in classes (ImageNet's 1000) read from class
    folders: only the count can be compared (the names are not the
    folder names)."""
    if len(classes) != len(folders):
        raise DataCheckError(
            f'{where}: the dataset type has {len(classes)} built-in classes '
            f'but there are {len(folders)} class folders '
            f'{_listed(folders)}. Set metainfo=dict(classes=(...)) to the '
            'sorted folder names (and the heads\' num_classes), or use '
            'CustomDataset.')


def _cls_samples(dataset, phase: str, ds_type: str):
    """``(data_list, label problems)`` of an mmpretrain dataset; an empty
    split or an unreadable ``ann_file`` is an error."""
    img_dir = dataset.img_prefix
    ann_file = dataset.ann_file
    try:
        data_list = dataset.load_data_list()
    except RuntimeError as e:
        if 'Found 0 files' not in str(e):
            raise
        data_list = []
    except (OSError, ValueError, AssertionError, KeyError,
            IndexError) as e:
        what = f'its ann_file {ann_file}' if ann_file else \
            f'the folder {img_dir}'
        raise DataCheckError(
            f'The {phase} split ({phase}_dataloader, {ds_type}): reading '
            f'{what} failed: {type(e).__name__}: {e}. An ann_file holds one '
            '"relative/path label" line per image.') from e
    if not data_list:
        if ann_file:
            where = f'its ann_file {ann_file} lists no image'
        else:
            exts = ', '.join(sorted(dataset.extensions))
            where = (f'no file ending in {exts} in the class folders of '
                     f'{img_dir}; {_other_files(img_dir)}')
        raise EmptySplitError(
            f'The {phase} split ({phase}_dataloader, {ds_type}) is empty: '
            f'{where}.')
    labels = []
    num_classes = len(dataset.CLASSES) if dataset.CLASSES else None
    if ann_file and num_classes:
        for i, info in enumerate(data_list):
            label = info.get('gt_label')
            if label is not None and not 0 <= label < num_classes:
                labels.append((i, [('label', f'{info["img_path"]}: label '
                                    f'{label} in {ann_file} (classes: 0 to '
                                    f'{num_classes - 1})')]))
    return data_list, labels


def check_cls_datasets(cfg, phases=('train', 'val', 'test'),
                       check_files: bool = True,
                       workers: Optional[int] = None) -> None:
    """Raise :class:`DataCheckError` unless the class names and the files
    of the classification datasets of ``cfg`` agree.

    * Folder layout (no ``ann_file``): the class names given in the config
      are the sorted folder names (:func:`compare_class_names`); a dataset
      type's built-in classes (ImageNet) match the folder count; splits
      that take their classes from the folders have the same folders.
    * With ``check_files``: no split is empty, every image listed (by the
      folders or the ``ann_file``) exists and has a readable header, and
      ``ann_file`` labels are valid class indices. Problems are reported
      for all splits at once (count and first files of each kind).
    """
    from mmpretrain.datasets.custom import find_folders

    datasets, folder_splits = [], []
    for phase, ds_cfg in split_datasets(cfg, phases):
        ds_type = _get(ds_cfg, 'type', '?')
        dataset = build_lazy_dataset(ds_cfg, 'mmpretrain')
        where = f'The {phase} split ({phase}_dataloader, {ds_type})'
        datasets.append((phase, ds_type, where, dataset))
        if dataset.ann_file or not getattr(dataset, 'with_label', True):
            continue
        folders, _ = find_folders(dataset.img_prefix)
        where_dir = f'{where}, folders of {dataset.img_prefix}'
        if config_classes(ds_cfg):
            warning = compare_class_names(dataset.CLASSES, folders,
                                          where_dir)
            if warning:
                print_log(warning, logger='current', level=logging.WARNING)
        elif dataset.CLASSES is not None:
            _default_classes_vs_folders(dataset.CLASSES, folders, where_dir)
        else:
            folder_splits.append((phase, dataset.img_prefix, folders))
    _same_folders(folder_splits)
    if not check_files:
        return
    empty, reports = [], []
    for phase, ds_type, where, dataset in datasets:
        try:
            data_list, labels = _cls_samples(dataset, phase, ds_type)
        except EmptySplitError as e:
            empty.append(str(e))
            continue
        results = scan_samples([(info['img_path'], None)
                                for info in data_list], f'the {phase} split',
                               workers)
        results = merge_problems(results, labels)
        if results:
            reports.append(format_problems(
                f'{where}, images of {dataset.img_prefix}', len(data_list),
                results))
    raise_reports(empty, reports)


def _same_folders(folder_splits) -> None:
    """Splits that take their class list from their folders must have the
    same folders, or the same label means another class in each."""
    if not folder_splits:
        return
    phase0, dir0, folders0 = folder_splits[0]
    for phase, folder, folders in folder_splits[1:]:
        if folders != folders0:
            only0 = [f for f in folders0 if f not in folders]
            only = [f for f in folders if f not in folders0]
            raise DataCheckError(
                f'The {phase0} split ({dir0}) and the {phase} split '
                f'({folder}) take their classes from their folders but the '
                f'folders differ (only in {phase0}: {_listed(only0)}; only '
                f'in {phase}: {_listed(only)}), so a label would mean '
                'another class in each. Give both the same class folders, '
                'or set metainfo=dict(classes=(...)) on the datasets.')


def check_cls_config(cfg, phases=('train', 'val', 'test'),
                     check_teacher: bool = True,
                     check_files: bool = True) -> None:
    """Run :func:`check_cls_data_exists`, for training
    :func:`check_teacher_checkpoint`, then :func:`check_cls_datasets`
    (the per-file part only with ``check_files``)."""
    check_cls_data_exists(cfg, phases)
    if check_teacher:
        check_teacher_checkpoint(cfg)
    check_cls_datasets(cfg, phases, check_files=check_files)
