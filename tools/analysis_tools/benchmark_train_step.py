# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Forward+backward time of a BHViT classifier, binary vs full precision.

    python tools/analysis_tools/benchmark_train_step.py --arch small \
        --batch 8 --size 224 --repeats 10 [--threads 2] [--compile] \
        [--official-repo PATH --extra-path DEPS]

Times one training step (forward, cross-entropy, backward; no optimizer
step) of the mmpretrain classifier with 1-bit weights/activations and of its
32-bit counterpart (same architecture, ``weight_bits=act_bits=32``), with
the timing protocol of :mod:`mmbhvit.utils.timing` (cases interleaved, order
reversed every round, so that machine noise hits all alike); prints median,
quartiles and spread, and the ratios of the medians.

``--composed`` adds the 1-bit classifier with its quantizers composed as
before their fusion into :class:`~mmbhvit.models.binary.ShiftedSignSTE` and
:class:`~mmbhvit.models.binary.CentredSignSTE` (same weights, values and
gradients): the gain of the fused Functions, measured in the same run.

``--apart`` adds the 1-bit classifier whose residual projections read
their input as two consumers (the sign and the shortcut, three backward
passes over it) instead of one
:class:`~mmbhvit.models.binary.ShiftedSignShortcut` (one pass).

``--compile`` adds the same two classifiers wrapped in ``torch.compile``
(default inductor backend; the first step, which compiles forward and
backward, is timed separately and reported as the compile time).

``--pointwise`` instead times the forward and forward + backward of every
distinct binary 1×1 layer of the 1-bit model (its input shape at
``--batch``/``--size``) as a float32 convolution, as float32 matrix
products (:class:`~mmbhvit.models.binary.layers.PointwiseConv`) and as
the integer product
(:class:`~mmbhvit.models.binary.layers.SignProductConv1x1`), and says
which one the layer takes: the evidence for the rules of
``BinaryConv2d``.

``--profile`` instead profiles one 1-bit and one 32-bit step op by op
(``torch.profiler`` self CPU time), the ops whose time differs most
between the two first.

``--modules`` instead splits the 1-bit and 32-bit steps by wall clock:
forward per block part and stage (forward hooks), the whole forward, and
the backward (step minus forward), medians over ``--repeats`` interleaved
steps: where the two steps differ without the profiler's per-op overhead.

``--official-repo`` additionally times the official implementation
(IMRL/BHViT, a local clone; it needs ``transformers`` and ``timm``
importable, e.g. via ``--extra-path``) on the same configuration.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` and glibc keeps freed memory
(:func:`mmbhvit.utils.malloc.keep_freed_memory`, for every model timed),
as in ``tools/train.py``; ``--default-malloc`` leaves the allocator alone.
"""
import argparse
import copy
import os
import statistics
import sys
import time
import types

# as tools/train.py: OpenMP threads that busy-wait collapse on a shared CPU
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402

import mmbhvit  # noqa: E402,F401
from mmbhvit.models import BHViT  # noqa: E402
from mmbhvit.models.backbones.bhvit import BinaryResidualProj  # noqa: E402
from mmbhvit.models.binary import BinaryConv2d, SignSTE  # noqa: E402
from mmbhvit.models.binary import fused  # noqa: E402
from mmbhvit.models.binary.fused import fused_kernels  # noqa: E402
from mmbhvit.models.binary.layers import (  # noqa: E402
    PointwiseConv, SignProductConv1x1)
from mmbhvit.testing.parity import build_classifier  # noqa: E402
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.malloc import keep_freed_memory  # noqa: E402
from mmbhvit.utils.timing import summarize, time_interleaved  # noqa: E402


def _backbone_cfg(arch: str, bits: int, **kw) -> dict:
    return dict(type='BHViT', arch=arch, weight_bits=bits, act_bits=bits,
                **kw)


def official_model(repo: str, arch: str, bits: int, num_classes: int):
    """The official classifier for the same config (flags of the official
    training script: shift3, shift5, some_fp, token BatchNorm)."""
    sys.path.insert(0, repo)
    from models import BatchNormT
    from transformer.BHViT import BHViTForImageClassification
    from transformers import ViTConfig
    zoo = BHViT.arch_zoo[arch]
    config = ViTConfig(
        hidden_size=zoo['embed_dims'], depths=zoo['depths'],
        num_attention_heads=zoo['num_heads'],
        intermediate_size=[d * r for d, r in zip(zoo['embed_dims'],
                                                 zoo['mlp_ratios'])],
        num_hidden_layersA=sum(zoo['depths'][:2]),
        num_hidden_layersB=sum(zoo['depths'][2:]), image_size=224,
        layer_norm_eps=1e-5, attention_probs_dropout_prob=0.,
        hidden_dropout_prob=0.)
    config.drop_path, config.num_labels = 0., num_classes
    config.shift3 = config.shift5 = True
    config.norm_layer = BatchNormT
    config.disable_layerscale = False
    config.gsb, config.recu, config.some_fp = False, False, True
    config.weight_bits = config.input_bits = bits
    config.output_attentions = config.output_hidden_states = False
    config.return_dict = False
    return BHViTForImageClassification(config)


class _ComposedClippedSign(torch.autograd.Function):
    """The clipped-STE weight sign as written before the fused Functions
    (mask multiplied in); for ``--composed`` only."""

    @staticmethod
    def forward(ctx, w, scale):
        ctx.save_for_backward(w)
        return scale * torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        w, = ctx.saved_tensors
        return grad * (w.abs() <= 1), None


def _composed_weight(conv) -> torch.Tensor:
    dims = tuple(range(1, conv.weight.dim()))
    scale = conv.weight.abs().mean(dim=dims, keepdim=True).detach()
    centred = conv.weight - conv.weight.mean(dim=dims, keepdim=True)
    return _ComposedClippedSign.apply(centred, scale)


def _composed_input(conv, x, shift=None):
    return SignSTE.apply(x if shift is None else shift(x))


def use_composed_quantizers(model) -> None:
    """Give the binary convolutions of ``model`` the formulation of the
    quantizers before they were fused (autograd through the weight centring,
    a separate shift then :class:`SignSTE`): same values and gradients, more
    tensors; ``--composed`` times it beside the fused one."""
    for m in model.modules():
        if isinstance(m, BinaryConv2d) and m.is_binary and not m.recu:
            m.quantized_weight = types.MethodType(_composed_weight, m)
            m.quantize_input = types.MethodType(_composed_input, m)
    separate_sign_and_shortcut(model)


def separate_sign_and_shortcut(model) -> None:
    """Make the residual projections of ``model`` read their input as two
    consumers, the sign (:class:`ShiftedSignSTE`) and the shortcut, as
    before :class:`~mmbhvit.models.binary.ShiftedSignShortcut` (same values;
    ``--apart`` times it)."""
    for m in model.modules():
        if isinstance(m, BinaryResidualProj):
            m._fused_input = lambda x: None


def train_step(module, forward, x, target) -> None:
    """Forward + cross-entropy + backward (gradients dropped after)."""
    loss = torch.nn.functional.cross_entropy(forward(x), target)
    loss.backward()
    module.zero_grad(set_to_none=True)


def _unfused(model, x):
    with fused_kernels(False):
        return model(x, mode='tensor')


def _pointwise_path(output) -> str:
    name = type(output.grad_fn).__name__
    if name.startswith('SignProductConv1x1'):
        return output.grad_fn.route  # 'popcount', 'integer' or 'conv'
    return 'matmul' if name.startswith('PointwiseConv') else 'conv'


def pointwise_shapes(model, x):
    """``{(in, out, input shape): (count, path taken)}`` for the binary 1×1
    layers that a forward of ``model`` on ``x`` runs; the path is
    ``'popcount'`` or ``'integer'`` (:class:`SignProductConv1x1`'s routes),
    ``'matmul'`` (:class:`PointwiseConv`) or ``'conv'`` (``F.conv2d``)."""
    found = {}

    def record(layer, inputs, output):
        key = (layer.in_channels, layer.out_channels,
               tuple(inputs[0].shape))
        count, _ = found.get(key, (0, None))
        found[key] = (count + 1, _pointwise_path(output))

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, BinaryConv2d) and m.is_binary
             and m.kernel_size == (1, 1) and m.groups == 1]
    try:
        with torch.enable_grad():
            model(x, mode='tensor')
    finally:
        for h in hooks:
            h.remove()
    return found


POINTWISE_PATHS = ('conv', 'matmul', 'integer', 'popcount')


def pointwise_paths() -> tuple:
    """The ways :func:`time_pointwise` times here: ``'integer'`` only where
    ``torch._int_mm`` is fast (elsewhere one product takes seconds),
    ``'popcount'`` only with the extension built; each left out is said."""
    paths = []
    for path in POINTWISE_PATHS:
        if path == 'integer' and not fused.int8_products_fast():
            print('integer products not timed: torch._int_mm is a plain '
                  'loop on this CPU (no AVX-512 VNNI)')
        elif path == 'popcount' and fused.unavailable_reason():
            print(f'popcount products not timed: '
                  f'{fused.unavailable_reason()}')
        else:
            paths.append(path)
    return tuple(paths)


def time_pointwise(model, x, repeats: int, warmup: int) -> None:
    """Print the forward and forward + backward time of each binary 1×1
    layer shape of ``model`` as a float convolution (oneDNN), as float
    matrix products (:class:`PointwiseConv`) and as the exact products of
    :class:`SignProductConv1x1` (integer, popcount) (``--pointwise``)."""
    paths = pointwise_paths()
    shapes = pointwise_shapes(model, x)
    print(f'binary 1x1 layers, {torch.get_num_threads()} threads, '
          f'{repeats} repeats, median ms, forward / forward + backward')
    print(f'{"in->out":>11} {"input shape":>20} {"count":>5} ' +
          ' '.join(f'{k:>15}' for k in paths) + f' {"takes":>8}')
    totals = {k: [0., 0.] for k in paths + ('taken', )}
    for (cin, cout, shape), (count, taken) in shapes.items():
        signs = torch.randint(0, 2, shape).float().mul_(2).sub_(1)
        signs.requires_grad_()
        weight = torch.randint(0, 2, (cout, cin, 1, 1)).float()
        weight = weight.mul_(2).sub_(1).mul_(0.02).requires_grad_()
        grad = torch.randn(shape[0], cout, *shape[2:])
        ops = {'conv': torch.nn.functional.conv2d,
               'matmul': lambda a, b: PointwiseConv.apply(a, b, None),
               'integer': lambda a, b: SignProductConv1x1.apply(
                   a, b, None, 'integer'),
               'popcount': lambda a, b: SignProductConv1x1.apply(
                   a, b, None, 'popcount')}
        cases = {}
        for k in paths:
            op = ops[k]
            cases[k] = lambda op=op: op(signs, weight)
            cases[k + '+b'] = lambda op=op: op(signs, weight).backward(grad)
        times = time_interleaved(cases, repeats, warmup)
        med = {k: summarize(v)['median'] * 1e3 for k, v in times.items()}
        for k in paths + ('taken', ):
            src = taken if k == 'taken' else k
            totals[k][0] += count * med[src]
            totals[k][1] += count * med[src + '+b']
        print(f'{f"{cin}->{cout}":>11} {str(shape):>20} {count:5d} ' +
              ' '.join(f'{med[k]:.2f}/{med[k + "+b"]:.2f}'.rjust(15)
                       for k in paths) + f' {taken:>8}')
    print('per step: ' + ', '.join(
        f'{"as taken" if k == "taken" else "all " + k} '
        f'{v[0]:.0f} / {v[1]:.0f} ms' for k, v in totals.items()))


def profile_ops(models, x, target, repeats: int, warmup: int,
                top: int = 25) -> None:
    """Print ``torch.profiler`` self CPU time per op and step of the 1-bit
    and 32-bit classifiers (``--profile``), the ops with the largest
    difference first: where the 1-bit step spends more or less."""
    from torch.profiler import ProfilerActivity, profile
    per_op = {bits: {} for bits in models}
    forwards = {bits: (lambda x, m=clf: m(x, mode='tensor'))
                for bits, clf in models.items()}
    for _ in range(warmup):
        for bits, clf in models.items():
            train_step(clf, forwards[bits], x, target)
    for _ in range(repeats):  # interleaved, as the timings: the VM drifts
        for bits, clf in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(clf, forwards[bits], x, target)
            for e in prof.key_averages():
                ms = e.self_cpu_time_total / 1e3 / repeats
                per_op[bits][e.key] = per_op[bits].get(e.key, 0.) + ms
    one, full = per_op[1], per_op[32]
    keys = sorted(set(one) | set(full),
                  key=lambda k: -abs(one.get(k, 0.) - full.get(k, 0.)))
    print(f'torch.profiler self CPU time per step (ms), {repeats} steps '
          f'after {warmup} warm-up, {torch.get_num_threads()} threads')
    print(f'{"op":<56} {"1-bit":>9} {"32-bit":>9} {"diff":>9}')
    for k in keys[:top]:
        a, b = one.get(k, 0.), full.get(k, 0.)
        print(f'{k[:56]:<56} {a:9.1f} {b:9.1f} {a - b:+9.1f}')
    a, b = sum(one.values()), sum(full.values())
    print(f'{"total":<56} {a:9.1f} {b:9.1f} {a - b:+9.1f}')


MODULE_KINDS = ('ConvStem', 'MSGDC', 'MSMHA', 'BinaryFFN', 'ShiftBranches',
                'PatchMerging')


def module_times(models, x, target, repeats: int, warmup: int) -> dict:
    """``{bits: {label: [seconds per step]}}``: wall-clock forward time of
    each block part per stage (labels like ``'BinaryFFN s1'``, the parts of
    :data:`MODULE_KINDS`), of the whole forward (``'forward'``) and the
    rest of the step (``'backward'``: loss and backward), for the 1-bit and
    32-bit classifiers, steps interleaved."""
    records = {}
    for bits, clf in models.items():
        rec = records[bits] = {}
        current = {}
        for si, stage in enumerate(clf.backbone.stages):
            for m in stage.modules():
                m._bench_stage = si + 1
        for m in clf.modules():
            kind = type(m).__name__
            if kind not in MODULE_KINDS:
                continue
            label = kind + (f' s{m._bench_stage}'
                            if hasattr(m, '_bench_stage') else '')

            def pre(mod, args, label=label):
                current[label] = time.perf_counter()

            def post(mod, args, out, label=label, rec=rec):
                rec[label][-1] += time.perf_counter() - current[label]

            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
            rec.setdefault(label, [])
        rec['forward'], rec['backward'] = [], []
    for i in range(warmup + repeats):
        for bits, clf in models.items():
            rec = records[bits]
            for times in rec.values():
                times.append(0.)
            start = time.perf_counter()
            out = clf(x, mode='tensor')
            mid = time.perf_counter()
            torch.nn.functional.cross_entropy(out, target).backward()
            clf.zero_grad(set_to_none=True)
            rec['forward'][-1] = mid - start
            rec['backward'][-1] = time.perf_counter() - mid
            if i < warmup:
                for times in rec.values():
                    times.pop()
    return records


def print_module_times(records) -> None:
    labels = list(records[1])
    print(f'wall clock per step (ms, medians), '
          f'{torch.get_num_threads()} threads')
    print(f'{"part":<22} {"1-bit":>9} {"32-bit":>9} {"diff":>9}')
    for label in labels:
        a = statistics.median(records[1][label]) * 1e3
        b = statistics.median(records[32][label]) * 1e3
        print(f'{label:<22} {a:9.1f} {b:9.1f} {a - b:+9.1f}')


def ratio_pairs(names):
    """The comparisons worth a ratio: every 1-bit mmbhvit case against its
    32-bit counterpart and the official 1-bit code, every compiled case
    against its eager twin, every unfused case against its fused twin."""
    names = list(names)
    for a in names:
        if not a.startswith('mmbhvit'):
            continue
        others = []
        if '1-bit' in a:
            others += [a.replace('1-bit', '32-bit'), 'official 1-bit']
        if '32-bit' in a:
            others.append('official 32-bit')
        if a.endswith(' compiled'):
            others.append(a[:-len(' compiled')])
        if a.endswith(' composed') or a.endswith(' apart'):
            others = [a.rsplit(' ', 1)[0]]
        if a.endswith(' unfused'):
            others.append(a[:-len(' unfused')])
        for b in others:
            if b in names:
                yield a, b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='small', choices=['tiny', 'small'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--compile', action='store_true',
                        help='also time the mmbhvit classifiers wrapped in '
                        'torch.compile (compile time reported apart)')
    parser.add_argument('--no-eager', action='store_true',
                        help='with --compile: leave out the eager mmbhvit '
                        'cases')
    parser.add_argument('--composed', action='store_true',
                        help='also time the 1-bit classifier with the '
                        'quantizers as composed before their fusion (same '
                        'weights)')
    parser.add_argument('--apart', action='store_true',
                        help='also time the 1-bit classifier with the sign '
                        'and the shortcut of its residual projections as '
                        'two consumers of the input (same weights)')
    parser.add_argument('--unfused', action='store_true',
                        help='also time both classifiers with the one-pass '
                        'CPU kernels of sign/STE and RPReLU, the integer and '
                        'matrix products of the 1x1 layers and the shift '
                        "branches' backward switched off "
                        '(mmbhvit.models.binary.fused; same models)')
    parser.add_argument('--default-malloc', action='store_true',
                        help="leave glibc's allocator settings as they are "
                        '(tools/train.py applies mmbhvit.utils.malloc.'
                        'keep_freed_memory, and so does this tool by '
                        'default)')
    parser.add_argument('--pointwise', action='store_true',
                        help='time each binary 1x1 layer shape of the 1-bit '
                        'model as a float convolution, as float matrix '
                        'products and as the integer product instead of '
                        'whole steps')
    parser.add_argument('--profile', action='store_true',
                        help='instead of timing, profile the 1-bit and '
                        '32-bit steps op by op (torch.profiler self CPU '
                        'time; --repeats steps after --warmup)')
    parser.add_argument('--modules', action='store_true',
                        help='instead of whole steps, split the 1-bit and '
                        '32-bit steps by wall clock: forward per block part '
                        'and stage, forward, backward')
    parser.add_argument('--official-repo', default=None)
    parser.add_argument('--extra-path', default=None,
                        help='a directory prepended to sys.path (e.g. where '
                        'transformers/timm are installed for the official '
                        'code)')
    args = parser.parse_args(argv)
    # as tools/train.py (all models alike); --default-malloc: glibc as it is
    malloc = {} if args.default_malloc else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.extra_path:
        sys.path.insert(0, args.extra_path)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch, ))
    if args.pointwise:
        clf = build_classifier(_backbone_cfg(args.arch, 1), 1000).train()
        print(f'CPU: {cpu_description()}')
        time_pointwise(clf, x, args.repeats, args.warmup)
        return None
    if args.modules:
        print(f'CPU: {cpu_description()}')
        models = {bits: build_classifier(_backbone_cfg(args.arch, bits),
                                         1000).train() for bits in (1, 32)}
        records = module_times(models, x, target, args.repeats,
                               max(args.warmup, 1))
        print_module_times(records)
        return records
    if args.profile:
        print(f'CPU: {cpu_description()}')
        profile_ops({bits: build_classifier(_backbone_cfg(args.arch, bits),
                                            1000).train()
                     for bits in (1, 32)}, x, target, args.repeats,
                    max(args.warmup, 1))
        return None
    entries, models = {}, {}
    compile_times = {}
    for bits in (1, 32):
        clf = build_classifier(_backbone_cfg(args.arch, bits), 1000).train()
        models[bits] = clf
        # the first training step initialises LSQ from the data (eager)
        train_step(clf, lambda x, m=clf: m(x, mode='tensor'), x, target)
        if not args.no_eager:
            entries[f'mmbhvit {bits}-bit'] = (
                clf, lambda x, m=clf: m(x, mode='tensor'))
        if args.unfused:
            entries[f'mmbhvit {bits}-bit unfused'] = (
                clf, lambda x, m=clf: _unfused(m, x))
        if args.compile:
            compiled = torch.compile(clf)
            name = f'mmbhvit {bits}-bit compiled'
            forward = (lambda x, m=compiled: m(x, mode='tensor'))
            start = time.perf_counter()
            train_step(clf, forward, x, target)
            compile_times[name] = time.perf_counter() - start
            entries[name] = (clf, forward)
    if args.composed:
        clf = copy.deepcopy(models[1])
        use_composed_quantizers(clf)
        entries['mmbhvit 1-bit composed'] = (
            clf, lambda x, m=clf: m(x, mode='tensor'))
    if args.apart:
        clf = copy.deepcopy(models[1])
        separate_sign_and_shortcut(clf)
        entries['mmbhvit 1-bit apart'] = (
            clf, lambda x, m=clf: m(x, mode='tensor'))
    if args.official_repo:
        for bits in (1, 32):
            off = official_model(args.official_repo, args.arch, bits,
                                 1000).train()
            entries[f'official {bits}-bit'] = (off, lambda x, m=off: m(x)[0])
    cases = {
        name: (lambda m=module, f=forward: train_step(m, f, x, target))
        for name, (module, forward) in entries.items()
    }
    times = time_interleaved(
        cases, args.repeats, args.warmup,
        on_round=lambda i, n: print(f'round {i}/{n}', file=sys.stderr,
                                    flush=True))
    print(f'BHViT-{args.arch}, batch {args.batch}, {args.size}x{args.size}, '
          f'forward+loss+backward, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}, {args.repeats} repeats after '
          f'{args.warmup} warm-up (interleaved)')
    print(f'CPU: {cpu_description()}')
    print('allocator: glibc keeps freed memory (keep_freed_memory)'
          if malloc and all(malloc.values()) else
          'allocator: default settings')
    print(f'{"model":<28} {"median s":>9} {"q1":>7} {"q3":>7} {"min":>7} '
          f'{"max":>7}')
    stats = {name: summarize(ts) for name, ts in times.items()}
    for name, s in stats.items():
        print(f'{name:<28} {s["median"]:9.3f} {s["q1"]:7.3f} {s["q3"]:7.3f} '
              f'{s["min"]:7.3f} {s["max"]:7.3f}')
    for name, dt in compile_times.items():
        print(f'{name}: first step (compiling) {dt:.1f} s')
    med = {name: s['median'] for name, s in stats.items()}
    print('ratios of medians (and the median of the per-round ratios, '
          'which drift of the machine between rounds does not move):')
    for a, b in ratio_pairs(med):
        paired = statistics.median(x / y for x, y in zip(times[a], times[b]))
        print(f'  {a} / {b}: {med[a] / med[b]:.2f} (paired {paired:.2f})')
    return times


if __name__ == '__main__':
    main()
