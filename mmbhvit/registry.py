# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Registration in both OpenMMLab model registries.

mmbhvit modules are used from mmpretrain (classification, pretraining) and
from mmsegmentation (dense prediction); each has its own ``MODELS``
registry, so every model class is registered in both.
"""
from mmpretrain.registry import MODELS as PRETRAIN_MODELS
from mmseg.registry import MODELS as SEG_MODELS


def register_model(cls=None, *, name=None):
    """Class decorator: register ``cls`` in mmpretrain's and mmseg's
    ``MODELS`` (usable as ``@register_model`` or
    ``@register_model(name='X')``)."""

    def _register(c):
        for registry in (PRETRAIN_MODELS, SEG_MODELS):
            registry.register_module(name=name, module=c)
        return c

    return _register if cls is None else _register(cls)
