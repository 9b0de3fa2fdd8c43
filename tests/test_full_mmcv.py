# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""With full mmcv (compiled ops), mmbhvit.compat must change nothing.

Run by `make test-full-mmcv` in the second virtualenv (.venv-mmcv, full
mmcv 2.1.0 built from source); under mmcv-lite (`make test`) the full-mmcv
tests skip, and only the requirement files are compared.
"""
import json
import os.path as osp
import re
import subprocess
import sys

import pytest

from mmbhvit.compat import is_lite_mmcv

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

needs_full_mmcv = pytest.mark.skipif(
    is_lite_mmcv(), reason='mmcv-lite is installed (no mmcv._ext): these '
    'tests run in `make test-full-mmcv`')


def _pins(name):
    pins = {}
    with open(osp.join(REPO, 'requirements', name)) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                pkg = re.split(r'[=<>!~ ]', line, 1)[0].lower()
                pins[pkg] = line
    return pins


def test_full_mmcv_requirements_equal_runtime_but_mmcv():
    lite, full = _pins('runtime.txt'), _pins('runtime-full-mmcv.txt')
    assert lite.pop('mmcv-lite') == 'mmcv-lite==2.1.0'
    assert full.pop('mmcv') == 'mmcv==2.1.0'  # the same mmcv release
    assert lite == full


@needs_full_mmcv
def test_compat_is_inert_in_a_fresh_process():
    """``import mmbhvit`` then mmseg: the real mmcv.ops, no placeholder."""
    code = r'''
import importlib, json
import mmbhvit
from mmbhvit import compat
import mmcv, mmcv.ops, mmcv._ext
import mmseg.models
from mmcv.ops.focal_loss import sigmoid_focal_loss
from mmcv.ops.point_sample import point_sample
seg_focal = importlib.import_module('mmseg.models.losses.focal_loss')
seg_points = importlib.import_module('mmseg.models.utils.point_sample')
print(json.dumps(dict(
    light=compat.light_ops_installed(),
    install_again=compat.install_light_mmcv_ops(),
    ops_file=mmcv.ops.__file__,
    ops_marked=hasattr(mmcv.ops, '__mmbhvit_light_ops__'),
    nms_module=mmcv.ops.nms.__module__,
    seg_focal_is_real=seg_focal._sigmoid_focal_loss is sigmoid_focal_loss,
    seg_point_sample_is_real=seg_points.point_sample is point_sample,
    ext=mmcv._ext.__file__)))
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info['light'] is False and info['install_again'] is False
    assert info['ops_file'].endswith(osp.join('mmcv', 'ops', '__init__.py'))
    assert not info['ops_marked']
    assert info['nms_module'] == 'mmcv.ops.nms'
    assert info['seg_focal_is_real'] and info['seg_point_sample_is_real']
    assert osp.basename(info['ext']).startswith('_ext')


@needs_full_mmcv
def test_compiled_ops_compute():
    """nms and roi_align from mmcv._ext give the known results."""
    import torch
    from mmcv.ops import RoIAlign, nms

    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [20., 20., 30., 30.], [0., 0., 10., 9.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # box 3 (best) suppresses boxes 0 and 1 (IoU 0.9, 0.66); box 2 is apart
    assert keep.tolist() == [3, 2]
    assert torch.allclose(dets[:, 4], torch.tensor([0.95, 0.7]))

    feat = torch.arange(16.).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 4., 4.]])  # the whole map
    out = RoIAlign((2, 2), spatial_scale=1., sampling_ratio=1,
                   aligned=False)(feat, rois)
    # one sample at the centre of each 2x2 bin: bilinear values
    assert torch.allclose(out.flatten(),
                          torch.tensor([5., 7., 13., 15.]))


@needs_full_mmcv
def test_compat_leaves_an_imported_mmcv_ops_alone():
    import mmcv.ops

    from mmbhvit import compat
    assert not compat.light_ops_installed()
    assert compat.install_light_mmcv_ops() is False
    assert sys.modules['mmcv.ops'] is mmcv.ops
