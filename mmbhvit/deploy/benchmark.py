# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Batch-1 CPU latency of a BHViT in three forms, measured side by side:

(a) the PyTorch full-precision counterpart (``weight_bits = act_bits = 32``),
(b) the PyTorch binary model (1-bit values simulated with float ops),
(c) the packed engine (:mod:`mmbhvit.deploy.engine`) running (b)'s export.

The three are timed interleaved (a, b, c, c, b, a, ...) after warm-up rounds
so that load from other processes affects them alike
(:mod:`mmbhvit.utils.timing`, the protocol of
``tools/analysis_tools/benchmark.py`` too); medians and quartiles are
reported per thread count. ``--profile`` adds time per layer type for the
three forms. Used by ``tools/deployment/benchmark_binary.py``.
"""
import argparse
import copy
import logging
import os
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .engine import PackedBHViT, PackedClassifier, Profile
from .export import export_model, state_dict_bytes
from .mmseg_backend import use_packed_backbone
from .ops import resolve_backend
from ..testing.deploy import calibrate_random_model
from ..utils.io import atomic_write_json
from ..utils.timing import summarize, time_interleaved

DEFAULT_CLS_CONFIG = 'configs/bhvit/bhvit-small_2xb128_in1k.py'
DEFAULT_SEG_CONFIG = 'configs/bhvit/upernet_bhvit_ade20k.py'
#: the short task names of this benchmark
TASK_KEYS = {'classification': 'cls', 'segmentation': 'seg'}


def _quiet():
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


def build_pair(config: str, checkpoint: Optional[str] = None,
               calib_size=(128, 128)):
    """The binary model of ``config`` (``checkpoint`` loaded, or a random
    initialisation made realistic by :func:`calibrate_random_model`) and
    its full-precision counterpart (same config, 32-bit)."""
    from ..apis import build_model
    _quiet()
    binary = build_model(config, checkpoint, student_only=True)
    if checkpoint is None:
        torch.manual_seed(0)
        calibrate_random_model(binary, calib_size)
    fp = build_model(config, full_precision=True, student_only=True)
    torch.manual_seed(0)
    calibrate_random_model(fp, calib_size)
    return binary.eval(), fp.eval()


def _group(name: str) -> str:
    """Forms compared with each other: the whole classifier, the backbone,
    or the full segmentor."""
    if 'backbone' in name and 'heads' not in name:
        return 'backbone'
    return 'full model' if ('full' in name or 'heads' in name) else 'model'


def _module_profile(model: nn.Module, kinds: Dict[str, tuple]):
    """Forward hooks that accumulate time per module kind (non-nested
    kinds). Returns (times dict, remove function)."""
    times = defaultdict(float)
    handles = []
    for name, m in model.named_modules():
        for kind, types in kinds.items():
            if isinstance(m, types):
                def pre(mod, inp, kind=kind):
                    mod._mmbhvit_t0 = time.perf_counter()

                def post(mod, inp, out, kind=kind):
                    times[kind] += time.perf_counter() - mod._mmbhvit_t0

                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
                break

    def remove():
        for h in handles:
            h.remove()

    return times, remove


def pytorch_kinds(model: nn.Module) -> Dict[str, tuple]:
    from ..models.backbones.bhvit import (MSGDC, MSMHA, BinaryFFN, ConvStem,
                                          PatchMerging, ShiftBranches)
    kinds = {
        'stem (float)': (ConvStem, ),
        'msgdc': (MSGDC, ),
        'msmha (attention + q/k/v/proj)': (MSMHA, ),
        'mlp (expand + reduce)': (BinaryFFN, ),
        'shift branches': (ShiftBranches, ),
        'patch merging': (PatchMerging, ),
    }
    for attr in ('decode_head', 'auxiliary_head', 'neck', 'head'):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            kinds[f'{attr} (float)'] = (type(m), )
    return kinds


def time_forms(forms: Dict[str, Callable[[], object]], iters: int,
               warmup: int) -> Dict[str, dict]:
    """Time the forms interleaved (:mod:`mmbhvit.utils.timing`) under
    ``torch.inference_mode``; per form the median, quartiles and minimum in
    milliseconds and the number of timed runs."""
    with torch.inference_mode():
        times = time_interleaved(forms, iters, warmup)
    summary = {}
    for name, ts in times.items():
        s = summarize(ts)
        summary[name] = dict(median_ms=1e3 * s['median'], q1_ms=1e3 * s['q1'],
                             q3_ms=1e3 * s['q3'], min_ms=1e3 * s['min'],
                             n=len(ts))
    return summary


def benchmark_task(task: str, binary: nn.Module, fp: nn.Module,
                   size, threads: List[int], iters: int, warmup: int,
                   profile: bool, backend: str = 'auto') -> dict:
    """Time (a) fp, (b) binary, (c) packed for ``task`` ('cls' or 'seg')."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    packed = export_model(binary)
    backend = resolve_backend(backend)
    result = dict(task=task, input=list(x.shape), backend=backend,
                  runs={})
    if task == 'cls':
        engine = PackedClassifier(packed, backend=backend).eval()
        forms = {
            '(a) pytorch fp32': lambda: fp(x, mode='tensor'),
            '(b) pytorch binary (simulated)': lambda: binary(x, mode='tensor'),
            '(c) packed engine': lambda: engine(x),
        }
        laps_owner = engine
    else:
        engine = PackedBHViT(packed, backend=backend).eval()
        # the segmentor as users run it: use_packed_backbone's defaults
        seg_packed = use_packed_backbone(
            copy.deepcopy(binary), packed, backend=backend)
        forms = {
            '(a) pytorch fp32 backbone': lambda: fp.backbone(x),
            '(b) pytorch binary backbone (simulated)':
            lambda: binary.backbone(x),
            '(c) packed engine backbone': lambda: engine(x),
            '(a) pytorch fp32 full model': lambda: fp(x, mode='tensor'),
            '(b) pytorch binary full model':
            lambda: binary(x, mode='tensor'),
            '(c) packed backbone + pytorch heads (BN folded, '
            'channels-last)':
            lambda: seg_packed(x, mode='tensor'),
        }
        laps_owner = engine
    result['file_mb'] = dict(
        fp32_backbone=state_dict_bytes(binary.backbone) / 2**20,
        packed_backbone=sum(
            t.numel() * t.element_size() for k, t in packed['tensors'].items()
            if k.startswith('backbone.')) / 2**20)
    old = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            result['runs'][n] = time_forms(forms, iters, warmup)
            if profile:
                result.setdefault('profile', {})[n] = _profile(
                    forms, binary, fp, laps_owner, iters, task, x)
    finally:
        torch.set_num_threads(old)
    return result


def _profile(forms, binary, fp, laps_owner, iters, task, x) -> dict:
    """Time per layer type: hooks on the PyTorch models (backbone layers,
    and the head for classifiers), the engine's own profile (forward hooks
    on its ops, :meth:`PackedBHViT.profile`)."""
    out = {}
    for label, model in (('(a) pytorch fp32', fp),
                         ('(b) pytorch binary', binary)):
        times, remove = _module_profile(model, pytorch_kinds(model))
        try:
            with torch.inference_mode():
                for _ in range(iters):
                    if task == 'cls':
                        model(x, mode='tensor')
                    else:
                        model.backbone(x)
        finally:
            remove()
        out[label] = {k: 1e3 * v / iters for k, v in times.items()}
    laps: Profile = laps_owner.profile(True)
    try:
        engine_fn = [f for k, f in forms.items() if k.startswith('(c)')][0]
        with torch.inference_mode():
            for _ in range(iters):
                engine_fn()
    finally:
        laps_owner.profile(False)
    out['(c) packed engine'] = {
        k: 1e3 * v / iters for k, v in laps.times.items()
    }
    return out


def format_result(res: dict) -> str:
    lines = [f"## {res['task']}: input {res['input']}, engine backend "
             f"{res['backend']!r}"]
    fm = res['file_mb']
    lines.append(f"backbone weights: fp32 {fm['fp32_backbone']:.1f} MiB, "
                 f"packed {fm['packed_backbone']:.2f} MiB")
    for n, runs in res['runs'].items():
        lines.append(f'\nthreads = {n}')
        lines.append('| form | median ms | q1–q3 ms | min ms | vs (a) |')
        lines.append('|---|---:|---:|---:|---:|')
        ref = {
            _group(name): s['median_ms']
            for name, s in runs.items() if name.startswith('(a)')
        }
        for name, s in runs.items():
            base = ref.get(_group(name))
            speed = (f"{base / s['median_ms']:.2f}x" if base else '')
            lines.append(f"| {name} | {s['median_ms']:.1f} | "
                         f"{s['q1_ms']:.1f}–{s['q3_ms']:.1f} | "
                         f"{s['min_ms']:.1f} | {speed} |")
    for n, prof in res.get('profile', {}).items():
        lines.append(f'\nprofile (threads = {n}), ms per forward by layer '
                     'type:')
        for form, times in prof.items():
            total = sum(times.values())
            lines.append(f'{form}: total {total:.1f} ms')
            for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
                share = 100 * v / max(total, 1e-9)
                lines.append(f'    {v:8.2f} ms {share:5.1f}%  {k}')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Batch-1 CPU latency: PyTorch fp32 counterpart vs '
        'PyTorch binary (simulated) vs the packed engine')
    p.add_argument('config', nargs='?', default=None,
                   help='one config (mmpretrain classifier or mmseg '
                   f'segmentor); default: {DEFAULT_CLS_CONFIG} at 224 and '
                   f'{DEFAULT_SEG_CONFIG} at 512')
    p.add_argument('--checkpoint', default=None,
                   help='trained checkpoint (default: random, calibrated)')
    p.add_argument('--size', type=int, nargs='+', default=None,
                   help='input size (default 224 for classifiers, 512 for '
                   'segmentors)')
    p.add_argument('--threads', type=int, nargs='+', default=None,
                   help='thread counts to measure (default: 1 and all)')
    p.add_argument('--iters', type=int, default=None,
                   help='timed iterations per form (default 20 cls / 7 seg)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--backend', default='auto', choices=('auto', 'cpp',
                                                         'torch'))
    p.add_argument('--profile', action='store_true',
                   help='also print the time per layer type')
    p.add_argument('--json', default=None, help='write the results here')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..apis import task_of
    jobs = ([(args.config, TASK_KEYS[task_of(args.config)])]
            if args.config else
            [(DEFAULT_CLS_CONFIG, 'cls'), (DEFAULT_SEG_CONFIG, 'seg')])
    threads = args.threads or sorted({1, torch.get_num_threads()})
    load = ', '.join(f'{v:.2f}' for v in os.getloadavg())
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, threads '
          f'{threads}, engine backend {resolve_backend(args.backend)!r}, '
          f'load average before: {load}')
    if resolve_backend(args.backend) == 'cpp':
        from .ops import load_extension
        print(f'packed kernels: {load_extension().isa()}')
    results = []
    for config, task in jobs:
        size = args.size or ([224] if task == 'cls' else [512])
        size = size * 2 if len(size) == 1 else size
        iters = args.iters or (20 if task == 'cls' else 7)
        binary, fp = build_pair(config, args.checkpoint)
        print(f'\n# {config}')
        res = benchmark_task(task, binary, fp, size, threads, iters,
                             args.warmup, args.profile, args.backend)
        res['config'] = config
        res['load_after'] = os.getloadavg()
        print(format_result(res), flush=True)
        print('load average after: ' +
              ', '.join(f'{v:.2f}' for v in res['load_after']))
        results.append(res)
    if args.json:
        atomic_write_json(results, args.json, indent=1)
    return 0
