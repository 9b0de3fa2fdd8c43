# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Run an mmseg segmentor with the packed BHViT engine as its backbone.

Example::

    from mmseg.apis import inference_model
    from mmbhvit.apis import build_model
    from mmbhvit.deploy.mmseg_backend import use_packed_backbone

    # strict loading, CPU, eval; the default scope set as init_model does
    model = build_model(config, checkpoint, init_scope=True)
    use_packed_backbone(model, 'bhvit.packed.pth')
    result = inference_model(model, 'demo.png')   # same API as before

The backbone is replaced; the data preprocessor, the neck and heads and the
post-processing stay the mmseg modules with the checkpoint's weights. By
default the neck and heads are also prepared for inference: their
BatchNorms are folded into the preceding convolutions (mmcv's
``fuse_conv_bn``) and they run in channels-last memory, which the engine
produces without a copy. The model is then for inference only.
"""
from typing import List, Union

import torch
from torch import Tensor, nn

from .engine import PackedBHViT

#: The modules after the backbone in mmseg's segmentors.
HEAD_NAMES = ('neck', 'decode_head', 'auxiliary_head')


#: side of the fixed probe image of :func:`use_packed_backbone`
PROBE_SIZE = 64
#: largest accepted RMS difference between the packed and the PyTorch
#: backbone on the probe, relative to the RMS of the PyTorch output (per
#: output map). Float rounding gives ~1e-7 (float64) to ~1e-6 (float32);
#: another checkpoint or an untrained model of the same architecture 0.8-9.
PROBE_RTOL = 1e-3
VERIFY_MODES = ('outputs', 'spec')


def probe_input(channels: int, size: int = PROBE_SIZE,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """A fixed, deterministic ``(1, channels, size, size)`` image of roughly
    unit scale (like a normalised image): integer-hash noise, a tilted wave
    and 8-pixel blocks, different in every channel."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size),
                          indexing='ij')
    planes = []
    for k in range(channels):
        h = ((x * 73856093) ^ (y * 19349663) ^ ((k + 1) * 83492791)) % 2048
        noise = h.double() / 1024 - 1
        wave = torch.sin(x * (0.23 + 0.07 * k) + y * (0.11 + 0.05 * k))
        blocks = ((x // 8 + y // 8 + k) % 2) * 2.0 - 1
        planes.append(0.7 * noise + 0.6 * wave + 0.4 * blocks)
    return torch.stack(planes)[None].to(dtype)


def _rms_rel(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    scale = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((out - ref).pow(2).mean().sqrt() / scale)


#: largest accepted RMS difference between a packed head convolution and
#: its PyTorch block on a probe, relative to the block's RMS (float
#: rounding and the odd sign decision within rounding of its threshold:
#: ~1e-7; a folding error: ~1)
HEAD_PROBE_RTOL = 1e-4


class PackedConvBlock(nn.Module):
    """A :class:`~mmbhvit.models.heads.BinaryConvBlock` of a decode head or
    neck running on packed bits (:class:`~mmbhvit.deploy.blocks.conv.
    PackedConv`), folded from the block itself (its weights are the model's:
    no file). NCHW in and out, computed in channels-last memory (a
    channels-last input needs no copy; the output is channels-last).

    The folding is checked once, at construction: the packed op and the
    block (eval mode) run on a fixed probe and must agree within
    :data:`HEAD_PROBE_RTOL`, else ``RuntimeError``.
    """

    def __init__(self, block: nn.Module, backend: str = 'auto',
                 dtype: torch.dtype = torch.float32, where: str = ''):
        super().__init__()
        from .registry import Folder, Params, build, describe, handler_for
        spec = describe(block, where)
        errs = spec.errors()
        if errs:
            raise NotImplementedError(f'{where}: ' + '; '.join(errs))
        folder = Folder(dtype, 'block')
        handler_for(block, where).fold(block, spec, folder)
        self.spec = spec
        self.dtype = dtype
        self.op = build(spec, Params(folder.tensors, 'block', dtype), dtype,
                        backend)
        self._check(block, where)

    @torch.no_grad()
    def _check(self, block: nn.Module, where: str) -> None:
        ref_dtype = next(block.parameters()).dtype
        was_training = block.training
        block.eval()
        try:
            x = probe_input(self.spec.cin, 8, ref_dtype)
            err = _rms_rel(self(x), block(x))
        finally:
            block.train(was_training)
        if not err <= HEAD_PROBE_RTOL:
            raise RuntimeError(
                f'{where}: the packed convolution differs from the PyTorch '
                f'block by {err:.3g} (RMS, relative) on a probe, more than '
                f'{HEAD_PROBE_RTOL:g}: its folding does not fit this block; '
                'run the head in PyTorch (pack_binary=False)')

    def forward(self, x: Tensor) -> Tensor:
        xs = x.permute(0, 2, 3, 1)
        if xs.dtype != self.dtype or not xs.is_contiguous():
            xs = xs.to(self.dtype).contiguous()
        return self.op(xs).permute(0, 3, 1, 2).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return (f'{s.cin}, {s.cout}, kernel_size={s.kernel_size}, '
                f'shortcut={s.shortcut!r}, backend={self.op.backend!r}')


def pack_binary_convs(module: nn.Module, backend: str = 'auto',
                      dtype: torch.dtype = torch.float32,
                      prefix: str = '') -> int:
    """Replace every fully binary :class:`~mmbhvit.models.heads.
    BinaryConvBlock` below ``module`` by a :class:`PackedConvBlock`, in
    place; returns how many. Blocks with ``weight_bits=32`` or
    ``act_bits=32`` (a full-precision counterpart) stay PyTorch."""
    from ..models.heads import BinaryConvBlock
    count = 0
    for name, child in list(module.named_children()):
        where = f'{prefix}.{name}' if prefix else name
        if isinstance(child, BinaryConvBlock):
            if child.conv.is_binary:
                setattr(module, name,
                        PackedConvBlock(child, backend, dtype, where))
                count += 1
        else:
            count += pack_binary_convs(child, backend, dtype, where)
    return count


#: output channels of the heads' float convolutions are padded to a
#: multiple of this (:class:`PaddedOutputConv`)
CONV_OUT_MULTIPLE = 8


class PaddedOutputConv(nn.Module):
    """A float convolution computed with its output channels padded (zero
    filters) to a multiple of ``multiple``; the padding channels are
    dropped from the output, so the values are the convolution's.

    Why: oneDNN's channels-last CPU convolution at 1 thread takes a slow
    path when the output channels are not a multiple of 8, e.g. the
    150-class ``conv_seg`` 128 -> 150 at 128x128: ~21 ms, against ~9 ms
    for 128 -> 152 (AMD EPYC, Zen 3, AVX2); at 2 threads both ~4.5 ms.
    The output is a channel slice of the padded map (not contiguous).
    """

    def __init__(self, conv: nn.Conv2d, multiple: int = CONV_OUT_MULTIPLE):
        super().__init__()
        if conv.groups != 1:
            raise ValueError('PaddedOutputConv pads ungrouped convolutions '
                             f'only, got groups={conv.groups}')
        self.out_channels = conv.out_channels
        padded = -(-conv.out_channels // multiple) * multiple
        self.conv = nn.Conv2d(
            conv.in_channels, padded, conv.kernel_size, conv.stride,
            conv.padding, conv.dilation, bias=True,
            padding_mode=conv.padding_mode).to(conv.weight)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:conv.out_channels] = conv.weight
            self.conv.bias.zero_()
            if conv.bias is not None:
                self.conv.bias[:conv.out_channels] = conv.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)[:, :self.out_channels]

    def extra_repr(self) -> str:
        return f'out_channels={self.out_channels}'


def pad_conv_outputs(module: nn.Module,
                     multiple: int = CONV_OUT_MULTIPLE) -> int:
    """Wrap every ungrouped float ``nn.Conv2d`` below ``module`` whose
    output channels are not a multiple of ``multiple`` in a
    :class:`PaddedOutputConv`, in place; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if (type(child) is nn.Conv2d and child.groups == 1
                and child.out_channels % multiple):
            setattr(module, name, PaddedOutputConv(child, multiple))
            count += 1
        elif not isinstance(child, PaddedOutputConv):
            count += pad_conv_outputs(child, multiple)
    return count


def optimize_heads(model: nn.Module, pack_binary: bool = True,
                   backend: str = 'auto',
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Prepare the neck and heads for CPU inference, in place (their
    BatchNorms use the running statistics from then on); returns
    ``model``:

    * ``pack_binary`` (default): their binary convolution blocks
      (``BinaryUPerHead`` / ``BinaryFPNHead`` / ``BinaryFPN``) run on
      packed bits (:func:`pack_binary_convs`, ``backend`` and ``dtype`` as
      the engine's);
    * the remaining BatchNorms are folded into the convolutions before
      them (mmcv's ``fuse_conv_bn``), float convolutions get output
      channels padded to a multiple of 8 (:func:`pad_conv_outputs`; e.g.
      a 150-class ``conv_seg``) and the heads are stored channels-last.
    """
    from mmcv.cnn import fuse_conv_bn
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if head is None:
            continue
        head.eval()
        if pack_binary:
            pack_binary_convs(head, backend, dtype, name)
        fuse_conv_bn(head)
        pad_conv_outputs(head)
        head.to(memory_format=torch.channels_last)
    return model


def _reference_spec(old: nn.Module) -> dict:
    from ..models import BHViT
    from .spec import arch_spec
    if isinstance(old, BHViT):
        return arch_spec(old)
    if isinstance(old, PackedBHViT):
        return old.graph['arch']
    raise TypeError('use_packed_backbone replaces a BHViT backbone (built '
                    'from the config the packed file was exported from); '
                    f'the model has a {type(old).__name__}')


@torch.no_grad()
def _probe_errors(old: nn.Module, engine: PackedBHViT, packed,
                  backend: str) -> List[float]:
    """Per output map, the RMS difference between ``engine`` and the
    backbone ``old`` (eval mode) on :func:`probe_input`, relative to
    ``old``'s output. If float32 exceeds :data:`PROBE_RTOL`, decide in
    float64 (a sign decision within rounding of its threshold can flip in
    float32 and binarized attention amplifies it; in float64 it does not)."""
    x = probe_input(engine.in_channels)
    ref_params = [p for p in old.parameters() if p.is_floating_point()]
    ref_dtype = ref_params[0].dtype if ref_params else torch.float32
    was_training = old.training
    old.eval()
    try:
        ref = old(x.to(ref_dtype))
        errs = [_rms_rel(o, r) for o, r in zip(engine(x), ref)]
        if max(errs) <= PROBE_RTOL or isinstance(old, PackedBHViT) or (
                engine.dtype == ref_dtype == torch.float64):
            return errs
        engine64 = PackedBHViT(packed, dtype=torch.float64, backend=backend)
        old.double()  # exact round trip float32 -> float64 -> float32
        try:
            ref = old(x.double())
        finally:
            old.to(ref_dtype)
        return [_rms_rel(o, r) for o, r in zip(engine64(x), ref)]
    finally:
        old.train(was_training)


def use_packed_backbone(model: nn.Module, packed: Union[str, dict],
                        backend: str = 'auto',
                        dtype: torch.dtype = torch.float32,
                        fast_heads: bool = True,
                        verify: str = 'outputs') -> nn.Module:
    """Replace ``model.backbone`` (a BHViT) by the packed engine built from
    ``packed`` (an exported file or dict), in place; returns ``model``.

    The engine is a module with the same ``forward(x)`` → tuple of NCHW
    feature maps, returned in the dtype of the model's heads (``dtype`` is
    the engine's own float dtype; float64 only to check exactness). With
    ``fast_heads`` (default) the neck and heads go through
    :func:`optimize_heads` and the engine hands them channels-last maps
    (same values up to float rounding; ~1.3x faster heads on a CPU); the
    binary convolution blocks of binary heads then run on packed bits too.

    Before replacing anything the packed file is checked against the
    backbone it replaces (the model is left unchanged on an error):

    * always: the file itself (:func:`~mmbhvit.deploy.export.load_packed`:
      format, digests, manifest; every tensor's shape at engine build) and
      its **complete architecture spec** against the spec derived, by the
      exporter's own function (:func:`mmbhvit.deploy.spec.arch_spec`), from
      the PyTorch backbone (every block's kind and options, widths, depths,
      heads, window, MLP ratios, binarizer, shifts, merging, image size,
      outputs); the differing fields are listed;
    * ``verify='outputs'`` (default): also the **weights**. The packed and
      the PyTorch backbone (eval mode) run on a fixed ``1×C×64×64`` probe
      (:func:`probe_input`); each output map must agree within
      :data:`PROBE_RTOL` (RMS, relative; float rounding is ~1e-6, another
      checkpoint or an untrained model ~1). This refuses a file exported from
      another checkpoint than the one the model (and its heads) was loaded
      from. Costs one forward of each backbone at 64×64, once.
    * ``verify='spec'``: the architecture only; for a PyTorch backbone that
      deliberately holds other weights (e.g. a model built without a
      checkpoint, when the packed file brings the trained backbone).

    Raises:
        ValueError (:class:`~mmbhvit.deploy.spec.PackedFormatError`): the
            file is corrupt or of an old format, or does not fit the
            backbone (architecture or, with ``'outputs'``, weights).
    """
    from .export import load_packed
    from .spec import PackedFormatError, diff_specs, format_diffs
    if verify not in VERIFY_MODES:
        raise ValueError(f'verify must be one of {VERIFY_MODES}, got '
                         f'{verify!r}')
    if not hasattr(model, 'backbone'):
        raise TypeError(f'{type(model).__name__} has no backbone to replace')
    head_params = [
        p for n, p in model.named_parameters()
        if not n.startswith('backbone.')
    ]
    devices = {str(p.device) for p in head_params}
    if devices - {'cpu'}:
        raise ValueError('the packed engine runs on the CPU: build the model '
                         f"with device='cpu' (its heads are on {devices})")
    out_dtype = head_params[0].dtype if head_params else dtype
    packed = load_packed(packed)
    old = model.backbone
    diffs = diff_specs(packed['graph']['arch'], _reference_spec(old))
    if diffs:
        raise PackedFormatError(
            f'{packed.source} does not fit the model: its backbone '
            f'architecture differs from the model\'s in {len(diffs)} '
            'field(s) (export it from the same config: '
            'tools/deployment/export_binary.py CONFIG CHECKPOINT OUT):\n' +
            format_diffs(diffs, 'packed file', 'model'))
    engine = PackedBHViT(packed, dtype=dtype, backend=backend,
                         out_dtype=out_dtype, channels_last=fast_heads)
    if verify == 'outputs':
        errs = _probe_errors(old, engine, packed, engine.backend)
        if max(errs) > PROBE_RTOL:
            meta = packed['graph'].get('meta') or {}
            src = meta.get('checkpoint') or 'no checkpoint (random weights)'
            sha = meta.get('checkpoint_sha256')
            raise PackedFormatError(
                f'{packed.source} does not hold the weights of the model\'s '
                f'backbone: on a fixed {PROBE_SIZE}x{PROBE_SIZE} probe '
                'its output maps differ from the PyTorch backbone\'s by '
                f"{', '.join(f'{e:.3g}' for e in errs)} (RMS, relative; "
                f'float rounding stays below {PROBE_RTOL:g}). It was '
                f'exported from {src}'
                f"{f' (sha256 {sha[:16]}...)' if sha else ''}, not from the "
                'checkpoint the model was loaded from. Export it from that '
                'checkpoint, or pass verify=\'spec\' if the PyTorch '
                'backbone deliberately holds other weights.')
    was_training = model.training
    model.backbone = engine
    model.train(was_training)
    if fast_heads:
        optimize_heads(model, backend=engine.backend, dtype=dtype)
    return model
