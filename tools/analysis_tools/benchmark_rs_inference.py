# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Peak memory (and time) of ``tools/rs_inference.py`` on a large scene.

    python tools/analysis_tools/benchmark_rs_inference.py --size 10000 \
        --small 2000

Generates (in a temporary folder, or ``--workdir``) a georeferenced 16-bit
4-band GeoTIFF scene of ``--size`` pixels a side and, for comparison, one
of ``--small`` pixels a side (:func:`mmbhvit.datasets.geo_synth.make_scene`,
written strip by strip), saves a randomly initialised checkpoint of
``--config`` (the 4-band BHViT-tiny FPN by default; its ``dataset_meta``
carries the scenes' band normalisation, as a trained one would), and runs
the tool on each scene in a child process of its own. The peak resident
memory of each child is its ``VmHWM`` (``/proc/self/status``, Linux) read
just before it exits; a scene's raw size (bands x height x width x 2
bytes) is printed beside it: with streaming the peak follows the scene's
width and the window, not its area.

``--packed`` also exports the checkpoint with the packed 1-bit backbone
and runs the tool with it. ``--window``/``--stride``/``--batch-size`` are
passed on. ``--json FILE`` writes the numbers.
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

TOOL = osp.join(ROOT, 'tools', 'rs_inference.py')
DEFAULT_CONFIG = osp.join(ROOT, 'configs', 'bhvit',
                          'fpn_bhvit-tiny_rs-lvf-rgbn.py')
#: Runs the tool as ``python tools/rs_inference.py ...`` would, then prints
#: the process's peak resident set size in KiB: ``VmHWM`` of
#: ``/proc/self/status``, the high-water mark of this process's own memory
#: since its ``exec``. (``getrusage``'s ``ru_maxrss`` would not do: Linux
#: carries the peak of the forking parent over the ``exec``.)
WRAPPER = ('import runpy, sys; tool = sys.argv[1]; '
           'sys.argv = sys.argv[1:]; '
           "runpy.run_path(tool, run_name='__main__'); "
           "hwm = [l.split()[1] for l in open('/proc/self/status') "
           "if l.startswith('VmHWM:')]; print('MAXRSS_KIB', hwm[0])")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=10000)
    parser.add_argument('--small', type=int, default=2000,
                        help='side of the comparison scene (0: none)')
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--reduced', action='store_true',
                        help='shrink the backbone to 16..128 channels and '
                        'one block per stage (FPN 16 channels): the '
                        'streaming buffers, not the model, dominate')
    parser.add_argument('--window', type=int)
    parser.add_argument('--stride', type=int)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--packed', action='store_true',
                        help='also run with the packed 1-bit backbone')
    parser.add_argument('--workdir', help='keep the scenes here (reused '
                        'when present)')
    parser.add_argument('--json', help='write the results to this file')
    return parser.parse_args(argv)


def write_reduced_config(base, work):
    path = osp.join(work, 'reduced.py')
    with open(path, 'w') as f:
        f.write(REDUCED.format(base=base))
    return path


#: ``--reduced``: the 4-band config with a small BHViT and FPN.
REDUCED = """_base_ = {base!r}
dims = [16, 32, 64, 128]
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims=dims,
                            depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4],
                            mlp_ratios=[2, 2, 2, 2]), init_cfg=None),
    neck=dict(in_channels=dims, out_channels=16),
    decode_head=dict(in_channels=[16] * 4, channels=16))
"""


def make_checkpoint(config, scene, path):
    """A random-weight checkpoint of ``config`` whose dataset_meta holds
    the band normalisation of ``scene``."""
    import torch

    from mmbhvit.apis import build_model
    from mmbhvit.datasets import geo
    from mmbhvit.utils.io import atomic_torch_save
    torch.manual_seed(0)
    model = build_model(config)
    norm = geo.compute_band_norm([geo.raster_info(scene)], [1, 2, 3, 4])
    n = model.decode_head.num_classes
    meta = dict(classes=[f'class{i}' for i in range(n)],
                palette=[[(70 * i) % 256, (150 * i) % 256, (40 * i) % 256]
                         for i in range(n)],
                band_norm=norm.to_dict())
    atomic_torch_save(dict(state_dict=model.state_dict(),
                           meta=dict(dataset_meta=meta)), path)


def run_tool(scene, config, ckpt, out, args, packed=None):
    cmd = [sys.executable, '-c', WRAPPER, TOOL, scene, config, ckpt, out,
           '--batch-size', str(args.batch_size), '--threads',
           str(args.threads)]
    for opt in ('window', 'stride'):
        if getattr(args, opt):
            cmd += [f'--{opt}', str(getattr(args, opt))]
    if packed:
        cmd += ['--packed', packed]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY='PASSIVE')
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f'rs_inference failed:\n{done.stderr[-3000:]}')
    kib = [int(line.split()[1]) for line in done.stdout.splitlines()
           if line.startswith('MAXRSS_KIB')][-1]
    windows = [line for line in done.stdout.splitlines()
               if 'windows of' in line]
    return dict(peak_rss_mib=kib / 1024, seconds=seconds,
                log=windows[-1] if windows else '')


def main(argv=None):
    args = parse_args(argv)
    from mmbhvit.datasets.geo_synth import make_scene
    from mmbhvit.utils.sysinfo import cpu_description
    work = args.workdir or tempfile.mkdtemp(prefix='rs_bench_')
    os.makedirs(work, exist_ok=True)
    sides = [s for s in (args.small, args.size) if s]
    scenes = {}
    for side in sides:
        path = osp.join(work, f'scene_{side}.tif')
        if not osp.isfile(path):
            print(f'writing a {side}x{side} 4-band uint16 scene to {path}',
                  flush=True)
            t0 = time.perf_counter()
            make_scene(path, None, (side, side), strip=512)
            print(f'  {time.perf_counter() - t0:.0f} s, '
                  f'{osp.getsize(path) / 2**20:.0f} MiB on disk', flush=True)
        scenes[side] = path
    if args.reduced:
        args.config = write_reduced_config(args.config, work)
    ckpt = osp.join(work, 'random.pth')
    make_checkpoint(args.config, scenes[sides[0]], ckpt)
    packed = None
    if args.packed:
        packed = osp.join(work, 'random.packed.pth')
        subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'deployment',
                                                 'export_binary.py'),
                        args.config, ckpt, packed], check=True,
                       capture_output=True)
    results = dict(cpu=cpu_description(), config=args.config,
                   reduced=args.reduced,
                   threads=args.threads, batch_size=args.batch_size,
                   runs=[])
    print(f'CPU: {results["cpu"]}; torch threads {args.threads}; '
          f'config {args.config}{" (reduced)" if args.reduced else ""} '
          f'(random weights), batch size {args.batch_size}')
    for side, scene in scenes.items():
        for backbone in ['pytorch'] + (['packed'] if packed else []):
            out = osp.join(work, f'mask_{side}_{backbone}.tif')
            r = run_tool(scene, args.config, ckpt, out, args,
                         packed if backbone == 'packed' else None)
            raw = 4 * side * side * 2 / 2**20
            r.update(side=side, backbone=backbone, scene_raw_mib=raw)
            results['runs'].append(r)
            print(f'{side}x{side} ({raw:.0f} MiB raw), {backbone} backbone: '
                  f'peak RSS {r["peak_rss_mib"]:.0f} MiB, '
                  f'{r["seconds"]:.0f} s  [{r["log"].split(": ", 1)[-1]}]',
                  flush=True)
    if args.json:
        from mmbhvit.utils.io import atomic_write_json
        atomic_write_json(results, args.json, indent=1)
    return results


if __name__ == '__main__':
    main()
