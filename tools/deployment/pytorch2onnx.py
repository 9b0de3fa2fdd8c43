# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Export a BHViT classifier or segmentor to ONNX, and check the file
against PyTorch with ONNX Runtime and/or OpenVINO.

Examples::

    # static 1x3x224x224, checked with every installed runtime
    python tools/deployment/pytorch2onnx.py \
        configs/bhvit/bhvit-small_2xb128_in1k.py epoch_100.pth \
        --out bhvit-small.onnx --shape 224 224 --verify

    # dynamic N x H x W segmentor, checked at 512x512, 544x544 and 538x538
    python tools/deployment/pytorch2onnx.py \
        configs/bhvit/upernet_bhvit_ade20k.py iter_160000.pth \
        --out upernet.onnx --shape 512 512 --dynamic --verify onnxruntime

    # check an existing file against a checkpoint (no export)
    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT \
        --out upernet.onnx --verify --verify-only

The input of the file is the preprocessed batch (normalised as the config's
data preprocessor does; mean / std / channel order are in the file's
metadata); the output is a classifier's logits or a segmentor's logits
resized to the input (``--no-seg-resize``: the decode head's 1/4
resolution). Exit status: 0 exported (and verified), 1 verification
failed, 2 bad arguments or input files. See docs/deployment.md, "ONNX
export".
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a BHViT classifier or segmentor to ONNX '
        '(static or dynamic H x W) and verify it against PyTorch')
    parser.add_argument('config', help='mmpretrain or mmseg config file')
    parser.add_argument(
        'checkpoint',
        help="checkpoint, loaded strictly; 'none': random initialisation")
    parser.add_argument(
        '--out', help='ONNX file to write (default: <config name>.onnx)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        default=(224, 224),
                        help='input height and width of the example input '
                        '(the only accepted size without --dynamic)')
    parser.add_argument('--batch', type=int, default=1,
                        help='batch size of the example input')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch, height and width')
    parser.add_argument('--opset', type=int, default=None,
                        help='ONNX opset (default: '
                        'mmbhvit.deploy.onnx.DEFAULT_OPSET)')
    parser.add_argument(
        '--no-seg-resize', action='store_true',
        help='segmentors: output the decode head logits (1/4 resolution) '
        'instead of logits resized to the input')
    parser.add_argument(
        '--verify', nargs='*', metavar='RUNTIME', default=None,
        help='compare with PyTorch: onnxruntime and/or openvino (no value: '
        'every installed one)')
    parser.add_argument(
        '--verify-shape', type=int, nargs=2, action='append',
        metavar=('H', 'W'),
        help='probe size (repeatable); default: --shape, and with '
        '--dynamic also --shape + 32 and --shape + 26')
    parser.add_argument('--verify-only', action='store_true',
                        help='do not export: verify the existing --out file')
    parser.add_argument(
        '--probe', metavar='IMAGE',
        help='probe image (resized and normalised); default: seeded '
        'standard-normal noise')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='classifier logits: absolute tolerance')
    parser.add_argument(
        '--rtol', type=float, default=1e-4,
        help='classifier logits: tolerance relative to max |logit|')
    parser.add_argument(
        '--min-agreement', type=float, default=0.995,
        help='segmentors: least fraction of pixels with the same predicted '
        'class')
    parser.add_argument('--threads', type=int, default=None,
                        help='runtime threads for verification')
    args = parser.parse_args(argv)
    if args.verify_only and args.verify is None:
        parser.error('--verify-only needs --verify')
    if min(args.shape) < 1 or args.batch < 1:
        parser.error(f'--shape and --batch must be positive, got '
                     f'{args.shape} and {args.batch}')
    return args


def verify_shapes(args):
    if args.verify_shape:
        return [tuple(s) for s in args.verify_shape]
    h, w = args.shape
    shapes = [(h, w)]
    if args.dynamic:
        shapes += [(h + 32, w + 32), (h + 26, w + 26)]
    return shapes


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmbhvit.apis import CheckpointMismatchError, build_model
    from mmbhvit.deploy import onnx as mo
    ckpt = None if args.checkpoint.lower() == 'none' else args.checkpoint
    out = args.out or osp.splitext(osp.basename(args.config))[0] + '.onnx'
    runtimes = None
    if args.verify is not None:
        runtimes = args.verify or list(mo.available_runtimes())
        unknown = sorted(set(runtimes) - set(mo.RUNTIMES))
        if unknown:
            print(f'pytorch2onnx: error: unknown runtime(s) {unknown}; '
                  f'choose from {list(mo.RUNTIMES)}', file=sys.stderr)
            return 2
        if not runtimes:
            print('pytorch2onnx: error: --verify: neither onnxruntime nor '
                  "openvino is installed (pip install 'mmbhvit[onnx]')",
                  file=sys.stderr)
            return 2
    for what, path in (('config', args.config), ('checkpoint', ckpt),
                       ('probe image', args.probe),
                       ('ONNX file (--verify-only)',
                        out if args.verify_only else None)):
        if path is not None and not osp.isfile(path):
            print(f'pytorch2onnx: error: {what} not found: {path}',
                  file=sys.stderr)
            return 2
    try:
        model = build_model(args.config, ckpt, student_only=True)
    except CheckpointMismatchError as e:
        print(f'pytorch2onnx: error: {e}', file=sys.stderr)
        return 2
    seg_resize = not args.no_seg_resize
    shape = (args.batch, model_in_channels(model), *args.shape)
    if not args.verify_only:
        mo.export_onnx(model, out, input_shape=shape, dynamic=args.dynamic,
                       opset=args.opset, seg_resize=seg_resize,
                       metadata=dict(config=osp.basename(args.config),
                                     checkpoint=osp.basename(ckpt or
                                                             'none')))
        print(f'wrote {out} ({mo.task_of_model(model)}, input '
              f"{'x'.join(map(str, shape))}"
              f"{', dynamic batch/height/width' if args.dynamic else ''})")
    if runtimes is None:
        return 0
    inputs = [
        mo.probe_batch(model, (args.batch, shape[1], h, w), args.probe)
        for h, w in verify_shapes(args)
    ]
    try:
        rows = mo.verify_onnx(model, out, inputs, runtimes,
                              seg_resize=seg_resize, atol=args.atol,
                              rtol=args.rtol,
                              min_agreement=args.min_agreement,
                              threads=args.threads)
    except (ValueError, mo.OnnxVerificationError) as e:
        print(f'pytorch2onnx: verification failed: {e}', file=sys.stderr)
        return 1
    failed = [r for r in rows if not r['passed']]
    for r in rows:
        agreement = (f", agreement {r['agreement']:.4%}"
                     if 'agreement' in r else '')
        print(f"{r['runtime']:<12} {'x'.join(map(str, r['shape'])):<16} "
              f"max |diff| {r['max_abs_diff']:.3g} (relative "
              f"{r['max_rel_diff']:.3g}){agreement}  "
              f"{'ok' if r['passed'] else 'FAILED: ' + r['problem']}")
    if failed:
        print(f'pytorch2onnx: verification failed: {out} does not reproduce '
              f'{osp.basename(args.config)} with checkpoint {ckpt} in '
              f'{len(failed)} of {len(rows)} runs (first: '
              f"{failed[0]['runtime']} at "
              f"{'x'.join(map(str, failed[0]['shape']))}: "
              f"{failed[0]['problem']})", file=sys.stderr)
        return 1
    print(f'verified: {len(rows)} runs match PyTorch')
    return 0


def model_in_channels(model) -> int:
    backbone = getattr(model, 'backbone', model)
    return int(getattr(backbone, 'in_channels', 3))


if __name__ == '__main__':
    sys.exit(main())
