# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""mmseg's ``MMSegInferencer`` with strict loading and the right class names.

``mmseg.apis.MMSegInferencer(model=CONFIG, weights=CKPT)`` loads the weights
non-strictly, and names the classes after Cityscapes (19 names and colours)
whenever the checkpoint holds no ``meta.dataset_meta`` or no checkpoint is
given. :class:`SegInferencer` is the same inferencer (same call, outputs,
visualisation) with two changes:

* the model is built by :func:`mmbhvit.apis.build_model` (strict loading:
  a checkpoint of another model is refused, naming the keys);
* the class names and palette come from, in this order: the ``classes`` /
  ``palette`` arguments, the checkpoint's ``meta.dataset_meta`` (training
  checkpoints carry the training set's), the config's dataset (its test,
  else val, else train dataset, built without listing any file: for
  ``RSLVFDataset`` that is the data's ``classes.json``, with mmseg's own
  generated palette when the file has none, as in training). If none of
  these gives them, it is an error, not another dataset's names.

Example::

    from mmbhvit.apis import inferencer
    seg = inferencer('configs/bhvit/upernet_bhvit-tiny_demo-shapes.py',
                     'work_dirs/demo/iter_300.pth')
    result = seg('demo.png', out_dir='out')   # out/vis/demo.png, out/pred/
"""
import copy
from typing import Optional, Sequence, Union

from mmengine.config import Config

import mmbhvit  # noqa: F401  (mmcv-lite shim before mmseg, registries)
from mmseg.apis import MMSegInferencer

__all__ = ['SegInferencer', 'config_dataset_meta']

#: Where the class names of a config are looked for, in this order.
_LOADERS = ('test_dataloader', 'val_dataloader', 'train_dataloader')


def config_dataset_meta(cfg: Config) -> dict:
    """``{'classes': tuple, 'palette': list}`` of the config's dataset.

    The first leaf dataset of the test, else val, else train dataloader is
    built with ``lazy_init=True`` and no pipeline
    (:func:`mmbhvit.utils.data_check.build_lazy_dataset`), so the palette is
    the one training used, also when mmseg generates it.

    Raises:
        ValueError: the config has no dataset, or it cannot give its class
            names (the message says which dataset and why).
    """
    from mmbhvit.utils.data_check import build_lazy_dataset, iter_datasets
    name = getattr(cfg, 'filename', None) or 'the config'
    errors = []
    for loader in _LOADERS:
        ds_cfg = (cfg.get(loader) or {}).get('dataset')
        leaves = list(iter_datasets(ds_cfg))
        if not leaves:
            continue
        try:
            dataset = build_lazy_dataset(copy.deepcopy(leaves[0]), 'mmseg')
        except Exception as e:  # missing classes.json, unknown type ...
            errors.append(f'{loader}: {e}')
            continue
        meta = dataset.metainfo
        if meta.get('classes') and meta.get('palette'):
            return dict(classes=tuple(meta['classes']),
                        palette=[list(c) for c in meta['palette']])
        errors.append(f'{loader}: {leaves[0].get("type")} gives no class '
                      'names')
    detail = '; '.join(errors) if errors else 'it defines no dataset'
    raise ValueError(
        f'No class names for the visualisation: the checkpoint holds no '
        f'meta.dataset_meta (or none was given) and the dataset of {name} '
        f'cannot give them ({detail}). Pass classes=[...] and '
        'palette=[[r, g, b], ...], or make the data (classes.json) '
        'reachable from the config.')


class SegInferencer(MMSegInferencer):
    """``MMSegInferencer`` building the model with
    :func:`mmbhvit.apis.build_model` (see the module doc).

    Args:
        model (str | Config | dict): an mmseg config (path or object).
        weights (str, optional): checkpoint. None: random weights (the
            inferencer then only shows the pipeline and the names).
        classes (sequence of str, optional): class names; overrides the
            checkpoint's and the config's.
        palette (sequence of [r, g, b], optional): one colour per class;
            taken with ``classes``.
        device (str): where the model runs. Defaults to ``'cpu'``.
        strict (bool): strict checkpoint loading (keep True; see
            :func:`mmbhvit.apis.load_weights`).
    """

    def __init__(self,
                 model: Union[str, Config, dict],
                 weights: Optional[str] = None,
                 classes: Optional[Sequence[str]] = None,
                 palette: Optional[Sequence[Sequence[int]]] = None,
                 device: str = 'cpu',
                 strict: bool = True) -> None:
        if (classes is None) != (palette is None):
            raise ValueError('give classes and palette together (one '
                             'colour per class), or neither')
        if classes is not None and len(classes) != len(palette):
            raise ValueError(f'{len(classes)} classes but {len(palette)} '
                             'palette colours')
        self._meta_override = None if classes is None else dict(
            classes=tuple(classes), palette=[list(c) for c in palette])
        self._strict = strict
        super().__init__(model=model, weights=weights, device=device,
                         scope='mmseg')
        # mmseg's __init__ gives the visualizer Cityscapes' names; it takes
        # the model's again before drawing, but keep both in step now
        self.visualizer.set_dataset_meta(**self.model.dataset_meta)

    def _init_model(self, cfg, weights: Optional[str], device: str = 'cpu'):
        from mmbhvit.apis import build_model, task_of
        if task_of(cfg) != 'segmentation':
            raise ValueError(
                f'{getattr(cfg, "filename", None) or "the config"} is not a '
                'segmentation config; for classification use mmpretrain\'s '
                'ImageClassificationInferencer on '
                'mmbhvit.apis.build_model(config, checkpoint)')
        model = build_model(cfg, weights, strict=self._strict, device=device)
        meta = self._meta_override
        if meta is None:
            saved = getattr(model, 'dataset_meta', None) or {}
            if saved.get('classes') and saved.get('palette'):
                meta = dict(classes=tuple(saved['classes']),
                            palette=[list(c) for c in saved['palette']])
            else:
                meta = config_dataset_meta(model.cfg)
        num_classes = _num_classes(model)
        if num_classes is not None and len(meta['classes']) != num_classes:
            raise ValueError(
                f'{len(meta["classes"])} class names {list(meta["classes"])}'
                f' for a model with {num_classes} output classes')
        model.dataset_meta = meta
        return model


def _num_classes(model) -> Optional[int]:
    head = getattr(model, 'decode_head', None)
    if isinstance(head, (list, tuple)):  # cascade heads: the last one
        head = head[-1]
    num = getattr(head, 'num_classes', None)
    if num is None or getattr(head, 'out_channels', None) == 1:
        return None  # a one-channel binary head has two class names
    return int(num)

