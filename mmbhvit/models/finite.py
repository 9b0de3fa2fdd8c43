# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Non-finite values (NaN, ±inf) in image batches and losses.

One place for the test and its message, used by the PyTorch backbone
(:class:`~mmbhvit.models.BHViT`), the packed engine
(:class:`~mmbhvit.deploy.engine.PackedBHViT`) and the training guard
(:class:`~mmbhvit.engine.NonFiniteCheckHook`).

The test is a single reduction (the sum of the tensor is finite iff every
element is, unless finite values overflow the sum); only when the sum is
not finite are the elements looked at one by one, so a finite batch costs
one pass over the input without allocating a mask.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor


class NonFiniteError(ValueError):
    """A tensor that must be finite (an input batch, a loss, a gradient)
    holds NaN or ±inf."""


def is_tracing() -> bool:
    """True while the model is traced or compiled (``torch.jit.trace``,
    ONNX export, ``torch.compile``, ``torch.export``).

    Data-dependent checks (such as :func:`check_finite_input`) are skipped
    there: they would be evaluated once at trace time, or break the graph.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, 'compiler', None)
    return compiler is not None and compiler.is_compiling()


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite (always True for integer and
    empty tensors)."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(x.detach().sum(dtype=acc))):
        return True
    # NaN / inf somewhere, or finite values whose sum overflowed
    return bool(torch.isfinite(x.detach()).all())


def _counts(t: Tensor) -> str:
    t = t.detach()
    parts = []
    for n, label in ((int(torch.isnan(t).sum()), 'NaN'),
                     (int((t == float('inf')).sum()), '+inf'),
                     (int((t == float('-inf')).sum()), '-inf')):
        if n:
            parts.append(f'{n} {label}')
    return ', '.join(parts) + f' of {t.numel()} values'


def describe_nonfinite(x: Tensor,
                       names: Optional[Sequence[Optional[str]]] = None,
                       max_items: int = 5) -> str:
    """Which images of the batch ``x`` (N, ...) hold NaN / ±inf, and how
    many, e.g. ``'batch index 1 (img_dir/train/7.png): 1 NaN of 12288
    values'``. ``names`` (one per image, e.g. file paths) are added when
    given."""
    if x.dim() == 0:
        return _counts(x)
    bad = (~torch.isfinite(x.detach())).reshape(x.shape[0], -1).any(1)
    index = bad.nonzero().flatten().tolist()
    parts = []
    for i in index[:max_items]:
        name = names[i] if names is not None and i < len(names) else None
        label = f'batch index {i}' + (f' ({name})' if name else '')
        parts.append(f'{label}: {_counts(x[i])}')
    if len(index) > max_items:
        parts.append(f'... and {len(index) - max_items} more image(s)')
    return '; '.join(parts)


def check_finite_input(x: Tensor, owner: str,
                       note: str = '') -> None:
    """Raise :class:`NonFiniteError` if the image batch ``x`` holds NaN or
    ±inf, naming the images and the counts. ``owner`` names the model in the
    message; ``note`` is appended (e.g. a dtype cast that happened)."""
    if all_finite(x):
        return
    raise NonFiniteError(
        f'{owner} got a non-finite input batch (shape {tuple(x.shape)}, '
        f'{x.dtype}{note}): {describe_nonfinite(x)}. NaN/inf pixels would '
        'turn every BatchNorm running statistic into NaN in training and '
        'give a meaningless prediction at inference; check the image files '
        'and the data pipeline (e.g. a std of 0 in the data preprocessor).')
