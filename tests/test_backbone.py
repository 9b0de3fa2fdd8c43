# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
import pytest
import torch
from torch import nn

import mmbhvit  # noqa: F401
from mmbhvit.apis import CheckpointMismatchError
from mmbhvit.models import BHViT
from mmbhvit.models.backbones import bhvit as bhvit_module
from mmbhvit.models.binary import fused
from mmbhvit.models.binary import layers as layers_module
from mmbhvit.models.binary import (BinaryConv2d, GSBAttentionBinarizer,
                                   LSQAttentionQuantizer)

SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                  num_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2])


def _outputs_shapes(model, h, w):
    with torch.no_grad():
        return [tuple(o.shape) for o in model(torch.randn(1, 3, h, w))]


def test_arch_zoo_settings():
    tiny, small = BHViT('tiny'), BHViT('small')
    assert [len(s) for s in tiny.stages] == [2, 2, 6, 2]
    assert [len(s) for s in small.stages] == [3, 4, 8, 4]
    blk = small.stages[0][0]
    assert blk.ffn.expand.conv.out_channels == 512      # MLP 512/1024/1024/2048
    assert small.stages[3][0].ffn.expand.conv.out_channels == 2048
    assert small.stages[2][0].token_mixer.num_heads == 4
    assert isinstance(small.stages[0][0].token_mixer, bhvit_module.MSGDC)
    assert isinstance(small.stages[2][0].token_mixer, bhvit_module.MSMHA)


@pytest.mark.parametrize('size,expected', [
    ((224, 224), [56, 28, 14, 7]),
    ((100, 150), [(25, 38), (13, 19), (7, 10), (4, 5)]),
    ((65, 97), [(17, 25), (9, 13), (5, 7), (3, 4)]),
])
def test_any_input_size_gives_ceil_strides(size, expected):
    model = BHViT(SMALL_ARCH).eval()
    shapes = _outputs_shapes(model, *size)
    for shape, exp, ch in zip(shapes, expected, SMALL_ARCH['embed_dims']):
        exp = exp if isinstance(exp, tuple) else (exp, exp)
        assert shape == (1, ch) + exp


def test_segmentation_sizes_full_width():
    # official widths, 512x683 (non-square, not a multiple of 32)
    model = BHViT(dict(embed_dims=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                       num_heads=[1, 1, 4, 8], mlp_ratios=[1, 1, 1, 1]),
                  attn_binarizer='gsb').eval()
    shapes = _outputs_shapes(model, 512, 683)
    assert shapes == [(1, 64, 128, 171), (1, 128, 64, 86), (1, 256, 32, 43),
                      (1, 512, 16, 22)]


def test_train_backward_and_every_parameter_gets_gradient():
    model = BHViT(SMALL_ARCH, attn_binarizer='gsb', binary_merge=True,
                  recu=True, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 96)
    sum(o.float().pow(2).mean() for o in model(x)).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_out_indices_and_final_norm():
    model = BHViT(SMALL_ARCH, out_indices=(1, 3), final_norm=True).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    raw = []
    h = model.stages[3].register_forward_hook(lambda m, i, o: raw.append(o))
    outs = model(torch.randn(1, 3, 64, 64))
    h.remove()
    assert torch.allclose(outs[1], model.norm(raw[0]))
    with pytest.raises(ValueError, match='out_indices'):
        BHViT(SMALL_ARCH, out_indices=(4, ))


def test_frozen_stages_and_norm_eval():
    model = BHViT(SMALL_ARCH, frozen_stages=1, norm_eval=True)
    model.train()
    assert not model.pos_embed.requires_grad
    assert all(not p.requires_grad for p in model.patch_embed.parameters())
    assert all(not p.requires_grad for p in model.stages[1].parameters())
    assert all(not p.requires_grad
               for p in model.downsamples[0].parameters())
    assert all(p.requires_grad for p in model.stages[2].parameters())
    assert all(not m.training for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize('registry', ['mmpretrain', 'mmseg'])
def test_registered_in_both_registries(registry):
    import importlib
    models = importlib.import_module(f'{registry}.registry').MODELS
    model = models.build(dict(type='BHViT', arch=SMALL_ARCH))
    assert isinstance(model, BHViT)


def test_syncbn_config_builds_syncbn_everywhere():
    model = BHViT(SMALL_ARCH, norm_cfg=dict(type='SyncBN',
                                            requires_grad=True))
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    # SyncBN runs un-synchronised in eval mode, on 4-D inputs everywhere
    model.eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert outs[-1].shape == (1, 128, 2, 2)


@pytest.mark.parametrize('bad,match', [
    (torch.randn(3, 64, 64), '4-D image batch'),
    (torch.randn(1, 4, 64, 64), 'built for 3 input channels, got 4'),
    (torch.randn(1, 3, 31, 64), 'at least 32'),
])
def test_bad_input_errors(bad, match):
    model = BHViT(SMALL_ARCH)
    with pytest.raises(ValueError, match=match):
        model(bad)


@pytest.mark.parametrize('arch,match', [
    ('huge', "Unknown BHViT arch 'huge'"),
    (dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1],
          num_heads=[1, 1, 2, 4]), "missing \\['mlp_ratios'\\]"),
    (dict(SMALL_ARCH, depths=[1, 1, 1]), 'must be 4 positive ints'),
    (dict(SMALL_ARCH, num_heads=[1, 1, 3, 4]), 'not divisible by num_heads'),
    (dict(SMALL_ARCH, embed_dims=[18, 32, 64, 128]), 'divisible by 4'),
    (dict(SMALL_ARCH, window=7), "unknown \\['window'\\]"),
])
def test_bad_arch_errors(arch, match):
    with pytest.raises(ValueError, match=match):
        BHViT(arch)


def test_bad_options_errors():
    with pytest.raises(ValueError, match="attn_binarizer must be 'gsb' or"):
        BHViT(SMALL_ARCH, attn_binarizer='int8')
    with pytest.raises(ValueError, match='act_bits must be one of'):
        BHViT(SMALL_ARCH, act_bits=4)
    with pytest.raises(ValueError, match='window_size must be odd'):
        BHViT(SMALL_ARCH, window_size=8)


@pytest.mark.parametrize('binarizer', ['gsb', 'lsq'])
def test_binary_honesty(monkeypatch, binarizer):
    """Every 1-bit layer sees exactly two weight values per output channel
    (±scale) and ±1 activations; Q/K/V reach the products as ±1 and the
    attention matrix reaches P·V as its documented levels."""
    torch.manual_seed(0)
    model = BHViT(SMALL_ARCH, attn_binarizer=binarizer,
                  binary_merge=True).eval()
    with torch.no_grad():   # trained-like parameters: no bias exactly 0
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.2 - 0.1)
    seen = {'conv': 0, 'qkv': 0, 'attn': 0}
    orig_conv = BinaryConv2d._conv_forward

    def check_binary(x, weight):
        seen['conv'] += 1
        assert set(x.unique().tolist()) == {-1., 1.}
        for w in weight:
            assert len(w.unique()) == 2
            assert torch.allclose(w.abs(), w.abs().max().expand_as(w))

    def conv_spy(self, x, weight, bias):
        if self.is_binary:
            check_binary(x, weight)
        return orig_conv(self, x, weight, bias)

    integer_product = layers_module.SignProductConv1x1

    class IntegerProductSpy:  # the 1×1 layers' exact forward
        MIN_WORK = 1  # every wide layer of this small model takes it
        MIN_POPCOUNT_WORK = 1
        BLOCK = integer_product.BLOCK

        @staticmethod
        def apply(x, weight, bias, route=None):
            check_binary(x, weight)
            return integer_product.apply(x, weight, bias, route)

    orig_sign = bhvit_module.sign_ste

    def sign_spy(x):
        out = orig_sign(x)
        seen['qkv'] += 1
        assert set(out.unique().tolist()) == {-1., 1.}
        return out

    def attn_spy(module, inputs, out):
        seen['attn'] += 1
        if isinstance(module, GSBAttentionBinarizer):
            masks, scales = module.masks(inputs[0])
            for t in masks:
                assert set(t.unique().tolist()) <= {-1., 0., 1.}
            recon = sum(s * t for s, t in zip(scales, masks))
            assert torch.allclose(out, recon)
        else:
            levels = out / module.step.view(1, -1, 1, 1)
            assert torch.allclose(levels, levels.round(), atol=1e-6)

    monkeypatch.setattr(BinaryConv2d, '_conv_forward', conv_spy)
    monkeypatch.setattr(layers_module, 'SignProductConv1x1',
                        IntegerProductSpy)
    monkeypatch.setattr(bhvit_module, 'sign_ste', sign_spy)
    for m in model.modules():
        if isinstance(m, (GSBAttentionBinarizer, LSQAttentionQuantizer)):
            m.register_forward_hook(attn_spy)
    model(torch.randn(2, 3, 64, 64))
    n_binary = sum(1 for m in model.modules()
                   if isinstance(m, BinaryConv2d) and m.is_binary)
    assert seen['conv'] == n_binary > 0
    assert seen['qkv'] == 3 * 2          # q, k, v in the two MSMHA blocks
    assert seen['attn'] == 2
    # the stem is the only full-precision conv besides nothing else
    fp_convs = [n for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and not isinstance(m, BinaryConv2d)]
    assert fp_convs == ['patch_embed.conv']


def test_pretrained_missing_file_and_mismatch(tmp_path):
    model = BHViT(SMALL_ARCH, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'nope.pth'),
        prefix='backbone.'))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        model.init_weights()
    src = BHViT(SMALL_ARCH)
    state = {f'backbone.{k}': v for k, v in src.state_dict().items()}
    state.pop('backbone.stages.0.0.norm1.weight')
    state['backbone.extra.weight'] = torch.zeros(1)
    torch.save({'state_dict': state}, tmp_path / 'bad.pth')
    model = BHViT(SMALL_ARCH, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'bad.pth'),
        prefix='backbone.'))
    with pytest.raises(CheckpointMismatchError) as err:
        model.init_weights()
    assert 'stages.0.0.norm1.weight' in str(err.value)
    assert 'extra.weight' in str(err.value)
    assert 'bad.pth' in str(err.value)


def test_pretrained_loads_exactly(tmp_path):
    src = BHViT(SMALL_ARCH)
    src.init_weights()
    state = {f'backbone.{k}': v for k, v in src.state_dict().items()}
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'ok.pth')
    model = BHViT(SMALL_ARCH, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'ok.pth'),
        prefix='backbone.'))
    model.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize('shape', [(2, 16, 7, 9), (1, 16, 2, 3), (1, 16, 1, 1)])
@pytest.mark.parametrize('radii', [(1, 2), (1,)])
@pytest.mark.parametrize('cpu_path', [True, False])
def test_shift_branches_conv_equals_rolls(shape, radii, cpu_path):
    """The fused depthwise form equals the sum of rolled, gated branches,
    values and gradients, with the CPU training path (WrapDepthwiseConv's
    own backward) and with the plain convolution's."""
    torch.manual_seed(0)
    m = bhvit_module.ShiftBranches(16, radii).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    grads = []
    with fused.fused_kernels(cpu_path):
        for fn in (m.forward, m.forward_rolls):
            m.zero_grad()
            x.grad = None
            out = fn(x)
            (out * g).sum().backward()
            grads.append((out.detach(), x.grad.clone(),
                          [p.grad.clone() for p in m.parameters()]))
        own = type(m(x).grad_fn).__name__ == 'WrapDepthwiseConvBackward'
    # the map must be at least as large as the pad for the convolution
    assert own == (cpu_path and min(shape[2:]) >= max(radii))
    (o1, x1, p1), (o2, x2, p2) = grads
    assert torch.allclose(o1, o2, atol=1e-13)
    assert torch.allclose(x1, x2, atol=1e-13)
    for a, b in zip(p1, p2):
        assert torch.allclose(a, b, atol=1e-12)
    # a channel-group shift really moves data: not the identity
    y = torch.randn(1, 16, 5, 5)
    assert not torch.allclose(bhvit_module.channel_group_shift(y, 1), y)
