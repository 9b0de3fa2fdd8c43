# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Check a segmentation config's data before a Runner is built.

``tools/train.py`` and ``tools/test.py`` call :func:`check_data_config`
first, so a missing dataset, a class-count mismatch, an empty split, a
missing or unreadable image or annotation, or an image whose annotation has
another size ends with one readable message naming the files, instead of a
stack trace from deep inside a dataloader worker hours into training. The
per-file part reads image headers only (:mod:`.image_header`), in threads;
``--skip-data-check`` switches it off.
"""
import os
import os.path as osp
import time
from typing import Iterator, List, Optional, Tuple

from mmengine.logging import print_log

from .text import first_items

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


class EmptySplitError(DataCheckError):
    """A split of a dataset lists no sample."""


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


def build_lazy_dataset(dataset_cfg, scope: str = 'mmseg'):
    """The dataset of ``dataset_cfg`` built with ``lazy_init=True`` and no
    pipeline (from the ``scope`` registry): its meta information and
    resolved paths, no file listed yet."""
    from mmengine.registry import init_default_scope
    if scope == 'mmpretrain':
        from mmpretrain.registry import DATASETS
    else:
        from mmseg.registry import DATASETS

    init_default_scope(scope)
    cfg = dict(dataset_cfg)
    cfg['lazy_init'] = True
    cfg['pipeline'] = []
    try:
        return DATASETS.build(cfg)
    except (ValueError, FileNotFoundError, KeyError, AssertionError) as e:
        raise DataCheckError(
            f'Could not build the dataset {cfg.get("type")} (data_root '
            f'{cfg.get("data_root")!r}, data_prefix '
            f'{cfg.get("data_prefix")!r}): {e}') from e


def dataset_classes(dataset_cfg) -> Optional[tuple]:
    """The class names a dataset config will use (no files are listed)."""
    dataset = build_lazy_dataset(dataset_cfg, 'mmseg')
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


# --------------------------------------------------------------------------
# Every file of a split: present, readable header, matching sizes
# --------------------------------------------------------------------------
#: Problems of each kind listed in an error (the count gives the rest).
MAX_LISTED = 5
#: From this many samples on, the file check logs what it does and its
#: progress.
LOG_MIN_SAMPLES = 2000
#: Seconds between progress lines.
LOG_INTERVAL = 10.
#: Samples per task given to a thread.
CHUNK = 256
#: How to switch the file check off, named in its messages.
SKIP_HINT = ('tools/train.py and tools/test.py skip this file check with '
             '--skip-data-check')

#: Problem kinds, in the order they are reported, with their heading.
PROBLEM_KINDS = (
    ('missing_image', 'image file missing', 'image files missing'),
    ('missing_annotation', 'annotation missing', 'annotations missing'),
    ('unreadable', 'file unreadable', 'files unreadable'),
    ('size', 'image/annotation size mismatch (width x height; the image as '
     'loaded)', 'image/annotation size mismatches (width x height; the '
     'images as loaded)'),
    ('label', 'label out of range', 'labels out of range'),
)


def default_workers() -> int:
    """Threads reading headers: the work is mostly waiting for the file
    system (and the GIL is released meanwhile), so more threads than cores
    help, most on network file systems."""
    return min(16, 4 * (os.cpu_count() or 1))


def _size(wh) -> str:
    return f'{wh[0]}x{wh[1]}'


def _check_sample(img: str, ann: Optional[str]) -> list:
    """``[(kind, text), ...]`` for one image (and its annotation)."""
    from .image_header import ImageFileError, read_image_header
    found, headers = [], []
    for path, role in ((img, 'image'), (ann, 'annotation')):
        if path is None:
            headers.append(None)
            continue
        header = None
        try:
            header = read_image_header(path)
        except FileNotFoundError:
            if role == 'image':
                found.append(('missing_image', path))
            else:
                found.append(('missing_annotation',
                              f'{path}   (for the image {img})'))
        except ImageFileError as e:
            found.append(('unreadable', f'{e}   ({role})'))
        except OSError as e:  # permissions, I/O errors
            found.append(('unreadable',
                          f'{path}: {e.strerror or e}   ({role})'))
        headers.append(header)
    image, label = headers
    if image is not None and label is not None and \
            image.loaded_size != label.unchanged_size:
        notes = []
        for header, size in ((image, image.loaded_size),
                             (label, label.unchanged_size)):
            notes.append(f' (stored {_size(header.size)}, turned by its '
                         f'orientation tag {header.orientation} when '
                         'loaded)' if size != header.size else '')
        found.append(('size', f'{img} is {_size(image.loaded_size)}'
                      f'{notes[0]} but its annotation {ann} is '
                      f'{_size(label.unchanged_size)}{notes[1]}'))
    return found


def _check_chunk(chunk) -> list:
    out = []
    for index, img, ann in chunk:
        problems = _check_sample(img, ann)
        if problems:
            out.append((index, problems))
    return out


def scan_samples(samples, what: str, workers: Optional[int] = None) -> list:
    """Read the header of every image (and annotation) of ``samples``.

    Args:
        samples: ``(image path, annotation path or None)`` pairs.
        what: names the split in the log lines (e.g. ``'the train split'``).
        workers: threads; default :func:`default_workers`.

    Returns:
        ``[(sample index, [(kind, text), ...]), ...]`` in sample order, for
        the samples with a problem (kinds: see :data:`PROBLEM_KINDS`).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed
    samples = list(samples)
    n = len(samples)
    workers = workers or default_workers()
    chunks = [[(i, *samples[i]) for i in range(start, min(n, start + CHUNK))]
              for start in range(0, n, CHUNK)]
    verbose = n >= LOG_MIN_SAMPLES
    num_files = n + sum(ann is not None for _, ann in samples)
    if verbose:
        print_log(
            f'Data check: reading the headers of {num_files} files of {what}'
            f' ({n} samples, {workers} threads; {SKIP_HINT})',
            logger='current')
    start = last = time.perf_counter()
    results, done = [], 0
    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            results.extend(_check_chunk(chunk))
    else:
        with ThreadPoolExecutor(workers, 'data-check') as pool:
            futures = {pool.submit(_check_chunk, c): len(c) for c in chunks}
            try:
                for future in as_completed(futures):
                    results.extend(future.result())
                    done += futures[future]
                    now = time.perf_counter()
                    if verbose and now - last >= LOG_INTERVAL and done < n:
                        last = now
                        print_log(f'Data check: {done}/{n} samples of '
                                  f'{what} ({now - start:.0f} s)',
                                  logger='current')
            except BaseException:  # e.g. Ctrl-C: do not read the rest
                for future in futures:
                    future.cancel()
                raise
    if verbose:
        print_log(f'Data check: {num_files} files of {what} read in '
                  f'{time.perf_counter() - start:.1f} s', logger='current')
    results.sort(key=lambda r: r[0])
    return results


def format_problems(title: str, num_samples: int, results: list) -> str:
    """One report for a split: ``title``, then each kind of problem with
    its count and its first :data:`MAX_LISTED` files.

    ``results`` as returned by :func:`scan_samples` (merged with other
    problems with :func:`merge_problems`)."""
    by_kind = {kind: [] for kind, _, _ in PROBLEM_KINDS}
    for _, problems in results:
        for kind, text in problems:
            by_kind[kind].append(text)
    lines = [f'{title}: problems in {len(results)} of {num_samples} '
             'samples:']
    for kind, one, many in PROBLEM_KINDS:
        texts = by_kind[kind]
        if not texts:
            continue
        lines.append(f'  {len(texts)} {one if len(texts) == 1 else many}:')
        lines.append('    ' + first_items(texts, MAX_LISTED, '\n    '))
    return '\n'.join(lines)


def merge_problems(*results) -> list:
    """Merge ``[(sample index, [(kind, text), ...]), ...]`` lists."""
    merged = {}
    for result in results:
        for index, problems in result:
            merged.setdefault(index, []).extend(problems)
    return sorted(merged.items())


def _pipeline_has(pipeline, name: str) -> bool:
    """Whether a transform whose type contains ``name`` is in
    ``pipeline`` (also inside wrappers such as ``TestTimeAug``)."""
    if isinstance(pipeline, (list, tuple)):
        return any(_pipeline_has(t, name) for t in pipeline)
    if isinstance(pipeline, dict) or hasattr(pipeline, 'get'):
        kind = _cfg_get(pipeline, 'type')
        if isinstance(kind, str) and name in kind:
            return True
        if isinstance(kind, type) and name in kind.__name__:
            return True
        return any(
            _pipeline_has(v, name) for v in pipeline.values()
            if isinstance(v, (list, tuple, dict)))
    return False


def _suffixes(suffix) -> str:
    if isinstance(suffix, (list, tuple)):
        return ', '.join(repr(s) for s in suffix)
    return repr(suffix)


def _other_files(folder: str, limit: int = 100000) -> str:
    """What else a folder holds, e.g. ``'12 files: 10 '.jpg', 2 '.tif''``
    (for the message of an empty split)."""
    counts, total = {}, 0
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for name in files:
            if name.startswith('.'):
                continue
            ext = osp.splitext(name)[1].lower() or '(no suffix)'
            counts[ext] = counts.get(ext, 0) + 1
            total += 1
            if total >= limit:
                break
        if total >= limit:
            break
    if not total:
        return 'the folder holds no files at all'
    kinds = ', '.join(f'{n} {e!r}' for e, n in
                      sorted(counts.items(), key=lambda kv: -kv[1]))
    more = ' (counting stopped there)' if total >= limit else ''
    files = 'file' if total == 1 else 'files'
    return f'the folder holds {total} other {files}{more}: {kinds}'


def _seg_samples(dataset, phase: str, ds_type: str, check_ann: bool):
    """The ``(image, annotation)`` pairs of an mmseg dataset, as its
    ``load_data_list`` gives them; an empty split is an error that says
    where it looked."""
    try:
        data_list = dataset.load_data_list()
    except (OSError, ValueError, AssertionError, KeyError) as e:
        raise DataCheckError(
            f'The {phase} split ({phase}_dataloader, {ds_type}): listing its '
            f'files in {dataset.data_prefix.get("img_path")!r} failed: {e}'
        ) from e
    img_dir = dataset.data_prefix.get('img_path')
    if not data_list:
        ann_file = getattr(dataset, 'ann_file', '')
        if ann_file and not osp.isdir(ann_file):
            where = f'its ann_file {ann_file} lists no sample'
        else:
            suffix = _suffixes(getattr(dataset, 'img_suffix', '?'))
            where = (f'no image ending in {suffix} in {img_dir} (searched '
                     f'recursively); {_other_files(img_dir)}')
        raise EmptySplitError(
            f'The {phase} split ({phase}_dataloader, {ds_type}) is empty: '
            f'{where}. Fix data_prefix.img_path / img_suffix / ann_file, or '
            'add the data.')
    return [(info['img_path'],
             info.get('seg_map_path') if check_ann else None)
            for info in data_list]


def _dataset_key(ds) -> str:
    keys = ('type', 'data_root', 'data_prefix', 'ann_file', 'img_suffix',
            'seg_map_suffix', 'split')
    return repr([(k, _cfg_get(ds, k)) for k in keys])


def split_datasets(cfg, phases) -> Iterator[Tuple[str, dict]]:
    """``(phase, dataset config)`` for every leaf dataset of the phases'
    dataloaders, each distinct dataset once (val and test often share
    one)."""
    seen = set()
    for phase, loader in _loaders(cfg, phases):
        for ds in iter_datasets(_cfg_get(loader, 'dataset')):
            key = _dataset_key(ds)
            if key not in seen:
                seen.add(key)
                yield phase, ds


def check_data_files(cfg, phases=('train', 'val', 'test'),
                     workers: Optional[int] = None) -> None:
    """Raise :class:`DataCheckError` unless every split of the
    segmentation datasets of ``cfg`` is usable.

    Each image of each ``{phase}_dataloader`` dataset (as its
    ``load_data_list`` lists it) has a readable header and, when the
    pipeline loads annotations, an annotation with a readable header and
    the same size (after the EXIF rotation the image loader applies). Only
    headers are read (see :mod:`mmbhvit.utils.image_header`). An empty
    split is an error naming the split, the folder and the suffix. All
    problems of all splits are reported at once: for each kind, the count
    and the first :data:`MAX_LISTED` files.
    """
    empty, reports = [], []
    for phase, ds in split_datasets(cfg, phases):
        ds_type = _cfg_get(ds, 'type', '?')
        pipeline = _cfg_get(ds, 'pipeline')
        check_ann = pipeline is None or _pipeline_has(pipeline,
                                                      'LoadAnnotations')
        dataset = build_lazy_dataset(ds, 'mmseg')
        try:
            samples = _seg_samples(dataset, phase, ds_type, check_ann)
        except EmptySplitError as e:
            empty.append(str(e))
            continue
        results = scan_samples(samples, f'the {phase} split', workers)
        if results:
            prefix = dataset.data_prefix
            title = (f'The {phase} split ({phase}_dataloader, {ds_type};'
                     f' images {prefix.get("img_path")} '
                     f'{_suffixes(getattr(dataset, "img_suffix", "?"))}')
            if check_ann and prefix.get('seg_map_path'):
                suffix = _suffixes(getattr(dataset, 'seg_map_suffix', '?'))
                title += (f', annotations {prefix.get("seg_map_path")} '
                          f'{suffix}')
            reports.append(format_problems(title + ')', len(samples),
                                           results))
    raise_reports(empty, reports)


def raise_reports(empty: List[str], reports: List[str]) -> None:
    """One :class:`DataCheckError` for the empty splits and the file
    problems of all splits, if there are any."""
    if reports:
        reports = reports + [f'Fix or remove these files ({SKIP_HINT}).']
    if empty or reports:
        raise DataCheckError('\n'.join(empty + reports))


def check_data_config(cfg, phases=('train', 'val', 'test'),
                      check_files: bool = True) -> None:
    """Run :func:`check_data_exists`, :func:`check_num_classes` and, unless
    ``check_files=False``, :func:`check_data_files`."""
    check_data_exists(cfg, phases)
    check_num_classes(cfg, phases)
    if check_files:
        check_data_files(cfg, phases)
