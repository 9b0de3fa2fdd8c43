# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""One way to turn a config (and a checkpoint) into a model.

Every tool (training, testing, the image demo, export, benchmarks,
complexity, parity) builds its model here:

* :func:`task_of` says whether a config is a segmentation (mmseg) or a
  classification (mmpretrain) config;
* :func:`build_model` builds the model of a config on a device, in eval
  mode, SyncBN replaced by BN, and loads a checkpoint into it;
* :func:`load_weights` loads a checkpoint **strictly**: a missing, an
  unexpected or a shape-mismatched key stops with
  :class:`CheckpointMismatchError`, which names the file, the config and
  the offending keys (the first few and their count). ``strict=False`` is
  the explicit opt-out for fine-tuning from a different model; it still
  refuses a checkpoint that shares no key with the model.

Example::

    from mmbhvit.apis import build_model
    model = build_model('configs/bhvit/fpn_bhvit_ade20k.py', 'iter_80000.pth')
"""
import copy
import inspect
import os.path as osp
import warnings
from typing import Optional, Union

import torch
from mmengine.config import Config
from torch import nn

__all__ = [
    'CheckpointMismatchError', 'CheckpointReadError', 'build_model',
    'inferencer', 'load_config', 'load_weights', 'read_checkpoint',
    'task_of', 'use_verified_loading'
]

TASK_SCOPES = {'segmentation': 'mmseg', 'classification': 'mmpretrain'}


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read as a PyTorch checkpoint."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


def load_config(config: Union[str, Config, dict],
                cfg_options: Optional[dict] = None) -> Config:
    """A :class:`Config` from a path, a Config (copied) or a dict, with
    ``cfg_options`` merged and its ``custom_imports`` imported."""
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = Config(copy.deepcopy(config))
    else:
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file not found: {config}')
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    import mmbhvit  # noqa: F401  (mmcv-lite shim, registries)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    return cfg


def _config_name(cfg) -> str:
    filename = getattr(cfg, 'filename', None)
    return osp.basename(filename) if filename else 'the given config'


def task_of(config: Union[str, Config, dict]) -> str:
    """``'segmentation'`` (an mmseg config) or ``'classification'`` (an
    mmpretrain config), from ``default_scope`` or else the model type."""
    cfg = config if isinstance(config, (Config, dict)) else \
        load_config(config)
    scope = cfg.get('default_scope')
    for task, task_scope in TASK_SCOPES.items():
        if scope == task_scope:
            return task
    if scope is not None:
        raise ValueError(f'{_config_name(cfg)}: default_scope {scope!r} '
                         'is neither mmseg nor mmpretrain')
    model_type = (cfg.get('model') or {}).get('type')
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    from mmseg.models.segmentors import BaseSegmentor
    from mmseg.registry import MODELS as SEG_MODELS
    seg_cls = SEG_MODELS.get(model_type) if model_type else None
    if isinstance(seg_cls, type) and issubclass(seg_cls, BaseSegmentor):
        return 'segmentation'
    if model_type and PRETRAIN_MODELS.get(model_type) is not None:
        return 'classification'
    raise ValueError(f'{_config_name(cfg)}: cannot tell the task of a config '
                     'without default_scope whose model type is '
                     f'{model_type!r}')


#: the plain model of each distillation model
STUDENT_TYPES = {'DistillImageClassifier': 'ImageClassifier',
                 'DistillEncoderDecoder': 'EncoderDecoder'}


def distill_args(distill_type: str) -> frozenset:
    """The arguments of a distillation model that its plain model
    (:data:`STUDENT_TYPES`) lacks: the teacher and the losses, read from the
    two classes' signatures."""
    from mmpretrain.models import ImageClassifier
    from mmseg.models import EncoderDecoder

    from .models.classifiers import DistillImageClassifier
    from .models.segmentors import DistillEncoderDecoder
    classes = {c.__name__: c for c in (ImageClassifier, EncoderDecoder,
                                       DistillImageClassifier,
                                       DistillEncoderDecoder)}

    def named(cls) -> frozenset:  # not self, *args, **kwargs
        return frozenset(
            name for name, p in inspect.signature(cls.__init__).parameters.
            items() if name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                     p.KEYWORD_ONLY))

    return named(classes[distill_type]) - named(
        classes[STUDENT_TYPES[distill_type]])


def _student_only(model_cfg: dict) -> dict:
    """A distillation model's student as the plain model (its state dict
    keys are the student's: the teacher is not a sub-module)."""
    plain = STUDENT_TYPES.get(model_cfg.get('type'))
    if plain is None:
        return model_cfg
    drop = distill_args(model_cfg['type'])
    return dict(type=plain, **{k: v for k, v in model_cfg.items()
                               if k != 'type' and k not in drop})


#: neck / head types with ``weight_bits`` / ``act_bits`` options
BINARY_HEADS = ('BinaryUPerHead', 'BinaryFPNHead', 'BinaryFPN')


def _as_list(cfg) -> list:
    """A module config, or a list of them (mmseg's auxiliary heads), as a
    list (empty for None)."""
    if cfg is None:
        return []
    return list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]


def build_model(config: Union[str, Config, dict],
                checkpoint: Optional[str] = None,
                *,
                strict: bool = True,
                device: Union[str, torch.device] = 'cpu',
                cfg_options: Optional[dict] = None,
                full_precision: bool = False,
                student_only: bool = False,
                init_scope: bool = False) -> nn.Module:
    """Build the model of ``config`` in eval mode and load ``checkpoint``.

    Args:
        config (str | Config | dict): an mmseg or mmpretrain config.
        checkpoint (str, optional): a checkpoint of this model (mmengine
            training checkpoint, slim checkpoint or raw state dict), loaded
            with :func:`load_weights`. None: the modules' own random
            initialisation (the backbone's ``init_cfg`` is not applied).
        strict (bool): see :func:`load_weights`. Keep True for evaluation,
            export and inference.
        device: where the model is put.
        cfg_options (dict, optional): overrides merged into the config.
        full_precision (bool): the full-precision counterpart
            (``weight_bits=act_bits=32`` on the backbone and on binary
            necks / heads, :data:`BINARY_HEADS`).
        student_only (bool): a distillation model is built as the plain
            model of its student (ImageClassifier, EncoderDecoder;
            deployment).
        init_scope (bool): also make the config's scope the global default
            scope, as ``mmseg.apis.init_model`` does (``inference_model``
            builds its test pipeline from it). Default False: the caller's
            default scope is left as it was.

    Returns:
        nn.Module with ``cfg`` (the resolved config), ``task`` and, when
        the checkpoint holds them, ``dataset_meta`` attributes.
    """
    from mmengine.registry import DefaultScope

    from .utils.launch import replace_norm_type
    cfg = load_config(config, cfg_options)
    task = task_of(cfg)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pop('pretrained', None)
    if task == 'segmentation':
        model_cfg['train_cfg'] = None
    if student_only:
        model_cfg = _student_only(model_cfg)
    replace_norm_type(model_cfg, 'SyncBN', 'BN')  # CPU runs, costs
    if full_precision:
        backbone = model_cfg.get('backbone', {})
        if backbone.get('type') != 'BHViT':
            raise ValueError(
                'full_precision needs a BHViT backbone (weight_bits/act_bits)'
                f'; {_config_name(cfg)} has {backbone.get("type")!r}')
        backbone.update(weight_bits=32, act_bits=32)
        for name in ('neck', 'decode_head', 'auxiliary_head'):
            for part in _as_list(model_cfg.get(name)):
                if part.get('type') in BINARY_HEADS:
                    part.update(weight_bits=32, act_bits=32)
    scope = TASK_SCOPES[task]
    if scope == 'mmseg':
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
    else:
        import mmpretrain.models  # noqa: F401
        from mmpretrain.registry import MODELS
    # sub-modules are built in the current default scope: the config's
    # while building, the caller's afterwards
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(model_cfg)
    model.cfg = cfg
    model._config = cfg  # where mmpretrain's inferencers look for it
    model.task = task
    if checkpoint is not None:
        ckpt = load_weights(model, checkpoint, strict=strict, config=cfg)
        meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
        if isinstance(meta, dict) and meta.get('dataset_meta'):
            model.dataset_meta = meta['dataset_meta']
    model.to(device)
    if init_scope:
        from mmengine.registry import init_default_scope
        init_default_scope(scope)
    return model.eval()


def inferencer(config: Union[str, Config, dict],
               checkpoint: Optional[str] = None,
               **kwargs):
    """mmseg's ``MMSegInferencer`` for a segmentation config, with the
    model built by :func:`build_model` (strict) and the class names and
    palette of the checkpoint's ``dataset_meta``, else of the config's
    dataset (never Cityscapes'): :class:`mmbhvit.inferencer.SegInferencer`
    (``kwargs``: ``classes``, ``palette``, ``device``, ``strict``)."""
    from .inferencer import SegInferencer
    return SegInferencer(config, checkpoint, **kwargs)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------
def read_checkpoint(filename: str) -> dict:
    """Read a checkpoint file (local or a URL mmengine understands) on the
    CPU, with weights-only loading and mmengine's training-state classes
    allowed; an unreadable file raises :class:`CheckpointReadError` naming
    it."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from .checkpoint_io import resume_safe_globals
    if '://' not in filename and not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint not found: {filename}')
    try:
        with resume_safe_globals():
            ckpt = CheckpointLoader.load_checkpoint(filename,
                                                    map_location='cpu')
    except Exception as exc:  # pickle, zip, EOF, weights-only refusals
        raise CheckpointReadError(
            f'cannot read checkpoint {filename}: {type(exc).__name__}: '
            f'{str(exc).splitlines()[0] if str(exc) else ""} (truncated or '
            'not a PyTorch checkpoint?)') from exc
    return ckpt


def checkpoint_state_dict(ckpt, filename: str = 'the checkpoint') -> dict:
    """The state dict inside a checkpoint (``state_dict``, ``model`` or the
    raw dict), ``module.`` prefixes (DDP) removed."""
    state = ckpt
    if isinstance(state, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) for k in state):
        raise CheckpointReadError(f'{filename} holds no state dict (a dict '
                                  'of named tensors)')
    return {(k[7:] if k.startswith('module.') else k): v
            for k, v in state.items()}


def load_weights(model: nn.Module,
                 filename: str,
                 *,
                 strict: bool = True,
                 config: Union[str, Config, None] = None,
                 checkpoint: Optional[dict] = None) -> dict:
    """Load the checkpoint ``filename`` (or ``checkpoint``, already read
    from it) into ``model``; return the checkpoint.

    Strict (default): every key of the model present with its shape and no
    key left over, else :class:`CheckpointMismatchError`. Positional
    embeddings that differ only in their grid are resized (logged).
    ``strict=False`` (fine-tuning from a different model, on purpose) loads
    the keys that fit and warns with the rest; a checkpoint sharing no key
    with the model is refused either way.
    """
    from mmengine.logging import print_log
    from mmengine.model import is_model_wrapper

    from .models.checkpoint import StateDictMismatch
    if is_model_wrapper(model):
        model = model.module
    ckpt = read_checkpoint(filename) if checkpoint is None else checkpoint
    state = checkpoint_state_dict(ckpt, filename)
    own = model.state_dict()
    diff = StateDictMismatch(state, own)
    if isinstance(config, Config):
        config = config.filename
    where = (f'checkpoint {filename} does not fit the model of '
             f'{config or type(model).__name__}')
    if not diff.matched:
        raise CheckpointMismatchError(
            f'{where}: they share no key (checkpoint keys start '
            f'{sorted(state)[:3]}, model keys {sorted(own)[:3]}). Is it a '
            'checkpoint of another model, or an official BHViT checkpoint '
            'that needs tools/model_converters/bhvit2mmbhvit.py?')
    if diff and strict:
        raise CheckpointMismatchError(
            f'{where}:\n{diff.describe()}\nUse a checkpoint trained or '
            'converted for this config (same arch and options). To '
            'fine-tune from a different model on purpose, load it '
            'non-strictly: allow_partial_load=True in the training config.')
    if diff:
        loaded = len(diff.matched) - len(diff.mismatched)
        warnings.warn(f'{where}; loading the {loaded} matching tensors only '
                      '(strict=False):\n'
                      f'{diff.describe()}')
    for line in diff.resized:
        print_log(f'resized {line}', logger='current')
    result = model.load_state_dict(diff.loadable(own), strict=False)
    assert not result.unexpected_keys
    return ckpt


def use_verified_loading(runner, strict: bool = True) -> None:
    """Route the Runner's checkpoint loading (``load_from``, ``--resume``,
    ``tools/test.py CKPT``) through :func:`load_weights`, in place.

    mmengine loads ``load_from`` with ``strict=False``: a checkpoint of
    another model would be evaluated or fine-tuned silently. Here a
    mismatch stops with :class:`CheckpointMismatchError`; ``strict=False``
    (``allow_partial_load=True`` in a training config) loads what fits,
    with a warning, but never when resuming.
    """

    def load_checkpoint(filename, *args, **kwargs):
        # mmengine's (map_location, strict, revise_keys) are replaced: the
        # weights are read on the CPU and copied into the model
        checkpoint = read_checkpoint(filename)
        runner.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        load_weights(runner.model, filename, checkpoint=checkpoint,
                     strict=strict or bool(runner._resume),
                     config=runner.cfg)
        runner._has_loaded = True
        runner.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    runner.load_checkpoint = load_checkpoint
