# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Packed file format v3: what the file claims is verified, and a file that
is corrupt, old, inconsistent or of another model is refused with an error
that names the file, the tensor and the problem.

* load: format/version, SHA-256 of the graph and of the tensors, manifest
  (names, shapes, dtypes), consistency of the architecture spec;
* engine build (both backends): every tensor's shape against the spec;
* ``use_packed_backbone``: the full spec and the outputs on a probe input
  against the PyTorch backbone it replaces;
* ``save_packed``: atomic, a full disk leaves the previous file intact.
"""
import copy
import errno
import json
import os
import os.path as osp

import pytest
import torch
from torch import nn

import mmbhvit  # noqa: F401
import mmbhvit.utils.io as io_mod
from mmbhvit.deploy import (PackedBHViT, PackedClassifier, PackedFormatError,
                            export_model, load_engine, load_packed,
                            save_packed)
from mmbhvit.deploy import export as export_mod
from mmbhvit.deploy import mmseg_backend
from mmbhvit.deploy import ops as deploy_ops
from mmbhvit.deploy import spec as spec_mod
from mmbhvit.deploy.export import seal_packed
from mmbhvit.deploy.mmseg_backend import use_packed_backbone
from mmbhvit.testing.deploy import calibrate_random_model
from mmbhvit.models import BHViT
from mmbhvit.utils.io import DiskFullError, sha256_file

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
HAS_EXT = deploy_ops.extension_available()
BACKENDS = [
    pytest.param('cpp', marks=pytest.mark.skipif(
        not HAS_EXT, reason='packed-bit C++ kernels not built: '
        f'{deploy_ops.extension_error()}')), 'torch'
]

# small widths, every block kind (as tests/test_deploy.py)
ARCH = dict(embed_dims=[32, 64, 128, 128], depths=[1, 1, 2, 1],
            num_heads=[1, 2, 4, 2], mlp_ratios=[4, 2, 2, 4])


def _quiet():
    import logging

    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


def _backbone(seed=0, arch=ARCH, calibrated=True, **kw):
    """A reduced BHViT: calibrated like a trained network (the weights a
    checkpoint would bring), or as initialised (untrained)."""
    torch.manual_seed(seed)
    _quiet()
    model = BHViT(dict(arch), **kw)
    model.init_weights()
    if not calibrated:
        return model.eval()
    return calibrate_random_model(model, (64, 64), seed=seed)


def _classifier(seed=0):
    from mmengine.registry import DefaultScope

    from mmbhvit.testing.parity import build_classifier
    torch.manual_seed(seed)
    _quiet()
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = build_classifier(dict(type='BHViT', arch=ARCH), 7)
    model.init_weights()
    return calibrate_random_model(model, (64, 64), seed=seed)


class _Segmentor(nn.Module):
    """The parts of an mmseg segmentor use_packed_backbone touches."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.decode_head = nn.Conv2d(backbone.num_features[-1], 3, 1)


@pytest.fixture(scope='module')
def model():
    return _backbone(0)


@pytest.fixture(scope='module')
def packed(model):
    return export_model(model)


def _x():
    g = torch.Generator().manual_seed(4)
    return torch.randn(1, 3, 64, 64, generator=g)


# --------------------------------------------------------------------------
# what the file holds
# --------------------------------------------------------------------------
def test_file_carries_spec_manifest_and_digests(model, packed, tmp_path):
    g = packed['graph']
    assert g['version'] == 3
    arch = g['arch']
    assert arch == spec_mod.arch_spec(model)  # the exporter's own function
    for key, value in dict(depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 2],
                           mlp_ratios=[4, 2, 2, 4], window_size=7,
                           attn_binarizer='lsq', binary_merge=False,
                           shift3=True, shift5=True, img_size=[224, 224],
                           in_channels=3, out_indices=[0, 1, 2, 3],
                           final_norm=True).items():
        assert arch[key] == value, key
    assert [[b['token_mixer']['kind'] for b in s]
            for s in arch['stages']] == [['msgdc'], ['msgdc'],
                                         ['msmha', 'msmha'], ['msmha']]
    assert arch['stages'][0][0]['token_mixer']['dilations'] == [1, 3, 5]
    assert [m['binary'] for m in arch['downsamples']] == [False] * 3
    # one description of the model: no second layer graph
    assert 'backbone' not in g and g['head'] is None
    # tensor names are the module paths of the PyTorch model
    params = dict(model.named_parameters())
    assert 'stages.2.1.token_mixer.q.conv.weight' in params
    assert 'backbone.stages.2.1.token_mixer.q.wbits' in packed['tensors']
    # every tensor: shape, dtype and digest in the manifest
    man = g['manifest']
    assert sorted(man) == sorted(packed['tensors'])
    for k, t in packed['tensors'].items():
        assert man[k]['shape'] == list(t.shape)
        assert man[k]['dtype'] == ('int64' if k.endswith('wbits') else
                                   'float32')
        assert len(man[k]['sha256']) == 64
    # the digest is deterministic: names sorted, independent of dict order
    again = export_model(model)
    assert again['graph']['tensors_sha256'] == g['tensors_sha256']
    shuffled = dict(reversed(list(packed['tensors'].items())))
    assert spec_mod.tensors_sha256(shuffled) == g['tensors_sha256']
    assert g['meta']['config_sha256'] is None
    assert g['meta']['checkpoint_sha256'] is None
    json.dumps(g)


def test_provenance_digests_recorded_and_validated(model, tmp_path):
    ckpt = tmp_path / 'model.pth'
    torch.save(model.state_dict(), ckpt)
    digest = sha256_file(str(ckpt))
    import hashlib
    assert digest == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    p = export_model(model, meta=dict(checkpoint_sha256=digest,
                                      config_sha256='AB' * 32, note='x'))
    meta = p['graph']['meta']
    assert meta['checkpoint_sha256'] == digest
    assert meta['config_sha256'] == 'ab' * 32 and meta['note'] == 'x'
    with pytest.raises(ValueError, match='checkpoint_sha256.*hex SHA-256'):
        export_model(model, meta=dict(checkpoint_sha256='not-a-digest'))


def test_export_cli_records_config_and_checkpoint_digests(tmp_path, capsys):
    from mmbhvit.apis import build_model
    from mmbhvit.checkpoint_io import save_slim_checkpoint
    config = osp.join(ROOT, 'configs/bhvit/bhvit-reduced_demo-cls.py')
    torch.manual_seed(0)
    _quiet()
    model = build_model(config, student_only=True)
    ckpt, out = str(tmp_path / 'ckpt.pth'), str(tmp_path / 'm.packed.pth')
    save_slim_checkpoint(model.state_dict(), ckpt)
    assert export_mod.main([config, ckpt, out]) == 0
    meta = load_packed(out)['graph']['meta']
    assert meta['checkpoint_sha256'] == sha256_file(ckpt)
    assert meta['config_sha256'] == export_mod.resolved_config_sha256(config)
    assert meta['checkpoint_sha256'] in capsys.readouterr().out


# --------------------------------------------------------------------------
# corrupt, incomplete, inconsistent and old files
# --------------------------------------------------------------------------
@pytest.mark.parametrize('where', [0.5, 0.3, 0.8])
def test_flipped_bytes_are_refused(packed, tmp_path, where):
    path = str(tmp_path / 'm.packed.pth')
    save_packed(packed, path)
    data = bytearray(open(path, 'rb').read())
    mid = int(len(data) * where)
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    with open(path, 'wb') as f:
        f.write(data)
    with pytest.raises(ValueError, match='(?s)m.packed.pth.*(corrupt|cannot '
                       'be read).*re-export') as err:
        load_packed(path)
    assert isinstance(err.value, PackedFormatError)
    with pytest.raises(PackedFormatError, match='m.packed.pth'):
        load_engine(path)


def test_truncated_file_is_refused(packed, tmp_path):
    path = tmp_path / 'cut.pth'
    save_packed(packed, str(path))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(PackedFormatError, match='cut.pth.*cannot be read'):
        PackedBHViT(str(path))


def test_damaged_tensor_is_named(packed):
    tensors = dict(packed['tensors'])
    key = 'backbone.stages.2.1.token_mixer.q.a'
    tensors[key] = tensors[key].clone()
    tensors[key][3] += 1e-3
    with pytest.raises(PackedFormatError,
                       match=f'given dict is corrupt.*SHA-256.*{key}'):
        load_packed(dict(packed, tensors=tensors))


@pytest.mark.parametrize('change,message', [
    ('drop', "no tensor 'backbone.stages.0.0.token_mixer.thr'"),
    ('extra', "tensor 'backbone.extra' is not in its manifest"),
    ('shape', r"'backbone.stages.0.0.token_mixer.thr' has shape \(31,\), "
     r'its manifest says \(32,\)'),
    ('dtype', "'backbone.stages.0.0.token_mixer.thr' has dtype float64, its "
     'manifest says float32'),
])
def test_manifest_must_match_the_tensors(packed, change, message):
    tensors = dict(packed['tensors'])
    key = 'backbone.stages.0.0.token_mixer.thr'
    if change == 'drop':
        del tensors[key]
    elif change == 'extra':
        tensors['backbone.extra'] = torch.zeros(3)
    elif change == 'shape':
        tensors[key] = tensors[key][:-1]
    else:
        tensors[key] = tensors[key].double()
    with pytest.raises(PackedFormatError,
                       match=f'corrupt or incomplete.*{message}'):
        load_packed(dict(packed, tensors=tensors))


def test_edited_graph_is_refused(packed):
    graph = copy.deepcopy(packed['graph'])
    graph['arch']['window_size'] = 5
    edited = dict(packed, graph=graph)
    with pytest.raises(PackedFormatError, match='graph .* does not match its '
                       'SHA-256'):
        load_packed(edited)
    # re-sealed (digests recomputed): the spec contradicts itself
    resealed = seal_packed(graph, packed['tensors'])
    with pytest.raises(PackedFormatError,
                       match=r'(?s)inconsistent.*window_size 7 != '
                       r'arch.window_size 5'):
        load_packed(resealed)


@pytest.mark.parametrize('version', [1, 2])
def test_old_version_file_says_reexport(packed, tmp_path, version):
    path = str(tmp_path / 'old.packed.pth')
    g = packed['graph']
    if version == 1:
        old = dict(format=g['format'], version=1, backbone={}, head=None,
                   param_dtype='float32', stats=g['stats'], meta={})
    else:  # v2: the architecture spec and a separate layer graph, sealed
        old = dict(g, version=2, backbone=dict(prefix='backbone'))
        old = seal_packed(old, packed['tensors'])['graph']
    torch.save(dict(graph=old, tensors=packed['tensors']), path)
    for load in (load_packed, PackedBHViT, load_engine):
        with pytest.raises(ValueError, match='old.packed.pth.* old packed '
                           f'format version {version}.*re-export it with '
                           'tools/deployment/export_binary.py'):
            load(path)
    with pytest.raises(PackedFormatError, match='version 4.*reads version 3'):
        load_packed(dict(packed, graph=dict(g, version=4)))
    with pytest.raises(PackedFormatError, match='not an exported packed'):
        load_packed(dict(state_dict={}))


# --------------------------------------------------------------------------
# tensors that do not fit the spec: refused at engine build, both backends
# --------------------------------------------------------------------------
def _with_tensor(packed, key, tensor):
    """A file whose manifest and digests are consistent (as a buggy or
    hand-made exporter would write it) but whose tensor does not fit the
    architecture spec."""
    tensors = dict(packed['tensors'], **{key: tensor})
    return seal_packed(packed['graph'], tensors)


@pytest.mark.parametrize('backend', BACKENDS)
def test_weight_row_missing_is_refused(packed, backend):
    key = 'backbone.stages.0.0.ffn.expand.wbits'
    words = packed['tensors'][key]
    assert words.shape == (128, 1)
    bad = _with_tensor(packed, key, words[:-1])
    load_packed(bad)  # the file itself is consistent
    with pytest.raises(PackedFormatError,
                       match=rf"{key}' has shape \(127, 1\), the architecture "
                       r'spec needs \(128, 1\)'):
        PackedBHViT(bad, backend=backend)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('key', [
    'backbone.stages.2.0.token_mixer.q.a',  # per output of a projection
    'backbone.stages.1.0.token_mixer.conv2.slope',  # MSGDC
    'backbone.stages.3.0.token_mixer.lsq.step',  # per head
    'backbone.norm.bias',
])
def test_per_channel_parameter_cut_to_one_is_refused(packed, backend, key):
    full = packed['tensors'][key]
    bad = _with_tensor(packed, key, full[:1].clone())
    with pytest.raises(PackedFormatError,
                       match=rf"{key}' has shape \(1,\), the architecture "
                       rf'spec needs \({full.numel()},\)'):
        PackedBHViT(bad, backend=backend)


@pytest.mark.slow
def test_classifier_head_shapes_checked():
    packed = export_model(_classifier())
    bad = _with_tensor(packed, 'head.fc.bias',
                       packed['tensors']['head.fc.bias'][:5])
    with pytest.raises(PackedFormatError, match=r"head.fc.bias' has shape "
                       r'\(5,\), the architecture spec needs \(7,\)'):
        PackedClassifier(bad)


@pytest.mark.skipif(not HAS_EXT, reason='C++ kernels not built')
def test_cpp_kernels_check_their_sizes():
    """Below the engine, every C++ op checks the sizes it indexes."""
    ext = deploy_ops.load_extension()
    g = torch.Generator().manual_seed(0)
    cin, cout = 64, 32
    from mmbhvit.deploy.blocks import PackedProj, ProjSpec
    from mmbhvit.deploy.packing import pack_bits
    from mmbhvit.deploy.registry import Params
    t = {'p.wbits': pack_bits(torch.rand(cout, cin, generator=g) > .5)}
    t['p.thr'] = torch.randn(cin, generator=g)
    for n in ('a', 'b', 'slope', 'post_scale', 'post_bias'):
        t[f'p.{n}'] = torch.randn(cout, generator=g)
    proj = PackedProj(ProjSpec(cin=cin, cout=cout, shortcut='mean'),
                      Params(t, 'p', torch.float32), torch.float32, 'cpp')
    x = torch.randn(5, cin, generator=g)
    args = proj.kernel_args()
    with pytest.raises(RuntimeError, match='must have 32 elements, got 1'):
        ext.proj(x, args[0], args[1], cout, args[2][:1].contiguous(),
                 *args[3:], deploy_ops.SHORTCUTS['mean'])
    with pytest.raises(RuntimeError, match='wt must be'):
        ext.proj(x, args[0], args[1][:, :8].contiguous(), cout, *args[2:],
                 deploy_ops.SHORTCUTS['mean'])


def test_verification_happens_once_at_load(packed, monkeypatch):
    calls = []
    real = export_mod.digest_tensors
    monkeypatch.setattr(export_mod, 'digest_tensors',
                        lambda t: calls.append(1) or real(t))
    # a dict of unknown origin is verified once, when the engine is built
    engine = load_engine(dict(graph=packed['graph'],
                              tensors=packed['tensors']))
    assert len(calls) == 1
    with torch.no_grad():
        engine(_x())
        engine(_x())
    assert len(calls) == 1
    # the exporter's own output was checked when it was made
    load_engine(packed)
    assert len(calls) == 1


# --------------------------------------------------------------------------
# use_packed_backbone: the file must be the model's backbone
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_use_packed_backbone_accepts_the_matching_file(model, packed):
    seg = _Segmentor(copy.deepcopy(model))
    with torch.no_grad():
        ref = seg.backbone(_x())
    assert use_packed_backbone(seg, packed, fast_heads=False) is seg
    assert isinstance(seg.backbone, PackedBHViT)
    with torch.no_grad():
        out = seg.backbone(_x())
    for o, r in zip(out, ref):
        assert (o - r).abs().max() < 1e-4 * r.abs().max()
    # a float64 file and engine are compared to the float32 model as well
    seg = _Segmentor(copy.deepcopy(model))
    use_packed_backbone(seg, export_model(copy.deepcopy(model).double(),
                                          torch.float64),
                        dtype=torch.float64, fast_heads=False)


@pytest.mark.slow
def test_use_packed_backbone_refuses_other_depths(model):
    other = _backbone(0, arch=dict(ARCH, depths=[1, 1, 3, 1]))
    seg = _Segmentor(copy.deepcopy(model))
    with pytest.raises(ValueError, match=r'(?s)given dict does not fit the '
                       r'model.*'
                       r'depths: packed file \[1, 1, 3, 1\], model '
                       r'\[1, 1, 2, 1\].*stages\[2\]\[2\]: packed file a '
                       r'msmha block, model .<absent>.'):
        use_packed_backbone(seg, export_model(other))
    assert isinstance(seg.backbone, BHViT)  # unchanged


@pytest.mark.parametrize('kw,field', [
    (dict(attn_binarizer='gsb'), 'attn_binarizer'),
    (dict(shift5=False), 'shift5'),
    (dict(binary_merge=True), 'binary_merge'),
    (dict(window_size=5), 'window_size'),
    (dict(img_size=128), 'img_size'),
    (dict(out_indices=(1, 2, 3)), 'out_indices'),
])
@pytest.mark.slow
def test_use_packed_backbone_lists_differing_options(model, kw, field):
    other = _backbone(0, **kw)
    seg = _Segmentor(copy.deepcopy(model))
    with pytest.raises(PackedFormatError, match=rf'(?s)differs.*\n  {field}: '
                       'packed file'):
        use_packed_backbone(seg, export_model(other), fast_heads=False)


@pytest.mark.parametrize('which', ['untrained', 'other checkpoint'])
@pytest.mark.slow
def test_use_packed_backbone_refuses_other_weights(model, which, tmp_path):
    """Same architecture, other weights: an untrained export, or one of
    another checkpoint while the model (backbone and heads) holds the
    checkpoint it was loaded from."""
    other = (_backbone(0, calibrated=False) if which == 'untrained' else
             _backbone(1))
    path = str(tmp_path / 'other.packed.pth')
    save_packed(export_model(other), path)
    seg = _Segmentor(copy.deepcopy(model)).train()
    with pytest.raises(PackedFormatError, match='other.packed.pth. does not '
                       "hold the weights of the model's backbone.*probe"):
        use_packed_backbone(seg, path)
    # the model is left as it was
    assert isinstance(seg.backbone, BHViT) and seg.backbone.training
    assert all(p.dtype == torch.float32 for p in seg.backbone.parameters())
    # explicit opt-out: architecture only
    use_packed_backbone(seg, path, verify='spec', fast_heads=False)
    assert isinstance(seg.backbone, PackedBHViT)
    with pytest.raises(ValueError, match='verify must be one of'):
        use_packed_backbone(_Segmentor(copy.deepcopy(model)), path,
                            verify='none')


@pytest.mark.slow
def test_probe_decides_in_float64_when_float32_disagrees(model, packed,
                                                         monkeypatch):
    """A float32 sign decision within rounding of its threshold can flip
    and attention amplifies it; the probe then compares in float64 and
    restores the PyTorch backbone's dtype."""
    monkeypatch.setattr(mmseg_backend, 'PROBE_RTOL', 1e-30)
    old = copy.deepcopy(model)
    engine = PackedBHViT(packed)
    errs = mmseg_backend._probe_errors(old, engine, load_packed(packed),
                                       engine.backend)
    assert max(errs) < 1e-5
    assert all(p.dtype == torch.float32 for p in old.parameters())


# --------------------------------------------------------------------------
# atomic write
# --------------------------------------------------------------------------
class _FullDisk:
    """A file object whose disk fills up after ``limit`` bytes."""

    def __init__(self, f, limit):
        self._f, self._left = f, limit

    def write(self, data):
        data = memoryview(data).cast('B')
        if len(data) > self._left:
            self._f.write(data[:self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def test_save_packed_under_a_full_disk_keeps_the_old_file(
        packed, tmp_path, monkeypatch):
    path = str(tmp_path / 'm.packed.pth')
    save_packed(packed, path)
    before = open(path, 'rb').read()
    newer = export_model(_backbone(1))
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        io_mod.os, 'fdopen',
        lambda fd, mode='r', *a, **k: _FullDisk(real_fdopen(fd, mode, *a, **k),
                                                len(before) // 2))
    with pytest.raises(DiskFullError, match='no space .*m.packed.pth'):
        save_packed(newer, path)
    monkeypatch.undo()
    assert open(path, 'rb').read() == before  # byte-identical
    assert os.listdir(tmp_path) == ['m.packed.pth']  # no temporary left
    load_packed(path)
    # and a normal write replaces it
    save_packed(newer, path)
    assert load_packed(path)['graph']['tensors_sha256'] == newer['graph'][
        'tensors_sha256']


def test_save_packed_refuses_an_inconsistent_dict(packed, tmp_path):
    tensors = dict(packed['tensors'])
    tensors.pop('backbone.norm.bias')
    path = tmp_path / 'x.pth'
    with pytest.raises(PackedFormatError, match="no tensor 'backbone.norm"):
        save_packed(dict(packed, tensors=tensors), str(path))
    assert not path.exists()


@pytest.mark.slow
def test_image_demo_packed_backend_refuses_another_model(tmp_path):
    """demo/image_demo.py --backend packed: with --checkpoint the packed file
    must hold that checkpoint's backbone (probe); without, the architecture
    must still be the config's."""
    import cv2
    import numpy as np

    from _helpers import load_script
    from mmbhvit.apis import build_model
    from mmbhvit.checkpoint_io import save_slim_checkpoint
    demo = load_script('demo/image_demo.py', 'image_demo')
    cfg = osp.join(ROOT, 'configs/bhvit/upernet_bhvit-tiny_demo-shapes.py')
    _quiet()
    torch.manual_seed(0)
    model = build_model(cfg)
    calibrate_random_model(model.backbone, (64, 64), seed=1)
    ckpt = str(tmp_path / 'model.pth')
    save_slim_checkpoint(model.state_dict(), ckpt)
    other = str(tmp_path / 'other.packed.pth')  # same config, other weights
    backbone = copy.deepcopy(model.backbone)
    backbone.init_weights()  # new random 1x1 weights and embeddings
    save_packed(export_model(backbone), other)
    deeper = str(tmp_path / 'deeper.packed.pth')  # BHViT-small depths
    save_packed(export_model(BHViT('small', img_size=96).eval()), deeper)
    img = str(tmp_path / 'img.png')
    cv2.imwrite(img, (np.random.default_rng(0).random((64, 64, 3)) *
                      255).astype(np.uint8))
    out = str(tmp_path / 'out.png')
    base = [img, cfg, '--backend', 'packed', '--out-file', out]
    with pytest.raises(SystemExit, match="other.packed.pth. does not hold "
                       "the weights of the model's backbone"):
        demo.main(base + ['--checkpoint', ckpt, '--packed-model', other])
    with pytest.raises(SystemExit, match=r'(?s)deeper.packed.pth. does not '
                       r'fit the model.*depths: packed file \[3, 4, 8, 4\], '
                       r'model \[2, 2, 6, 2\]'):
        demo.main(base + ['--packed-model', deeper])
    assert not osp.exists(out)
