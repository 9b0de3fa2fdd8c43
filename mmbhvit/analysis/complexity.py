# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""Cost of binary networks: BOPs, FLOPs, OPs and (1-bit) parameters.

Binary-network papers count the cost of a model as

.. math:: \text{OPs} = \text{BOPs} / 64 + \text{FLOPs}

where a BOP is one multiply-accumulate (MAC) whose two operands are both
1-bit (64 of them fit in one 64-bit XNOR-popcount instruction) and FLOPs
are the remaining floating-point operations.

Counting is done by mmengine's :class:`~mmengine.analysis.FlopAnalyzer`,
which traces the model with ``torch.jit`` and sums per-operator handles over
the modules that ran them. Conventions are mmengine's:

* **one MAC = one FLOP** (a fused multiply-add is one operation);
* convolutions, matmuls and linear layers count their MACs; BatchNorm counts
  2 per element in eval mode (1 without affine), ``layer_norm`` /
  ``group_norm`` 5, bilinear upsampling 4 and nearest 1 per output element,
  adaptive average pooling 1 per input element;
* every other element-wise op (add, mul, sub, div, PReLU, GELU, softmax,
  sign, mean, pow, sqrt, max/avg pooling, ``repeat_interleave``, bicubic
  resizing, ...) is **not counted**; :meth:`ComplexityReport.uncounted_ops`
  lists them for a given model.

What this module adds are handles for the MAC operators
(``aten::_convolution``, ``matmul``, ``mm``, ``bmm``, ``linear``, ``addmm``)
that look at *where each operand comes from* in the traced graph
(:func:`operand_bits`): when both operands are quantized maps, the MACs are
reported as BOPs instead of FLOPs, multiplied by the product of the operand
bit widths (a 1-bit × 2-bit product costs 2 binary products, the usual
bit-serial decomposition). Because the decision follows the data, it does
not depend on which module's ``forward`` ran the op: the three convolutions
of :class:`~mmbhvit.models.backbones.bhvit.MSGDC`, called through
``conv._conv_forward`` (outside ``BinaryConv2d.forward``), and the attention
products inside ``MSMHA.attend`` are found like any other op; they are
attributed to the module that ran them (``MSGDC``, ``MSMHA``).

In BHViT this gives:

* binary convolutions (sign-binarized input × sign-binarized weight) →
  BOPs, 1 per MAC;
* the attention products :math:`q^\top k` (both sign-binarized) → BOPs,
  1 per MAC;
* :math:`v P^\top` with sign-binarized ``v`` and a quantized ``P``: the LSQ
  quantizer (``LSQAttentionQuantizer``, 4 levels) makes ``P`` a 2-bit map →
  2 BOPs per MAC; GSB (``GSBAttentionBinarizer``) makes ``P`` three binary
  maps → 3 BOPs per MAC;
* everything else (the full-precision stem and patch merging, BN, heads,
  upsampling) → FLOPs, as far as mmengine counts it.

The binarization of weights (``abs``/``mean``/``sign`` of the latent
weights) is traced too, but it is neither a MAC nor counted: at deployment
the binary weights are precomputed.
"""
import math
import os.path as osp
from collections import Counter, OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from typing import (Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import (addmm_flop_jit, conv_flop_jit,
                                           get_shape, linear_flop_jit,
                                           matmul_flop_jit)
from mmengine.config import Config
from torch import Tensor, nn

#: A BOP costs 1/64 of a FLOP in ``OPs = BOPs / 64 + FLOPs``.
BOPS_PER_FLOP = 64
#: Counter keys of binary products start with this prefix; the key ends
#: with the operand bit widths, e.g. ``bop_matmul_1x2``.
BOP_PREFIX = 'bop_'

#: ``torch.autograd.Function`` names (``prim::PythonOp`` in a trace) whose
#: output is made of ``n`` binary planes. Extend it for new quantizers.
QUANTIZER_PLANES: Dict[str, int] = {
    'SignSTE': 1,  # activations: sign(x)
    'ClippedSignSTE': 1,  # weights: scale * sign(w), scale per out-channel
    '_GSBFunction': 3,  # GSB attention: alpha (T0 + b1 T1 + b2 T2)
}
#: Ops that produce integers; clamping them to ``[lo, hi]`` gives a
#: ``ceil(log2(hi - lo + 1))``-bit map (the LSQ attention quantizer).
ROUNDING_OPS = frozenset({'prim::PythonOp.RoundSTE', 'aten::round'})
#: Ops that only move, select or pad values: the bit width of their first
#: input carries over.
LAYOUT_OPS = frozenset({
    'aten::view', 'aten::reshape', 'aten::reshape_as', 'aten::transpose',
    'aten::t', 'aten::permute', 'aten::expand', 'aten::expand_as',
    'aten::contiguous', 'aten::unsqueeze', 'aten::squeeze', 'aten::flatten',
    'aten::unflatten', 'aten::slice', 'aten::select', 'aten::narrow',
    'aten::clone', 'aten::detach', 'aten::to', 'aten::repeat',
    'aten::constant_pad_nd', 'aten::pad', 'aten::chunk', 'aten::split',
    'aten::split_with_sizes', 'prim::ListUnpack'
})
#: Ops that cost nothing (copies, shape queries, identity autograd
#: Functions) but that mmengine does not ignore by itself; ignoring them
#: keeps :meth:`BinaryFlopAnalyzer.unsupported_ops` to real computations.
ZERO_COST_OPS = ('aten::pad', 'aten::repeat', 'aten::repeat_interleave',
                 'aten::reshape_as', 'aten::numel', 'aten::feature_dropout',
                 'prim::PythonOp.ScaleGrad')
_MAX_DEPTH = 64


def _kind(node) -> str:
    kind = node.kind()
    if kind == 'prim::PythonOp':
        kind = f'{kind}.{node.pyname()}'
    return kind


def _constant(value):
    node = value.node()
    return node.output().toIValue() if node.kind() == 'prim::Constant' \
        else None


def _numel(value) -> Optional[int]:
    shape = get_shape(value) if value.isCompleteTensor() else None
    return None if shape is None else math.prod(shape)


def _is_scale(scale, x) -> bool:
    """Whether ``scale`` broadcasts over ``x`` as a (per-channel/scalar)
    factor: a constant, or a tensor with fewer elements than ``x``."""
    if not scale.isCompleteTensor():
        return scale.node().kind() == 'prim::Constant'
    n_scale, n_x = _numel(scale), _numel(x)
    return n_x is not None and n_scale < n_x


def _skip_layout(value, depth: int = 0):
    while _kind(value.node()) in LAYOUT_OPS and depth < _MAX_DEPTH:
        value = next(iter(value.node().inputs()))
        depth += 1
    return value


def operand_bits(value, _depth: int = 0) -> Optional[int]:
    """Bit width (number of binary planes) of a traced tensor, or None when
    it is a full-precision tensor.

    Follows ``value`` back through layout-only ops (:data:`LAYOUT_OPS`) to
    the op that produced it:

    * a quantizer in :data:`QUANTIZER_PLANES` (or ``aten::sign``) → its
      planes;
    * ``clamp(round(x), lo, hi)`` → ``ceil(log2(hi - lo + 1))`` bits;
    * a quantized map times / divided by a scale (a constant or a smaller
      broadcast tensor) → the bits of the map (the scale is applied after
      the accumulation);
    * ``cat`` of quantized maps → the widest of them.

    Args:
        value (torch._C.Value): an input of a node of a traced graph.
    """
    if _depth > _MAX_DEPTH:
        return None
    node = value.node()
    kind = _kind(node)
    inputs = list(node.inputs())
    if kind.startswith('prim::PythonOp.'):
        return QUANTIZER_PLANES.get(kind.split('.', 1)[1])
    if kind == 'aten::sign':
        return 1
    if kind in LAYOUT_OPS:
        return operand_bits(inputs[0], _depth + 1)
    if kind in ('aten::clamp', 'aten::clamp_'):
        source = _skip_layout(inputs[0])
        if _kind(source.node()) in ROUNDING_OPS:
            lo, hi = _constant(inputs[1]), _constant(inputs[2])
            if lo is None or hi is None:
                return None
            return max(1, math.ceil(math.log2(int(hi) - int(lo) + 1)))
        return operand_bits(inputs[0], _depth + 1)
    if kind in ('aten::mul', 'aten::div'):
        bits = operand_bits(inputs[0], _depth + 1)
        if bits is not None and _is_scale(inputs[1], inputs[0]):
            return bits
        if kind == 'aten::mul':
            bits = operand_bits(inputs[1], _depth + 1)
            if bits is not None and _is_scale(inputs[0], inputs[1]):
                return bits
        return None
    if kind == 'aten::cat' and \
            inputs[0].node().kind() == 'prim::ListConstruct':
        parts = [
            operand_bits(v, _depth + 1) for v in inputs[0].node().inputs()
        ]
        if parts and None not in parts:
            return max(parts)
    return None


def _mac_handle(count_macs, name: str, operands: Tuple[int, int] = (0, 1)):
    """An op handle that counts MACs with ``count_macs`` (an mmengine
    handle) and files them as ``name`` (FLOPs) or, when both operands are
    quantized, as ``bop_<name>_<a>x<b>`` with ``a * b`` BOPs per MAC."""

    def handle(inputs, outputs) -> Counter:
        counted = count_macs(inputs, outputs)
        macs = sum(counted.values()) if isinstance(counted,
                                                   Mapping) else counted
        bits = [operand_bits(inputs[i]) for i in operands]
        if None in bits:
            return Counter({name: macs})
        lo, hi = sorted(bits)
        return Counter({f'{BOP_PREFIX}{name}_{lo}x{hi}': macs * lo * hi})

    return handle


def _no_cost(inputs, outputs) -> Counter:
    return Counter()


def _bits_product(key: str) -> int:
    lo, hi = key.rsplit('_', 1)[1].split('x')
    return int(lo) * int(hi)


class BinaryFlopAnalyzer(FlopAnalyzer):
    """:class:`~mmengine.analysis.FlopAnalyzer` that separates binary
    products (BOPs) from floating-point operations (FLOPs).

    ``by_operator(module)`` holds FLOPs under mmengine's operator names
    (``conv``, ``matmul``, ``batch_norm``, ...) and BOPs under
    ``bop_<op>_<a>x<b>`` keys (``a``, ``b``: operand bit widths). Because
    the two units mix, :meth:`total` (mmengine's plain sum) is not a cost;
    use :meth:`bops`, :meth:`flops`, :meth:`ops` instead. Warnings about
    uncounted operators are off; :meth:`unsupported_ops` lists them.

    Args:
        model (nn.Module): the model; traced in its current mode (call
            ``eval()`` first for inference costs).
        inputs (Tensor | tuple[Tensor]): inputs of ``model.forward``.
        count_bn (bool): count BatchNorm (mmengine: 2 FLOPs per element in
            eval mode). False treats BN as folded into the preceding layer.
    """

    def __init__(self, model: nn.Module, inputs: Union[Tensor, Tuple[Tensor,
                                                                     ...]],
                 count_bn: bool = True):
        super().__init__(model, inputs)
        self.set_op_handle(
            **{
                'aten::_convolution': _mac_handle(conv_flop_jit, 'conv'),
                'aten::matmul': _mac_handle(matmul_flop_jit, 'matmul'),
                'aten::mm': _mac_handle(matmul_flop_jit, 'mm'),
                'aten::bmm': _mac_handle(matmul_flop_jit, 'bmm'),
                'aten::linear': _mac_handle(linear_flop_jit, 'linear'),
                'aten::addmm': _mac_handle(addmm_flop_jit, 'addmm', (1, 2)),
            })
        # mmengine ignores only plain op kinds; a Python op is matched by
        # its full name, so it gets a handle that counts nothing.
        self.set_op_handle(
            **{op: _no_cost if op.startswith('prim::PythonOp.') else None
               for op in ZERO_COST_OPS})
        if not count_bn:
            # set_op_handle(name, None) does not drop a handle already set
            self._op_handles.pop('aten::batch_norm', None)
            self._ignored_ops.add('aten::batch_norm')
        self.unsupported_ops_warnings(False)
        self.uncalled_modules_warnings(False)
        self.tracer_warnings('none')

    def bops(self, module_name: str = '') -> int:
        """Binary operations (1-bit MACs, weighted by operand widths)."""
        return sum(v for k, v in self.by_operator(module_name).items()
                   if k.startswith(BOP_PREFIX))

    def flops(self, module_name: str = '') -> int:
        """Floating-point operations (a MAC counts 1)."""
        return sum(v for k, v in self.by_operator(module_name).items()
                   if not k.startswith(BOP_PREFIX))

    def binary_macs(self, module_name: str = '') -> int:
        """MACs whose operands are both quantized (each counted once,
        whatever the bit widths)."""
        return sum(v // _bits_product(k)
                   for k, v in self.by_operator(module_name).items()
                   if k.startswith(BOP_PREFIX))

    def ops(self, module_name: str = '') -> float:
        """``BOPs / 64 + FLOPs``."""
        return self.bops(module_name) / BOPS_PER_FLOP + self.flops(
            module_name)


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------
def binary_parameter_count(model: nn.Module) -> Dict[str, int]:
    """Like :func:`mmengine.analysis.parameter_count`, for the 1-bit
    parameters only: the weights of ``BinaryConv2d`` layers with
    ``weight_bits == 1`` (their biases stay in floating point)."""
    from ..models.binary.layers import binary_conv_layers
    count: Dict[str, int] = defaultdict(int)
    for name, layer in binary_conv_layers(model, weight_bits=1):
        parts = (name.split('.') if name else []) + ['weight']
        for k in range(len(parts) + 1):
            count['.'.join(parts[:k])] += layer.weight.numel()
    return count


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------
@dataclass
class CostRow:
    """Cost of one part of a model (or of the whole model)."""
    name: str
    params: int = 0
    binary_params: int = 0
    bops: int = 0
    flops: int = 0
    binary_macs: int = 0
    #: 'part' (a piece of a sub-total), 'subtotal', 'total' or 'extra'
    #: (reported apart from the inference total, e.g. an auxiliary head)
    kind: str = 'part'

    @property
    def ops(self) -> float:
        return self.bops / BOPS_PER_FLOP + self.flops

    def __add__(self, other: 'CostRow') -> 'CostRow':
        return CostRow(self.name, self.params + other.params,
                       self.binary_params + other.binary_params,
                       self.bops + other.bops, self.flops + other.flops,
                       self.binary_macs + other.binary_macs, self.kind)

    def to_dict(self) -> dict:
        d = asdict(self)
        d['ops'] = self.ops
        return d


def _module_names(model: nn.Module) -> set:
    return {name for name, _ in model.named_modules()}


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
    # Count the shift branches in their roll form (data movement plus one
    # gate per branch), not as the depthwise conv that fuses them for speed.
    from ..models.backbones.bhvit import ShiftBranches
    shifts = [m for m in model.modules() if isinstance(m, ShiftBranches)]
    for m in shifts:
        m.fused = False
    try:
        return _analyze_parts(model, inputs, parts, count_bn)
    finally:
        for m in shifts:
            m.fused = True


def _analyze_parts(model, inputs, parts, count_bn):
    analyzer = BinaryFlopAnalyzer(model, inputs, count_bn=count_bn)
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


def _fmt(value: float, unit: float, digits: int = 3) -> str:
    return f'{value / unit:.{digits}f}'


@dataclass
class ComplexityReport:
    """Costs of a model built from a config, part by part."""
    config: str
    task: str
    input_shape: Tuple[int, ...]
    full_precision: bool
    count_bn: bool
    rows: List[CostRow] = field(default_factory=list)
    uncounted: Dict[str, int] = field(default_factory=dict)
    #: backbone cost by block type (see :data:`BREAKDOWN_TYPES`)
    breakdown: List[CostRow] = field(default_factory=list)

    def row(self, name: str) -> CostRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f'no row {name!r}; rows: {[r.name for r in self.rows]}')

    @property
    def total(self) -> CostRow:
        return next(r for r in self.rows if r.kind == 'total')

    def uncounted_ops(self) -> Dict[str, int]:
        """Operators traced but not counted (mmengine has no handle for
        them), with how many times each ran."""
        return dict(self.uncounted)

    def to_dict(self) -> dict:
        return dict(config=self.config, task=self.task,
                    input_shape=list(self.input_shape),
                    full_precision=self.full_precision,
                    count_bn=self.count_bn,
                    rows=[r.to_dict() for r in self.rows],
                    breakdown=[r.to_dict() for r in self.breakdown],
                    uncounted_ops=self.uncounted_ops())

    def to_markdown(self) -> str:
        """A markdown table (params in M, BOPs/FLOPs/OPs in G = 1e9)."""
        head = ('| part | params (M) | 1-bit params (M) | BOPs (G) | '
                'FLOPs (G) | OPs (G) |')
        lines = [head, '|' + '---|' * 6]
        for r in self.rows:
            name = r.name
            if r.kind == 'part':
                name = '&nbsp;&nbsp;' + name
            elif r.kind in ('total', 'subtotal'):
                name = f'**{name}**'
            lines.append(f'| {name} | {_fmt(r.params, 1e6, 2)} | '
                         f'{_fmt(r.binary_params, 1e6, 2)} | '
                         f'{_fmt(r.bops, 1e9)} | {_fmt(r.flops, 1e9)} | '
                         f'{_fmt(r.ops, 1e9)} |')
        return '\n'.join(lines)

    def breakdown_markdown(self) -> str:
        """The backbone cost by block type, as a markdown table."""
        lines = ['| backbone block type | params (M) | BOPs (G) | FLOPs (G) '
                 '| OPs (G) |', '|' + '---|' * 5]
        for r in self.breakdown:
            lines.append(f'| {r.name} | {_fmt(r.params, 1e6, 2)} | '
                         f'{_fmt(r.bops, 1e9)} | {_fmt(r.flops, 1e9)} | '
                         f'{_fmt(r.ops, 1e9)} |')
        return '\n'.join(lines)

    def summary(self) -> str:
        t = self.total
        shape = '×'.join(str(s) for s in self.input_shape[-2:])
        kind = 'full-precision counterpart' if self.full_precision \
            else 'binary'
        return (f'{osp.basename(self.config)} ({self.task}, {kind}, input '
                f'{shape}): params {t.params / 1e6:.2f} M (1-bit '
                f'{t.binary_params / 1e6:.2f} M), BOPs {t.bops / 1e9:.3f} G, '
                f'FLOPs {t.flops / 1e9:.3f} G, OPs {t.ops / 1e8:.3f} ×10^8')


# --------------------------------------------------------------------------
# Traceable graphs of whole models
# --------------------------------------------------------------------------
class ClassifierGraph(nn.Module):
    """backbone → neck → head of an mmpretrain classifier as one traceable
    ``forward(images)`` (the data preprocessor is left out). Sub-module
    names stay ``backbone``, ``neck``, ``head``."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.backbone = classifier.backbone
        self.neck = classifier.neck if getattr(classifier, 'with_neck',
                                               False) else None
        self.head = classifier.head

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.head(feats)


class ResizeToInput(nn.Module):
    """Bilinear resize of the logits to the input size, as in mmseg's
    ``encode_decode`` (``decode_head.predict_by_feat``)."""

    def __init__(self, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, logits: Tensor, image: Tensor) -> Tensor:
        return nn.functional.interpolate(
            logits, size=image.shape[-2:], mode='bilinear',
            align_corners=self.align_corners)


class SegmentorGraph(nn.Module):
    """backbone → neck → decode head → resize to input of an mmseg
    ``EncoderDecoder`` as one traceable ``forward(images)``; the auxiliary
    head(s) (training only) also run on the neck outputs so that their cost
    can be reported apart."""

    def __init__(self, segmentor: nn.Module, with_auxiliary: bool = True):
        super().__init__()
        if isinstance(segmentor.decode_head, nn.ModuleList):
            raise NotImplementedError(
                'cascaded decode heads are not supported; got '
                f'{type(segmentor).__name__}')
        self.backbone = segmentor.backbone
        self.neck = segmentor.neck if getattr(segmentor, 'with_neck',
                                              False) else None
        self.decode_head = segmentor.decode_head
        self.resize = ResizeToInput(
            getattr(segmentor.decode_head, 'align_corners', False))
        aux = getattr(segmentor, 'auxiliary_head', None)
        self.auxiliary_head = aux if with_auxiliary else None

    def forward(self, x: Tensor):
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        logits = self.resize(self.decode_head(feats), x)
        if self.auxiliary_head is None:
            return logits
        if isinstance(self.auxiliary_head, nn.ModuleList):
            return (logits, ) + tuple(h(feats) for h in self.auxiliary_head)
        return logits, self.auxiliary_head(feats)


def backbone_parts(backbone: nn.Module, prefix: str = 'backbone.'
                   ) -> List[Tuple[str, List[str]]]:
    """Per-stage parts of a BHViT backbone (``[]`` for other backbones):
    stem (+ its positional embedding), stage *i* with the patch merging that
    opens it, final norm."""
    from ..models import BHViT
    if not isinstance(backbone, BHViT):
        return []
    parts = [('stem', [prefix + 'patch_embed', prefix + 'pos_embed'])]
    for i in range(len(backbone.stages)):
        names = [f'{prefix}stages.{i}']
        if i > 0:
            names.insert(0, f'{prefix}downsamples.{i - 1}')
        parts.append((f'stage{i + 1}', names))
    if getattr(backbone, 'final_norm', False):
        parts.append(('final norm', [prefix + 'norm']))
    return parts


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
    from ..apis import build_model
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
