# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Whole models as traceable graphs (``forward(images)``, data preprocessor
left out) and the names of their parts, for cost counting."""
from typing import List, Tuple

from torch import Tensor, nn

from ..models import BHViT


class ClassifierGraph(nn.Module):
    """backbone → neck → head of an mmpretrain classifier as one traceable
    ``forward(images)`` (the data preprocessor is left out). Sub-module
    names stay ``backbone``, ``neck``, ``head``."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.backbone = classifier.backbone
        self.neck = classifier.neck if getattr(classifier, 'with_neck',
                                               False) else None
        self.head = classifier.head

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.head(feats)


class ResizeToInput(nn.Module):
    """Bilinear resize of the logits to the input size, as in mmseg's
    ``encode_decode`` (``decode_head.predict_by_feat``)."""

    def __init__(self, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, logits: Tensor, image: Tensor) -> Tensor:
        return nn.functional.interpolate(
            logits, size=image.shape[-2:], mode='bilinear',
            align_corners=self.align_corners)


class SegmentorGraph(nn.Module):
    """backbone → neck → decode head → resize to input of an mmseg
    ``EncoderDecoder`` as one traceable ``forward(images)``; the auxiliary
    head(s) (training only) also run on the neck outputs so that their cost
    can be reported apart."""

    def __init__(self, segmentor: nn.Module, with_auxiliary: bool = True):
        super().__init__()
        if isinstance(segmentor.decode_head, nn.ModuleList):
            raise NotImplementedError(
                'cascaded decode heads are not supported; got '
                f'{type(segmentor).__name__}')
        self.backbone = segmentor.backbone
        self.neck = segmentor.neck if getattr(segmentor, 'with_neck',
                                              False) else None
        self.decode_head = segmentor.decode_head
        self.resize = ResizeToInput(
            getattr(segmentor.decode_head, 'align_corners', False))
        aux = getattr(segmentor, 'auxiliary_head', None)
        self.auxiliary_head = aux if with_auxiliary else None

    def forward(self, x: Tensor):
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        logits = self.resize(self.decode_head(feats), x)
        if self.auxiliary_head is None:
            return logits
        if isinstance(self.auxiliary_head, nn.ModuleList):
            return (logits, ) + tuple(h(feats) for h in self.auxiliary_head)
        return logits, self.auxiliary_head(feats)


def backbone_parts(backbone: nn.Module, prefix: str = 'backbone.'
                   ) -> List[Tuple[str, List[str]]]:
    """Per-stage parts of a BHViT backbone (``[]`` for other backbones):
    stem (+ its positional embedding), stage *i* with the patch merging that
    opens it, final norm."""
    if not isinstance(backbone, BHViT):
        return []
    parts = [('stem', [prefix + 'patch_embed', prefix + 'pos_embed'])]
    for i in range(len(backbone.stages)):
        names = [f'{prefix}stages.{i}']
        if i > 0:
            names.insert(0, f'{prefix}downsamples.{i - 1}')
        parts.append((f'stage{i + 1}', names))
    if getattr(backbone, 'final_norm', False):
        parts.append(('final norm', [prefix + 'norm']))
    return parts
