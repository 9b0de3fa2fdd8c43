# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Run an mmseg segmentor with the packed BHViT engine as its backbone.

Example::

    from mmseg.apis import inference_model, init_model, show_result_pyplot
    from mmbhvit.deploy.mmseg_backend import use_packed_backbone

    model = init_model(config, checkpoint, device='cpu')
    use_packed_backbone(model, 'bhvit.packed.pth')
    result = inference_model(model, 'demo.png')   # same API as before

The backbone is replaced; the data preprocessor, the neck and heads and the
post-processing stay the mmseg modules with the checkpoint's weights. By
default the neck and heads are also prepared for inference: their
BatchNorms are folded into the preceding convolutions (mmcv's
``fuse_conv_bn``) and they run in channels-last memory, which the engine
produces without a copy. The model is then for inference only.
"""
from typing import Union

import torch
from torch import nn

from .engine import PackedBHViT

#: The modules after the backbone in mmseg's segmentors.
HEAD_NAMES = ('neck', 'decode_head', 'auxiliary_head')


def optimize_heads(model: nn.Module) -> nn.Module:
    """Fold the BatchNorms of the neck and heads into their convolutions
    and store them channels-last, in place (inference only: the folded
    convs use the BN running statistics). Returns ``model``."""
    from mmcv.cnn import fuse_conv_bn
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if head is None:
            continue
        head.eval()
        fuse_conv_bn(head)
        head.to(memory_format=torch.channels_last)
    return model


def use_packed_backbone(model: nn.Module, packed: Union[str, dict],
                        backend: str = 'auto',
                        dtype: torch.dtype = torch.float32,
                        fast_heads: bool = True) -> nn.Module:
    """Replace ``model.backbone`` (a BHViT) by the packed engine built from
    ``packed`` (an exported file or dict), in place; returns ``model``.

    The engine is a module with the same ``forward(x)`` → tuple of NCHW
    feature maps, returned in the dtype of the model's heads (``dtype`` is
    the engine's own float dtype; float64 only to check exactness). With
    ``fast_heads`` (default) the neck and heads go through
    :func:`optimize_heads` and the engine hands them channels-last maps
    (same values up to float rounding; ~1.3x faster heads on a CPU).
    Raises ``ValueError`` when the packed backbone does not fit the model
    (widths or output stages).
    """
    if not hasattr(model, 'backbone'):
        raise TypeError(f'{type(model).__name__} has no backbone to replace')
    head_params = [
        p for n, p in model.named_parameters()
        if not n.startswith('backbone.')
    ]
    devices = {str(p.device) for p in head_params}
    if devices - {'cpu'}:
        raise ValueError('the packed engine runs on the CPU: build the model '
                         f"with device='cpu' (its heads are on {devices})")
    out_dtype = head_params[0].dtype if head_params else dtype
    engine = PackedBHViT(packed, dtype=dtype, backend=backend,
                         out_dtype=out_dtype, channels_last=fast_heads)
    old = model.backbone
    old_dims = getattr(old, 'num_features', None)
    if old_dims is not None and tuple(old_dims) != engine.embed_dims:
        raise ValueError(f'packed backbone widths {engine.embed_dims} do not '
                         f'match the model backbone {tuple(old_dims)}')
    old_out = getattr(old, 'out_indices', None)
    if old_out is not None and tuple(old_out) != engine.out_indices:
        raise ValueError(f'packed backbone outputs stages '
                         f'{engine.out_indices}, the model expects '
                         f'{tuple(old_out)}: export from the same config')
    final_norm = getattr(old, 'final_norm', None)
    if final_norm is not None and bool(final_norm) != engine.final_norm:
        raise ValueError('final_norm differs between the packed backbone and '
                         'the model: export from the same config')
    was_training = model.training
    model.backbone = engine
    model.train(was_training)
    if fast_heads:
        optimize_heads(model)
    return model
