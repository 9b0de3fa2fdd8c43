# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""What a packed BHViT file claims and how it is checked (format v3).

Three things make a packed file trustworthy:

* :func:`arch_spec` – the complete architecture of a PyTorch
  :class:`~mmbhvit.models.BHViT` as a tree of typed specs, one per module
  (:mod:`mmbhvit.deploy.registry`; every block's kind and options, widths,
  depths, heads, window, MLP ratios, binarizer, shifts, merging, image
  size, outputs). The exporter stores it in the file (its only description
  of the model); :func:`mmbhvit.deploy.mmseg_backend.use_packed_backbone`
  derives it again from the backbone it replaces and compares the two
  (:func:`diff_specs`).
* :func:`expected_tensors` – the name, shape and dtype of every tensor the
  engine reads, from the specs alone (each block kind declares its
  tensors). The engine checks the tensors against it once, when it is built
  (:func:`check_tensor_shapes`), so neither backend ever reads a tensor of
  the wrong size.
* :func:`tensor_manifest` / :func:`digest_tensors` / :func:`graph_sha256`
  – the manifest (every tensor's name, shape, dtype and SHA-256) and the
  SHA-256 digests that :func:`mmbhvit.deploy.export.load_packed` verifies
  (corruption, truncation, hand edits).

:func:`check_graph` verifies that the spec parses and is internally
consistent (the architecture summary and the per-block specs agree).
:func:`tensor_errors` is the one comparison of tensors against a listing
(the manifest, the spec).
"""
import hashlib
import json
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..utils.text import first_items

#: dtype names as stored in the manifest
DTYPES = {
    torch.float32: 'float32',
    torch.float64: 'float64',
    torch.int64: 'int64'
}


class PackedFormatError(ValueError):
    """A packed file is corrupt, incomplete, of an old format or does not
    fit the model it is used with."""


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPES.get(dtype, str(dtype).replace('torch.', ''))


# --------------------------------------------------------------------------
# The architecture spec of a PyTorch BHViT
# --------------------------------------------------------------------------
def arch_spec(backbone: nn.Module) -> dict:
    """The complete architecture of a BHViT backbone, JSON-able, read from
    its modules by the deploy handlers (:func:`mmbhvit.deploy.registry.
    describe`): a summary of the options and the typed spec of every stem,
    block and patch merging; holds no learned values. Stored by the
    exporter as ``graph['arch']`` and compared by
    :func:`use_packed_backbone`."""
    from ..models import BHViT
    from .registry import describe
    if not isinstance(backbone, BHViT):
        raise TypeError('arch_spec needs a BHViT backbone, got '
                        f'{type(backbone).__name__}')
    return describe(backbone).to_dict()


_LABELS = {'embed_dims': 'embed_dims (stage widths)'}
_ABSENT = '<absent>'


def _diff(a, b, path: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            p = f'{path}.{k}' if path else str(k)
            if k not in a or k not in b:
                out.append((p, a.get(k, _ABSENT), b.get(k, _ABSENT)))
            else:
                _diff(a[k], b[k], p, out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and \
            any(isinstance(v, (dict, list, tuple)) for v in [*a, *b]):
        for i in range(max(len(a), len(b))):
            p = f'{path}[{i}]'
            if i >= len(a) or i >= len(b):
                out.append((p, a[i] if i < len(a) else _ABSENT,
                            b[i] if i < len(b) else _ABSENT))
            else:
                _diff(a[i], b[i], p, out)
    elif a != b and not (isinstance(a, (list, tuple))
                         and isinstance(b, (list, tuple))
                         and list(a) == list(b)):
        out.append((path, a, b))


def diff_specs(a: dict, b: dict) -> List[Tuple[str, Any, Any]]:
    """Fields whose values differ between two architecture specs, as
    ``(field, value in a, value in b)`` (``'<absent>'`` for a field or a
    block only one has), top-level fields first."""
    out: List[Tuple[str, Any, Any]] = []
    _diff(a, b, '', out)
    return [(_LABELS.get(k, k), va, vb) for k, va, vb in out]


def _short(v) -> str:
    if isinstance(v, dict) and 'kind' in v:
        mixer = v.get('token_mixer')
        kind = mixer.get('kind') if isinstance(mixer, dict) else v['kind']
        return f'a {kind} block'
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + '...'


def format_diffs(diffs: List[Tuple[str, Any, Any]], name_a: str,
                 name_b: str, limit: int = 12) -> str:
    lines = [f'  {k}: {name_a} {_short(va)}, {name_b} {_short(vb)}'
             for k, va, vb in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f'  ... and {len(diffs) - limit} more')
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# The typed specs of a file, their consistency, the tensors they need
# --------------------------------------------------------------------------
def parse_graph(graph: dict, what: str):
    """``(backbone spec, head spec or None)`` of a file's graph (the
    :class:`~mmbhvit.deploy.engine.BackboneSpec` tree from
    ``graph['arch']``); :class:`PackedFormatError` if it does not parse."""
    from .registry import Spec, load_handlers
    load_handlers()
    try:
        arch = Spec.from_dict(graph.get('arch'), 'arch')
        if arch.kind != 'BHViT':
            raise ValueError(f'arch is a {arch.kind!r} spec, not a BHViT')
        head = graph.get('head')
        head = None if head is None else Spec.from_dict(head, 'head')
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise PackedFormatError(
            f'{what}: the architecture spec is malformed ({e}; a damaged or '
            'hand-edited file, or one of another mmbhvit version; re-export '
            'it with tools/deployment/export_binary.py)') from None
    return arch, head


def _head_errors(arch, head) -> List[str]:
    if head is None:
        return []
    if head.kind != 'gap_linear':
        return [f'head: unsupported head {head.kind!r}']
    if head.in_channels != arch.embed_dims[-1]:
        return [f'head.in_channels {head.in_channels} != embed_dims[-1] '
                f'{arch.embed_dims[-1]}']
    if 3 not in arch.out_indices:
        return ['a classification head needs the stage-4 output (3 in '
                'out_indices)']
    return []


def check_graph(graph: dict, what: str) -> None:
    """Raise :class:`PackedFormatError` unless the architecture spec
    parses and is consistent (the summary against the blocks, every block
    spec in itself, the head against the backbone)."""
    from .registry import spec_errors
    arch, head = parse_graph(graph, what)
    try:
        errs = arch.errors()
        if not errs:
            errs = spec_errors(arch, 'arch')[:] + _head_errors(arch, head)
            if head is not None:
                errs += spec_errors(head, 'head')
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        errs = [f'malformed spec ({type(e).__name__}: {e})']
    if errs:
        raise PackedFormatError(
            f'{what}: the architecture spec is inconsistent (a damaged or '
            'hand-edited file; re-export it with '
            'tools/deployment/export_binary.py):\n  ' +
            first_items(errs, 8, '\n  '))


def expected_tensors(graph: dict) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of every tensor the engine reads, from
    the typed specs of the file's graph only (each block kind declares its
    own tensors, :meth:`mmbhvit.deploy.registry.Spec.tensors`)."""
    from .export import BACKBONE_PATH, HEAD_PATH
    from .registry import expected_tensors as tree_tensors
    arch, head = parse_graph(graph, 'the graph')
    pdt = graph['param_dtype']
    out = tree_tensors(arch, BACKBONE_PATH, pdt)
    if head is not None:
        out.update(tree_tensors(head, HEAD_PATH, pdt))
    return out


def tensor_errors(expected: Dict[str, Any], tensors: Dict[str, Tensor],
                  source: str, verb: str) -> List[str]:
    """Every difference between the tensors and what ``source`` (the
    manifest, the architecture spec) lists as ``{name: (shape, dtype)}``
    (None for an unreadable entry): missing, extra, not a tensor, shape,
    dtype. ``verb`` says how ``source`` states a shape (``'says'``)."""
    errs = []
    for name in sorted(set(expected) | set(tensors), key=str):
        t = tensors.get(name)
        if name not in expected or expected[name] is None:
            errs.append(f'tensor {name!r} is not in {source}')
            continue
        shape, dtype = expected[name]
        if t is None:
            errs.append(f'it has no tensor {name!r} ({source} {verb} shape '
                        f'{tuple(shape)}, {dtype})')
        elif not isinstance(t, Tensor):
            errs.append(f'{name!r} is a {type(t).__name__}, not a tensor')
        elif tuple(t.shape) != tuple(shape):
            errs.append(f'tensor {name!r} has shape {tuple(t.shape)}, '
                        f'{source} {verb} {tuple(shape)}')
        elif dtype_name(t.dtype) != dtype:
            errs.append(f'tensor {name!r} has dtype {dtype_name(t.dtype)}, '
                        f'{source} {verb} {dtype}')
    return errs


def check_tensor_shapes(graph: dict, tensors: Dict[str, Tensor],
                        what: str) -> None:
    """Every tensor the spec needs is present with the shape and dtype the
    spec gives, and there is no other (raises :class:`PackedFormatError`
    naming the file, the tensor and both shapes)."""
    errs = tensor_errors(expected_tensors(graph), tensors,
                         'the architecture spec', 'needs')
    if errs:
        raise PackedFormatError(
            f'{what} does not fit its own architecture spec:\n  ' +
            first_items(errs, 8, '\n  '))


# --------------------------------------------------------------------------
# Manifest and digests
# --------------------------------------------------------------------------
def tensor_manifest(tensors: Dict[str, Tensor],
                    digests: Optional[Dict[str, str]] = None
                    ) -> Dict[str, dict]:
    """``{name: {'shape': [...], 'dtype': 'float32', 'sha256': ...}}``,
    sorted by name (``sha256`` from ``digests`` when given)."""
    out = {}
    for k in sorted(tensors):
        entry = dict(shape=[int(s) for s in tensors[k].shape],
                     dtype=dtype_name(tensors[k].dtype))
        if digests is not None:
            entry['sha256'] = digests[k]
        out[k] = entry
    return out


def _raw_bytes(t: Tensor) -> memoryview:
    arr = t.detach().cpu().contiguous().reshape(-1).numpy()
    if sys.byteorder == 'big':  # digests are over little-endian bytes
        arr = arr.byteswap()
    return memoryview(arr).cast('B')


def digest_tensors(tensors: Dict[str, Tensor]) -> Tuple[str, Dict[str, str]]:
    """``(tensors_sha256, {name: sha256 of its raw bytes})`` in one pass.

    ``tensors_sha256`` is deterministic: for each name in sorted order, a
    JSON header ``[name, dtype, shape]`` (8-byte length prefix) and the raw
    little-endian bytes of the contiguous tensor."""
    h = hashlib.sha256()
    per_tensor = {}
    for name in sorted(tensors):
        t = tensors[name]
        header = json.dumps([name, dtype_name(t.dtype),
                             [int(s) for s in t.shape]]).encode()
        data = _raw_bytes(t)
        h.update(len(header).to_bytes(8, 'little'))
        h.update(header)
        h.update(data)
        per_tensor[name] = hashlib.sha256(data).hexdigest()
    return h.hexdigest(), per_tensor


def tensors_sha256(tensors: Dict[str, Tensor]) -> str:
    """The SHA-256 over all tensors (see :func:`digest_tensors`)."""
    return digest_tensors(tensors)[0]


def graph_sha256(graph: dict) -> str:
    """SHA-256 of the canonical JSON of the graph without its own
    ``graph_sha256`` field (it covers the spec, the manifest, the tensor
    digest and the metadata)."""
    body = {k: v for k, v in graph.items() if k != 'graph_sha256'}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
