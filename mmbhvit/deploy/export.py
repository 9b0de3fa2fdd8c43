# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Export a trained BHViT into a deployable file with bit-packed weights.

The file (format version 3) is a plain ``torch.save`` of
``{'graph': dict, 'tensors': dict}`` (loads with ``torch.load(path,
weights_only=True)``), written atomically (:func:`save_packed`):

* ``graph`` – JSON-able description: ``arch``, the complete architecture
  derived from the model as a tree of typed specs, one per module
  (:func:`mmbhvit.deploy.spec.arch_spec`; the engine is built from it and
  nothing else); ``head``, the spec of the classification head or None;
  ``manifest``, every tensor's shape, dtype and SHA-256; ``tensors_sha256``
  over all tensors; ``meta`` with the SHA-256 of the source checkpoint and
  of the resolved config; statistics; and ``graph_sha256`` over all of it;
* ``tensors`` – ``{module path.name: tensor}``; binary weights are int64
  words of 64 sign bits (:mod:`mmbhvit.deploy.packing`), everything else
  float.

:func:`load_packed` verifies all of it (format, version, digests, manifest,
spec consistency); the engine checks every tensor's shape against the spec
when it is built (:func:`mmbhvit.deploy.spec.check_tensor_shapes`).

The exporter walks the model through the deploy registry
(:mod:`mmbhvit.deploy.registry`): each module kind's handler in
:mod:`mmbhvit.deploy.blocks` describes it and folds its tensors (all in
float64, then stored in ``param_dtype``): binary weights to sign bits and a
per-output factor, eval BatchNorms and RPReLU shifts into per-channel
affines, learnable shifts before a sign into thresholds (``sign(x + s)``
becomes ``x > -s``, exact in floating point), the shift branches into one
sparse depthwise filter, the stem / full-precision merging BatchNorm into
the convolution.

Sign convention: ``torch.sign(0) = 0``, a third value 1 bit cannot hold. The
engine maps an exact 0 to -1 (an activation exactly equal to its threshold,
or a centred weight exactly 0). In a trained network exact zeros do not
occur except at zero padding, which the engine handles exactly (a padded
tap contributes 0); :func:`export_model` counts zero centred weights and
warns if there are any.
"""
import argparse
import hashlib
import io
import os
import os.path as osp
import re
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..utils.io import DiskFullError, atomic_torch_save, sha256_file
from ..utils.text import first_items
from .registry import Folder, describe
from .spec import (PackedFormatError, check_graph, check_tensor_shapes,
                   digest_tensors, dtype_name, graph_sha256, tensor_errors,
                   tensor_manifest)

#: tensor paths of the backbone and of the classification head in the file
#: (the module paths of an mmpretrain classifier)
BACKBONE_PATH = 'backbone'
HEAD_PATH = 'head.fc'

FORMAT = 'mmbhvit.packed-bhvit'
VERSION = 3
#: what the versions this mmbhvit refuses lacked (named in the error)
OLD_VERSIONS = {
    1: 'no architecture spec, no checksums',
    2: 'a separate layer graph beside the architecture spec',
}
#: the command that writes packed files (named in every "re-export" error)
EXPORT_TOOL = 'tools/deployment/export_binary.py CONFIG CHECKPOINT OUT'

SIGN_CONVENTION = (
    'activation bit = (x > threshold) (x + shift > 0); weight bit = '
    '(w - mean_in(w) > 0); an exact 0 maps to -1 (torch.sign gives 0); '
    'zero padding of the binary 3x3 convolutions contributes 0')


def _export_head(model: nn.Module, out: Folder) -> Optional[dict]:
    """GAP neck + linear classification head of an mmpretrain classifier
    (folded by the handler of its ``head.fc``)."""
    neck, head = getattr(model, 'neck', None), getattr(model, 'head', None)
    if head is None:  # a segmentor or a bare backbone
        return None
    fc = getattr(head, 'fc', None)
    if neck is None or not isinstance(fc, nn.Linear):
        warnings.warn(f'head {type(head).__name__} (neck '
                      f'{type(neck).__name__}) is not exported: only GAP + '
                      'a linear head are; the packed file holds the backbone '
                      'only and load_engine() returns feature maps')
        return None
    if type(neck).__name__ != 'GlobalAveragePooling':
        warnings.warn(f'neck {type(neck).__name__} is not exported; the '
                      'packed file holds the backbone only')
        return None
    spec = describe(fc, HEAD_PATH)
    out.fold(HEAD_PATH, fc, spec)
    return spec.to_dict()


_SHA256_HEX = re.compile(r'^[0-9a-f]{64}$')
#: provenance digests every file records (None when unknown)
PROVENANCE_KEYS = ('config_sha256', 'checkpoint_sha256')


def _export_meta(meta: Optional[dict]) -> dict:
    """``meta`` with validated ``config_sha256`` / ``checkpoint_sha256``
    (hex SHA-256 or None; always present) and the torch version."""
    meta = dict(meta or {})
    for key in PROVENANCE_KEYS:
        value = meta.get(key)
        if isinstance(value, str):
            value = value.lower()
        if value is not None and not (isinstance(value, str)
                                      and _SHA256_HEX.match(value)):
            raise ValueError(f'export_model: meta[{key!r}] must be a hex '
                             f'SHA-256 (64 hex digits) or None, got '
                             f'{value!r}')
        meta[key] = value
    meta['torch'] = str(torch.__version__)
    return meta


def export_model(model: nn.Module,
                 param_dtype: torch.dtype = torch.float32,
                 meta: Optional[dict] = None) -> dict:
    """Export a BHViT backbone, or a model with a ``.backbone`` (mmpretrain
    classifier: the GAP + linear head is exported too; mmseg segmentor: the
    backbone only) into the deployable dict ``{'graph', 'tensors'}``
    (format version 2, sealed with its manifest and digests).

    ``meta`` is recorded in ``graph['meta']``; its ``config_sha256`` and
    ``checkpoint_sha256`` (hex SHA-256 of the resolved config text and of
    the checkpoint file, see :func:`resolved_config_sha256` and
    :func:`mmbhvit.utils.io.sha256_file`) are validated and always present
    (None when not given)."""
    from ..models import BHViT
    backbone = model if isinstance(model, BHViT) else getattr(
        model, 'backbone', None)
    if not isinstance(backbone, BHViT):
        raise TypeError('export_model needs a BHViT or a model whose '
                        f'.backbone is a BHViT, got {type(model).__name__}')
    meta = _export_meta(meta)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = Folder(param_dtype)
            graph = dict(format=FORMAT, version=VERSION,
                         sign_convention=SIGN_CONVENTION,
                         param_dtype=dtype_name(param_dtype))
            spec = describe(backbone, BACKBONE_PATH)
            out.fold(BACKBONE_PATH, backbone, spec)
            graph['arch'] = spec.to_dict()
            graph['head'] = (None if model is backbone else
                             _export_head(model, out))
    finally:
        model.train(was_training)
    if out.stats['zero_centred_weights']:
        warnings.warn(
            f"{out.stats['zero_centred_weights']} binary weights are exactly "
            'equal to their mean (torch.sign gives 0 there, the packed file '
            '-1): the exported model can differ slightly')
    graph['stats'] = dict(out.stats)
    graph['meta'] = meta
    # the exporter's own output must satisfy the checks of the loader
    check_graph(graph, 'the export')
    check_tensor_shapes(graph, out.tensors, 'the export')
    sealed = seal_packed(graph, out.tensors)
    # checked just above: save_packed and the engines need no second pass
    return VerifiedPacked(sealed['graph'], sealed['tensors'],
                          'the given dict')


def seal_packed(graph: dict, tensors: Dict[str, Tensor]) -> dict:
    """``{'graph', 'tensors'}`` with the graph's manifest (every tensor's
    shape, dtype and SHA-256), ``tensors_sha256`` and ``graph_sha256``
    (re)computed. Used by :func:`export_model`; tests use it to build files
    that are consistent but do not fit their spec."""
    graph = {
        k: v for k, v in graph.items()
        if k not in ('manifest', 'tensors_sha256', 'graph_sha256')
    }
    overall, per_tensor = digest_tensors(tensors)
    graph['manifest'] = tensor_manifest(tensors, per_tensor)
    graph['tensors_sha256'] = overall
    graph['graph_sha256'] = graph_sha256(graph)
    return dict(graph=graph, tensors=dict(tensors))


def save_packed(packed: dict, path: str):
    """Write an exported dict (see :func:`export_model`) atomically: to a
    temporary file in the same folder, fsync'ed, then renamed over ``path``.
    A dict that would not load is refused; a full disk raises
    :class:`~mmbhvit.utils.io.DiskFullError` naming the file and leaves any
    previous file at ``path`` untouched."""
    packed = load_packed(packed)  # verify before writing
    atomic_torch_save(dict(graph=packed['graph'], tensors=packed['tensors']),
                      path)


class VerifiedPacked(dict):
    """A packed dict that passed :func:`load_packed` (``source`` names the
    file); the engines do not verify it a second time."""

    def __init__(self, graph: dict, tensors: dict, source: str):
        super().__init__(graph=graph, tensors=tensors)
        self.source = source


def _reexport(what: str) -> str:
    return f'{what}; re-export it with {EXPORT_TOOL}'


def _check_manifest(manifest: dict, tensors: dict, what: str) -> None:
    listed = {
        k: (tuple(m.get('shape') or ()), m.get('dtype'))
        if isinstance(m, dict) else None
        for k, m in manifest.items()
    }
    errs = tensor_errors(listed, tensors, 'its manifest', 'says')
    if errs:
        raise PackedFormatError(
            _reexport(f'{what} is corrupt or incomplete: ' +
                      first_items(errs, 4, '; ')))


def load_packed(path_or_dict) -> dict:
    """Read an exported file (weights-only loading) or take an exported
    dict, and verify it: format and version (a version-1 file is refused
    with a "re-export" message), the SHA-256 of its graph and of its
    tensors (corruption), the manifest against the tensors present
    (missing, extra, shape, dtype) and the internal consistency of the
    architecture spec. Returns a :class:`VerifiedPacked` (a dict).

    Raises:
        PackedFormatError (a ValueError): naming the file and the problem.
    """
    if isinstance(path_or_dict, VerifiedPacked):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        packed, what = path_or_dict, 'the given dict'
    else:
        path = os.fspath(path_or_dict)
        what = f'packed file {path!r}'
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} not found')
        try:
            packed = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # damaged zip, not a torch file, pickles
            msg = str(e).strip().splitlines()
            raise PackedFormatError(_reexport(
                f'{what} cannot be read ({type(e).__name__}: '
                f"{msg[0] if msg else ''}): it is truncated, corrupt or not "
                'a packed BHViT')) from e
    graph = packed.get('graph') if isinstance(packed, dict) else None
    if not isinstance(graph, dict) or graph.get('format') != FORMAT:
        raise PackedFormatError(f'{what} is not an exported packed BHViT '
                                f'(format {FORMAT!r}); write one with '
                                f'{EXPORT_TOOL}')
    version = graph.get('version')
    if version != VERSION:
        if isinstance(version, int) and version < VERSION:
            raise PackedFormatError(_reexport(
                f'{what} has the old packed format version {version} '
                f'({OLD_VERSIONS.get(version, "an older layout")}), which '
                f'this mmbhvit no longer reads (it reads version {VERSION})'))
        raise PackedFormatError(
            f'{what} has packed format version {version!r}; this mmbhvit '
            f'reads version {VERSION} (written by a newer mmbhvit? update '
            f'mmbhvit, or re-export it with this one: {EXPORT_TOOL})')
    tensors = packed.get('tensors')
    if not isinstance(tensors, dict) or not all(
            isinstance(graph.get(k), dict)
            for k in ('arch', 'manifest')):
        raise PackedFormatError(_reexport(
            f'{what} is incomplete: it lacks the tensors, the architecture '
            'spec or the manifest (a corrupt export?)'))
    try:
        graph_ok = graph.get('graph_sha256') == graph_sha256(graph)
    except (TypeError, ValueError):  # not JSON-able any more
        graph_ok = False
    if not graph_ok:
        raise PackedFormatError(
            f'{what} is corrupt: its graph (architecture spec, manifest, '
            'metadata) does not match its SHA-256 (damaged or edited after '
            f'export); copy it again or re-export it with {EXPORT_TOOL}')
    _check_manifest(graph['manifest'], tensors, what)
    overall, per_tensor = digest_tensors(tensors)
    if overall != graph.get('tensors_sha256'):
        bad = [k for k in sorted(per_tensor)
               if per_tensor[k] != graph['manifest'][k].get('sha256')]
        raise PackedFormatError(
            f'{what} is corrupt: the SHA-256 of its tensors does not match '
            f'the one recorded at export (damaged: '
            f"{', '.join(bad[:4]) or 'unknown'}"
            f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}): it "
            'changed after export (a damaged copy, download or disk); copy '
            f'it again or re-export it with {EXPORT_TOOL}')
    check_graph(graph, what)
    return VerifiedPacked(graph, tensors, what)


def resolved_config_sha256(config) -> str:
    """SHA-256 of the resolved config text (``_base_`` files merged), as
    ``Config.dump()`` writes it (``pretty_text``) for a ``.py`` config: the
    digest of the ``config.py`` a training run dumps into its work dir."""
    from mmengine.config import Config
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    return hashlib.sha256(cfg.pretty_text.encode('utf-8')).hexdigest()


def state_dict_bytes(module: nn.Module, dtype=torch.float32) -> int:
    """Bytes of ``torch.save`` of the module's float32 state dict."""
    buf = io.BytesIO()
    sd = {
        k: (v.to(dtype) if v.is_floating_point() else v)
        for k, v in module.state_dict().items()
    }
    torch.save(sd, buf)
    return buf.tell()


def size_report(packed: dict, fp32_bytes: int, packed_bytes: int) -> str:
    """Human-readable size comparison."""
    st = packed['graph']['stats']
    nb = st['binary_weights']
    lines = [
        f"binary weights: {nb:,} -> {st['packed_weight_bytes']:,} bytes "
        f"packed (float32: {4 * nb:,} bytes, "
        f"{4 * nb / max(st['packed_weight_bytes'], 1):.1f}x smaller)",
        f"other values (float, folded): {st['float_values']:,}",
        f'file: {packed_bytes:,} bytes vs float32 reference {fp32_bytes:,} '
        f'bytes ({fp32_bytes / max(packed_bytes, 1):.1f}x smaller)',
    ]
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# Command line (tools/deployment/export_binary.py)
# --------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a trained BHViT (classifier or segmentor '
        'backbone) with bit-packed 1-bit weights for the packed CPU engine')
    parser.add_argument('config', help='mmpretrain or mmseg config file')
    parser.add_argument(
        'checkpoint',
        help="trained checkpoint; 'none' exports the random initialisation "
        '(for benchmarks)')
    parser.add_argument('out',
                        help='output file (e.g. bhvit_small.packed.pth)')
    parser.add_argument(
        '--param-dtype', choices=('float32', 'float64'), default='float32',
        help='dtype of the folded per-channel parameters (float64 only for '
        'exactness tests)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = None if args.checkpoint.lower() == 'none' else args.checkpoint
    if ckpt is not None and not osp.isfile(ckpt):
        raise SystemExit(f'checkpoint not found: {ckpt}')
    from ..apis import build_model
    model = build_model(args.config, ckpt, student_only=True)
    packed = export_model(
        model, getattr(torch, args.param_dtype),
        meta=dict(config=osp.abspath(args.config),
                  checkpoint=osp.abspath(ckpt) if ckpt else None,
                  config_sha256=resolved_config_sha256(args.config),
                  checkpoint_sha256=sha256_file(ckpt) if ckpt else None))
    try:
        save_packed(packed, args.out)
    except DiskFullError as e:
        raise SystemExit(f'ERROR: {e}')
    out_bytes = os.path.getsize(args.out)
    exported = model if packed['graph']['head'] else model.backbone
    fp32 = state_dict_bytes(exported)
    print(f'wrote {args.out}')
    what = ('classifier (backbone + head)' if packed['graph']['head'] else
            'backbone')
    print(f'exported: {what}')
    print(size_report(packed, fp32, out_bytes))
    if ckpt is not None:
        print(f'checkpoint file {ckpt}: {os.path.getsize(ckpt):,} bytes '
              '(whole model, may include optimizer state)')
    meta = packed['graph']['meta']
    print(f"sha256: tensors {packed['graph']['tensors_sha256']}, config "
          f"{meta['config_sha256']}, checkpoint {meta['checkpoint_sha256']}")
    return 0
