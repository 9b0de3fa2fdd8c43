# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""ONNX export of BHViT classifiers and segmentors, and running the file
with ONNX Runtime or OpenVINO.

* :func:`export_onnx` writes a plain ONNX file (standard operators only: the
  binary layers are ``Sign`` + float ``Conv`` / ``MatMul``) with a static or
  a dynamic ``N x H x W`` input;
* :func:`run_onnx` runs a file on a NumPy batch (``'onnxruntime'`` or
  ``'openvino'``), reusing the compiled model between calls;
* :func:`compare_outputs` measures an ONNX output against PyTorch's.

What is exported (:class:`ExportWrapper`): the input is the *preprocessed*
batch (normalised, RGB/BGR as the data preprocessor makes it; the mean, std
and channel order are stored in the file's metadata); the output is

* classifier: the logits of ``model(x, mode='tensor')`` (before softmax),
  ``(N, num_classes)``;
* segmentor: the logits of ``model(x, mode='tensor')`` resized (bilinearly,
  with the decode head's ``align_corners``) to the input's ``H x W``, as
  mmseg's ``predict`` does before its argmax: ``(N, num_classes, H, W)``.
  ``seg_resize=False`` keeps the decode head's 1/4-resolution logits;
* anything else (a backbone): its output tensors, ``output0, output1...``.

The exporter is torch's TorchScript-based ``torch.onnx.export(...,
dynamo=False)``: it exports a dynamic ``H x W`` graph of the demo
segmentor in seconds, inlines the sign/STE autograd Functions into plain
``Sign`` nodes; the binarized weights are stored as constants
(:func:`frozen_quantized_weights`). The model's
shape-dependent Python (padding to multiples, positional-embedding resize,
window counts, shift padding) computes in the graph while traced (see
:mod:`mmbhvit.models.layout`); mmseg's ``AdaptiveAvgPool2d`` (UPerHead's
pyramid pooling), which that exporter cannot export for a dynamic input, is
traced as two averaging matrix products (:func:`adaptive_avg_pool2d_traceable`)
during the export only.
"""
import contextlib
import functools
import io
import os
import os.path as osp
import warnings
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    'DEFAULT_OPSET', 'RUNTIMES', 'ExportWrapper', 'OnnxVerificationError',
    'adaptive_avg_pool2d_traceable', 'available_runtimes', 'compare_outputs',
    'export_onnx', 'load_runtime', 'probe_batch', 'run_onnx', 'task_of_model',
    'frozen_quantized_weights', 'traceable_adaptive_pools', 'verify_onnx'
]

DEFAULT_OPSET = 17
RUNTIMES = ('onnxruntime', 'openvino')


class OnnxVerificationError(AssertionError):
    """An ONNX file whose outputs do not reproduce the PyTorch model."""


# --------------------------------------------------------------------------
# What is exported
# --------------------------------------------------------------------------
def task_of_model(model: nn.Module) -> str:
    """``'segmentation'`` (an mmseg segmentor), ``'classification'`` (an
    mmpretrain classifier) or ``'module'`` (anything else)."""
    from mmpretrain.models.classifiers import BaseClassifier
    from mmseg.models.segmentors import BaseSegmentor
    if isinstance(model, BaseSegmentor):
        return 'segmentation'
    if isinstance(model, BaseClassifier):
        return 'classification'
    return 'module'


class ExportWrapper(nn.Module):
    """The exported function of a model: ``forward(x)`` on a preprocessed
    NCHW batch, outputs as described in the module docstring."""

    def __init__(self, model: nn.Module, seg_resize: bool = True):
        super().__init__()
        self.model = model
        self.task = task_of_model(model)
        self.seg_resize = seg_resize

    def forward(self, x: Tensor):
        if self.task == 'module':
            return self.model(x)
        out = self.model(x, mode='tensor')
        if self.task == 'segmentation' and self.seg_resize:
            out = F.interpolate(out, size=x.shape[2:], mode='bilinear',
                                align_corners=self.align_corners)
        return out

    @property
    def align_corners(self) -> bool:
        return bool(getattr(self.model.decode_head, 'align_corners', False))


# --------------------------------------------------------------------------
# Adaptive average pooling with a dynamic input size
# --------------------------------------------------------------------------
def _bin_matrix(n, k: int, like: Tensor) -> Tensor:
    """``(k, n)`` matrix averaging the ``k`` adaptive-pooling bins of a
    length ``n`` (bin ``i`` covers ``floor(i n / k) .. ceil((i + 1) n / k)
    - 1``, PyTorch's rule); ``n`` may be a traced size."""
    i = torch.arange(k, device=like.device)
    start = torch.div(i * n, k, rounding_mode='floor')
    end = torch.div((i + 1) * n + k - 1, k, rounding_mode='floor')
    j = torch.arange(n, device=like.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    weight = inside.to(like.dtype)
    return weight / weight.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d_traceable(x: Tensor, output_size) -> Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` as two matrix products with
    bin-averaging matrices built from ``x``'s (possibly traced) size: the
    same bins and values (up to float rounding: products with ``1/len``
    instead of a sum divided by ``len``), for any input size, in standard
    ONNX operators."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    h, w = x.shape[-2:]
    kh = h if output_size[0] is None else output_size[0]
    kw = w if output_size[1] is None else output_size[1]
    rows = _bin_matrix(h, int(kh), x)
    cols = _bin_matrix(w, int(kw), x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _is_global(output_size) -> bool:
    sizes = (output_size, ) * 2 if isinstance(output_size, int) else \
        tuple(output_size)
    return all(s == 1 for s in sizes)


@contextlib.contextmanager
def traceable_adaptive_pools(model: nn.Module) -> Iterator[int]:
    """Inside the block, every ``nn.AdaptiveAvgPool2d`` of ``model`` whose
    output is not 1 x 1 (exported as ``GlobalAveragePool`` as it is) runs
    :func:`adaptive_avg_pool2d_traceable`; yields how many were switched."""
    switched = []
    for m in model.modules():
        if isinstance(m, nn.AdaptiveAvgPool2d) and \
                not _is_global(m.output_size):
            m.forward = functools.partial(adaptive_avg_pool2d_traceable,
                                          output_size=m.output_size)
            switched.append(m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.forward


@contextlib.contextmanager
def frozen_quantized_weights(model: nn.Module) -> Iterator[int]:
    """Inside the block, every ``BinaryConv2d`` of ``model`` returns its
    quantized weight (binarized: ``scale * sign``) computed once, as a
    constant: the export stores it instead of the ops that binarize the
    float weight (which the exporter's constant folding leaves in). Same
    values; yields how many were frozen."""
    from ..models.binary import BinaryConv2d
    frozen = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryConv2d):
                weight = m.quantized_weight().detach().clone()
                m.quantized_weight = functools.partial(_constant, weight)
                frozen.append(m)
    try:
        yield len(frozen)
    finally:
        for m in frozen:
            del m.quantized_weight


def _constant(value: Tensor) -> Tensor:
    return value


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
def _check_shape(input_shape) -> Tuple[int, int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0
                                  for s in shape):
        raise ValueError('export_onnx: input_shape must be 4 positive ints '
                         f'(N, C, H, W), got {input_shape!r}')
    return shape


def _preprocess_metadata(model: nn.Module) -> Dict[str, str]:
    """mean / std / channel order of the model's data preprocessor."""
    meta = {}
    pre = getattr(model, 'data_preprocessor', None)
    if pre is None:
        return meta
    for key in ('mean', 'std'):
        value = getattr(pre, key, None)
        if isinstance(value, Tensor):
            meta[key] = ','.join(f'{v:g}' for v in value.flatten().tolist())
    if 'mean' not in meta:
        meta['normalization'] = 'none'
    to_rgb = getattr(pre, 'channel_conversion', None)
    if to_rgb is None:
        to_rgb = getattr(pre, 'to_rgb', None)
    if to_rgb is not None:
        meta['input_channels'] = 'RGB' if to_rgb else 'as loaded (BGR)'
    return meta


def export_onnx(model: nn.Module,
                path: str,
                *,
                input_shape: Sequence[int] = (1, 3, 224, 224),
                dynamic: bool = False,
                opset: Optional[int] = None,
                seg_resize: bool = True,
                metadata: Optional[Dict[str, str]] = None) -> str:
    """Export ``model`` to the ONNX file ``path`` and return ``path``.

    Args:
        model (nn.Module): an mmpretrain classifier, an mmseg segmentor
            (e.g. from :func:`mmbhvit.apis.build_model`) or any module
            taking one NCHW batch. Exported in eval mode (its mode is
            restored afterwards); its weights are not changed.
        path (str): the ``.onnx`` file, written atomically (nothing is left
            behind when the export fails).
        input_shape: ``(N, C, H, W)`` of the example input the graph is
            traced with. With ``dynamic=False`` the file accepts exactly
            this shape.
        dynamic (bool): batch size, height and width become dynamic
            (``batch``, ``height``, ``width``): one file for every size
            the model accepts (H, W >= 32 for BHViT).
        opset (int, optional): ONNX opset, default :data:`DEFAULT_OPSET`.
        seg_resize (bool): segmentors: resize the logits to the input size
            (default) or keep the decode head's resolution.
        metadata (dict, optional): extra ``metadata_props`` (str to str).

    The file's ``metadata_props`` record the task, the output, the shapes
    and the data preprocessor's mean / std / channel order.
    """
    import onnx  # noqa: F401  (the checker below; a clear ImportError)
    shape = _check_shape(input_shape)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    wrapper = ExportWrapper(model, seg_resize=seg_resize)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    if param is not None:
        example = example.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), traceable_adaptive_pools(model), \
                frozen_quantized_weights(model):
            names, axes = _output_axes(wrapper, example, dynamic)
            buf = io.BytesIO()
            with warnings.catch_warnings():
                # the TorchScript exporter's deprecation notices; we choose
                # it on purpose (module docstring)
                warnings.filterwarnings(
                    'ignore', message='.*legacy TorchScript-based ONNX')
                warnings.filterwarnings(
                    'ignore', message='The feature will be removed')
                # the attention quantizer reads two sizes as Python values:
                # its heads check (a constant) and its gradient scale (not
                # used by the forward pass); neither changes the graph
                warnings.filterwarnings(
                    'ignore', category=torch.jit.TracerWarning,
                    module=r'mmbhvit\.models\.binary\.attention')
                torch.onnx.export(
                    wrapper, (example, ), buf, dynamo=False,
                    input_names=['input'], output_names=list(names),
                    dynamic_axes=axes, opset_version=opset,
                    do_constant_folding=True)
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    _constants_to_initializers(proto)
    meta = {
        'producer': 'mmbhvit.deploy.onnx',
        'task': wrapper.task,
        'input': 'preprocessed NCHW float batch',
        'output': _output_description(wrapper),
        'example_shape': 'x'.join(map(str, shape)),
        'dynamic': str(bool(dynamic)),
    }
    meta.update(_preprocess_metadata(model))
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    from ..utils.io import atomic_write
    with atomic_write(path, 'wb') as f:
        f.write(proto.SerializeToString())
    return path


def _constants_to_initializers(proto, min_elements: int = 16) -> None:
    """Turn the ``Constant`` nodes holding tensors of at least
    ``min_elements`` values (the frozen binarized weights) into graph
    initializers, where the other weights are and where tools such as ONNX
    Runtime's quantizer look for weights. Same graph, same values."""
    keep = []
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        value = attrs.get('value')
        if node.op_type == 'Constant' and len(attrs) == 1 and \
                value is not None and value.t.dims and \
                int(np.prod(value.t.dims)) >= min_elements:
            tensor = proto.graph.initializer.add()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _output_axes(wrapper: ExportWrapper, example: Tensor, dynamic: bool):
    """Output names and, when ``dynamic``, the ``dynamic_axes`` of
    ``torch.onnx.export`` (the input's batch, height and width; the
    outputs' batch and spatial sizes, the input's for resized logits)."""
    if wrapper.task == 'classification':
        names, ranks = ('output', ), (2, )
    elif wrapper.task == 'segmentation':
        names, ranks = ('output', ), (4, )
    else:  # a plain module: one forward tells its outputs
        out = wrapper(example)
        outs = (out, ) if isinstance(out, Tensor) else tuple(out)
        names = ('output', ) if isinstance(out, Tensor) else tuple(
            f'output{i}' for i in range(len(outs)))
        ranks = tuple(o.dim() for o in outs)
    if not dynamic:
        return names, None
    axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    for name, rank in zip(names, ranks):
        axes[name] = {0: 'batch'}
        if rank == 4 and wrapper.task == 'segmentation' and wrapper.seg_resize:
            axes[name].update({2: 'height', 3: 'width'})
        elif rank == 4:
            axes[name].update({2: f'{name}_height', 3: f'{name}_width'})
    return names, axes


def _output_description(wrapper: ExportWrapper) -> str:
    if wrapper.task == 'classification':
        return 'logits (N, num_classes), before softmax'
    if wrapper.task == 'segmentation':
        if wrapper.seg_resize:
            return ('logits (N, num_classes, H, W) resized to the input '
                    f'(bilinear, align_corners={wrapper.align_corners})')
        return 'logits (N, num_classes, H/4, W/4) of the decode head'
    return 'the module outputs'


# --------------------------------------------------------------------------
# Running an exported file
# --------------------------------------------------------------------------
def available_runtimes() -> Tuple[str, ...]:
    """The runtimes of :data:`RUNTIMES` that can be imported here."""
    found = []
    for name in RUNTIMES:
        try:
            __import__(name)
        except ImportError:
            continue
        found.append(name)
    return tuple(found)


class _Session:
    """A compiled ONNX file: ``session(array) -> array`` (first output)."""

    def __init__(self, path: str, runtime: str, threads: Optional[int]):
        self.path, self.runtime = path, runtime
        if runtime == 'onnxruntime':
            import onnxruntime as ort
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
                options.inter_op_num_threads = 1
            self._sess = ort.InferenceSession(
                path, options, providers=['CPUExecutionProvider'])
            inp = self._sess.get_inputs()[0]
            self.input_name, self.input_shape = inp.name, list(inp.shape)
        elif runtime == 'openvino':
            import openvino as ov
            config = {'INFERENCE_PRECISION_HINT': 'f32'}
            if threads:
                config['INFERENCE_NUM_THREADS'] = int(threads)
            core = ov.Core()
            self._compiled = core.compile_model(core.read_model(path), 'CPU',
                                                config)
            self.input_name = None
            self.input_shape = [
                d.get_length() if d.is_static else None
                for d in self._compiled.input(0).get_partial_shape()
            ]
        else:
            raise ValueError(f'runtime must be one of {RUNTIMES}, got '
                             f'{runtime!r}')

    def check(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f'run_onnx({self.path}): inputs must be a NumPy '
                            f'array, got {type(x).__name__}')
        if x.dtype != np.float32:
            raise TypeError(f'run_onnx({self.path}): inputs must be float32 '
                            f'(the exported graph is float32), got {x.dtype}')
        if x.ndim != len(self.input_shape):
            raise ValueError(f'run_onnx({self.path}): inputs must be '
                             f'{len(self.input_shape)}-D, got shape '
                             f'{x.shape}')
        for got, want in zip(x.shape, self.input_shape):
            if isinstance(want, int) and got != want:
                raise ValueError(
                    f'run_onnx({self.path}): the file was exported for a '
                    f'static input {tuple(self.input_shape)}, got {x.shape} '
                    '(export with dynamic=True / --dynamic for other '
                    'sizes)')
        return np.ascontiguousarray(x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.check(x)
        if self.runtime == 'onnxruntime':
            return self._sess.run(None, {self.input_name: x})[0]
        return self._compiled(x)[self._compiled.output(0)]


@functools.lru_cache(maxsize=4)
def _cached_session(path: str, stamp: Tuple[int, int], runtime: str,
                    threads: Optional[int]) -> _Session:
    return _Session(path, runtime, threads)


def load_runtime(path: str, runtime: str = 'onnxruntime',
                 threads: Optional[int] = None) -> _Session:
    """The ONNX file ``path`` compiled by ``runtime`` (on the CPU, float32):
    a callable from a float32 NCHW array to the first output. Reused for
    the same file (same size and modification time), runtime and threads.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got '
                         f'{runtime!r}')
    if not osp.isfile(path):
        raise FileNotFoundError(f'ONNX file not found: {path}')
    if threads is not None and int(threads) < 1:
        raise ValueError(f'threads must be >= 1 (or None: the runtime\'s '
                         f'default), got {threads}')
    try:
        __import__(runtime)
    except ImportError as e:
        raise ImportError(f'{runtime} is not installed ({e}); install the '
                          "ONNX extras: pip install 'mmbhvit[onnx]'") from e
    st = os.stat(path)
    return _cached_session(osp.realpath(path), (st.st_mtime_ns, st.st_size),
                           runtime, None if threads is None else int(threads))


def run_onnx(path: str,
             inputs: np.ndarray,
             runtime: str = 'onnxruntime',
             threads: Optional[int] = None) -> np.ndarray:
    """Run the ONNX file ``path`` on ``inputs`` (a float32 NCHW array) with
    ``runtime`` (``'onnxruntime'`` or ``'openvino'``, CPU, float32
    precision) and return its first output. ``threads``: intra-op threads
    (None: the runtime's default). The compiled model is kept for the next
    call with the same file, runtime and threads (:func:`load_runtime`), so
    repeated calls time inference, not compilation."""
    return load_runtime(path, runtime, threads)(inputs)


# --------------------------------------------------------------------------
# Comparing with PyTorch
# --------------------------------------------------------------------------
def compare_outputs(ref: np.ndarray, out: np.ndarray,
                    task: str) -> Dict[str, float]:
    """Differences of an ONNX output ``out`` from PyTorch's ``ref``:
    ``max_abs_diff``, ``max_rel_diff`` (relative to ``max|ref|``) and
    ``agreement``: the fraction of equal argmaxes over dim 1 (the
    predicted classes of a classifier, the pixels of a segmentor)."""
    if ref.shape != out.shape:
        raise OnnxVerificationError(f'output shape {out.shape} differs from '
                                    f'PyTorch\'s {ref.shape}')
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    scale = max(float(np.abs(ref).max()), 1e-12)
    result = dict(max_abs_diff=float(diff.max()),
                  max_rel_diff=float(diff.max()) / scale)
    if task in ('classification', 'segmentation') and ref.ndim >= 2:
        result['agreement'] = float(
            (ref.argmax(axis=1) == out.argmax(axis=1)).mean())
    return result


def probe_batch(model: nn.Module, shape: Sequence[int],
                image: Optional[str] = None, seed: int = 0) -> Tensor:
    """A float32 ``(N, C, H, W)`` probe input for :func:`verify_onnx`.

    Without ``image``: standard-normal values (seeded), the scale of a
    normalised image. With ``image`` (a file): the image resized to
    ``H x W`` and normalised like the model's data preprocessor does
    (channel order, mean, std), repeated ``N`` times.
    """
    n, c, h, w = _check_shape(shape)
    if image is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((n, c, h, w), generator=gen)
    import mmcv
    if not osp.isfile(image):
        raise FileNotFoundError(f'probe image not found: {image}')
    img = mmcv.imread(image)  # BGR, HxWx3 uint8
    if img is None:
        raise ValueError(f'probe image {image}: cannot be read as an image')
    if img.shape[2] != c:
        raise ValueError(f'probe image {image} has {img.shape[2]} channels, '
                         f'the model takes {c}')
    img = mmcv.imresize(img, (w, h)).astype(np.float32)
    pre = getattr(model, 'data_preprocessor', None)
    to_rgb = getattr(pre, 'channel_conversion', getattr(pre, 'to_rgb', False))
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if to_rgb:
        x = x.flip(0)
    mean, std = getattr(pre, 'mean', None), getattr(pre, 'std', None)
    if isinstance(mean, Tensor) and isinstance(std, Tensor):
        x = (x - mean.view(-1, 1, 1).float()) / std.view(-1, 1, 1).float()
    return x.unsqueeze(0).repeat(n, 1, 1, 1).contiguous()


def verify_onnx(model: nn.Module,
                path: str,
                inputs: Sequence[Tensor],
                runtimes: Sequence[str] = RUNTIMES,
                *,
                seg_resize: bool = True,
                atol: float = 1e-4,
                rtol: float = 1e-4,
                min_agreement: float = 0.995,
                threads: Optional[int] = None) -> list:
    """Run the ONNX file ``path`` on each of ``inputs`` with each of
    ``runtimes`` and compare with ``model`` in PyTorch (eval mode, eager).

    Passing needs, for a classifier (or a module), logits within
    ``atol + rtol * max|ref|`` of PyTorch's; for a segmentor, the same
    predicted class on at least ``min_agreement`` of the pixels (a binary
    network's sign can flip where a value rounds to within float error of
    0, which moves logits locally; predictions are the contract).

    A binary network's float32 PyTorch output can itself be off: a sign
    whose input is within rounding error of 0 flips. So when a classifier's
    logits miss the bound, the model is run once more in float64 (a copy):
    the file passes if it is within the bound of the float64 logits, or no
    further from them than float32 PyTorch is (``float64_diff``, reported).
    When a segmentor misses, the float64 run only explains the failure:
    ``pytorch_float32_vs_float64`` (pixel agreement) below
    ``min_agreement`` means the model itself is sign-unstable at that size.

    Returns:
        list of dict: one per (runtime, input): ``runtime``, ``shape``, the
        :func:`compare_outputs` figures, ``passed`` and ``problem`` (why it
        did not pass, or '').
    """
    wrapper = ExportWrapper(model, seg_resize=seg_resize)
    was_training = model.training
    model.eval()
    rows, model64 = [], None
    try:
        for x in inputs:
            with torch.no_grad():
                ref = _first(wrapper(x)).float().numpy()
            for runtime in runtimes:
                out = run_onnx(path, x.float().numpy(), runtime, threads)
                res = compare_outputs(ref, out, wrapper.task)
                problem = ''
                if wrapper.task == 'segmentation':
                    if res['agreement'] < min_agreement:
                        if model64 is None:
                            model64 = _float64_copy(wrapper)
                        with torch.no_grad():
                            ref64 = _first(model64(x.double())).numpy()
                        own = float((ref.argmax(1) == ref64.argmax(1)).mean())
                        res['pytorch_float32_vs_float64'] = own
                        unstable = (': the model is sign-unstable here'
                                    if own < min_agreement else '')
                        problem = (f"pixel agreement {res['agreement']:.4%} "
                                   f'< {min_agreement:.2%} (float32 PyTorch '
                                   f'agrees with float64 PyTorch on {own:.4%}'
                                   f'{unstable})')
                else:
                    bound = atol + rtol * float(np.abs(ref).max())
                    if not res['max_abs_diff'] <= bound:
                        problem = (f"max |diff| {res['max_abs_diff']:.3g} > "
                                   f'atol + rtol * max|ref| = {bound:.3g}')
                        if model64 is None:
                            model64 = _float64_copy(wrapper)
                        with torch.no_grad():
                            ref64 = _first(model64(x.double())).numpy()
                        own = float(np.abs(ref - ref64).max())
                        res['float64_diff'] = float(np.abs(out - ref64).max())
                        res['pytorch_float32_vs_float64'] = own
                        if res['float64_diff'] <= max(bound, own):
                            problem = ''
                rows.append(dict(runtime=runtime, shape=tuple(x.shape),
                                 passed=not problem, problem=problem, **res))
    finally:
        model.train(was_training)
    return rows


def _first(out) -> Tensor:
    """The first output (what :func:`run_onnx` returns)."""
    return out if isinstance(out, Tensor) else out[0]


def _float64_copy(wrapper: ExportWrapper) -> ExportWrapper:
    import copy
    return ExportWrapper(copy.deepcopy(wrapper.model).double().eval(),
                         seg_resize=wrapper.seg_resize)
