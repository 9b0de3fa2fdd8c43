# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""Knowledge-distillation pretraining of BHViT (the paper's classification
recipe) as an mmpretrain classifier.

.. math::
    L = w_{cls} L_{cls} + w_{dis} L_{dis} + L_{re}

* :math:`L_{cls}`: the head's loss on the labels (cross-entropy);
* :math:`L_{dis}`: cross-entropy of the student's log-softmax against the
  softmax of a frozen teacher (DeiT-small in the paper), batch mean; it
  differs from :math:`KL(p_t \| p_s)` by the teacher's entropy, a constant,
  so the gradients are the same;
* :math:`L_{re}`: :class:`~mmbhvit.models.losses.BinaryWeightRegLoss`
  (weighted by its own ``loss_weight``), off until
  :class:`~mmbhvit.engine.RegLossSwitchHook` switches it on.

The paper writes :math:`(1-\lambda-\beta) L_{cls} + \lambda L_{dis} + \beta
L_{re}` with :math:`\lambda = 0.8, \beta = 0.1`, the defaults here.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor

from ..teacher import FrozenTeacherMixin, TeacherCheckpointError

__all__ = ['DistillImageClassifier', 'TeacherCheckpointError']

LOSS_TERMS = ('cls', 'distill')


def _check_weights(weights: Optional[dict], what: str) -> Optional[dict]:
    if weights is None:
        return None
    unknown = set(weights) - set(LOSS_TERMS)
    if unknown:
        raise KeyError(f'{what} takes the keys {LOSS_TERMS}, got unknown '
                       f'{sorted(unknown)}')
    return {k: float(v) for k, v in weights.items()}


@MODELS.register_module()
class DistillImageClassifier(FrozenTeacherMixin, ImageClassifier):
    """An :class:`ImageClassifier` trained with a frozen teacher and the
    binary weight regularization.

    The teacher is frozen and kept outside the module tree
    (:class:`~mmbhvit.models.teacher.FrozenTeacherMixin`): checkpoints hold
    the plain ``ImageClassifier`` keys and hand over to segmentation or to
    the plain config unchanged; prediction and ``mode='tensor'`` never build
    it, so the config works for inference and testing without the teacher
    checkpoint.

    Args:
        backbone, neck, head, pretrained, train_cfg, data_preprocessor,
            init_cfg: as in :class:`ImageClassifier`; the head's loss is
            :math:`L_{cls}` (keep its ``loss_weight`` at 1 and set
            ``loss_weights['cls']`` instead).
        teacher (dict | str): config of the teacher model (or a config file
            whose ``model`` it is), a classifier whose
            ``forward(inputs, mode='tensor')`` returns logits over the same
            classes (e.g. ``ImageClassifier`` with ``VisionTransformer``
            ``arch='deit-small'`` + ``VisionTransformerClsHead``). It sees the
            student's preprocessed inputs (same normalisation).
        teacher_checkpoint (str, optional): the teacher's weights (a file with
            a ``state_dict`` of the teacher's keys, e.g. an mmpretrain
            checkpoint), loaded strictly. Required unless
            ``allow_random_teacher``.
        allow_random_teacher (bool): let a missing ``teacher_checkpoint``
            leave the teacher randomly initialised (tests, demos). Default
            False: a missing checkpoint raises
            :class:`TeacherCheckpointError`.
        loss_weights (dict): ``cls`` and ``distill`` factors; defaults 0.1 and
            0.8 (the paper's :math:`1-\\lambda-\\beta` and :math:`\\lambda`).
        reg_phase_loss_weights (dict, optional): ``cls`` / ``distill`` factors
            that replace ``loss_weights`` while :math:`L_{re}` is on. None
            keeps ``loss_weights`` (the paper). The official training script
            uses ``loss_weights=dict(cls=0.1, distill=0.9)`` and
            ``reg_phase_loss_weights=dict(cls=0., distill=0.9)``.
        distill_loss (dict): loss between student logits and teacher
            probabilities; default soft-target ``CrossEntropyLoss``.
        reg_loss (dict): config of the regularization (its ``loss_weight`` is
            :math:`\\beta`).
    """

    teacher_registry = MODELS
    teacher_hint = ('for the BHViT configs: the DeiT-small weights of '
                    'mmpretrain, see configs/bhvit/README_classification.md')

    def __init__(self,
                 backbone: dict,
                 neck: Optional[dict] = None,
                 head: Optional[dict] = None,
                 teacher: Optional[dict] = None,
                 teacher_checkpoint: Optional[str] = None,
                 allow_random_teacher: bool = False,
                 loss_weights: dict = dict(cls=0.1, distill=0.8),
                 reg_phase_loss_weights: Optional[dict] = None,
                 distill_loss: dict = dict(type='CrossEntropyLoss',
                                           use_soft=True),
                 reg_loss: dict = dict(type='BinaryWeightRegLoss',
                                       loss_weight=0.1),
                 pretrained: Optional[str] = None,
                 train_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(backbone=backbone, neck=neck, head=head,
                         pretrained=pretrained, train_cfg=train_cfg,
                         data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        if head is None:
            raise ValueError('DistillImageClassifier needs a head')
        self._init_teacher(teacher, teacher_checkpoint, allow_random_teacher)
        weights = _check_weights(loss_weights, 'loss_weights')
        missing = set(LOSS_TERMS) - set(weights)
        if missing:
            raise KeyError(f'loss_weights misses {sorted(missing)}')
        self.base_loss_weights = weights
        self.reg_phase_loss_weights = _check_weights(reg_phase_loss_weights,
                                                     'reg_phase_loss_weights')
        self.distill_loss = MODELS.build(distill_loss)
        self.reg_loss = MODELS.build(reg_loss)

    # ------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------
    @property
    def reg_loss_enabled(self) -> bool:
        return self.reg_loss.enabled

    def set_reg_loss_enabled(self, enabled: bool = True) -> None:
        """Switch :math:`L_{re}` (and the reg-phase weights) on or off."""
        self.reg_loss.set_enabled(enabled)

    @property
    def loss_weights(self) -> Dict[str, float]:
        """The ``cls`` / ``distill`` factors in use now."""
        if self.reg_loss.enabled and self.reg_phase_loss_weights:
            return {**self.base_loss_weights, **self.reg_phase_loss_weights}
        return dict(self.base_loss_weights)

    def loss(self, inputs: Tensor, data_samples: List[DataSample]) -> dict:
        """Weighted losses ``loss_cls``, ``loss_distill``, ``loss_reg`` (their
        sum is optimised), plus ``binary_w_dev``, the unweighted
        :math:`L_{re}`, logged for monitoring in every phase."""
        weights = self.loss_weights
        feats = self.extract_feat(inputs)
        logits = self.head(feats)
        teacher_logits = self.teacher_logits(inputs)
        if teacher_logits.shape != logits.shape:
            raise ValueError(f'teacher logits {tuple(teacher_logits.shape)} '
                             f'vs student {tuple(logits.shape)}: the teacher '
                             'must predict the same classes')

        losses = dict()
        head_losses = self.head.loss(feats, data_samples)
        losses['loss_cls'] = weights['cls'] * head_losses.pop('loss')
        losses.update(head_losses)  # accuracy, if the head computes it
        teacher_probs = F.softmax(teacher_logits.to(logits.dtype), dim=-1)
        losses['loss_distill'] = weights['distill'] * self.distill_loss(
            logits, teacher_probs)
        losses['loss_reg'] = self.reg_loss(self)
        with torch.no_grad():
            losses['binary_w_dev'] = self.reg_loss.distance(
                self.reg_loss.binary_weights(self)).to(logits.device)
        return losses
