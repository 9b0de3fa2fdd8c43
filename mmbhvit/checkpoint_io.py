# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Checkpoint files under torch >= 2.6, whose ``torch.load`` defaults to
``weights_only=True`` (mmengine 0.10.7 calls it without the argument).

* :func:`save_slim_checkpoint` writes ``{'meta': ..., 'state_dict': ...}``
  with plain Python types only, which loads with ``weights_only=True``;
* :func:`resume_safe_globals` is a context manager that lets the
  weights-only unpickler read a full mmengine training checkpoint
  (``--resume``, or testing/fine-tuning from a ``iter_*.pth`` written by a
  Runner) by allow-listing exactly the few extra globals mmengine writes
  (:func:`mmengine_checkpoint_globals`);
  :func:`register_resume_safe_globals` registers them for good.

This module reads and writes checkpoint *files*. Building a model from a
config and a checkpoint, with strict key matching, is
:func:`mmbhvit.apis.build_model`; the ``Pretrained`` ``init_cfg`` of the
backbone is :mod:`mmbhvit.models.checkpoint`. See ``docs/checkpoints.md``.
"""
import contextlib
import importlib
import pickle
import types
from typing import Any, Dict, Iterator, List, Optional

__all__ = [
    'save_slim_checkpoint', 'mmengine_checkpoint_globals',
    'resume_safe_globals', 'register_resume_safe_globals'
]

_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))


def _to_plain(value: Any, where: str) -> Any:
    """Convert ``value`` to plain Python containers and scalars.

    numpy scalars and arrays become Python numbers and lists; tuples stay
    tuples; dict keys must be plain scalars. Anything else raises
    ``TypeError`` naming where it was found.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, _PLAIN_SCALARS):
        # Subclasses (e.g. numpy.float64 is a float) become the base type.
        for base in (str, bytes, int, float):
            if isinstance(value, base):
                return base(value)
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, _PLAIN_SCALARS):
                raise TypeError(f'{where}: key {key!r} is a '
                                f'{type(key).__name__}, not a plain scalar')
            out[_to_plain(key, where)] = _to_plain(item, f'{where}[{key!r}]')
        return out
    if isinstance(value, (list, tuple)):
        items = [
            _to_plain(item, f'{where}[{i}]') for i, item in enumerate(value)
        ]
        return tuple(items) if isinstance(value, tuple) else items
    # numpy values, checked by duck typing to keep numpy optional here.
    if type(value).__module__ == 'numpy' and hasattr(value, 'tolist'):
        return _to_plain(value.tolist(), where)
    raise TypeError(
        f'{where} is a {type(value).__module__}.{type(value).__qualname__}; '
        'a slim checkpoint meta may hold only str/int/float/bool/None/bytes '
        'in dicts, lists and tuples')


def save_slim_checkpoint(state_dict: Dict[str, Any],
                         path: str,
                         meta: Optional[Dict[str, Any]] = None) -> None:
    """Save ``{'meta': meta, 'state_dict': state_dict}`` with plain types.

    The file loads with ``torch.load(path, weights_only=True)`` and with
    ``mmengine.runner.load_checkpoint``, whatever torch's default.

    Args:
        state_dict (dict): Parameter name to tensor. Tensors are detached,
            moved to the CPU, and copied when they are views of a larger
            storage (so the file holds only their own data).
        path (str): Output file; parent folders are created. Written
            atomically (:func:`mmbhvit.utils.io.atomic_write`): a failure,
            e.g. a full disk, leaves any previous file there unchanged.
        meta (dict, optional): Plain metadata (numpy values are converted;
            other objects raise ``TypeError``). Defaults to ``{}``.
    """
    import torch

    if not isinstance(state_dict, dict):
        raise TypeError('state_dict must be a dict of tensors, got '
                        f'{type(state_dict).__name__}')
    weights = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f'state_dict key {name!r} is not a str')
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'state_dict[{name!r}] is a '
                            f'{type(tensor).__name__}, not a tensor')
        tensor = tensor.detach().cpu()
        own_bytes = tensor.numel() * tensor.element_size()
        if (not tensor.is_contiguous() or tensor.storage_offset() != 0
                or tensor.untyped_storage().nbytes() != own_bytes):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if type(tensor) is not torch.Tensor:  # Parameter and subclasses
            tensor = tensor.as_subclass(torch.Tensor)
        weights[name] = tensor
    checkpoint = {
        'meta': _to_plain(dict(meta or {}), 'meta'),
        'state_dict': weights
    }
    from .utils.io import atomic_torch_save
    atomic_torch_save(checkpoint, path)


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to methods of mmengine's ``HistoryBuffer``.

    mmengine pickles ``HistoryBuffer._statistics_methods`` (e.g.
    ``HistoryBuffer.mean``) as ``builtins.getattr(HistoryBuffer, 'mean')``.
    Inside :func:`resume_safe_globals` the weights-only unpickler
    resolves ``builtins.getattr`` to this function, so no other attribute is
    reachable.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if (isinstance(obj, type) and issubclass(obj, HistoryBuffer)
            and isinstance(name, str) and not name.startswith('_')):
        method = getattr(obj, name, None)
        if isinstance(method, types.FunctionType):
            return method
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint: '
        'only HistoryBuffer statistics methods are allowed')


def mmengine_checkpoint_globals() -> List[Any]:
    """The globals a full mmengine 0.10 training checkpoint needs.

    Found by saving a Runner checkpoint and reading it with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``: the message hub
    holds ``HistoryBuffer`` objects (numpy arrays, and their statistics
    methods pickled through ``builtins.getattr``) and numpy scalars such as
    the ETA. Everything else (optimizer and scheduler states, ``Counter``,
    ``OrderedDict``, tensors) is already allowed by torch.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:
        multiarray = importlib.import_module('numpy._core.multiarray')
    except ImportError:  # numpy < 1.26
        multiarray = importlib.import_module('numpy.core.multiarray')
    allowed: List[Any] = [HistoryBuffer, np.ndarray, np.dtype]
    # Arrays and scalars, under both numpy 2 and numpy 1 module names.
    for func in ('_reconstruct', 'scalar'):
        obj = getattr(multiarray, func)
        for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
            allowed.append((obj, f'{module}.{func}'))
    # dtype instances are rebuilt with BUILD, which needs their classes
    # (numpy.dtypes.Float64DType, ...): the numeric and bool ones.
    allowed.extend({type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG'})
    allowed.append((_history_buffer_getattr, 'builtins.getattr'))
    return allowed


@contextlib.contextmanager
def resume_safe_globals() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` read mmengine training states.

    Use around the code that loads a Runner checkpoint, e.g.::

        with resume_safe_globals():
            runner.train()  # resume=True, or load_from='.../iter_8000.pth'

    Weights-only loading stays on; only :func:`mmengine_checkpoint_globals`
    is allow-listed, and only inside the ``with`` block. On torch < 2.6
    (no ``safe_globals``) this does nothing: ``torch.load`` is not
    weights-only by default there.
    """
    import torch

    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    global _RESUME_DEPTH
    # torch's context removes its globals on exit, even if an outer block
    # still needs them: only the outermost block installs and removes.
    if safe_globals is None or _RESUME_DEPTH:
        _RESUME_DEPTH += 1
        try:
            yield
        finally:
            _RESUME_DEPTH -= 1
        return
    with safe_globals(mmengine_checkpoint_globals()):
        _RESUME_DEPTH += 1
        try:
            yield
        finally:
            _RESUME_DEPTH -= 1


_RESUME_DEPTH = 0


def register_resume_safe_globals() -> None:
    """Allow-list :func:`mmengine_checkpoint_globals` for the process.

    For scripts that cannot wrap ``runner.train()`` in
    :func:`resume_safe_globals`. Weights-only loading stays on.
    """
    import torch

    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is not None:
        add(mmengine_checkpoint_globals())
