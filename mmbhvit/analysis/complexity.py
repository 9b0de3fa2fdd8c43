# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Cost of a model or of a config's model: BOPs, FLOPs, OPs and (1-bit)
parameters, in total, per part and per block type.

This module glues the pieces, each in its own module:

* :mod:`~mmbhvit.analysis.counting`: the counting itself
  (:class:`BinaryFlopAnalyzer`, :func:`operand_bits`,
  :func:`binary_parameter_count`) and its conventions (``OPs = BOPs / 64 +
  FLOPs``, what is counted and how);
* :mod:`~mmbhvit.analysis.graphs`: whole classifiers / segmentors as one
  traceable ``forward(images)`` and the names of their parts;
* :mod:`~mmbhvit.analysis.report`: :class:`CostRow` and
  :class:`ComplexityReport` (markdown, dict).

The model of a config is built by :func:`mmbhvit.apis.build_model`, the
builder every tool uses.
"""
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.analysis import parameter_count
from mmengine.config import Config
from torch import Tensor, nn

from ..apis import build_model
from ..models.backbones.bhvit import ShiftBranches
from .counting import BinaryFlopAnalyzer, binary_parameter_count
from .graphs import ClassifierGraph, SegmentorGraph, backbone_parts
from .report import ComplexityReport, CostRow


def _module_names(model: nn.Module) -> set:
    return {name for name, _ in model.named_modules()}


@contextmanager
def _shifts_unfused(model: nn.Module):
    """Every :class:`ShiftBranches` of ``model`` in its roll form inside the
    ``with`` block: counted as data movement plus one gate per branch, not
    as the depthwise conv that fuses them for speed."""
    with ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, ShiftBranches):
                stack.enter_context(m.unfused())
        yield


def analyze_model(model: nn.Module,
                  inputs: Union[Tensor, Tuple[Tensor, ...]],
                  parts: Optional[Sequence[Tuple[str, Sequence[str]]]] = None,
                  count_bn: bool = True
                  ) -> Tuple['OrderedDict[str, CostRow]', BinaryFlopAnalyzer]:
    """Cost of named parts of ``model`` for one forward pass on ``inputs``.

    Args:
        model (nn.Module): traced as is (put it in eval mode first).
        inputs: inputs of ``model.forward``.
        parts: ``(label, names)`` pairs; ``names`` are submodule names
            (costs and parameters) or parameter names (parameters only);
            ``''`` is the whole model. Default: ``[('total', [''])]``.
        count_bn (bool): see :class:`BinaryFlopAnalyzer`.

    Returns:
        (OrderedDict[label, CostRow], BinaryFlopAnalyzer)
    """
    if parts is None:
        parts = [('total', [''])]
    with _shifts_unfused(model):
        return _analyze_parts(model, inputs, parts, count_bn)


def _analyze_parts(model, inputs, parts, count_bn):
    analyzer = BinaryFlopAnalyzer(model, inputs, count_bn=count_bn)
    analyzer.by_operator()  # trace now, in the caller's context
    params = parameter_count(model)
    binary = binary_parameter_count(model)
    modules = _module_names(model)
    rows: 'OrderedDict[str, CostRow]' = OrderedDict()
    for label, names in parts:
        row = CostRow(label)
        for name in names:
            if name not in modules and name not in params:
                raise KeyError(f'{name!r} is neither a submodule nor a '
                               f'parameter of {type(model).__name__}')
            row.params += params.get(name, 0)
            row.binary_params += binary.get(name, 0)
            if name in modules:
                row.bops += analyzer.bops(name)
                row.flops += analyzer.flops(name)
                row.binary_macs += analyzer.binary_macs(name)
        rows[label] = row
    return rows, analyzer


#: Block types of the BHViT backbone whose costs :func:`analyze_config`
#: reports apart (none of them nests another).
BREAKDOWN_TYPES = ('ConvStem', 'PatchMerging', 'MSGDC', 'MSMHA', 'BinaryFFN',
                   'ShiftBranches')


def cost_by_module_type(model: nn.Module, analyzer: BinaryFlopAnalyzer,
                        types: Sequence[str] = BREAKDOWN_TYPES,
                        prefix: str = '') -> List[CostRow]:
    """Summed cost of all submodules of ``model`` (under ``prefix``)
    whose class name is in ``types``, one row per type."""
    params = parameter_count(model)
    binary = binary_parameter_count(model)
    rows = OrderedDict((t, CostRow(t, kind='breakdown')) for t in types)
    for name, module in model.named_modules():
        row = rows.get(type(module).__name__)
        if row is None or not name.startswith(prefix):
            continue
        row.params += params.get(name, 0)
        row.binary_params += binary.get(name, 0)
        row.bops += analyzer.bops(name)
        row.flops += analyzer.flops(name)
        row.binary_macs += analyzer.binary_macs(name)
    return [r for r in rows.values() if r.params or r.bops or r.flops]


def _difference(name: str, whole: CostRow, pieces: Iterable[CostRow],
                kind: str) -> Optional[CostRow]:
    rest = CostRow(name, whole.params, whole.binary_params, whole.bops,
                   whole.flops, whole.binary_macs, kind)
    for p in pieces:
        rest.params -= p.params
        rest.binary_params -= p.binary_params
        rest.bops -= p.bops
        rest.flops -= p.flops
        rest.binary_macs -= p.binary_macs
    if any((rest.params, rest.binary_params, rest.bops, rest.flops)):
        return rest
    return None


def _with_kind(row: CostRow, kind: str, name: Optional[str] = None):
    row.kind = kind
    if name is not None:
        row.name = name
    return row


def analyze_config(config: Union[str, Config],
                   shape: Optional[Sequence[int]] = None,
                   full_precision: bool = False,
                   count_bn: bool = True,
                   cfg_options: Optional[dict] = None) -> ComplexityReport:
    """Params, BOPs, FLOPs and OPs of the model of a config, in total and
    per part, for one image.

    Classification configs (default 224×224): stem, stage1–4 (each with the
    patch merging that opens it), final norm, backbone, neck, head, total.
    Segmentation configs (default 512×512): the backbone parts, backbone,
    neck, decode head, resize of the logits to the input, the inference
    total, and the auxiliary head(s) apart (they only run in training; they
    are not in the total).

    Args:
        config (str | Config): config path or object.
        shape (tuple[int, int], optional): input ``(H, W)``.
        full_precision (bool): analyse the full-precision counterpart
            (``weight_bits=act_bits=32`` on the backbone).
        count_bn (bool): count BatchNorm (see :class:`BinaryFlopAnalyzer`).
        cfg_options (dict, optional): overrides merged into the config.
    """
    model = build_model(config, cfg_options=cfg_options,
                        full_precision=full_precision, student_only=True)
    task = model.task
    if shape is None:
        shape = (224, 224) if task == 'classification' else (512, 512)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f'shape must be (H, W), got {shape}')
    in_channels = getattr(model.backbone, 'in_channels', 3)
    inputs = torch.randn(1, in_channels, *shape)
    if task == 'classification':
        graph = ClassifierGraph(model).eval()
        components = ['neck', 'head']
    else:
        graph = SegmentorGraph(model).eval()
        components = ['neck', 'decode_head', 'resize']
    components = [c for c in components if getattr(graph, c) is not None]
    extras = []
    if task == 'segmentation' and graph.auxiliary_head is not None:
        extras = ['auxiliary_head']
    stage_parts = backbone_parts(graph.backbone)
    parts = stage_parts + [('backbone', ['backbone'])]
    parts += [(c, [c]) for c in components + extras] + [('model', [''])]
    with torch.no_grad():
        costs, analyzer = analyze_model(graph, (inputs, ), parts, count_bn)

    rows = [_with_kind(costs[label], 'part') for label, _ in stage_parts]
    if stage_parts:
        rest = _difference('backbone (other)', costs['backbone'],
                           rows, 'part')
        if rest is not None:
            rows.append(rest)
    rows.append(_with_kind(costs['backbone'], 'subtotal'))
    component_rows = [costs['backbone']]
    for c in components:
        rows.append(_with_kind(costs[c], 'subtotal',
                               'resize to input' if c == 'resize' else c))
        component_rows.append(costs[c])
    extra_rows = [
        _with_kind(costs[e], 'extra', f'{e} (training only)') for e in extras
    ]
    total = CostRow('total', kind='total')
    for r in component_rows:
        total = total + r
    total.name, total.kind = 'total' if not extras else \
        'total (inference)', 'total'
    rest = _difference('other', costs['model'], component_rows + extra_rows,
                       'subtotal')
    if rest is not None:
        rows.append(rest)
        total = total + rest
        total.kind = 'total'
    rows.append(total)
    rows.extend(extra_rows)
    breakdown = cost_by_module_type(graph, analyzer, prefix='backbone.')
    if breakdown:
        rest = _difference('other (block norms, final norm, ...)',
                           costs['backbone'], breakdown, 'breakdown')
        if rest is not None:
            breakdown.append(rest)
    config_name = config if isinstance(config, str) else \
        getattr(config, 'filename', None) or '<config>'
    return ComplexityReport(
        config=config_name, task=task, input_shape=(1, in_channels) + shape,
        full_precision=full_precision, count_bn=count_bn, rows=rows,
        uncounted=dict(sorted(analyzer.unsupported_ops('').items())),
        breakdown=breakdown)
