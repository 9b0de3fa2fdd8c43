# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The deploy registry: one handler per PyTorch module kind.

A handler (:class:`Handler`) is registered for a module type with
:func:`register` and holds everything the deployment needs to know about
that kind of module:

* ``describe(module)`` – its typed spec (a :class:`Spec` dataclass: the
  options of the module, never a learned value), stored in the packed file;
* ``fold(module, spec, out)`` – its tensors, folded for inference and
  written through a :class:`Folder` under the module's own path;
* ``op`` – the packed op (an ``nn.Module`` running the C++ kernels or the
  PyTorch fallback) built from the spec and the file's tensors
  (:func:`build`).

The spec names every tensor the module stores with its shape and dtype
(:meth:`Spec.tensors`), so the file checks (:mod:`.spec`), the exporter and
the op all read the same declaration; a tensor name is written in one
place. A new module kind is one file with a spec, a handler and an op.

Exporting walks the model (``describe`` / ``fold`` of the top handler ask
for their children with :func:`describe` and :meth:`Folder.fold`); loading
walks the spec tree (``Spec.from_dict``) and builds the ops with
:func:`build`. Tensor names are the module paths (``backbone.stages.0.0.
token_mixer.thr``), as in the PyTorch state dict.
"""
import dataclasses
from typing import (Any, ClassVar, Dict, Iterator, List, NamedTuple,
                    Optional, Tuple, Type)

import torch
from torch import Tensor, nn

from .packing import num_words, pack_bits

#: dtype of a tensor in a spec: ``'bits'`` (int64 words of packed sign
#: bits), ``'param'`` (the file's ``param_dtype``) or a fixed float dtype
TENSOR_KINDS = ('bits', 'param', 'float64')


class UnsupportedModuleError(NotImplementedError):
    """No deploy handler is registered for a module type."""


class TensorSpec(NamedTuple):
    """Shape and dtype kind (see :data:`TENSOR_KINDS`) of a stored tensor."""
    shape: Tuple[int, ...]
    kind: str = 'param'

    def dtype_name(self, param_dtype: str) -> str:
        return {'bits': 'int64', 'param': param_dtype}.get(self.kind,
                                                           self.kind)


def param(*shape: int) -> TensorSpec:
    """A float tensor stored in the file's ``param_dtype``."""
    return TensorSpec(tuple(int(s) for s in shape), 'param')


def bits(rows: int, nbits: int) -> TensorSpec:
    """Sign bits of ``rows`` outputs, ``nbits`` each, in int64 words."""
    return TensorSpec((int(rows), num_words(int(nbits))), 'bits')


def float64(*shape: int) -> TensorSpec:
    """A float tensor kept in float64 whatever the ``param_dtype`` (values
    the kernels take as Python floats)."""
    return TensorSpec(tuple(int(s) for s in shape), 'float64')


# --------------------------------------------------------------------------
# Typed specs
# --------------------------------------------------------------------------
_SPEC_KINDS: Dict[str, Type['Spec']] = {}


class Spec:
    """Base of the typed specs (subclasses are dataclasses with a ``kind``
    class attribute). Fields are JSON values or child specs (alone, in
    lists, in lists of lists); :meth:`to_dict` / :meth:`from_dict`
    convert to and from the file's JSON, where a dict with a ``kind`` key
    is always a spec (plain dict fields must not have one)."""
    kind: ClassVar[str] = ''

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            if cls.kind in _SPEC_KINDS and \
                    _SPEC_KINDS[cls.kind].__qualname__ != cls.__qualname__:
                raise KeyError(f'spec kind {cls.kind!r} is registered twice '
                               f'({_SPEC_KINDS[cls.kind].__qualname__}, '
                               f'{cls.__qualname__})')
            _SPEC_KINDS[cls.kind] = cls

    # what the file stores -------------------------------------------------
    def tensors(self) -> Dict[str, TensorSpec]:
        """The module's own tensors (local names), shapes and dtypes."""
        return {}

    def errors(self) -> List[str]:
        """Internal inconsistencies of this spec (not of its children)."""
        return []

    def children(self) -> Iterator[Tuple[str, 'Spec']]:
        """``(path, child spec)`` of the child specs, paths relative to
        this module (``'q'``, ``'stages.1.0'``)."""
        for f in dataclasses.fields(self):
            yield from _walk(getattr(self, f.name), f.name)

    # JSON -----------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dict(kind=self.kind)
        for f in dataclasses.fields(self):
            out[f.name] = _to_json(getattr(self, f.name))
        return out

    @staticmethod
    def from_dict(d: Any, where: str = 'spec') -> 'Spec':
        """The spec of a JSON dict (its ``kind`` picks the class); raises
        ``ValueError`` naming ``where`` for an unknown kind or fields that
        do not fit."""
        if not isinstance(d, dict):
            raise ValueError(f'{where} is not a spec (a {type(d).__name__})')
        cls = _SPEC_KINDS.get(d.get('kind'))
        if cls is None:
            raise ValueError(f'{where} has the unknown kind '
                             f"{d.get('kind')!r} (this mmbhvit knows "
                             f'{sorted(_SPEC_KINDS)})')
        names = {f.name for f in dataclasses.fields(cls)}
        given = set(d) - {'kind'}
        if names != given:
            raise ValueError(
                f"{where} ({d['kind']}) has fields {sorted(given)}, the "
                f'{cls.__name__} spec has {sorted(names)}')
        return cls(**{
            k: _from_json(v, f'{where}.{k}')
            for k, v in d.items() if k != 'kind'
        })


def _walk(value, path: str):
    if isinstance(value, Spec):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f'{path}.{i}')


def _to_json(v):
    if isinstance(v, Spec):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_to_json(i) for i in v]
    if isinstance(v, dict):
        return {k: _to_json(i) for k, i in v.items()}
    return v


def _from_json(v, where: str):
    if isinstance(v, dict) and 'kind' in v:  # a spec (only specs say kind)
        return Spec.from_dict(v, where)
    if isinstance(v, list):
        return [_from_json(i, f'{where}[{n}]') for n, i in enumerate(v)]
    return v


def walk_specs(spec: Spec, path: str) -> Iterator[Tuple[str, Spec]]:
    """``(path, spec)`` of ``spec`` and of every spec below it."""
    yield path, spec
    for sub, child in spec.children():
        yield from walk_specs(child, f'{path}.{sub}')


def expected_tensors(spec: Spec, path: str, param_dtype: str
                     ) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{full name: (shape, dtype name)}`` of every tensor of the tree."""
    out = {}
    for p, s in walk_specs(spec, path):
        for name, ts in s.tensors().items():
            out[f'{p}.{name}'] = (ts.shape, ts.dtype_name(param_dtype))
    return out


def spec_errors(spec: Spec, path: str) -> List[str]:
    """:meth:`Spec.errors` of every spec of the tree, prefixed by path."""
    return [f'{p}: {e}' for p, s in walk_specs(spec, path)
            for e in s.errors()]


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------
class Handler:
    """Deployment of one PyTorch module type (see the module docstring).
    Subclasses set ``spec`` (the :class:`Spec` dataclass) and ``op`` (the
    packed op: ``op(spec, params, dtype, backend)``) and implement
    :meth:`describe` and :meth:`fold`."""
    spec: ClassVar[Type[Spec]]
    op: ClassVar[Optional[type]] = None

    def describe(self, module: nn.Module) -> Spec:
        raise NotImplementedError

    def fold(self, module: nn.Module, spec: Spec, out: 'Folder',
             **kw) -> None:
        raise NotImplementedError


_BY_TYPE: Dict[type, Handler] = {}
_BY_KIND: Dict[str, Handler] = {}


def register(module_type: type):
    """Class decorator: register a :class:`Handler` for ``module_type``
    (and its subclasses, unless they have their own)."""

    def deco(cls):
        handler = cls()
        _BY_TYPE[module_type] = handler
        _BY_KIND[cls.spec.kind] = handler
        _SPEC_KINDS[cls.spec.kind] = cls.spec
        return cls

    return deco


def unregister(module_type: type) -> None:
    """Remove the handler of ``module_type`` (tests register toy kinds)."""
    handler = _BY_TYPE.pop(module_type, None)
    if handler is not None:
        _BY_KIND.pop(handler.spec.kind, None)
        _SPEC_KINDS.pop(handler.spec.kind, None)


def load_handlers():
    # the built-in handlers register themselves on import
    from . import blocks, engine  # noqa: F401


def handler_for(module: nn.Module, where: str = '') -> Handler:
    """The handler of ``module``'s type (the nearest registered base
    class); :class:`UnsupportedModuleError` naming the type, where it is
    and what is supported otherwise."""
    load_handlers()
    for cls in type(module).__mro__:
        h = _BY_TYPE.get(cls)
        if h is not None:
            return h
    known = ', '.join(sorted(t.__name__ for t in _BY_TYPE))
    at = f' at {where}' if where else ''
    raise UnsupportedModuleError(
        f'the packed engine cannot deploy a {type(module).__module__}.'
        f'{type(module).__qualname__}{at}: no deploy handler is registered '
        f'for this module type (supported: {known}); add one with '
        'mmbhvit.deploy.registry.register (see docs/deployment.md, "Code '
        'layout")')


_DESCRIBING: List[str] = []


def describe(module: nn.Module, where: str = '') -> Spec:
    """The typed spec of ``module`` (by its handler); ``where`` is its
    path below the module being described (named in errors)."""
    _DESCRIBING.append(where)
    try:
        path = '.'.join(p for p in _DESCRIBING if p)
        return handler_for(module, path).describe(module)
    finally:
        _DESCRIBING.pop()


def build(spec: Spec, params: 'Params', dtype: torch.dtype,
          backend: str) -> nn.Module:
    """The packed op of ``spec``."""
    load_handlers()
    handler = _BY_KIND.get(spec.kind)
    if handler is None or handler.op is None:
        raise UnsupportedModuleError(f'{params.path}: no packed op for the '
                                     f'spec kind {spec.kind!r}')
    return handler.op(spec, params, dtype, backend)


# --------------------------------------------------------------------------
# Writing and reading the tensors of one module
# --------------------------------------------------------------------------
def as_f64(t: Optional[Tensor], like: int = None) -> Tensor:
    """Detached float64 copy (zeros of size ``like`` for None)."""
    if t is None:
        return torch.zeros(like, dtype=torch.float64)
    return t.detach().double().reshape(-1) if t.dim() else t.detach().double()


class Folder:
    """Writes the folded tensors of one module under its path (shared
    store and statistics for the whole export)."""

    def __init__(self, param_dtype: torch.dtype, path: str = '',
                 _store: Optional[dict] = None,
                 _stats: Optional[dict] = None):
        if param_dtype not in (torch.float32, torch.float64):
            raise ValueError('param_dtype must be float32 or float64')
        self.dtype = param_dtype
        self.path = path
        self.tensors: Dict[str, Tensor] = {} if _store is None else _store
        self.stats = _stats if _stats is not None else dict(
            binary_weights=0, packed_weight_bytes=0, float_values=0,
            zero_centred_weights=0)

    def name(self, local: str) -> str:
        return f'{self.path}.{local}' if self.path else local

    def child(self, name: str) -> 'Folder':
        return Folder(self.dtype, self.name(name), self.tensors, self.stats)

    def fold(self, name: str, module: nn.Module, spec: Spec, **kw) -> None:
        """Fold a child module (by its handler) under ``path.name``."""
        sub = self.child(name)
        handler_for(module, sub.path).fold(module, spec, sub, **kw)

    def _store(self, local: str, t: Tensor) -> None:
        name = self.name(local)
        if name in self.tensors:
            raise KeyError(f'duplicate tensor name {name}')
        self.tensors[name] = t

    def put(self, local: str, t: Tensor) -> None:
        """A float tensor, stored in ``param_dtype``."""
        self._store(local, t.detach().to(self.dtype).contiguous().clone())
        self.stats['float_values'] += t.numel()

    def put_float64(self, local: str, t: Tensor) -> None:
        self._store(local, t.detach().double().contiguous().clone())
        self.stats['float_values'] += t.numel()

    def put_binary_weight(self, local: str, conv: nn.Module) -> Tensor:
        """Pack the sign bits of a binary conv's centred weight densely, per
        output channel: ``(out, words(kh*kw*in/groups))``, bit ``k * cin_g +
        i`` for tap ``k`` (row-major) and group input ``i``; returns the
        per-output scale ``mean |w|`` (float64)."""
        if not getattr(conv, 'is_binary', False):
            raise NotImplementedError(
                f'{self.name(local)}: only fully binary layers (weight_bits='
                'act_bits=1) can be packed; export a binary BHViT, not its '
                'full-precision counterpart')
        w = conv.weight.detach()
        dims = tuple(range(1, w.dim()))
        # as binarize_weight, in the weight's own dtype (ReCU rescales the
        # centred weight by a positive factor: same signs)
        scale = w.abs().mean(dim=dims).double()
        centred = w - w.mean(dim=dims, keepdim=True)
        self.stats['zero_centred_weights'] += int((centred == 0).sum())
        cout = w.shape[0]
        words = pack_bits((centred > 0).permute(0, 2, 3, 1).reshape(cout, -1))
        self._store(local, words.contiguous())
        self.stats['binary_weights'] += w.numel()
        self.stats['packed_weight_bytes'] += words.numel() * 8
        return scale


class Params:
    """Reads the tensors of one module from a verified file: ``f(name)``
    a float tensor in the engine's dtype, ``words(name)`` packed bits,
    ``raw(name)`` as stored; ``child(name)`` the params of a child."""

    def __init__(self, tensors: Dict[str, Tensor], path: str,
                 dtype: torch.dtype):
        self._tensors = tensors
        self.path = path
        self.dtype = dtype

    def child(self, name: str) -> 'Params':
        return Params(self._tensors, f'{self.path}.{name}', self.dtype)

    def raw(self, name: str) -> Tensor:
        key = f'{self.path}.{name}'
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f'the packed model has no tensor {key!r}: the '
                           'file is corrupt or was not written by '
                           'tools/deployment/export_binary.py of this '
                           'version') from None

    def f(self, name: str) -> Tensor:
        return self.raw(name).to(self.dtype).contiguous()

    words = raw
