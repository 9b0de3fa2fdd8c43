# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Params, BOPs, FLOPs and OPs (= BOPs/64 + FLOPs) of a BHViT config.

    python tools/analysis_tools/get_flops.py CONFIG [--shape H W]
        [--full-precision | --both] [--no-bn] [--json OUT]

Works for classification (mmpretrain, default 224×224) and segmentation
(mmseg, default 512×512) configs; prints a markdown table per part (stem,
stages, final norm, backbone, neck / head / decode head, auxiliary head
apart) and the backbone cost by block type.

Conventions (mmengine's ``FlopAnalyzer``): a multiply-accumulate counts
1 FLOP; a MAC whose two operands are 1-bit counts 1 BOP (a 1-bit × 2-bit
product 2 BOPs); only convolutions, matmuls, linear layers, norms, bilinear
/ nearest upsampling and adaptive average pooling are counted; element-wise
ops are not (the uncounted ops are listed). See
``mmbhvit/analysis/complexity.py``.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from mmengine.config import DictAction  # noqa: E402

from mmbhvit.analysis import analyze_config  # noqa: E402
from mmbhvit.utils.io import atomic_write_json  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Params, BOPs, FLOPs and OPs of a model config')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        default=None,
                        help='input size (default 224 224 for classification,'
                        ' 512 512 for segmentation)')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--full-precision', action='store_true',
                      help='analyse the full-precision counterpart '
                      '(weight_bits=act_bits=32 on the backbone)')
    mode.add_argument('--both', action='store_true',
                      help='analyse the binary model and its full-precision '
                      'counterpart')
    parser.add_argument('--no-bn', action='store_true',
                        help='do not count BatchNorm (as if folded)')
    parser.add_argument('--json', default=None, metavar='OUT',
                        help='also write the results to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config (key=value)')
    return parser.parse_args(argv)


def render(report) -> str:
    kind = ('full-precision counterpart' if report.full_precision else
            'binary model')
    shape = '×'.join(str(s) for s in report.input_shape[-2:])
    lines = [
        f'## {osp.basename(report.config)}: {kind}, {report.task}, input '
        f'{shape}', '',
        report.to_markdown(), '',
        report.summary(), ''
    ]
    if report.breakdown:
        lines += [report.breakdown_markdown(), '']
    if not report.count_bn:
        lines.append('BatchNorm not counted (--no-bn).')
    uncounted = ', '.join(f'{k.replace("prim::PythonOp.", "")} ×{v}'
                          for k, v in report.uncounted_ops().items())
    lines += [
        'Counting: 1 MAC = 1 FLOP; a MAC of two 1-bit operands = 1 BOP '
        '(1-bit × 2-bit = 2 BOPs, GSB attention = 3); OPs = BOPs/64 + FLOPs.',
        f'Traced but not counted (element-wise ops): {uncounted or "none"}',
        ''
    ]
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    modes = [False, True] if args.both else [args.full_precision]
    reports = []
    for index, fp in enumerate(modes, 1):
        # progress on stderr (tracing a 512x512 segmentor takes seconds):
        # stdout stays the report
        print(f'[{index}/{len(modes)}] counting the '
              f'{"full-precision" if fp else "binary"} model of '
              f'{args.config} ...', file=sys.stderr, flush=True)
        reports.append(
            analyze_config(args.config, shape=args.shape, full_precision=fp,
                           count_bn=not args.no_bn,
                           cfg_options=args.cfg_options))
    for report in reports:
        print(render(report))
    if args.json:
        atomic_write_json([r.to_dict() for r in reports], args.json,
                          indent=2)
        print(f'results written to {args.json}')
    return reports


if __name__ == '__main__':
    main()
