# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""One-pass CPU kernels for the elementwise parts of the binary layers.

The activation sign with its straight-through window
(:class:`~mmbhvit.models.binary.SignSTE`,
:class:`~mmbhvit.models.binary.ShiftedSignSTE`, and
:class:`~mmbhvit.models.binary.quantizers.ShiftedSignShortcut` with the
residual that reads the same input), RPReLU
(:class:`~mmbhvit.models.binary.RPReLUFunction`) and the weight binarizer
(:class:`~mmbhvit.models.binary.CentredSignSTE`) run on every binary layer
in every training step. Composed from PyTorch ops they make several passes
over activation-sized tensors (all weights); the compiled extension
(``mmbhvit._binary_ops``, ``csrc/training_ops.cpp``) does each forward and
backward in one pass, with the same element values.

They are used when all of these hold, otherwise the PyTorch composition
runs (same values; the unit tests compare both):

- the extension is built and has the ops (:func:`unavailable_reason`);
- the tensors are CPU float32 / float64, contiguous, with channels on
  dim 1;
- nothing is tracing or compiling the model (ONNX export, cost counting and
  ``torch.compile`` see the plain expressions);
- they are not switched off: environment variable
  ``MMBHVIT_FUSED_KERNELS=0``, or :func:`fused_kernels` as a context
  manager (e.g. ``with fused_kernels(False):`` for an A/B timing).

The same switch governs two CPU training paths written in PyTorch ops
(:func:`plain_cpu_training`; they need no extension): the integer product
of the binary 1×1 convolutions (:func:`integer_product_ok`, used by
:class:`~mmbhvit.models.binary.layers.SignProductConv1x1`, needs
``torch._int_mm`` and a CPU that runs it fast) and the backward of the
shift branches' circular depthwise convolution
(:class:`~mmbhvit.models.layout.WrapDepthwiseConv`).
"""
import contextlib
import functools
import os
from types import ModuleType
from typing import Iterator, Optional

import torch
from torch import Tensor

_OPS_NAMES = ('sign_ste_forward', 'sign_ste_backward', 'rprelu_forward',
              'rprelu_backward', 'centred_sign_forward',
              'centred_sign_backward', 'sign_product',
              'sign_shortcut_backward')
_DTYPES = (torch.float32, torch.float64)

_state = dict(loaded=False, ops=None, reason=None,
              enabled=os.environ.get('MMBHVIT_FUSED_KERNELS', '1') != '0')


def _load() -> Optional[ModuleType]:
    if not _state['loaded']:
        _state['loaded'] = True
        # the one loader of the extension (the packed engine's)
        from ...deploy.ops import (extension_error, load_extension,
                                   stale_build_reason)
        ext = load_extension()
        if ext is None:  # not built, or built for another torch
            _state['reason'] = (f'mmbhvit._binary_ops is not importable '
                                f'({extension_error()})')
        else:
            _state['reason'] = stale_build_reason(ext, _OPS_NAMES)
            if _state['reason'] is None:
                _state['ops'] = ext
    return _state['ops']


def unavailable_reason() -> Optional[str]:
    """Why the fused kernels cannot run here (None when they can)."""
    _load()
    return _state['reason']


def enabled() -> bool:
    """True when the fused kernels are switched on and built."""
    return _state['enabled'] and _load() is not None


@contextlib.contextmanager
def fused_kernels(enable: bool) -> Iterator[None]:
    """Switch the fused kernels on or off inside a ``with`` block."""
    before = _state['enabled']
    _state['enabled'] = bool(enable)
    try:
        yield
    finally:
        _state['enabled'] = before


def ops_for(x: Tensor, *per_channel: Optional[Tensor]
            ) -> Optional[ModuleType]:
    """The extension if it can take ``x`` (and the per-channel vectors
    ``per_channel``, None entries allowed) here, else None."""
    if not _state['enabled'] or torch.jit.is_tracing() or \
            torch.compiler.is_compiling():
        return None
    if x.device.type != 'cpu' or x.dtype not in _DTYPES or x.dim() < 2 \
            or not x.is_contiguous():
        return None
    channels = x.shape[1]
    for v in per_channel:
        if v is not None and (v.device.type != 'cpu' or v.dtype != x.dtype
                              or v.numel() != channels
                              or not v.is_contiguous()):
            return None
    return _load()


def plain_cpu_training(x: Tensor) -> bool:
    """True when a CPU-specific training path written in PyTorch ops may
    take ``x``: switched on, CPU float32/float64, contiguous NCHW, no
    tracing, compiling or autocast (which would expect the plain ops'
    own dtype rules)."""
    return (_state['enabled'] and x.device.type == 'cpu'
            and x.dtype in _DTYPES and x.dim() == 4 and x.is_contiguous()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled('cpu'))


@functools.lru_cache(maxsize=None)
def int8_products_fast() -> bool:
    """True when this CPU runs ``torch._int_mm`` with a vector kernel: it
    reports AVX-512 VNNI (``torch.cpu._is_vnni_supported``; where this
    torch lacks that function, False).

    Without it ATen takes a plain loop: on this Xeon seen as an AVX2-only
    CPU (``tools/deployment/as_avx2_cpu.py``) a 512×1024 by 1024×784
    product took 848 ms (1.0 G int8 ops/s) against 9.3 ms with AVX-512 VNNI
    present and 3.4 ms unrestricted, while float32 products keep their AVX2
    kernels; so on AVX2-only CPUs (e.g. AMD Zen 3) the binary 1×1 layers
    stay float."""
    probe = getattr(torch.cpu, '_is_vnni_supported', None)
    return bool(probe()) if probe is not None else False


def integer_product_ok(x: Tensor) -> bool:
    """True when the forward of a binary 1×1 convolution of ``x`` (a sign
    map) may run as an exact int8 product: :func:`plain_cpu_training`,
    float32, ``torch._int_mm`` present and fast here
    (:func:`int8_products_fast`)."""
    return (x.dtype == torch.float32 and hasattr(torch, '_int_mm')
            and plain_cpu_training(x) and int8_products_fast())


def sign_product_route(x: Tensor) -> Optional[str]:
    """How the forward of a binary 1×1 convolution of ``x`` (a float32
    sign map) may form its exact product here: ``'popcount'`` (the
    extension's ``sign_product``: XOR + popcount on packed bits, every
    kernel set, so also on AVX2-only CPUs), ``'integer'``
    (``torch._int_mm``, :func:`integer_product_ok`), or None (the float
    convolution)."""
    if x.dtype != torch.float32 or not plain_cpu_training(x):
        return None
    if _load() is not None:
        return 'popcount'
    return 'integer' if integer_product_ok(x) else None
