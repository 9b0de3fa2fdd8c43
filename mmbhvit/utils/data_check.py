# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Check a segmentation config's data before a Runner is built.

``tools/train.py`` and ``tools/test.py`` call :func:`check_data_config`
first, so a missing dataset or a class-count mismatch ends with one readable
message instead of a stack trace from deep inside a dataloader worker.
"""
import os
import os.path as osp
from typing import Iterator, List, Optional, Tuple

#: How to get each dataset type, shown when its files are missing.
PREPARE_HINTS = {
    'ADE20KDataset':
    ('ADE20K (SceneParsing, ADEChallengeData2016) is prepared as in '
     'mmsegmentation:\n'
     '  mkdir -p data/ade && cd data/ade\n'
     '  wget http://data.csail.mit.edu/places/ADEchallenge/'
     'ADEChallengeData2016.zip\n'
     '  unzip ADEChallengeData2016.zip   # -> ADEChallengeData2016/'
     '{images,annotations}/{training,validation}\n'
     'See https://mmsegmentation.readthedocs.io/en/latest/user_guides/'
     '2_dataset_prepare.html#ade20k'),
    'RSLVFDataset':
    ('RS-LVF is expected in the mmseg layout:\n'
     '  DATA_ROOT/classes.json           {"classes": [...], '
     '"palette": [[r, g, b], ...]}\n'
     '  DATA_ROOT/img_dir/{train,val}/*.png\n'
     '  DATA_ROOT/ann_dir/{train,val}/*.png   (uint8 class indices, 255 = '
     'ignore)\n'
     'tools/dataset_converters/rs_lvf.py builds it from images + RGB '
     'colour masks + a class file (see configs/bhvit/README.md).'),
}

GENERIC_HINT = (
    'Prepare the data in the layout the config expects (see '
    'https://mmsegmentation.readthedocs.io/en/latest/user_guides/'
    '2_dataset_prepare.html).')


class DataCheckError(RuntimeError):
    """The data a config points to is missing or does not fit the model."""


def _cfg_get(cfg, key, default=None):
    if cfg is None:
        return default
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def iter_datasets(dataset_cfg) -> Iterator[dict]:
    """Yield the leaf dataset configs of (possibly wrapped) dataset cfgs."""
    if dataset_cfg is None:
        return
    if isinstance(dataset_cfg, (list, tuple)):
        for d in dataset_cfg:
            yield from iter_datasets(d)
        return
    if _cfg_get(dataset_cfg, 'datasets') is not None:  # ConcatDataset
        yield from iter_datasets(dataset_cfg['datasets'])
    elif _cfg_get(dataset_cfg, 'dataset') is not None:  # RepeatDataset ...
        yield from iter_datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def _join(root: Optional[str], path: Optional[str]) -> Optional[str]:
    if not path:
        return root
    if root is None or osp.isabs(path):
        return path
    return osp.join(root, path)


def dataset_paths(dataset_cfg) -> List[Tuple[str, str]]:
    """``(description, path)`` of the folders / files a dataset reads."""
    root = _cfg_get(dataset_cfg, 'data_root')
    prefix = _cfg_get(dataset_cfg, 'data_prefix') or {}
    paths = []
    if root:
        paths.append(('data_root', root))
    for key in ('img_path', 'seg_map_path'):
        if prefix.get(key):
            paths.append((key, _join(root, prefix[key])))
    ann_file = _cfg_get(dataset_cfg, 'ann_file')
    if ann_file:
        paths.append(('ann_file', _join(root, ann_file)))
    return paths


def _loaders(cfg, phases):
    for phase in phases:
        loader = _cfg_get(cfg, f'{phase}_dataloader')
        if loader is not None:
            yield phase, loader


def check_data_exists(cfg, phases=('train', 'val', 'test')) -> None:
    """Raise :class:`DataCheckError` if a dataset folder or file is missing.

    Checks ``data_root`` and the ``data_prefix`` folders (and ``ann_file``)
    of the ``{phase}_dataloader`` datasets of ``cfg``.
    """
    missing, types = {}, []
    for phase, loader in _loaders(cfg, phases):
        for ds in iter_datasets(_cfg_get(loader, 'dataset')):
            for what, path in dataset_paths(ds):
                if osp.exists(path):
                    continue
                missing.setdefault(path, []).append(f'{phase} {what}')
                ds_type = _cfg_get(ds, 'type', '?')
                if ds_type not in types:
                    types.append(ds_type)
                if what == 'data_root':
                    break  # the folders inside it are missing too
    if not missing:
        return
    missing = [
        f'  {path}   ({", ".join(dict.fromkeys(uses))})'
        for path, uses in missing.items()
    ]
    raise missing_data_error(types, missing,
                             [PREPARE_HINTS.get(t, GENERIC_HINT)
                              for t in types])


def missing_data_error(types: List[str], missing: List[str],
                       hints: List[str]) -> DataCheckError:
    """The error for missing dataset files: which dataset types, which
    paths (``missing``: one line each), how to prepare them (``hints``) and
    how to point the config elsewhere."""
    return DataCheckError(
        f'Dataset files not found ({", ".join(map(str, types))}). Missing:\n'
        + '\n'.join(missing) +
        f'\n(relative paths are resolved from {os.getcwd()})\n\n' +
        '\n\n'.join(dict.fromkeys(hints)) +
        '\n\nOr point the config at your copy, e.g. --cfg-options '
        'train_dataloader.dataset.data_root=PATH '
        'val_dataloader.dataset.data_root=PATH '
        'test_dataloader.dataset.data_root=PATH')


def _heads(model_cfg) -> Iterator[Tuple[str, dict]]:
    if model_cfg is None:
        return
    if _cfg_get(model_cfg, 'module') is not None:  # a TTA wrapper
        model_cfg = model_cfg['module']
    for key in ('decode_head', 'auxiliary_head'):
        head = _cfg_get(model_cfg, key)
        if head is None:
            continue
        heads = head if isinstance(head, (list, tuple)) else [head]
        for i, h in enumerate(heads):
            name = f'model.{key}' + (f'[{i}]' if len(heads) > 1 else '')
            yield name, h


def dataset_classes(dataset_cfg) -> Optional[tuple]:
    """The class names a dataset config will use (no files are listed)."""
    from mmengine.registry import init_default_scope

    from mmseg.registry import DATASETS

    init_default_scope('mmseg')
    cfg = dict(dataset_cfg)
    cfg['lazy_init'] = True
    cfg['pipeline'] = []
    try:
        dataset = DATASETS.build(cfg)
    except (ValueError, FileNotFoundError, KeyError, AssertionError) as e:
        raise DataCheckError(
            f'Could not read the class list of {cfg.get("type")}: {e}') from e
    classes = dataset.metainfo.get('classes')
    return tuple(classes) if classes is not None else None


def check_num_classes(cfg, phases=('train', 'val', 'test')) -> None:
    """Raise :class:`DataCheckError` if a head's ``num_classes`` differs
    from the number of classes of a dataset of the config."""
    seen = {}
    for phase, loader in _loaders(cfg, phases):
        for ds in iter_datasets(_cfg_get(loader, 'dataset')):
            classes = dataset_classes(ds)
            if classes is not None:
                seen.setdefault(len(classes), (phase, ds.get('type'),
                                               classes))
    if not seen:
        return
    if len(seen) > 1:
        desc = '; '.join(f'{p} {t}: {n} classes'
                         for n, (p, t, _) in seen.items())
        raise DataCheckError(
            f'The datasets of this config disagree on the classes ({desc}).')
    (num, (phase, ds_type, classes)), = seen.items()
    for name, head in _heads(_cfg_get(cfg, 'model')):
        head_num = _cfg_get(head, 'num_classes')
        if head_num is None:
            continue
        if _cfg_get(head, 'out_channels') == 1 and num == 2:
            continue  # binary head with a sigmoid: one channel, two classes
        if head_num != num:
            raise DataCheckError(
                f'{name}.num_classes={head_num} but the {phase} dataset '
                f'({ds_type}) has {num} classes {list(classes)}. Fix the '
                'config or pass --cfg-options '
                + ' '.join(f'{n}.num_classes={num}'
                           for n, _ in _heads(_cfg_get(cfg, 'model'))))


def check_data_config(cfg, phases=('train', 'val', 'test')) -> None:
    """Run :func:`check_data_exists` then :func:`check_num_classes`."""
    check_data_exists(cfg, phases)
    check_num_classes(cfg, phases)
