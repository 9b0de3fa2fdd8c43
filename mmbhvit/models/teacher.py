# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""A frozen distillation teacher held beside a student model.

Shared by :class:`~mmbhvit.models.classifiers.DistillImageClassifier`
(ImageNet pretraining from DeiT-small) and
:class:`~mmbhvit.models.segmentors.DistillEncoderDecoder` (a binary head
taught by its full-precision counterpart).

The teacher is not a sub-module: it is kept out of ``_modules``, so it is
absent from ``state_dict()`` (the student's checkpoints hold the plain
model's keys and load into the plain config), from ``parameters()`` (the
optimizer never sees it) and from ``train()`` (it stays in eval mode). It
follows the student through ``.to()`` / ``.double()``. It is built, and its
weights loaded strictly, by ``init_weights`` (the Runner calls it before
training) or at the latest by the first :meth:`teacher_logits`; inference
never builds it, so a distillation config also tests and deploys without
the teacher's checkpoint.
"""
import copy
import logging
import os
import os.path as osp
import warnings
from typing import Optional, Union

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import DefaultScope
from torch import Tensor, nn

from ..utils.data_check import DataCheckError, _cfg_get
from .checkpoint import read_state_dict


class TeacherCheckpointError(FileNotFoundError):
    """Distillation was asked for without usable teacher weights."""


def teacher_checkpoint_found(path: Optional[str]) -> bool:
    """Whether ``path`` can be the teacher's checkpoint: set, and an
    existing file or a URL (the model and the config check both ask)."""
    return path is not None and ('://' in path or osp.isfile(path))


def check_teacher_checkpoint(cfg) -> None:
    """Raise :class:`~mmbhvit.utils.data_check.DataCheckError` if
    ``cfg.model`` (a classifier or a segmentor) distils from a teacher whose
    checkpoint is not set or missing, unless ``allow_random_teacher``: the
    check ``tools/train.py`` and the demo run before building a Runner."""
    model = _cfg_get(cfg, 'model') or {}
    if (_cfg_get(model, 'teacher') is None
            or _cfg_get(model, 'allow_random_teacher')):
        return
    path = _cfg_get(model, 'teacher_checkpoint')
    if teacher_checkpoint_found(path):
        return
    where = ('is not set' if path is None else
             f'not found: {path} (resolved from {os.getcwd()})')
    raise DataCheckError(
        f'The distillation teacher checkpoint (model.teacher_checkpoint) '
        f'{where}. Set it with --cfg-options model.teacher_checkpoint=PATH '
        '(for the BHViT classification configs the DeiT-small weights of '
        'mmpretrain, see configs/bhvit/README_classification.md; for a '
        'segmentation distillation config the trained teacher segmentor, '
        'see configs/bhvit/README.md), or distil from a random teacher with '
        'model.allow_random_teacher=True (tests only).')


def teacher_model_cfg(teacher: Union[dict, str]) -> dict:
    """The teacher's model config: ``teacher`` itself (a dict), or the
    ``model`` of the config file it names."""
    if isinstance(teacher, str):
        if not osp.isfile(teacher):
            raise FileNotFoundError(
                f'teacher config file not found: {teacher!r} (resolved from '
                f'{osp.abspath(teacher)})')
        return copy.deepcopy(Config.fromfile(teacher).model.to_dict())
    if not isinstance(teacher, dict):
        raise TypeError('the teacher must be a model config (dict) or a '
                        f'config file path, got {type(teacher).__name__}')
    return copy.deepcopy(dict(teacher))


class FrozenTeacherMixin:
    """Teacher handling for a student model (an mmengine ``BaseModel``).

    A subclass calls :meth:`_init_teacher` in its ``__init__`` (after the
    model's own) and sets :attr:`teacher_registry` (the ``MODELS`` registry
    that builds the teacher) and :attr:`teacher_hint` (how to obtain the
    weights, for the error messages).
    """

    teacher_registry = None
    teacher_hint = ''

    def _init_teacher(self, teacher: Union[dict, str],
                      teacher_checkpoint: Optional[str],
                      allow_random_teacher: bool) -> None:
        self.teacher_cfg = teacher_model_cfg(teacher)
        self.teacher_checkpoint = teacher_checkpoint
        self.allow_random_teacher = allow_random_teacher
        object.__setattr__(self, '_teacher', None)

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen teacher, or None before it is built."""
        return self._teacher

    def _resolve_teacher_checkpoint(self) -> Optional[str]:
        name = type(self).__name__
        hint = (f'Set it with --cfg-options model.teacher_checkpoint=PATH '
                f'({self.teacher_hint}), or set '
                'model.allow_random_teacher=True to distil from a random '
                'teacher (tests and demos only).')
        path = self.teacher_checkpoint
        if path is None:
            if self.allow_random_teacher:
                return None
            raise TeacherCheckpointError(
                f'{name}: teacher_checkpoint is not set, and a randomly '
                'initialised teacher is not allowed. ' + hint)
        if not teacher_checkpoint_found(path):
            if self.allow_random_teacher:
                warnings.warn(f'teacher_checkpoint {path!r} not found; '
                              'allow_random_teacher=True, so the teacher '
                              'stays random')
                return None
            raise TeacherCheckpointError(
                f'{name}: teacher checkpoint not found: {path!r} (resolved '
                f'from {osp.abspath(path)}). ' + hint)
        return path

    def build_teacher(self) -> nn.Module:
        """Build the teacher, load its weights and freeze it (once)."""
        if self._teacher is not None:
            return self._teacher
        name = type(self).__name__
        path = self._resolve_teacher_checkpoint()
        registry = self.teacher_registry
        # its sub-modules (data preprocessor, heads) in the registry's scope
        with DefaultScope.overwrite_default_scope(registry.scope):
            teacher = registry.build(copy.deepcopy(self.teacher_cfg))
        if path is None:
            teacher.init_weights()
            print_log(f'{name}: the teacher is RANDOMLY initialised '
                      '(allow_random_teacher=True)', logger='current',
                      level=logging.WARNING)
        else:
            state = read_state_dict(path)  # weights-only, allow-listed
            result = teacher.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise KeyError(
                    f'Teacher checkpoint {path!r} does not match the teacher '
                    f'{self.teacher_cfg.get("type")}:\n  missing keys: '
                    f'{result.missing_keys[:10]}\n  unexpected keys: '
                    f'{result.unexpected_keys[:10]}')
            print_log(f'{name}: teacher loaded from {path}',
                      logger='current')
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        ref = next(self.parameters())
        teacher.to(device=ref.device, dtype=ref.dtype)
        object.__setattr__(self, '_teacher', teacher)
        return teacher

    def init_weights(self):
        super().init_weights()
        self.build_teacher()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """``teacher(inputs, mode='tensor')`` of the frozen, eval-mode
        teacher (it sees the student's preprocessed inputs)."""
        teacher = self.build_teacher()
        teacher.eval()
        logits = teacher(inputs, mode='tensor')
        if not isinstance(logits, Tensor):
            raise TypeError('the teacher must return a logits tensor in '
                            f"mode='tensor', got {type(logits).__name__}")
        return logits.detach()
