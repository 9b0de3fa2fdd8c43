# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The deploy registry: a module kind is one handler (typed spec, folding,
packed op) registered for its PyTorch type.

* a toy token mixer registered in this file alone is exported, verified,
  run by the engine (both backends) and matches the PyTorch model;
* a module type without a handler is refused with its type and path;
* the typed specs name every tensor of the file once (the manifest, the
  shape checks and the ops read the same declaration).
"""
import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mmbhvit  # noqa: F401
from mmbhvit.deploy import (PackedBHViT, UnsupportedModuleError, arch_spec,
                            export_model, load_packed)
from mmbhvit.deploy import ops as deploy_ops
from mmbhvit.deploy import registry
from mmbhvit.deploy.ops import PackedOp, named_ops
from mmbhvit.deploy.registry import Handler, Spec, param
from mmbhvit.deploy.spec import PackedFormatError, expected_tensors
from mmbhvit.models import BHViT
from mmbhvit.testing.deploy import calibrate_random_model

ARCH = dict(embed_dims=[32, 64, 128, 128], depths=[1, 1, 2, 1],
            num_heads=[1, 2, 4, 2], mlp_ratios=[4, 2, 2, 4])
BACKENDS = ['torch'] + (['cpp'] if deploy_ops.extension_available() else [])


# --------------------------------------------------------------------------
# A toy block kind, all of it here: module, spec, handler, packed op
# --------------------------------------------------------------------------
class AffineMixer(nn.Module):
    """A per-channel affine token mixer (NCHW)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@dataclass
class AffineMixerSpec(Spec):
    kind = 'test_affine_mixer'
    channels: int

    def tensors(self):
        return dict(scale=param(self.channels), bias=param(self.channels))


class PackedAffineMixer(PackedOp):
    profile_label = 'toy affine mixer'

    def __init__(self, spec, params, dtype, backend):
        super().__init__(dtype, backend)
        self.scale, self.bias = params.f('scale'), params.f('bias')

    def forward(self, x, norm1, norm2):  # channels-last, as every op
        h = x + ((x * norm1[0] + norm1[1]) * self.scale + self.bias)
        return h, h * norm2[0] + norm2[1]


@pytest.fixture
def toy_kind():
    @registry.register(AffineMixer)
    class AffineMixerHandler(Handler):
        spec = AffineMixerSpec
        op = PackedAffineMixer

        def describe(self, m):
            return AffineMixerSpec(channels=m.scale.numel())

        def fold(self, m, spec, out):
            out.put('scale', m.scale.detach().double())
            out.put('bias', m.bias.detach().double())

    yield AffineMixerHandler
    registry.unregister(AffineMixer)


def _backbone(**kw):
    torch.manual_seed(0)
    model = BHViT(dict(ARCH), **kw)
    model.init_weights()
    return calibrate_random_model(model, (64, 64))


@pytest.mark.parametrize('backend', BACKENDS)
def test_toy_block_kind_exports_and_runs(toy_kind, backend):
    model = _backbone()
    for i in (0, 2):  # an MSGDC and an MSMHA block get the toy mixer
        model.stages[i][0].token_mixer = AffineMixer(ARCH['embed_dims'][i])
    model = model.double().eval()
    packed = export_model(model, torch.float64)
    arch = packed['graph']['arch']
    assert arch == arch_spec(model)
    assert arch['stages'][0][0]['token_mixer'] == dict(
        kind='test_affine_mixer', channels=32)
    assert 'backbone.stages.2.0.token_mixer.scale' in packed['tensors']
    assert not any(k.startswith('backbone.stages.2.0.token_mixer.q')
                   for k in packed['tensors'])
    engine = PackedBHViT(packed, torch.float64, backend)
    assert isinstance(engine.stages[0][0].token_mixer, PackedAffineMixer)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x.double())
        prof = engine.profile()
        out = engine(x)
        engine.profile(False)
    for o, r in zip(out, ref):
        assert (o - r).abs().max() <= 1e-9 * r.abs().max()
    assert prof.calls['toy affine mixer'] == 2
    # the file is verified like any other: a toy tensor cut short is named
    tensors = dict(packed['tensors'])
    key = 'backbone.stages.0.0.token_mixer.bias'
    tensors[key] = tensors[key][:3]
    from mmbhvit.deploy.export import seal_packed
    with pytest.raises(PackedFormatError, match=rf"{key}' has shape \(3,\), "
                       r'the architecture spec needs \(32,\)'):
        PackedBHViT(seal_packed(packed['graph'], tensors), torch.float64)


def test_toy_kind_unknown_after_unregistering(toy_kind):
    model = _backbone()
    model.stages[0][0].token_mixer = AffineMixer(32)
    packed = export_model(model.eval())
    registry.unregister(AffineMixer)
    with pytest.raises(PackedFormatError,
                       match="malformed.*unknown kind 'test_affine_mixer'"):
        load_packed(dict(graph=packed['graph'], tensors=packed['tensors']))


def test_unsupported_module_type_is_named():
    model = _backbone()
    model.stages[1][0].token_mixer = nn.Identity()
    msg = (r'cannot deploy a torch\.nn\.modules\.linear\.Identity at '
           r'backbone\.stages\.1\.0\.token_mixer: no deploy handler.*'
           r'supported: .*MSGDC.*MSMHA')
    with pytest.raises(UnsupportedModuleError, match=msg):
        export_model(model.eval())
    with pytest.raises(NotImplementedError, match='Identity'):
        arch_spec(model)  # the spec needs the handlers too


def test_specs_declare_every_tensor_once():
    """The tensors of an export are exactly those its specs declare, and
    every name is the path of a module of the PyTorch model."""
    model = _backbone(attn_binarizer='gsb', binary_merge=True)
    packed = export_model(model)
    expected = expected_tensors(packed['graph'])
    assert sorted(expected) == sorted(packed['tensors'])
    modules = {f'backbone.{n}' if n else 'backbone'
               for n, _ in model.named_modules()}
    for name in expected:
        owner = name
        while owner not in modules:  # strip the tensor's own (dotted) name
            owner = owner.rsplit('.', 1)[0]
        assert owner.count('.') >= 1 or owner == 'backbone', name
    gsb = 'backbone.stages.2.0.token_mixer.gsb'
    assert expected[gsb] == ((4, ), 'float64')
    alpha = model.stages[2][0].token_mixer.binarizer.alpha.detach()
    assert packed['tensors'][gsb][0].item() == alpha.item()


def test_spec_round_trip_and_errors():
    model = _backbone()
    spec = registry.describe(model)
    again = Spec.from_dict(copy.deepcopy(spec.to_dict()))
    assert again == spec
    with pytest.raises(ValueError, match=r"arch\.stages.*msgdc.*fields"):
        d = spec.to_dict()
        del d['stages'][0][0]['token_mixer']['groups']
        Spec.from_dict(d, 'arch')
    bad = copy.deepcopy(spec)
    bad.stages[0][0].token_mixer.groups = 5
    assert any('groups 5 does not divide 32' in e
               for e in registry.spec_errors(bad, 'arch'))


def test_profile_and_record_are_hooks():
    """Profiling and recording are hooks on the ops (no argument threaded
    through the calls) and leave no hook behind when switched off."""
    model = _backbone()
    engine = PackedBHViT(export_model(model))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                   for m in engine.modules()) + sum(
                       op._hooks is not None for _, op in named_ops(engine))

    assert len(list(named_ops(engine))) > 40

    assert hooks() == 0
    with torch.no_grad():
        ref = engine(x)
        prof = engine.profile()
        rec = engine.record()
        out = engine(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # one call per op: depths [1, 1, 2, 1]
    assert prof.calls['msgdc (binary 3x3 convs)'] == 2
    assert prof.calls['mlp expand + reduce (binary 1x1)'] == 5
    assert prof.calls['attention q/k/v (binary 1x1)'] == 9
    assert prof.calls['patch merging (float)'] == 3
    assert all(t > 0 for t in prof.times.values())
    names = [n for n, _ in rec.items]
    assert names[:3] == ['stages.0.0.token_mixer', 'stages.0.0.ffn.expand',
                         'stages.0.0.ffn.reduce']
    assert 'stages.2.1.token_mixer.context.attn_levels' in names
    assert len(names) == len(set(names))
    engine.profile(False)
    engine.record(False)
    assert hooks() == 0
