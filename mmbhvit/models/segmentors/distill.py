# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""A segmentor taught by a frozen teacher segmentor, pixel by pixel.

The use case: a 1-bit head (``BinaryUPerHead`` / ``BinaryFPNHead``) loses
accuracy against the full-precision head it replaces; trained with that
full-precision segmentor as its teacher it learns the teacher's class
probabilities at every pixel, not only the labels.

.. math::
    L = L_{decode} (+ L_{aux}) + w\, T^2\,
        \operatorname{mean}_{n,h,w} \mathrm{KL}\big(
        \operatorname{softmax}(t/T) \,\|\, \operatorname{softmax}(s/T)\big)

with :math:`s, t` the decode heads' logits of student and teacher (before
the resize to the image, both at the heads' output stride; the teacher's
are resized bilinearly to the student's if the strides differ), the KL
over the classes, averaged over every pixel and image. Labels marked
ignore (padding) are still taught: the teacher predicts there too.
"""
from typing import List, Union

import torch.nn.functional as F
from mmseg.models.segmentors import EncoderDecoder
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import add_prefix
from torch import Tensor

from ..teacher import FrozenTeacherMixin


def pixel_distill_loss(student: Tensor, teacher: Tensor,
                       temperature: float = 1.0) -> Tensor:
    """:math:`T^2` times the mean over pixels (and images) of
    :math:`\\mathrm{KL}(p_t \\| p_s)` over the classes (dim 1)."""
    if student.shape != teacher.shape:
        raise ValueError(f'student logits {tuple(student.shape)} and teacher '
                         f'logits {tuple(teacher.shape)} differ')
    t = float(temperature)
    log_p_s = F.log_softmax(student / t, dim=1)
    log_p_t = F.log_softmax(teacher.to(student.dtype) / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (t * t)


@MODELS.register_module()
class DistillEncoderDecoder(FrozenTeacherMixin, EncoderDecoder):
    """mmseg's :class:`EncoderDecoder` trained with a frozen teacher
    segmentor (pixel-wise distillation of the decode logits).

    The teacher is frozen and kept outside the module tree
    (:class:`~mmbhvit.models.teacher.FrozenTeacherMixin`): checkpoints hold
    the plain ``EncoderDecoder`` keys, so the student's checkpoint loads
    into the config without distillation (e.g. the binary-head config) for
    testing and deployment; inference never builds the teacher.

    Args:
        teacher (dict | str): the teacher's model config, or a config file
            whose ``model`` is the teacher (e.g. the full-precision-head
            counterpart of the student's config). Its ``forward(inputs,
            mode='tensor')`` must return logits over the same classes.
        teacher_checkpoint (str, optional): the teacher's trained weights,
            loaded strictly. Required unless ``allow_random_teacher``.
        allow_random_teacher (bool): tests only. Default False.
        distill_weight (float): :math:`w`. Default 1.
        temperature (float): :math:`T`. Default 1.
        **kwargs: the arguments of :class:`EncoderDecoder`.
    """

    teacher_registry = MODELS
    teacher_hint = ('the trained teacher segmentor, e.g. the full-precision-'
                    'head counterpart trained with tools/train.py on the '
                    'same data; configs/bhvit/README.md, "Binary heads"')

    def __init__(self,
                 teacher: Union[dict, str],
                 teacher_checkpoint: Union[str, None] = None,
                 allow_random_teacher: bool = False,
                 distill_weight: float = 1.0,
                 temperature: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self._init_teacher(teacher, teacher_checkpoint, allow_random_teacher)
        if not distill_weight >= 0:
            raise ValueError(f'distill_weight must be >= 0, got '
                             f'{distill_weight}')
        if not temperature > 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)

    def loss(self, inputs: Tensor, data_samples: List) -> dict:
        """The decode (and auxiliary) losses of :class:`EncoderDecoder`
        plus ``loss_distill``."""
        x = self.extract_feat(inputs)
        seg_logits = self.decode_head.forward(x)
        losses = add_prefix(
            self.decode_head.loss_by_feat(seg_logits, data_samples),
            'decode')
        if self.with_auxiliary_head:
            losses.update(self._auxiliary_head_forward_train(x, data_samples))
        teacher = self.teacher_logits(inputs)
        if teacher.shape[:2] != seg_logits.shape[:2]:
            raise ValueError(
                f'teacher logits {tuple(teacher.shape)} vs student '
                f'{tuple(seg_logits.shape)}: the teacher must predict the '
                'same classes')
        if teacher.shape[2:] != seg_logits.shape[2:]:
            teacher = resize(teacher, size=seg_logits.shape[2:],
                             mode='bilinear', align_corners=False)
        losses['loss_distill'] = self.distill_weight * pixel_distill_loss(
            seg_logits, teacher, self.temperature)
        return losses
