# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Which instruction set do the fp32 baselines really use? One 3×3
convolution, timed in each fp32 engine, against the AVX2 FMA ceiling.

    python tools/deployment/benchmark_fp32_conv.py
    python tools/deployment/as_avx2_cpu.py -- \\
        python tools/deployment/benchmark_fp32_conv.py

Prints GFLOP/s per thread of a 3×3 convolution (default 1024 → 512 channels
on 32×32, batch 1, 1 thread) in PyTorch, ONNX Runtime and OpenVINO (those
installed; the others are named as skipped), and the ceiling of a core with
two 256-bit FMA ports at this clock (2 ports × 8 floats × 2 FLOPs per
cycle, the clock from mmbhvit's dependent-add chain). A figure above the
ceiling means that engine ran AVX-512 kernels, whatever the environment
asked (docs/deployment.md, "An AVX2-only CPU on an AVX-512 machine").
"""
import argparse
import os.path as osp
import sys
import tempfile

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))
from mmbhvit.utils.sysinfo import cpu_description  # noqa: E402
from mmbhvit.utils.timing import (summarize,  # noqa: E402
                                  time_interleaved)

#: FLOPs per cycle of one core with two 256-bit FMA ports
AVX2_FMA_FLOPS_PER_CYCLE = 2 * 8 * 2


def engines(model, x, folder, threads):
    """(name, call or skip message) for each fp32 engine."""
    torch.set_num_threads(threads)
    yield 'PyTorch', lambda: model(x)
    path = osp.join(folder, 'conv.onnx')
    torch.onnx.export(model, (x, ), path, dynamo=False)
    xn = x.numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        yield 'ONNX Runtime', 'skipped: onnxruntime is not installed'
    else:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts,
                                    providers=['CPUExecutionProvider'])
        name = sess.get_inputs()[0].name
        yield 'ONNX Runtime', lambda: sess.run(None, {name: xn})
    try:
        import openvino as ov
    except ImportError:
        yield 'OpenVINO', 'skipped: openvino is not installed'
    else:
        compiled = ov.Core().compile_model(
            path, 'CPU', {'INFERENCE_NUM_THREADS': threads,
                          'INFERENCE_PRECISION_HINT': 'f32'})
        request = compiled.create_infer_request()
        yield 'OpenVINO', lambda: request.infer({0: xn})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--cin', type=int, default=1024)
    p.add_argument('--cout', type=int, default=512)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(args.cin, args.cout, 3, padding=1,
                            bias=False).eval()
    x = torch.randn(1, args.cin, args.size, args.size)
    flops = 2 * args.cin * args.cout * 9 * args.size**2
    from mmbhvit.deploy.ops import load_extension
    ext = load_extension()
    hz = ext.cpu_clock_hz() if ext is not None else None
    print(f'CPU: {cpu_description()}')
    if hz:
        ceiling = AVX2_FMA_FLOPS_PER_CYCLE * hz / 1e9
        print(f'clock (dependent-add chain) {hz / 1e9:.2f} GHz: AVX2 FMA '
              f'ceiling {ceiling:.0f} GFLOP/s per thread')
    else:
        ceiling = None
        print('clock unknown (mmbhvit._binary_ops is not built): no '
              'ceiling')
    print(f'3x3 convolution {args.cin} -> {args.cout} on {args.size}x'
          f'{args.size}, fp32, {args.threads} thread(s), best of '
          f'{args.repeats} interleaved rounds after one warm-up')
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        found = list(engines(model, x, folder, args.threads))
        cases = {n: c for n, c in found if not isinstance(c, str)}
        times = time_interleaved(cases, args.repeats, warmup=1)
        for name, call in found:
            if isinstance(call, str):
                print(f'{name:14s} {call}')
                continue
            s = summarize(times[name])['min']
            rate = flops / s / 1e9 / args.threads
            note = ''
            if ceiling is not None and rate > ceiling:
                note = '  (above the AVX2 ceiling: AVX-512 kernels)'
            print(f'{name:14s} {s * 1e3:8.1f} ms {rate:7.1f} GFLOP/s per '
                  f'thread{note}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
