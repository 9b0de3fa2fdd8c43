# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Compatibility with the installed OpenMMLab / PyTorch stack.

This module is imported first by :mod:`mmbhvit` and has two parts.

**mmcv-lite.** ``mmcv-lite`` ships ``mmcv`` without its compiled extension
``mmcv._ext``. Its ``mmcv/ops/__init__.py`` imports every op eagerly, so
``import mmcv.ops`` fails, and with it ``import mmseg.models`` (mmseg imports
``point_sample`` and ``sigmoid_focal_loss`` from ``mmcv.ops`` at module
level). When ``mmcv._ext`` is missing, :func:`install_light_mmcv_ops` puts a
light ``mmcv.ops`` package into :data:`sys.modules` instead:

* names whose source file is pure PyTorch (``point_sample``,
  ``CrissCrossAttention``, ``CornerPool``, ...) are loaded lazily from the
  real ``mmcv/ops/<file>.py``, without running ``mmcv/ops/__init__.py``;
* every other name exported by ``mmcv.ops`` (``nms``, ``DeformConv2d``,
  ``sigmoid_focal_loss``, ``PSAMask``, ...) is a placeholder class, so that
  ``from mmcv.ops import X`` succeeds, guarded or not, and calling or
  instantiating it raises :class:`MissingCompiledOpError`, which names the op
  and says how to get it. A placeholder is a class, so ``isinstance(m, X)``
  stays valid (and is always ``False``).

With full mmcv (``import mmcv._ext`` works) nothing is changed.

**Checkpoints under torch >= 2.6**, whose ``torch.load`` defaults to
``weights_only=True`` (mmengine 0.10.7 calls it without the argument):

* :func:`save_slim_checkpoint` writes ``{'meta': ..., 'state_dict': ...}``
  with plain Python types only, which loads with ``weights_only=True``;
* :func:`resume_safe_globals` is a context manager that lets the
  weights-only unpickler read a full mmengine training checkpoint
  (``--resume``, or testing/fine-tuning from a ``iter_*.pth`` written by a
  Runner) by allow-listing exactly the few extra globals mmengine writes;
  :func:`register_resume_safe_globals` registers them for good.

See ``docs/checkpoints.md``.
"""
import ast
import contextlib
import importlib
import importlib.machinery
import importlib.util
import os.path as osp
import pickle
import sys
import types
import warnings
from typing import Any, Dict, FrozenSet, Iterator, List, Optional

__all__ = [
    'MissingCompiledOpError', 'PURE_TORCH_OP_FILES', 'is_lite_mmcv',
    'install_light_mmcv_ops', 'light_ops_installed', 'installed_light_ops',
    'save_slim_checkpoint', 'mmengine_checkpoint_globals',
    'resume_safe_globals', 'register_resume_safe_globals'
]

# ---------------------------------------------------------------------------
# mmcv-lite: a light ``mmcv.ops``
# ---------------------------------------------------------------------------

#: Files of ``mmcv/ops`` that use neither ``mmcv._ext`` nor a file that does
#: (checked against mmcv 2.1.0). Names ``mmcv/ops/__init__.py`` imports from
#: them are served for real by the light package.
PURE_TORCH_OP_FILES: FrozenSet[str] = frozenset({
    'point_sample', 'cc_attention', 'corner_pool', 'conv2d_gradfix',
    'deprecated_wrappers', 'merge_cells'
})

#: Attribute set on the light package, so it can be told apart.
_LIGHT_MARK = '__mmbhvit_light_ops__'

_FULL_MMCV_HINT = ('install mmcv built with its compiled ops instead of '
                   'mmcv-lite, e.g. `pip uninstall -y mmcv-lite && '
                   'pip install mmcv==2.1.0` (this builds the ops from '
                   'source; `mim install mmcv==2.1.0` may find a prebuilt '
                   'wheel for your torch/CUDA)')


class MissingCompiledOpError(ModuleNotFoundError):
    """A compiled mmcv op was used, but ``mmcv._ext`` is not installed."""

    def __init__(self, op_name: str, import_error: str = '') -> None:
        self.op_name = op_name
        if import_error:
            state = f'fails to import ({import_error})'
        else:
            state = ('is missing (mmcv-lite is installed, or mmcv was built '
                     'without ops)')
        super().__init__(
            f'mmcv.ops.{op_name} needs full mmcv with compiled ops, but '
            f'mmcv._ext {state}. To use {op_name}, {_FULL_MMCV_HINT}.',
            name='mmcv._ext')


def _probe_mmcv_ext() -> Optional[BaseException]:
    """Import ``mmcv._ext``; return the error, or ``None`` if it imports.

    Raises:
        ModuleNotFoundError: when ``mmcv`` itself is not installed.
    """
    importlib.import_module('mmcv')
    try:
        importlib.import_module('mmcv._ext')
    except ImportError as err:
        return err
    return None


def is_lite_mmcv() -> bool:
    """Whether ``mmcv`` is installed but ``mmcv._ext`` does not import.

    ``False`` when mmcv is not installed at all.
    """
    try:
        return _probe_mmcv_ext() is not None
    except ImportError:
        return False


def _ops_exports(ops_dir: str) -> Dict[str, tuple]:
    """Map each name ``mmcv/ops/__init__.py`` imports to ``(file, name)``.

    The file is parsed, not run. ``from .nms import nms as n`` gives
    ``{'n': ('nms', 'nms')}``.
    """
    init_file = osp.join(ops_dir, '__init__.py')
    try:
        with open(init_file, encoding='utf-8') as f:
            tree = ast.parse(f.read(), filename=init_file)
    except (OSError, SyntaxError):
        # Unknown layout: serve at least what mmseg needs.
        return {'point_sample': ('point_sample', 'point_sample')}
    exports = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.level == 1
                and node.module):
            submodule = node.module.split('.')[0]
            for alias in node.names:
                exports[alias.asname or alias.name] = (submodule, alias.name)
    return exports


def _make_placeholder(op_name: str, import_error: str) -> type:
    """A class standing for a compiled op: creating/calling it raises."""

    def __new__(cls, *args, **kwargs):
        raise MissingCompiledOpError(op_name, import_error)

    doc = (f'Placeholder for the compiled op ``mmcv.ops.{op_name}``: '
           'mmcv._ext is not installed, so calling it raises '
           ':class:`mmbhvit.compat.MissingCompiledOpError`.')
    return type(op_name, (), {
        '__new__': __new__,
        '__module__': 'mmcv.ops',
        '__doc__': doc,
        _LIGHT_MARK: True,
    })


def _build_light_ops(mmcv_pkg: types.ModuleType,
                     import_error: str) -> types.ModuleType:
    ops_dir = osp.join(osp.dirname(mmcv_pkg.__file__), 'ops')
    exports = _ops_exports(ops_dir)
    pure = {
        name: where
        for name, where in exports.items() if where[0] in PURE_TORCH_OP_FILES
    }
    compiled = sorted(set(exports) - set(pure))

    light = types.ModuleType(
        'mmcv.ops', 'Light mmcv.ops installed by mmbhvit.compat: mmcv._ext '
        'is missing, so only the pure-PyTorch ops work.')
    # A package whose __path__ is the real ops folder: the pure files import
    # as usual (``mmcv.ops.point_sample``) and the real __init__ never runs.
    spec = importlib.machinery.ModuleSpec(
        'mmcv.ops', loader=None, is_package=True)
    spec.submodule_search_locations = [ops_dir]
    light.__spec__ = spec
    light.__path__ = [ops_dir]
    light.__package__ = 'mmcv.ops'
    light.__all__ = sorted(exports)
    setattr(light, _LIGHT_MARK, True)
    light.PURE_TORCH_OPS = tuple(sorted(pure))
    light.COMPILED_OPS = tuple(compiled)

    def __getattr__(name: str) -> Any:
        if name in pure:
            submodule, real_name = pure[name]
            module = importlib.import_module(f'mmcv.ops.{submodule}')
            value = getattr(module, real_name)
        elif name in exports:
            value = _make_placeholder(name, import_error)
        else:
            raise AttributeError(
                f"module 'mmcv.ops' (light version installed by "
                f"mmbhvit.compat) has no attribute {name!r}")
        setattr(light, name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(light.__dict__) | set(exports))

    light.__getattr__ = __getattr__
    light.__dir__ = __dir__
    return light


def light_ops_installed() -> bool:
    """Whether ``sys.modules['mmcv.ops']`` is the light package."""
    return getattr(sys.modules.get('mmcv.ops'), _LIGHT_MARK, False) is True


installed_light_ops = light_ops_installed


def install_light_mmcv_ops() -> bool:
    """Install the light ``mmcv.ops`` if, and only if, it is needed.

    Does nothing when mmcv is not installed, when ``mmcv._ext`` imports
    (full mmcv), or when an ``mmcv.ops`` module is already loaded.

    Returns:
        bool: Whether the light package is in place after the call.
    """
    if light_ops_installed():
        return True
    if 'mmcv.ops' in sys.modules:
        return False
    try:
        err = _probe_mmcv_ext()
    except ImportError:
        return False  # no mmcv at all: leave the error to its users
    if err is None:
        return False  # full mmcv
    import_error = ''
    if not (isinstance(err, ModuleNotFoundError)
            and err.name == 'mmcv._ext'):
        # _ext exists but is broken (e.g. built for another torch)
        import_error = f'{type(err).__name__}: {err}'
        warnings.warn(
            f'mmcv._ext is installed but fails to import ({import_error}); '
            'mmbhvit falls back to the pure-PyTorch subset of mmcv.ops. '
            'Rebuild mmcv for this torch to use the compiled ops.')
    mmcv_pkg = sys.modules['mmcv']
    light = _build_light_ops(mmcv_pkg, import_error)
    sys.modules['mmcv.ops'] = light
    mmcv_pkg.ops = light
    return True


# ---------------------------------------------------------------------------
# Checkpoints and ``torch.load(weights_only=True)``
# ---------------------------------------------------------------------------

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


install_light_mmcv_ops()
