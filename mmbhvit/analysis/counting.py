# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
r"""Counting BOPs, FLOPs and 1-bit parameters of binary networks.

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
  resizing, ...) is **not counted**;
  :meth:`~mmbhvit.analysis.ComplexityReport.uncounted_ops` lists them for a
  given model.

What this module adds are handles for the MAC operators
(``aten::_convolution``, ``matmul``, ``mm``, ``bmm``, ``linear``, ``addmm``)
that look at *where each operand comes from* in the traced graph
(:func:`operand_bits`): when both operands are quantized maps, the MACs are
reported as BOPs instead of FLOPs, multiplied by the product of the operand
bit widths (a 1-bit × 2-bit product costs 2 binary products, the usual
bit-serial decomposition). The bit width of a quantized map is the
``precision`` its quantizer declares
(:class:`~mmbhvit.models.binary.QuantizerFunction`). Because the decision
follows the data, it does not depend on which module's ``forward`` ran the
op: the three convolutions of
:class:`~mmbhvit.models.backbones.bhvit.MSGDC`, run through
:meth:`~mmbhvit.models.binary.BinaryConv2d.forward_quantized` (a method
call, so the convolutions' own ``forward`` never runs), and the attention
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
from collections import Counter, defaultdict
from typing import Dict, Mapping, Optional, Tuple, Union

from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import (addmm_flop_jit, conv_flop_jit,
                                           get_shape, linear_flop_jit,
                                           matmul_flop_jit)
from torch import Tensor, nn

from ..models.binary.layers import binary_conv_layers
from ..models.binary.quantizers import (ScaleGrad, integer_range_bits,
                                        quantizer_function)

#: A BOP costs 1/64 of a FLOP in ``OPs = BOPs / 64 + FLOPs``.
BOPS_PER_FLOP = 64
#: Counter keys of binary products start with this prefix; the key ends
#: with the operand bit widths, e.g. ``bop_matmul_1x2``.
BOP_PREFIX = 'bop_'
#: Kind of the trace node of a ``torch.autograd.Function``; the node's
#: ``pyname()`` is the Function's class name.
PYTHON_OP = 'prim::PythonOp'
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
                 f'{PYTHON_OP}.{ScaleGrad.__name__}')
_MAX_DEPTH = 64


def _kind(node) -> str:
    kind = node.kind()
    if kind == PYTHON_OP:
        kind = f'{kind}.{node.pyname()}'
    return kind


def _quantizer(node):
    """The :class:`~mmbhvit.models.binary.QuantizerFunction` that a trace
    node ran, or None."""
    if node.kind() != PYTHON_OP:
        return None
    return quantizer_function(node.pyname())


def _rounds(node) -> bool:
    """Whether the node outputs integers (``aten::round`` or an
    integer-valued quantizer such as ``RoundSTE``)."""
    if node.kind() == 'aten::round':
        return True
    quantizer = _quantizer(node)
    return quantizer is not None and quantizer.integer_valued


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

    * a quantizer Function (``prim::PythonOp``) → the ``precision`` its
      class declares (:func:`~mmbhvit.models.binary.quantizer_function`
      finds the class from the node's name); ``aten::sign`` → 1;
    * ``clamp(round(x), lo, hi)`` (``aten::round`` or an integer-valued
      quantizer) → ``ceil(log2(hi - lo + 1))`` bits;
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
    if node.kind() == PYTHON_OP:
        quantizer = _quantizer(node)
        return None if quantizer is None else quantizer.precision
    if kind == 'aten::sign':
        return 1
    if kind in LAYOUT_OPS:
        return operand_bits(inputs[0], _depth + 1)
    if kind in ('aten::clamp', 'aten::clamp_'):
        source = _skip_layout(inputs[0])
        if _rounds(source.node()):
            lo, hi = _constant(inputs[1]), _constant(inputs[2])
            if lo is None or hi is None:
                return None
            return integer_range_bits(lo, hi)
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
            **{op: _no_cost if op.startswith(f'{PYTHON_OP}.') else None
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


def binary_parameter_count(model: nn.Module) -> Dict[str, int]:
    """Like :func:`mmengine.analysis.parameter_count`, for the 1-bit
    parameters only: the weights of ``BinaryConv2d`` layers with
    ``weight_bits == 1`` (their biases stay in floating point)."""
    count: Dict[str, int] = defaultdict(int)
    for name, layer in binary_conv_layers(model, weight_bits=1):
        parts = (name.split('.') if name else []) + ['weight']
        for k in range(len(parts) + 1):
            count['.'.join(parts[:k])] += layer.weight.numel()
    return count
