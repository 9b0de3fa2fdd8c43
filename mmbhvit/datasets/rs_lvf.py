# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""RS-LVF, the remote-sensing segmentation set used by the BHViT paper.

RS-LVF's class list is not published with the paper, so this loader never
assumes one: the class names (and optionally the palette) are read from a
metadata file shipped *with the data* or given in the config, and every
disagreement is an error rather than a silent guess.

Layout (``data_root``)::

    data_root/
    ├── classes.json          # or classes.txt, see below
    ├── img_dir/{train,val}/xxx.png
    └── ann_dir/{train,val}/xxx.png   # one uint8 label index per pixel

Each annotation is a single-channel PNG of class indices ``0 .. C-1``; 255
marks "ignore". ``tools/dataset_converters/rs_lvf.py`` turns scenes
(GeoTIFF, 16-bit, multiband, or PNG/JPEG) and their index or RGB-coloured
masks into this layout, tiled: images are then GeoTIFF tiles
(``img_dir/*/*.tif``, the RS-LVF configs set ``img_suffix='.tif'``) and the
data root also holds ``bands.json``, the per-band normalisation
(:class:`~mmbhvit.datasets.geo.BandNorm`) that the ``LoadRSImage``
transform applies, and ``tiles.json``, the scene and window of each tile.

Metadata file formats:

* ``classes.json``: ``{"classes": ["name0", "name1", ...],
  "palette": [[r, g, b], ...]}``; ``palette`` (RGB, one triple per class)
  is optional.
* ``classes.txt``: one class name per line, in label-index order; empty
  lines and lines starting with ``#`` are skipped.
"""
import json
import os.path as osp
from typing import List, Optional, Sequence

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from .geo import BANDS_FILE

#: Names looked for in ``data_root`` when ``classes_file`` is not given.
DEFAULT_CLASS_FILES = ('classes.json', 'classes.txt')


class DatasetMetaError(ValueError):
    """The class list / palette of a dataset is missing or inconsistent."""


def _check_palette(palette, classes: Sequence[str], source: str) -> list:
    palette = [list(c) for c in palette]
    if len(palette) != len(classes):
        raise DatasetMetaError(
            f'{source}: the palette has {len(palette)} colours but there are '
            f'{len(classes)} classes {list(classes)}; give exactly one '
            '[r, g, b] colour per class (or leave the palette out).')
    for i, colour in enumerate(palette):
        if len(colour) != 3 or not all(
                isinstance(v, int) and 0 <= v <= 255 for v in colour):
            raise DatasetMetaError(
                f'{source}: palette entry {i} ({classes[i]!r}) is {colour}, '
                'expected three integers in 0..255.')
    return palette


def _check_classes(classes, source: str) -> List[str]:
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise DatasetMetaError(
            f'{source}: "classes" must be a list of class names, got '
            f'{classes!r}.')
    classes = list(classes)
    if not classes:
        raise DatasetMetaError(f'{source}: the class list is empty.')
    for name in classes:
        if not isinstance(name, str) or not name.strip():
            raise DatasetMetaError(
                f'{source}: class names must be non-empty strings, got '
                f'{name!r}.')
    duplicated = sorted({c for c in classes if classes.count(c) > 1})
    if duplicated:
        raise DatasetMetaError(
            f'{source}: duplicated class names {duplicated}.')
    return classes


def load_class_file(path: str) -> dict:
    """Read a ``classes.json`` / ``classes.txt`` metadata file.

    Returns:
        dict: ``classes`` (list of str) and, when the file has one,
        ``palette`` (list of ``[r, g, b]``).
    """
    if not osp.isfile(path):
        raise DatasetMetaError(f'class metadata file {path} does not exist.')
    if path.endswith('.json'):
        try:
            with open(path, encoding='utf-8') as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetMetaError(f'{path} is not valid JSON: {e}') from e
        if isinstance(meta, list):  # a bare list of names is accepted too
            meta = dict(classes=meta)
        if not isinstance(meta, dict) or 'classes' not in meta:
            raise DatasetMetaError(
                f'{path} must hold {{"classes": [...], "palette": [...]}} '
                '(palette optional).')
        out = dict(classes=_check_classes(meta['classes'], path))
        if meta.get('palette') is not None:
            out['palette'] = _check_palette(meta['palette'], out['classes'],
                                            path)
        return out
    with open(path, encoding='utf-8') as f:
        names = [
            line.strip() for line in f
            if line.strip() and not line.lstrip().startswith('#')
        ]
    return dict(classes=_check_classes(names, path))


def resolve_metainfo(data_root: Optional[str],
                     metainfo: Optional[dict] = None,
                     classes_file: Optional[str] = None) -> dict:
    """Merge the class metadata of the data folder and of the config.

    Either source may give the classes; when both do they must agree
    exactly (same names in the same order, same palette if both give one).

    Raises:
        DatasetMetaError: no class list anywhere, or the sources disagree,
            or the palette does not have one colour per class.
    """
    metainfo = dict(metainfo or {})
    if classes_file is not None:
        if data_root is not None and not osp.isabs(classes_file):
            classes_file = osp.join(data_root, classes_file)
        file_meta = load_class_file(classes_file)
    else:
        file_meta = None
        for name in DEFAULT_CLASS_FILES:
            candidate = osp.join(data_root or '', name)
            if osp.isfile(candidate):
                classes_file = candidate
                file_meta = load_class_file(candidate)
                break

    cfg_classes = metainfo.get('classes')
    if cfg_classes is not None:
        cfg_classes = _check_classes(cfg_classes, 'config metainfo')
    if cfg_classes is None and file_meta is None:
        looked = ', '.join(
            osp.join(data_root or '.', n) for n in DEFAULT_CLASS_FILES)
        raise DatasetMetaError(
            'No class list for this dataset: looked for ' + looked +
            ' and for metainfo=dict(classes=[...]) in the config. RS-LVF '
            'class names are not guessed: ship a classes.json ({"classes": '
            '[...], "palette": [[r, g, b], ...]}) with the data or set '
            '`metainfo=dict(classes=(...), palette=[...])` on the dataset.')
    if file_meta is not None and cfg_classes is not None and \
            file_meta['classes'] != cfg_classes:
        raise DatasetMetaError(
            f'The classes in {classes_file} {file_meta["classes"]} and the '
            f'config metainfo {cfg_classes} disagree; remove one of them or '
            'make them identical (same names, same order).')
    classes = cfg_classes if cfg_classes is not None else \
        file_meta['classes']

    palette = metainfo.get('palette')
    if palette is not None:
        palette = _check_palette(palette, classes, 'config metainfo')
    file_palette = (file_meta or {}).get('palette')
    if palette is not None and file_palette is not None and \
            palette != file_palette:
        raise DatasetMetaError(
            f'The palette in {classes_file} and the config metainfo '
            'disagree; remove one of them or make them identical.')
    if palette is None:
        palette = file_palette
    metainfo['classes'] = tuple(classes)
    if palette is not None:
        metainfo['palette'] = palette
    else:
        metainfo.pop('palette', None)  # mmseg then draws a fixed palette
    return metainfo


def _band_norm(data_root: Optional[str],
               bands_file: Optional[str]) -> Optional[dict]:
    """The checked content of ``bands_file`` when it exists, else None."""
    if not bands_file:
        return None
    if data_root is not None and not osp.isabs(bands_file):
        bands_file = osp.join(data_root, bands_file)
    if not osp.isfile(bands_file):
        return None
    from .geo import load_band_norm
    return load_band_norm(bands_file).to_dict()


@DATASETS.register_module()
class RSLVFDataset(BaseSegDataset):
    """RS-LVF remote-sensing segmentation dataset (class list from data).

    Args:
        classes_file (str, optional): metadata file, relative to
            ``data_root`` unless absolute. Defaults to None: use
            ``data_root/classes.json`` or ``data_root/classes.txt`` if one
            exists.
        metainfo (dict, optional): ``classes`` / ``palette`` given in the
            config; must agree with the metadata file when both exist.
        img_suffix (str): image suffix. Defaults to '.png'.
        seg_map_suffix (str): annotation suffix. Defaults to '.png'.
        bands_file (str, optional): per-band normalisation written by the
            converter, relative to ``data_root`` unless absolute; used when
            it exists. Its content goes into every sample
            (``band_norm``, read by ``LoadRSImage``) and into the metainfo,
            hence into the checkpoints' ``dataset_meta``, where
            ``tools/rs_inference.py`` finds it. Defaults to 'bands.json'.
        **kwargs: the arguments of :class:`mmseg.datasets.BaseSegDataset`
            (``data_root``, ``data_prefix``, ``pipeline`` ...).

    Every data sample carries ``num_classes`` so that the
    ``CheckLabelRange`` transform can validate label maps without being
    told the class count.
    """

    def __init__(self,
                 classes_file: Optional[str] = None,
                 metainfo: Optional[dict] = None,
                 img_suffix: str = '.png',
                 seg_map_suffix: str = '.png',
                 reduce_zero_label: bool = False,
                 bands_file: Optional[str] = BANDS_FILE,
                 **kwargs) -> None:
        metainfo = resolve_metainfo(
            kwargs.get('data_root'), metainfo, classes_file)
        self.classes_file = classes_file
        band_norm = _band_norm(kwargs.get('data_root'), bands_file)
        if band_norm is not None:
            metainfo['band_norm'] = band_norm
        super().__init__(
            metainfo=metainfo,
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs)

    def load_data_list(self) -> List[dict]:
        data_list = super().load_data_list()
        num_classes = len(self._metainfo['classes'])
        band_norm = self._metainfo.get('band_norm')
        for info in data_list:
            info['num_classes'] = num_classes
            if band_norm is not None:
                info['band_norm'] = band_norm
        return data_list
