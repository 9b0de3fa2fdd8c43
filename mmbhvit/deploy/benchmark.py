# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Batch-1 CPU latency of a BHViT in up to five forms, side by side:

(a) the PyTorch full-precision counterpart (``weight_bits = act_bits = 32``),
(b) the PyTorch binary model (1-bit values simulated with float ops),
(c) the packed engine (:mod:`mmbhvit.deploy.engine`) running (b)'s export,
(d) (a) exported to ONNX (:mod:`mmbhvit.deploy.onnx`, static input of the
    benchmark's size) run by ONNX Runtime, fp32,
(e) the same file run by OpenVINO, fp32.

(d) and (e) are the *baselines*: optional (``onnx`` plus the runtime must be
installed; a missing one is skipped with a message naming the pip command),
each runtime's own thread count set to the thread count measured
(``intra_op_num_threads`` / ``INFERENCE_NUM_THREADS``, compiled before the
timed rounds). The speed-ups of (c) are reported against each fp32 form and
against the fastest fp32 engine (the minimum median over (a), (d), (e)).
The OPs (``BOPs / 64 + FLOPs``, :mod:`mmbhvit.analysis`) of the binary model
are split into backbone and head (neck + head(s), and for segmentors the
resize of the logits to the input; auxiliary heads left out).

The forms are timed interleaved (a, b, c, ..., c, b, a, ...) after warm-up
rounds so that load from other processes affects them alike
(:mod:`mmbhvit.utils.timing`, the protocol of
``tools/analysis_tools/benchmark.py`` too), each call after an untimed
pause of :data:`SETTLE_S` (``--settle``): ONNX Runtime's worker threads
busy-wait on a core for ~50 ms after its call returns, which in the same
process slowed the form timed next (the packed segmentor, 2 threads: 286 ms
right after an ONNX Runtime call against 191 ms alone, medians of 6, AMD
EPYC Zen 3); medians and quartiles are
reported per thread count. ``--profile`` adds time per layer type for the
three forms. Used by ``tools/deployment/benchmark_binary.py``.
"""
import argparse
import copy
import logging
import os
import os.path as osp
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .engine import PackedBHViT, PackedClassifier, Profile
from .export import export_model, state_dict_bytes
from .mmseg_backend import PackedConvBlock, use_packed_backbone
from .ops import resolve_backend
from ..testing.deploy import calibrate_random_model
from ..utils.io import atomic_write, atomic_write_json
from ..utils.sysinfo import cpu_description
from ..utils.timing import summarize, time_interleaved

DEFAULT_CLS_CONFIG = 'configs/bhvit/bhvit-small_2xb128_in1k.py'
DEFAULT_SEG_CONFIG = 'configs/bhvit/upernet_bhvit_ade20k.py'
#: the short task names of this benchmark
TASK_KEYS = {'classification': 'cls', 'segmentation': 'seg'}
#: the fp32 baselines: runtime name -> form label prefix
BASELINES = {'onnxruntime': '(d) onnxruntime fp32',
             'openvino': '(e) openvino fp32'}
#: the forms in full precision (speed-ups of (c) are computed against these)
FP32_FORMS = ('(a)', '(d)', '(e)')


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


def resolve_baselines(requested: Optional[Sequence[str]] = None
                      ) -> Tuple[List[str], List[str]]:
    """The fp32 baselines to run and a skip message per one left out.

    ``requested``: runtime names of :data:`BASELINES` (None: all of them).
    Each needs ``onnx`` (the export) and the runtime itself
    (:func:`mmbhvit.deploy.onnx.available_runtimes`); one that is not
    installed is skipped, with a message naming the pip command.
    """
    from . import onnx as onnx_mod
    names = list(BASELINES) if requested is None else list(requested)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f'unknown baseline(s) {unknown}; choose from '
                         f'{sorted(BASELINES)}')
    if not names:
        return [], []
    try:
        import onnx  # noqa: F401
    except ImportError:
        return [], [
            f'skipping the {n} fp32 baseline: the onnx package (the export) '
            "is not installed; pip install 'mmbhvit[onnx]'" for n in names
        ]
    found = set(onnx_mod.available_runtimes())
    run, skipped = [], []
    for n in names:
        if n in found:
            run.append(n)
        else:
            skipped.append(f'skipping the {n} fp32 baseline: {n} is not '
                           f"installed; pip install {n} (or 'mmbhvit[onnx]')")
    return run, skipped


def _export_baselines(task: str, fp: nn.Module, shape, folder: str
                      ) -> Dict[str, str]:
    """ONNX files of the fp32 counterpart at the static ``shape``: for a
    classifier the logits (``'model'``); for a segmentor the backbone
    (``'backbone'``) and the whole segmentor without the resize to the input
    (``'full model'``: what ``fp(x, mode='tensor')`` computes)."""
    from .onnx import export_onnx
    shape = tuple(shape)
    if task == 'cls':
        return {'model': export_onnx(fp, osp.join(folder, 'fp32.onnx'),
                                     input_shape=shape)}
    return {
        'backbone': export_onnx(fp.backbone,
                                osp.join(folder, 'fp32_backbone.onnx'),
                                input_shape=shape),
        'full model': export_onnx(fp, osp.join(folder, 'fp32_full.onnx'),
                                  input_shape=shape, seg_resize=False),
    }


def _baseline_forms(files: Dict[str, str], runtimes: Sequence[str],
                    x: torch.Tensor, threads: int) -> Dict[str, Callable]:
    """The timed calls of the baselines, compiled now for ``threads``
    (outside the timed rounds)."""
    from .onnx import load_runtime
    arr = x.numpy()
    forms = {}
    for runtime in runtimes:
        for group, path in files.items():
            session = load_runtime(path, runtime, threads=threads)
            session(arr)  # compile / allocate before the warm-up rounds
            label = BASELINES[runtime] + ('' if group == 'model' else
                                          f' {group}')
            forms[label] = (lambda s=session: s(arr))
    return forms


def ops_split(model: nn.Module, size) -> Dict[str, float]:
    """OPs (``BOPs / 64 + FLOPs``) of ``model`` (a classifier or segmentor)
    for one ``size`` image: ``backbone``, ``head`` (everything else run at
    inference: neck, head, decode head, resize to the input) and ``total``
    (``backbone + head``), with the BOPs and FLOPs of each."""
    from ..analysis import ClassifierGraph, SegmentorGraph, analyze_model
    from .onnx import task_of_model
    task = task_of_model(model)
    if task == 'segmentation':
        graph = SegmentorGraph(model, with_auxiliary=False)
    elif task == 'classification':
        graph = ClassifierGraph(model)
    else:
        raise ValueError('ops_split: expected an mmpretrain classifier or an '
                         f'mmseg segmentor, got {type(model).__name__}')
    was_training = model.training
    x = torch.zeros(1, getattr(model.backbone, 'in_channels', 3), *size)
    try:
        with torch.no_grad():
            costs, _ = analyze_model(graph.eval(), (x, ),
                                     [('backbone', ['backbone']),
                                      ('total', [''])])
    finally:
        model.train(was_training)
    bb, total = costs['backbone'], costs['total']
    out = dict(backbone_ops=bb.ops, head_ops=total.ops - bb.ops,
               total_ops=total.ops, backbone_bops=bb.bops,
               head_bops=total.bops - bb.bops, backbone_flops=bb.flops,
               head_flops=total.flops - bb.flops)
    return {k: float(v) for k, v in out.items()}


def speedups(runs: Dict[str, dict]) -> Dict[str, dict]:
    """Per group of forms (:func:`_group`) with a packed form (c): its
    speed-up (ratio of medians) against each fp32 form present ((a), (d),
    (e)), keyed by that form's name, and ``'fastest fp32'``: against the
    fastest of them (named in ``'fastest fp32 form'``)."""
    groups = defaultdict(dict)
    for name, s in runs.items():
        groups[_group(name)][name] = s['median_ms']
    out = {}
    for group, medians in groups.items():
        packed = [v for k, v in medians.items() if k.startswith('(c)')]
        fp32 = {k: v for k, v in medians.items()
                if k.startswith(FP32_FORMS)}
        if not packed or not fp32:
            continue
        row = {k: v / packed[0] for k, v in fp32.items()}
        fastest = min(fp32, key=fp32.get)
        row['fastest fp32'] = fp32[fastest] / packed[0]
        row['fastest fp32 form'] = fastest
        out[group] = row
    return out


#: seconds of idle CPU before each timed call (longer than the ~50 ms that
#: ONNX Runtime's thread pool keeps spinning after a call)
SETTLE_S = 0.1


def time_forms(forms: Dict[str, Callable[[], object]], iters: int,
               warmup: int, settle: float = SETTLE_S) -> Dict[str, dict]:
    """Time the forms interleaved (:mod:`mmbhvit.utils.timing`) under
    ``torch.inference_mode``, each call after ``settle`` seconds of sleep;
    per form the median, quartiles and minimum in milliseconds and the
    number of timed runs."""
    with torch.inference_mode():
        times = time_interleaved(forms, iters, warmup, settle=settle)
    summary = {}
    for name, ts in times.items():
        s = summarize(ts)
        summary[name] = dict(median_ms=1e3 * s['median'], q1_ms=1e3 * s['q1'],
                             q3_ms=1e3 * s['q3'], min_ms=1e3 * s['min'],
                             n=len(ts))
    return summary


def benchmark_task(task: str, binary: nn.Module, fp: nn.Module,
                   size, threads: List[int], iters: int, warmup: int,
                   profile: bool, backend: str = 'auto',
                   baselines: Sequence[str] = (),
                   ops: bool = True, settle: float = SETTLE_S) -> dict:
    """Time (a) fp, (b) binary, (c) packed for ``task`` ('cls' or 'seg'),
    and the fp32 ``baselines`` (runtime names of :data:`BASELINES`, as
    :func:`resolve_baselines` returns them) (d), (e). ``ops``: add the
    binary model's OPs split (:func:`ops_split`) as ``result['ops']``;
    ``settle``: seconds of sleep before each timed call."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    packed = export_model(binary)
    backend = resolve_backend(backend)
    result = dict(task=task, input=list(x.shape), backend=backend,
                  settle_s=settle, runs={})
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
        packed_convs = sum(isinstance(m, PackedConvBlock)
                           for m in seg_packed.modules())
        full_label = ('(c) packed backbone + heads (binary convs packed, '
                      'rest pytorch; BN folded, channels-last)'
                      if packed_convs else
                      '(c) packed backbone + pytorch heads (BN folded, '
                      'channels-last)')
        forms = {
            '(a) pytorch fp32 backbone': lambda: fp.backbone(x),
            '(b) pytorch binary backbone (simulated)':
            lambda: binary.backbone(x),
            '(c) packed engine backbone': lambda: engine(x),
            '(a) pytorch fp32 full model': lambda: fp(x, mode='tensor'),
            '(b) pytorch binary full model':
            lambda: binary(x, mode='tensor'),
            full_label: lambda: seg_packed(x, mode='tensor'),
        }
        laps_owner = engine
    result['file_mb'] = dict(
        fp32_backbone=state_dict_bytes(binary.backbone) / 2**20,
        packed_backbone=sum(
            t.numel() * t.element_size() for k, t in packed['tensors'].items()
            if k.startswith('backbone.')) / 2**20)
    if ops:
        result['ops'] = ops_split(binary, size)
    result['baselines'] = list(baselines)
    old = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix='mmbhvit_bench_') as folder:
        files = (_export_baselines(task, fp, x.shape, folder)
                 if baselines else {})
        try:
            for n in threads:
                torch.set_num_threads(n)
                timed = dict(forms)
                timed.update(_baseline_forms(files, baselines, x, n))
                result['runs'][n] = time_forms(timed, iters, warmup,
                                               settle)
                result.setdefault('speedups', {})[n] = speedups(
                    result['runs'][n])
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


def float_share(times: Dict[str, float]) -> Tuple[float, float]:
    """``(float time, its fraction of the total)`` of an engine profile
    (``{label: time}``): the op kinds whose label says ``(float)``, i.e. the
    work around the binary kernels (issue 11 asks for <= 10 %)."""
    total = sum(times.values())
    flt = sum(v for k, v in times.items() if '(float)' in k)
    return flt, flt / total if total > 0 else 0.0


def format_result(res: dict) -> str:
    lines = [f"## {res['task']}: input {res['input']}, engine backend "
             f"{res['backend']!r}"]
    fm = res['file_mb']
    lines.append(f"backbone weights: fp32 {fm['fp32_backbone']:.1f} MiB, "
                 f"packed {fm['packed_backbone']:.2f} MiB")
    if 'ops' in res:
        o = res['ops']
        lines.append(f"binary model OPs (BOPs/64 + FLOPs): backbone "
                     f"{o['backbone_ops'] / 1e8:.3f}, head "
                     f"{o['head_ops'] / 1e8:.3f}, total "
                     f"{o['total_ops'] / 1e8:.3f} x10^8")
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
        for group, sp in res.get('speedups', {}).get(n, {}).items():
            vs = ', '.join(f'{sp[k]:.2f}x vs {k}' for k in sp
                           if k.startswith(FP32_FORMS))
            lines.append(f"packed ({group}): {vs}; "
                         f"{sp['fastest fp32']:.2f}x vs the fastest fp32 "
                         f"engine ({sp['fastest fp32 form']})")
    for n, prof in res.get('profile', {}).items():
        lines.append(f'\nprofile (threads = {n}), ms per forward by layer '
                     'type:')
        for form, times in prof.items():
            total = sum(times.values())
            lines.append(f'{form}: total {total:.1f} ms')
            for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
                share = 100 * v / max(total, 1e-9)
                lines.append(f'    {v:8.2f} ms {share:5.1f}%  {k}')
            if form.startswith('(c)'):
                flt, frac = float_share(times)
                lines.append(f'    float work around the kernels: '
                             f'{flt:.2f} ms ({100 * frac:.1f}%)')
                lines.append('    (profiled op by op; unprofiled, each '
                             'block runs as one C++ call)')
    return '\n'.join(lines)


#: markdown columns: (header, form letter) of the timed forms
_MD_FORMS = (('PyTorch fp32 ms', '(a)'), ('ORT fp32 ms', '(d)'),
             ('OpenVINO fp32 ms', '(e)'), ('PyTorch binary ms', '(b)'),
             ('packed ms', '(c)'))


def markdown_rows(results: Sequence[dict], header: bool = True) -> str:
    """README table rows: one per (config, threads) with the median ms of
    every form of the whole model (classifier, or full segmentor), the
    speed-ups of the packed form (c) against each fp32 form and against the
    fastest fp32 engine, and the OPs split backbone / head. Forms not run
    show ``–``. With ``header``: the CPU line and the table header first."""
    lines = []
    if header:
        lines += [f'CPU: {cpu_description()}', '',
                  '| config | input | threads | OPs ×10^8 backbone / head | ' +
                  ' | '.join(h for h, _ in _MD_FORMS) +
                  ' | packed vs PyTorch fp32 | vs ORT fp32 | '
                  'vs OpenVINO fp32 | vs fastest fp32 |',
                  '|---|---|---:|---:|' + '---:|' * (len(_MD_FORMS) + 4)]
    for res in results:
        config = osp.basename(res.get('config') or res['task'])
        size = '×'.join(str(s) for s in res['input'][-2:])
        o = res.get('ops')
        ops = (f"{o['backbone_ops'] / 1e8:.2f} / {o['head_ops'] / 1e8:.2f}"
               if o else '–')
        for n, runs in res['runs'].items():
            whole = {}
            for name, s in runs.items():
                if _group(name) != 'backbone':
                    whole.setdefault(name[:3], (name, s['median_ms']))
            cells = [f'{whole[k][1]:.1f}' if k in whole else '–'
                     for _, k in _MD_FORMS]
            sp = next((v for g, v in res.get('speedups', {}).get(n, {})
                       .items() if g != 'backbone'), {})
            ratios = []
            for letter in FP32_FORMS:
                name = whole.get(letter, (None, ))[0]
                ratios.append(f'{sp[name]:.2f}x' if name in sp else '–')
            ratios.append(f"{sp['fastest fp32']:.2f}x"
                          if 'fastest fp32' in sp else '–')
            lines.append(f'| {config} | {size} | {n} | {ops} | ' +
                         ' | '.join(cells + ratios) + ' |')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Batch-1 CPU latency: PyTorch fp32 counterpart vs '
        'PyTorch binary (simulated) vs the packed engine, and the fp32 '
        'counterpart in ONNX Runtime / OpenVINO (those installed)',
        epilog='Per-op timings of the packed-bit kernels instead (every '
        'kernel set, binary MACs per second, share of the AVX2 popcount '
        'peak): tools/deployment/benchmark_binary.py --kernels --help')
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
    p.add_argument('--baselines', nargs='+', default=None,
                   choices=sorted(BASELINES),
                   help='fp32 baselines: the fp32 counterpart exported to '
                   'ONNX and run by these runtimes (default: those '
                   'installed; a missing one is skipped with a message)')
    p.add_argument('--no-baselines', action='store_true',
                   help='time only the PyTorch forms and the packed engine')
    p.add_argument('--no-ops', action='store_true',
                   help='skip counting the OPs (backbone / head)')
    p.add_argument('--markdown', nargs='?', const='-', default=None,
                   metavar='FILE',
                   help='print README table rows (one per config and thread '
                   'count, CPU line above), or write them to FILE')
    p.add_argument('--json', default=None, help='write the results here')
    p.add_argument('--settle', type=float, default=SETTLE_S,
                   metavar='SECONDS',
                   help='untimed sleep before every timed call, so that no '
                   "form runs while another's threads still spin (ONNX "
                   f'Runtime: ~50 ms after a call; default {SETTLE_S})')
    p.add_argument('--default-malloc', action='store_true',
                   help="leave glibc's allocator settings alone (default: "
                   'keep freed memory, as the tools do on a CPU machine, '
                   'for every form)')
    args = p.parse_args(argv)
    if not args.settle >= 0:
        p.error(f'--settle must be >= 0 seconds, got {args.settle}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..apis import task_of
    if not args.default_malloc:
        from ..utils.malloc import keep_freed_memory
        keep_freed_memory()
    jobs = ([(args.config, TASK_KEYS[task_of(args.config)])]
            if args.config else
            [(DEFAULT_CLS_CONFIG, 'cls'), (DEFAULT_SEG_CONFIG, 'seg')])
    threads = args.threads or sorted({1, torch.get_num_threads()})
    load = ', '.join(f'{v:.2f}' for v in os.getloadavg())
    print(f'CPU: {cpu_description()}')
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, threads '
          f'{threads}, engine backend {resolve_backend(args.backend)!r}, '
          f'{args.settle:g} s idle before each timed call, '
          f'load average before: {load}')
    if args.no_baselines:
        baselines = []
    else:
        baselines, skipped = resolve_baselines(args.baselines)
        for line in skipped:
            print(line)
    print('fp32 baselines: ' + (', '.join(baselines) or 'none'))
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
                             args.warmup, args.profile, args.backend,
                             baselines=baselines, ops=not args.no_ops,
                             settle=args.settle)
        res['config'] = config
        res['load_after'] = os.getloadavg()
        print(format_result(res), flush=True)
        print('load average after: ' +
              ', '.join(f'{v:.2f}' for v in res['load_after']))
        results.append(res)
    if args.json:
        atomic_write_json(results, args.json, indent=1)
    if args.markdown:
        table = markdown_rows(results)
        if args.markdown == '-':
            print('\n' + table)
        else:
            with atomic_write(args.markdown, 'w') as f:
                f.write(table + '\n')
            print(f'markdown rows written to {args.markdown}')
    return 0
