# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Tests of mmbhvit.compat: the light mmcv.ops on mmcv-lite (checkpoint
loading: tests/test_checkpoint_io.py)."""
import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbhvit import compat

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COMPAT_FILE = osp.join(REPO_ROOT, 'mmbhvit', 'compat.py')

lite_only = pytest.mark.skipif(
    not compat.is_lite_mmcv(), reason='full mmcv with compiled ops installed')


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                          cwd=REPO_ROOT,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=120)


# ---------------------------------------------------------------------------
# mmcv-lite branch (this machine, CI)
# ---------------------------------------------------------------------------


@lite_only
def test_import_mmbhvit_installs_light_ops():
    import mmcv

    assert compat.light_ops_installed()
    assert sys.modules['mmcv.ops'] is mmcv.ops
    assert 'point_sample' in mmcv.ops.PURE_TORCH_OPS
    assert 'sigmoid_focal_loss' in mmcv.ops.COMPILED_OPS
    # installing again is a no-op that reports the same state
    assert compat.install_light_mmcv_ops() is True
    assert sys.modules['mmcv.ops'] is mmcv.ops


@lite_only
@pytest.mark.slow
def test_mmseg_imports_in_fresh_process():
    result = run_python("""
        import mmbhvit
        import mmseg.models
        from mmseg.apis import init_model, inference_model
        from mmseg.models.losses import focal_loss
        from mmseg.utils import mask_classification
        print('IMPORTS-OK', mmbhvit.compat.light_ops_installed())
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'IMPORTS-OK True' in result.stdout


@lite_only
@pytest.mark.slow
def test_without_compat_mmseg_models_fails():
    """The failure compat exists for (proves the test above means it)."""
    result = run_python('import mmseg.models')
    assert result.returncode != 0
    assert "No module named 'mmcv._ext'" in result.stderr


@lite_only
def test_point_sample_matches_grid_sample():
    from mmcv.ops import point_sample

    image = torch.tensor([[[[0., 1.], [2., 3.]]]])  # 1x1x2x2
    # (x, y) in [0, 1]: the centre, then the centre of the top-left pixel
    points = torch.tensor([[[0.5, 0.5], [0.25, 0.25], [0.75, 0.25]]])
    out = point_sample(image, points, align_corners=False)
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out, torch.tensor([[[1.5, 0.0, 1.0]]]))

    feats = torch.randn(2, 3, 5, 7)
    coords = torch.rand(2, 11, 2)
    expected = F.grid_sample(
        feats, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0]
    torch.testing.assert_close(point_sample(feats, coords), expected)


@lite_only
@pytest.mark.parametrize('op_name',
                         ['sigmoid_focal_loss', 'nms', 'DeformConv2d'])
def test_compiled_op_raises_clear_error(op_name):
    import mmcv.ops

    op = getattr(mmcv.ops, op_name)  # importing works (mmseg needs it) ...
    assert isinstance(op, type)
    assert not isinstance(nn.Conv2d(1, 1, 1), op)
    with pytest.raises(ModuleNotFoundError) as info:  # ... using it doesn't
        op(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))
    assert isinstance(info.value, compat.MissingCompiledOpError)
    message = str(info.value)
    assert f'mmcv.ops.{op_name}' in message
    assert 'compiled ops' in message and 'mmcv==2.1.0' in message


@lite_only
def test_unguarded_and_guarded_mmseg_users():
    import mmcv.ops
    from mmseg.models.decode_heads import psa_head
    from mmseg.models.losses import focal_loss

    # focal_loss.py imports sigmoid_focal_loss at module level
    with pytest.raises(compat.MissingCompiledOpError, match='sigmoid_focal'):
        focal_loss._sigmoid_focal_loss(
            torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 2.0, 0.25,
            None, 'none')
    # psa_head guards its import (``except ModuleNotFoundError: PSAMask =
    # None``): it gets the placeholder, and building the head names the op
    assert psa_head.PSAMask is mmcv.ops.PSAMask
    assert psa_head.PSAMask.__module__ == 'mmcv.ops'
    assert 'PSAMask' in mmcv.ops.COMPILED_OPS
    with pytest.raises(compat.MissingCompiledOpError, match='PSAMask'):
        psa_head.PSAHead(
            in_channels=8, channels=4, num_classes=2, mask_size=(5, 5))


@lite_only
def test_pure_ops_are_real():
    """The light package serves mmcv's own CrissCrossAttention: its output
    matches a loop over positions of the formula (attention of each pixel
    over its column, itself excluded, and its row; softmax over both)."""
    from mmcv.ops import CrissCrossAttention
    from mmcv.ops.cc_attention import CrissCrossAttention as RealCCA

    assert CrissCrossAttention is RealCCA
    torch.manual_seed(0)
    attention = CrissCrossAttention(16).double()
    with torch.no_grad():
        attention.gamma.scale.fill_(0.7)  # initialised to 0 (identity)
    x = torch.randn(1, 16, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        out = attention(x)
        q = attention.query_conv(x)[0]
        k = attention.key_conv(x)[0]
        v = attention.value_conv(x)[0]
    _, H, W = v.shape
    expected = torch.empty_like(x)
    for i in range(H):
        for j in range(W):
            column = [(r, j) for r in range(H) if r != i]
            row = [(i, c) for c in range(W)]
            where = column + row
            energy = torch.stack([q[:, i, j] @ k[:, r, c] for r, c in where])
            weights = torch.softmax(energy, dim=0)
            mixed = sum(w * v[:, r, c] for w, (r, c) in zip(weights, where))
            expected[0, :, i, j] = 0.7 * mixed + x[0, :, i, j]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@lite_only
def test_unknown_name_is_import_error():
    with pytest.raises(ImportError, match='no_such_op'):
        from mmcv.ops import no_such_op  # noqa: F401


# ---------------------------------------------------------------------------
# full-mmcv branch (simulated)
# ---------------------------------------------------------------------------


def test_full_mmcv_is_left_alone():
    """With an importable mmcv._ext, compat must not touch mmcv.ops."""
    result = run_python(f"""
        import importlib.machinery, importlib.util, sys, types
        fake_ext = types.ModuleType('mmcv._ext')
        fake_ext.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)
        sys.modules['mmcv._ext'] = fake_ext
        spec = importlib.util.spec_from_file_location(
            'standalone_compat', {COMPAT_FILE!r})
        compat = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compat)  # runs install_light_mmcv_ops()
        assert not compat.is_lite_mmcv()
        assert compat.install_light_mmcv_ops() is False
        assert not compat.light_ops_installed()
        assert 'mmcv.ops' not in sys.modules
        import mmcv
        assert not hasattr(mmcv, 'ops')
        print('FULL-MMCV-UNTOUCHED')
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'FULL-MMCV-UNTOUCHED' in result.stdout


def test_broken_mmcv_ext_falls_back_with_warning():
    """An mmcv._ext that exists but fails to import (wrong torch build)."""
    result = run_python(f"""
        import importlib.abc, importlib.machinery, sys, warnings

        class BrokenExt(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == 'mmcv._ext':
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise ImportError('_ext.so: undefined symbol: fake')

        sys.meta_path.insert(0, BrokenExt())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import importlib.util
            spec = importlib.util.spec_from_file_location(
                'standalone_compat', {COMPAT_FILE!r})
            compat = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(compat)
        assert compat.light_ops_installed()
        assert any('fails to import' in str(w.message) for w in caught)
        from mmcv.ops import nms
        try:
            nms()
        except compat.MissingCompiledOpError as err:
            assert 'undefined symbol: fake' in str(err), err
            print('BROKEN-EXT-OK')
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'BROKEN-EXT-OK' in result.stdout
