# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Peer figure: Larq Compute Engine (LCE) running a standard binary network.

Builds a larq-zoo model with random weights (``weights=None``: no download),
converts it with LCE's converter to a TFLite flatbuffer, runs it with LCE's
interpreter at batch 1, 224x224, and prints per thread count the median
latency and the **binary MACs per second per thread** (= binary MACs of the
model / latency / threads), next to the process CPU time per inference
(robust to other jobs sharing the cores; with 1 thread it is the time the
engine actually ran). The binary MACs are counted on the Keras model by
larq's ``ModelProfile`` (the 1-bit MACs of ``lq.models.summary``) and
cross-checked by counting the convolution / dense MACs of the quantized
layers whose input and kernel are both quantized to 1 bit.

The dependencies (TensorFlow, larq, larq-zoo, larq-compute-engine) are
optional and not part of CI; install them in their own virtualenv, apart
from the project's (torch is not needed there)::

    python3.11 -m venv /tmp/lce-venv
    /tmp/lce-venv/bin/pip install -r requirements/lce-benchmark.txt
    /tmp/lce-venv/bin/python tools/deployment/benchmark_lce.py \\
        --model quicknet --threads 1 2 --xnnpack --json lce.json

Notes: LCE's optimized binary kernels are written for Arm (its converter
targets ``arm`` or ``xcore``); on x86-64 its interpreter runs its portable
kernels (its interpreter warns: "not optimized for speed"), which is what
this tool measures on an x86 machine; ``--bconv`` picks LCE's binary-conv
kernels (im2col + BGEMM, the default of its interpreter, and the indirect
BGEMM, faster on x86; both timed by default), ``--xnnpack`` TFLite's
XNNPACK delegate for the float layers. ``--tflite``
reuses a flatbuffer written by ``--save-tflite`` (conversion takes about
a minute). Results and the comparison with the packed engine of this
project (``tools/deployment/benchmark_binary.py``): docs/deployment.md.
"""
import argparse
import json
import os
import statistics
import sys
import time

#: the pip command that installs what this tool needs (own venv)
PIP_COMMAND = 'pip install -r requirements/lce-benchmark.txt'
#: the same, spelled out (pins of requirements/lce-benchmark.txt)
PIP_PACKAGES = ('pip install tensorflow==2.16.2 tf-keras==2.16.0 '
                'larq==0.14.0 larq-zoo==2.4.0 larq-compute-engine==0.16.0 '
                '"numpy<2"')

MODELS = ('quicknet', 'quicknet_small', 'birealnet')

#: SIMD flags of /proc/cpuinfo worth printing next to a binary-kernel rate
SIMD_FLAGS = ('popcnt', 'avx2', 'avx512f', 'avx512bw', 'avx512_vpopcntdq',
              'avx512_bitalg', 'avx512_vnni')


def cpu_info(path='/proc/cpuinfo'):
    """CPU model name, logical CPUs and the SIMD flags of :data:`SIMD_FLAGS`
    it has (from ``/proc/cpuinfo``; 'unknown' / empty elsewhere)."""
    model, flags, cpus = 'unknown', set(), 0
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'processor':
                    cpus += 1
                elif key == 'model name' and model == 'unknown':
                    model = value.strip()
                elif key == 'flags' and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return dict(model=model, logical_cpus=cpus or os.cpu_count(),
                simd=[f for f in SIMD_FLAGS if f in flags])


def cpu_line(info=None):
    info = info or cpu_info()
    return (f"{info['model']}, {info['logical_cpus']} logical CPUs, SIMD: "
            f"{' '.join(info['simd']) or 'none of ' + '/'.join(SIMD_FLAGS)}")


def import_dependencies():
    """Import TensorFlow (Keras 2 API), larq, larq-zoo and LCE; on a missing
    one exit with a message naming the pip command."""
    # larq and larq-zoo are written for Keras 2: TF >= 2.16 ships Keras 3 as
    # tf.keras unless this is set (then tf.keras is the tf-keras package).
    os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    try:
        import tensorflow as tf
        import larq as lq
        import larq_zoo as lqz
        import larq_compute_engine as lce
        from larq_compute_engine.tflite.python.interpreter import \
            Interpreter
    except ImportError as e:
        raise SystemExit(
            f'benchmark_lce.py needs TensorFlow, larq, larq-zoo and '
            f'larq-compute-engine, which are optional and not installed '
            f'here ({e}). Install them in their own virtualenv:\n'
            f'    {PIP_COMMAND}\n'
            f'or\n    {PIP_PACKAGES}') from None
    return tf, lq, lqz, lce, Interpreter


def build_model(lqz, name, size=224):
    """A larq-zoo model with random weights (no download)."""
    factories = {
        'quicknet': lambda: lqz.sota.QuickNet,
        'quicknet_small': lambda: lqz.sota.QuickNetSmall,
        'birealnet': lambda: lqz.literature.BiRealNet,
    }
    return factories[name]()(weights=None, input_shape=(size, size, 3))


def _is_binary_quantizer(q):
    """True for larq's 1-bit quantizers (sign variants)."""
    if q is None:
        return False
    name = getattr(q, 'precision', None)
    if name is not None:
        return name == 1
    name = getattr(q, '__name__', type(q).__name__).lower()
    return 'sign' in name


def count_binary_macs_layers(lq, model):
    """Binary MACs counted by hand: per ``QuantConv2D`` / ``QuantDense``
    whose input and kernel quantizers are both 1-bit, output elements x
    (kernel taps x input channels / groups)."""
    total = 0
    for layer in model.layers:
        if not isinstance(layer, (lq.layers.QuantConv2D,
                                  lq.layers.QuantDense)):
            continue
        if not (_is_binary_quantizer(layer.input_quantizer)
                and _is_binary_quantizer(layer.kernel_quantizer)):
            continue
        out = 1
        for d in layer.output.shape[1:]:
            out *= int(d)
        kernel = layer.kernel.shape
        per_output = 1
        for d in kernel[:-1]:  # (kh, kw, cin / groups, cout) or (cin, cout)
            per_output *= int(d)
        total += out * per_output
    return total


def count_binary_macs(lq, model):
    """Binary MACs of ``model``: (by larq's ``ModelProfile``, the 1-bit
    MACs; by :func:`count_binary_macs_layers`)."""
    try:
        profile = lq.models.ModelProfile(model)
        by_larq = int(profile.op_count('mac', 1))
    except Exception as e:  # noqa: BLE001 - larq API differences
        print(f'larq ModelProfile failed ({e}); using the layer count')
        by_larq = None
    return by_larq, count_binary_macs_layers(lq, model)


#: LCE binary-convolution kernels (``Interpreter`` options): im2col + BGEMM
#: (LCE's default), the indirect BGEMM, the reference kernel
BCONV_KERNELS = {
    'im2col': {},
    'indirect': dict(use_indirect_bgemm=True),
    'reference': dict(use_reference_bconv=True),
}


def time_configs(Interpreter, flatbuffer, configs, repeats, warmup,
                 rounds=1, seed=0):
    """Interleaved timings of LCE's interpreter on one random batch-1
    input: every round runs ``repeats`` inferences of every
    ``(bconv, threads, xnnpack)`` config, so drift and other jobs on the
    cores spread over all alike. Per config: the median wall latency over
    all inferences, and the median over the rounds of the process CPU time
    per inference (all threads)."""
    import numpy as np
    interps, walls, cpus = {}, {}, {}
    for cfg in configs:
        bconv, threads, xnnpack = cfg
        interps[cfg] = Interpreter(flatbuffer, num_threads=threads,
                                   use_xnnpack=xnnpack,
                                   **BCONV_KERNELS[bconv])
        walls[cfg], cpus[cfg] = [], []
    shape = tuple(interps[configs[0]].input_shapes[0])
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    for _ in range(rounds):
        for cfg, interp in interps.items():
            for _ in range(warmup):
                interp.predict(x)
            c0 = time.process_time()
            for _ in range(repeats):
                t0 = time.perf_counter()
                interp.predict(x)
                walls[cfg].append(time.perf_counter() - t0)
            cpus[cfg].append((time.process_time() - c0) / repeats)
    return {
        cfg: dict(median_s=statistics.median(walls[cfg]),
                  min_s=min(walls[cfg]),
                  cpu_s_per_inference=statistics.median(cpus[cfg]))
        for cfg in configs
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Larq Compute Engine latency and binary MACs/s per '
        'thread of a larq-zoo model with random weights (batch 1)')
    parser.add_argument('--model', choices=MODELS, default='quicknet')
    parser.add_argument('--size', type=int, default=224,
                        help='input size (default 224)')
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed inferences per config and round')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed inferences per config and round')
    parser.add_argument('--rounds', type=int, default=3,
                        help='interleaved rounds over all configs')
    parser.add_argument('--bconv', nargs='+', choices=tuple(BCONV_KERNELS),
                        default=['im2col', 'indirect'],
                        help="LCE's binary-conv kernels to time (default: "
                        'im2col and indirect BGEMM)')
    parser.add_argument('--xnnpack', action='store_true',
                        help="TFLite's XNNPACK delegate for the float ops")
    parser.add_argument('--tflite', help='run this converted flatbuffer '
                        'instead of converting the model again')
    parser.add_argument('--save-tflite', help='write the flatbuffer here')
    parser.add_argument('--json', help='write the results here')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tf, lq, lqz, lce, Interpreter = import_dependencies()
    info = cpu_info()
    print(f'CPU: {cpu_line(info)}')
    load_before = os.getloadavg()[0]
    print(f'TensorFlow {tf.__version__}, larq-compute-engine '
          f'{getattr(lce, "__version__", "?")}; load average '
          f'{load_before:.1f} (other jobs on the cores inflate the wall '
          f'times; the CPU time per inference is robust to them)')

    model = build_model(lqz, args.model, args.size)
    by_larq, by_layers = count_binary_macs(lq, model)
    macs = by_larq if by_larq is not None else by_layers
    print(f'{args.model} {args.size}x{args.size}, random weights: '
          f'{macs / 1e9:.3f} G binary MACs (larq ModelProfile, 1-bit MACs: '
          f'{by_larq}; QuantConv2D/QuantDense with 1-bit input and kernel '
          f'quantizers, counted here: {by_layers})')

    if args.tflite:
        with open(args.tflite, 'rb') as f:
            flatbuffer = f.read()
        print(f'flatbuffer: {args.tflite} ({len(flatbuffer)} bytes)')
    else:
        t0 = time.perf_counter()
        flatbuffer = lce.convert_keras_model(model)
        print(f'converted with lce.convert_keras_model in '
              f'{time.perf_counter() - t0:.0f} s ({len(flatbuffer)} bytes)')
    if args.save_tflite:
        with open(args.save_tflite, 'wb') as f:
            f.write(flatbuffer)

    configs = [(b, nt, args.xnnpack) for b in args.bconv
               for nt in args.threads]
    timed = time_configs(Interpreter, flatbuffer, configs, args.repeats,
                         args.warmup, args.rounds)
    load_after = os.getloadavg()[0]
    runs = []
    head = (f'{"bconv":>9s} {"threads":>7s} {"median ms":>10s} '
            f'{"min ms":>8s} {"CPU ms/inf":>10s} '
            f'{"G bMAC/s/thread (wall)":>23s} {"G bMAC/s/core (CPU)":>20s}')
    print(f'batch 1, {args.rounds} interleaved rounds x {args.repeats} '
          f'timed inferences per config (after {args.warmup} warm-up), '
          f'XNNPACK {"on" if args.xnnpack else "off"}; CPU ms/inf = median '
          f'over rounds of process CPU time / inferences (all threads); '
          f'per core (CPU) = binary MACs / CPU time; load average '
          f'{load_before:.1f} -> {load_after:.1f}')
    print(head)
    print('-' * len(head))
    for cfg in configs:
        bconv, nt, _ = cfg
        r = dict(timed[cfg], bconv=bconv, threads=nt, xnnpack=args.xnnpack)
        r['gmacs_per_s_per_thread'] = macs / r['median_s'] / nt / 1e9
        r['gmacs_per_s_per_core_cpu'] = \
            macs / r['cpu_s_per_inference'] / 1e9
        runs.append(r)
        print(f'{bconv:>9s} {nt:7d} {r["median_s"] * 1e3:10.1f} '
              f'{r["min_s"] * 1e3:8.1f} '
              f'{r["cpu_s_per_inference"] * 1e3:10.1f} '
              f'{r["gmacs_per_s_per_thread"]:23.2f} '
              f'{r["gmacs_per_s_per_core_cpu"]:20.2f}')

    if args.json:
        result = dict(engine='larq-compute-engine',
                      lce_version=getattr(lce, '__version__', None),
                      tensorflow_version=tf.__version__, model=args.model,
                      size=args.size, batch=1, binary_macs=macs,
                      binary_macs_larq=by_larq,
                      binary_macs_layers=by_layers, cpu=info,
                      repeats=args.repeats, warmup=args.warmup,
                      rounds=args.rounds,
                      load_average=[load_before, load_after], runs=runs)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'results written to {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
