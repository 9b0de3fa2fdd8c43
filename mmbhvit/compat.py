# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""mmcv-lite support: a light ``mmcv.ops`` for mmsegmentation.

This module is imported first by :mod:`mmbhvit`, before anything imports
mmseg.

``mmcv-lite`` ships ``mmcv`` without its compiled extension ``mmcv._ext``.
Its ``mmcv/ops/__init__.py`` imports every op eagerly, so ``import mmcv.ops``
fails, and with it ``import mmseg.models`` (mmseg imports ``point_sample``
and ``sigmoid_focal_loss`` from ``mmcv.ops`` at module level). When
``mmcv._ext`` is missing, :func:`install_light_mmcv_ops` puts a light
``mmcv.ops`` package into :data:`sys.modules` instead:

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

Checkpoint loading under torch >= 2.6 (``save_slim_checkpoint``,
``resume_safe_globals``, ...) is :mod:`mmbhvit.checkpoint_io`; the old
``from mmbhvit.compat import ...`` still works for those names.
"""
import ast
import importlib
import importlib.machinery
import importlib.util
import os.path as osp
import sys
import types
import warnings
from typing import Any, Dict, FrozenSet, List, Optional

__all__ = [
    'MissingCompiledOpError', 'PURE_TORCH_OP_FILES', 'is_lite_mmcv',
    'install_light_mmcv_ops', 'light_ops_installed'
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


#: Names that lived here before :mod:`mmbhvit.checkpoint_io` existed; user
#: scripts and older docs import them from ``mmbhvit.compat``.
_MOVED_TO_CHECKPOINT_IO = frozenset({
    'save_slim_checkpoint', 'mmengine_checkpoint_globals',
    'resume_safe_globals', 'register_resume_safe_globals'
})


def __getattr__(name: str) -> Any:
    """Serve the checkpoint names from their module, on first use only (so
    this file still runs on its own, as the tests load it)."""
    if name in _MOVED_TO_CHECKPOINT_IO:
        from . import checkpoint_io
        return getattr(checkpoint_io, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


install_light_mmcv_ops()
