# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Mixed precision (AMP) with the binary layers.

Every custom autograd Function of ``mmbhvit.models.binary`` is autocast
aware for the device its inputs are on (CPU bfloat16/float16 and CUDA
float16): sign and round run in the incoming dtype, the weight binarizer,
the LSQ gradient scaling and the GSB scales in float32. Tests marked
``cuda`` run unchanged where a GPU exists and are skipped elsewhere.
"""
import os.path as osp

import pytest
import torch

import mmbhvit.models.binary as binary
from mmbhvit.apis import build_model
from mmbhvit.models.backbones.bhvit import BHViT
from mmbhvit.models.binary import (BinaryConv2d, CentredSignSTE,
                                   ClippedSignSTE, GSBAttentionBinarizer,
                                   LearnableBias, LSQAttentionQuantizer,
                                   RoundSTE, RPReLU, ScaleGrad,
                                   ShiftedSignSTE, SignSTE)
from mmbhvit.models.binary.attention import _GSBFunction

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CFG = osp.join(REPO, 'configs/bhvit/upernet_bhvit-tiny_demo-shapes.py')
SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                  num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])
BINARIZER_MODULES = (LSQAttentionQuantizer, GSBAttentionBinarizer, RPReLU,
                     LearnableBias)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA device (float16 '
                                'autocast / GradScaler on the GPU)')
DEVICES = [pytest.param('cpu', marks=pytest.mark.slow),
           pytest.param('cuda', marks=needs_cuda)]


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _binary_functions():
    return {
        f
        for f in _all_subclasses(torch.autograd.Function)
        if f.__module__.startswith(binary.__name__ + '.')
        and 'forward' in vars(f)  # not the abstract QuantizerFunction
    }


def _binarizer_params(model):
    for name, module in model.named_modules():
        if isinstance(module, BINARIZER_MODULES):
            for pname, param in module.named_parameters(recurse=False):
                yield f'{name}.{pname}', param


# --------------------------------------------------------------------------
# The Functions and their dtype decisions
# --------------------------------------------------------------------------
def test_every_binary_function_is_autocast_aware():
    """A Function added to the binary package without the decorators would
    run its forward under autocast without any decision about dtypes."""
    functions = _binary_functions()
    names = {f.__name__ for f in functions}
    assert {'SignSTE', 'ShiftedSignSTE', 'ClippedSignSTE', 'CentredSignSTE',
            'ScaleGrad', 'RoundSTE', '_GSBFunction'} <= names
    for f in functions:
        assert hasattr(f.forward, 'amp_cast_inputs'), f.__name__
        assert getattr(f.backward, 'amp_backward', False), f.__name__
    float32 = {f.__name__ for f in functions
               if f.forward.amp_cast_inputs is torch.float32}
    assert float32 == {'ClippedSignSTE', 'CentredSignSTE', 'ScaleGrad',
                       '_GSBFunction'}


def _apply(x, w, scale, s, p, alpha, beta1, beta2):
    return {
        'SignSTE': SignSTE.apply(x),
        'ShiftedSignSTE': ShiftedSignSTE.apply(x, s),
        'RoundSTE': RoundSTE.apply(x * 2),
        'ClippedSignSTE': ClippedSignSTE.apply(w, scale, 1.0),
        'CentredSignSTE': CentredSignSTE.apply(w),
        'ScaleGrad': ScaleGrad.apply(s, 1e-3),
        '_GSBFunction': _GSBFunction.apply(p, alpha, beta1, beta2, 0.7, 0.9),
    }


def _inputs(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    w = torch.randn(4, 3, 1, 1)
    scale = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    s = torch.rand(3).add(0.5)
    p = torch.softmax(torch.randn(1, 2, 5, 5) * 3, -1)
    scales = [torch.tensor(v) for v in (0.05, 1.5, 2.0)]
    return [t.to(dtype).requires_grad_(t is not scale)
            for t in (x, w, scale, s, p, *scales)]


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_function_dtypes_under_cpu_autocast(dtype):
    """Sign/round keep the autocast dtype; the weight binarizer, the LSQ
    gradient scaling and GSB compute in float32. Gradients come back in
    the dtype of each input, and values equal a float32 computation on the
    same (rounded) inputs."""
    inputs = _inputs(dtype)
    with torch.autocast('cpu', dtype=dtype):
        outs = _apply(*inputs)
    expected = {'SignSTE': dtype, 'ShiftedSignSTE': dtype, 'RoundSTE': dtype,
                'ClippedSignSTE': torch.float32,
                'CentredSignSTE': torch.float32, 'ScaleGrad': torch.float32,
                '_GSBFunction': torch.float32}
    assert {k: v.dtype for k, v in outs.items()} == expected
    sum(o.float().sum() for o in outs.values()).backward()
    for t in inputs:
        if t.requires_grad:
            assert t.grad is not None and t.grad.dtype == dtype
            assert torch.isfinite(t.grad).all()

    ref = _apply(*(t.detach().float() for t in inputs))
    for name, out in outs.items():
        torch.testing.assert_close(out.detach().float(), ref[name], rtol=0,
                                   atol=0, msg=name)


def test_without_autocast_low_precision_inputs_are_not_cast():
    """The decorators act only under autocast: a ``.half()`` or
    ``.bfloat16()`` model keeps its dtype end to end."""
    outs = _apply(*_inputs(torch.bfloat16))
    assert {o.dtype for o in outs.values()} == {torch.bfloat16}


def test_backward_replays_the_forward_autocast_state():
    """custom_bwd semantics: a backward that runs after the autocast region
    has closed still sees the forward's state (for sign/round) and a
    float32-cast Function's backward runs with autocast off."""
    seen = {}

    class Probe(torch.autograd.Function):
        # a throw-away Function decorated like the binary ones
        @staticmethod
        @binary.amp_forward()
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        @binary.amp_backward
        def backward(ctx, grad):
            seen['enabled'] = torch.is_autocast_enabled('cpu')
            seen['dtype'] = torch.get_autocast_dtype('cpu')
            return grad

    x = torch.randn(3, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = Probe.apply(x)
    y.sum().backward()  # outside the region
    assert seen == {'enabled': True, 'dtype': torch.bfloat16}


# --------------------------------------------------------------------------
# float16 numerics of the LSQ and GSB scales (CPU)
# --------------------------------------------------------------------------
def _attention_probs(dtype, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, heads, 49, 49, generator=g) * 2
    return torch.softmax(scores, -1).to(dtype)


def _quantize_and_backward(module, p, draw=torch.randn, grad_scale=1.0):
    """``module(p)`` and the gradient of a fixed random weighting of its
    output (weights from ``draw``, times ``grad_scale``) w.r.t. ``p``."""
    p = p.clone().requires_grad_()
    out = module(p)
    g = torch.Generator().manual_seed(1)
    w = draw(out.shape, generator=g).to(out.dtype) * grad_scale
    (out * w).sum().backward()
    return out, p.grad


def _lsq_run(quantizer, p):
    return _quantize_and_backward(quantizer, p)


def test_lsq_float16_attention_under_autocast_computes_in_float32():
    """CPU autocast leaves the softmax in the low dtype; the quantizer
    casts it to its float32 step sizes, so initialisation, levels and
    gradients equal a float32 run on the same (rounded) probabilities."""
    p16 = _attention_probs(torch.float16)
    q16 = LSQAttentionQuantizer(num_heads=2).train()
    q32 = LSQAttentionQuantizer(num_heads=2).train()
    with torch.autocast('cpu', dtype=torch.float16):
        out16, _ = _lsq_run(q16, p16)
    out32, _ = _lsq_run(q32, p16.float())
    assert out16.dtype == torch.float32
    torch.testing.assert_close(q16.step.detach(), q32.step.detach(),
                               rtol=0, atol=0)
    torch.testing.assert_close(out16, out32, rtol=0, atol=0)
    for name in ('step', 'zero_point'):
        g16 = getattr(q16, name).grad
        assert torch.isfinite(g16).all() and (g16 != 0).all(), name
        torch.testing.assert_close(g16, getattr(q32, name).grad, rtol=1e-6,
                                   atol=0)


def test_lsq_float16_scales_close_to_float32():
    """A pure float16 quantizer (``.half()``: step sizes, zero points and
    data all in float16): finite, the same levels almost everywhere, step
    size gradients finite and close to float32."""
    p16 = _attention_probs(torch.float16)
    q16 = LSQAttentionQuantizer(num_heads=2).half().train()
    q32 = LSQAttentionQuantizer(num_heads=2).train()
    out16, pg16 = _lsq_run(q16, p16)
    out32, pg32 = _lsq_run(q32, p16.float())
    assert out16.dtype == torch.float16
    assert torch.isfinite(out16).all() and torch.isfinite(pg16).all()
    torch.testing.assert_close(q16.step.detach().float(), q32.step.detach(),
                               rtol=2e-3, atol=0)
    # levels flip only where L P / s + z sits within float16 rounding of .5
    lv16 = (out16.float() / q16.step.detach().float().view(1, -1, 1, 1))
    lv32 = out32 / q32.step.detach().view(1, -1, 1, 1)
    flipped = (lv16.round() != lv32.round()).float().mean().item()
    assert flipped < 0.01
    for name in ('step', 'zero_point'):
        g16, g32 = getattr(q16, name).grad, getattr(q32, name).grad
        assert g16.dtype == torch.float16 and torch.isfinite(g16).all()
        torch.testing.assert_close(g16.float(), g32, rtol=0.05,
                                   atol=0.02 * g32.abs().max().item())


def _gsb(dtype=torch.float32):
    gsb = GSBAttentionBinarizer(num_heads=2).to(dtype)
    with torch.no_grad():
        gsb.beta1.fill_(1.5)
        gsb.beta2.fill_(2.0)
    return gsb


def _gsb_run(gsb, p, grad_scale=1.0):
    return _quantize_and_backward(gsb, p, torch.rand, grad_scale)


def test_gsb_float16_attention_under_autocast_computes_in_float32():
    """Under float16 autocast the GSB Function runs in float32: outputs and
    scale gradients equal the float32 ones, and stay finite with a
    loss-scaled gradient (2**16, GradScaler's initial scale), which in
    float16 overflows the scale gradients (sums over the attention map)."""
    p16 = _attention_probs(torch.float16)
    gsb16, gsb32 = _gsb(), _gsb()
    with torch.autocast('cpu', dtype=torch.float16):
        out16, pg16 = _gsb_run(gsb16, p16, grad_scale=2.**16)
    out32, _ = _gsb_run(gsb32, p16.float(), grad_scale=2.**16)
    assert out16.dtype == torch.float32 and pg16.dtype == torch.float16
    torch.testing.assert_close(out16, out32, rtol=0, atol=0)
    for name in ('alpha', 'beta1', 'beta2'):
        g16, g32 = getattr(gsb16, name).grad, getattr(gsb32, name).grad
        assert torch.isfinite(g16) and g16 != 0, name
        torch.testing.assert_close(g16, g32, rtol=1e-6, atol=0)
    assert gsb16.alpha.grad.abs() > 65504  # beyond float16's range

    # the same computation kept in float16 (a .half() module, no autocast)
    half = _gsb(torch.float16)
    _gsb_run(half, p16, grad_scale=2.**16)
    assert not torch.isfinite(half.alpha.grad)


def test_gsb_float16_scales_close_to_float32():
    """A pure float16 GSB binarizer at ordinary gradient magnitudes:
    finite, the same binary maps almost everywhere, scale gradients close
    to float32."""
    p16 = _attention_probs(torch.float16)
    gsb16, gsb32 = _gsb(torch.float16), _gsb()
    out16, pg16 = _gsb_run(gsb16, p16)
    out32, pg32 = _gsb_run(gsb32, p16.float())
    assert out16.dtype == torch.float16
    assert torch.isfinite(out16).all() and torch.isfinite(pg16).all()
    close = torch.isclose(out16.float(), out32, rtol=2e-3, atol=0)
    assert close.float().mean().item() > 0.99
    for name in ('alpha', 'beta1', 'beta2'):
        g16, g32 = getattr(gsb16, name).grad, getattr(gsb32, name).grad
        assert g16.dtype == torch.float16 and torch.isfinite(g16), name
        torch.testing.assert_close(g16.float(), g32, rtol=0.02, atol=0)


# --------------------------------------------------------------------------
# Training under autocast
# --------------------------------------------------------------------------
def _demo_segmentor(binarizer):
    """The demo segmentation config with a reduced backbone and heads."""
    opts = {
        'model.backbone.arch': dict(_delete_=True, **SMALL_ARCH),
        'model.backbone.attn_binarizer': binarizer,
        'model.decode_head.in_channels': SMALL_ARCH['embed_dims'],
        'model.decode_head.channels': 16,
        'model.auxiliary_head.in_channels': SMALL_ARCH['embed_dims'][2],
        'model.auxiliary_head.channels': 16,
    }
    return build_model(SEG_CFG, cfg_options=opts).train()


def _seg_batch(size=64, batch=2):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=g)
    samples = []
    for i in range(batch):
        seg = torch.zeros(1, size, size, dtype=torch.long)
        seg[:, 8:40, 8 + 6 * i:40 + 6 * i] = 1 + i
        seg[:, 44:60, 30:60] = 3
        sample = SegDataSample(gt_sem_seg=PixelData(data=seg))
        sample.set_metainfo(dict(img_shape=(size, size),
                                 pad_shape=(size, size),
                                 ori_shape=(size, size)))
        samples.append(sample)
    return inputs, samples


@pytest.mark.slow
@pytest.mark.parametrize('binarizer', ['lsq', 'gsb'])
def test_bfloat16_autocast_training_on_the_demo_config(binarizer):
    """CPU bfloat16 autocast, a few AdamW steps on a fixed batch: the loss
    is finite and falls, the binary layers really ran in bfloat16, and the
    gradients of the binarizer parameters (LSQ step sizes / GSB scales,
    RPReLU, LearnableBias) are finite and non-zero."""
    torch.manual_seed(0)
    model = _demo_segmentor(binarizer)
    inputs, samples = _seg_batch()
    conv_dtypes, attn_dtypes = set(), set()
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: (attn_dtypes if isinstance(
                m, (LSQAttentionQuantizer, GSBAttentionBinarizer)) else
                             conv_dtypes).add(o.dtype))
        for m in model.backbone.modules()
        if isinstance(m, (BinaryConv2d, LSQAttentionQuantizer,
                          GSBAttentionBinarizer))
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss, _ = model.parse_losses(model.loss(inputs, samples))
        loss.backward()
        losses.append(loss.item())
        if len(losses) < 6:
            optimizer.step()
    for h in hooks:
        h.remove()

    assert torch.bfloat16 in conv_dtypes  # autocast reached the binary convs
    assert attn_dtypes == {torch.float32}  # the quantized attention map
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.95 * losses[0], losses
    params = dict(_binarizer_params(model.backbone))
    kinds = {type(m).__name__ for m in model.backbone.modules()
             if isinstance(m, BINARIZER_MODULES)}
    attn = 'LSQAttentionQuantizer' if binarizer == 'lsq' else \
        'GSBAttentionBinarizer'
    assert {attn, 'RPReLU', 'LearnableBias'} <= kinds
    for name, param in params.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def _small_bhvit(binarizer, device):
    torch.manual_seed(0)
    return BHViT(SMALL_ARCH, attn_binarizer=binarizer).to(device).train()


def _feature_loss(outs):
    return sum(o.float().pow(2).mean() for o in outs)


@needs_cuda
@pytest.mark.parametrize('binarizer', ['lsq', 'gsb'])
def test_cuda_float16_autocast_forward_backward(binarizer):
    """A small BHViT under CUDA float16 autocast: the binary convolutions
    run in float16, the attention quantizer in float32, outputs and all
    gradients are finite. (Without loss scaling some scale gradients
    underflow to 0 in float16 activations: see the GradScaler test.)"""
    model = _small_bhvit(binarizer, 'cuda')
    x = torch.randn(2, 3, 64, 64, device='cuda')
    dtypes = {}

    def record(module, args, out):
        dtypes.setdefault(type(module).__name__, set()).add(out.dtype)

    for m in model.modules():
        if isinstance(m, (BinaryConv2d, LSQAttentionQuantizer,
                          GSBAttentionBinarizer)):
            m.register_forward_hook(record)
    with torch.autocast('cuda', dtype=torch.float16):
        outs = model(x)
        loss = _feature_loss(outs)
    loss.backward()
    assert torch.float16 in dtypes['BinaryConv2d']
    attn = 'LSQAttentionQuantizer' if binarizer == 'lsq' else \
        'GSBAttentionBinarizer'
    assert dtypes[attn] == {torch.float32}
    assert all(torch.isfinite(o).all() for o in outs)
    grads = {n: p.grad for n, p in model.named_parameters()
             if p.grad is not None}
    assert any('binarizer' in n for n in grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('binarizer', ['lsq', 'gsb'])
def test_float16_autocast_with_grad_scaler(device, binarizer):
    """float16 autocast + GradScaler (CUDA; the CPU variant uses the CPU
    GradScaler): steps are taken, the loss stays finite, and in every step
    taken the unscaled gradients of RPReLU / LearnableBias are finite and
    those of the LSQ step sizes / GSB scales finite and non-zero (float32
    in the binarizers, loss scaling for the float16 activations). (The
    shift branches start gated off by a zero LayerScale, so some of their
    biases have no gradient yet.)"""
    model = _small_bhvit(binarizer, device)
    x = torch.randn(2, 3, 64, 64, device=device)
    params = dict(_binarizer_params(model))
    assert any('binarizer' in n for n in params)
    scaler = torch.amp.GradScaler(device)
    # small steps: the GSB alpha (0.005) must stay positive
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    steps_taken = 0
    for _ in range(4):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = _feature_loss(model(x))
        assert torch.isfinite(loss)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = {n: p.grad.clone() for n, p in params.items()}
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:  # inf/nan found: step skipped
            continue
        steps_taken += 1
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), name
            if 'binarizer' in name:
                assert grad.abs().sum() > 0, name
    assert steps_taken >= 2
    for name, param in params.items():
        assert torch.isfinite(param).all(), name
