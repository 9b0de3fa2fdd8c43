# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Convert an official BHViT checkpoint (IMRL/BHViT) to an mmbhvit one.

    python tools/model_converters/bhvit2mmbhvit.py SRC.pth DST.pth

SRC is the official state dict, raw or wrapped as ``{'model': ...}``. DST is
a slim checkpoint ``{'meta': ..., 'state_dict': ...}`` with ``backbone.*``
(and ``head.fc.*`` when SRC has a classifier), loadable by the mmpretrain
classifier configs and, with ``prefix='backbone.'``, by segmentation models.
Every source key must be consumed and every key of the matching mmbhvit
model filled; otherwise the tool stops and lists the offending keys.
"""
import argparse
import sys

import torch

import mmbhvit  # noqa: F401
from mmbhvit.checkpoint_io import save_slim_checkpoint
from mmbhvit.converters import convert_official_state_dict
from mmbhvit.models import BHViT


def check_complete(conversion) -> None:
    """Build the BHViT the checkpoint describes and compare key sets/shapes."""
    model = BHViT(arch=conversion.arch, **conversion.options,
                  out_indices=(3, ), final_norm=True)
    expected = {f'backbone.{k}': v.shape
                for k, v in model.state_dict().items()}
    if conversion.num_classes is not None:
        dim = conversion.arch['embed_dims'][-1]
        expected['head.fc.weight'] = torch.Size([conversion.num_classes, dim])
        expected['head.fc.bias'] = torch.Size([conversion.num_classes])
    got = {k: v.shape for k, v in conversion.state_dict.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(f'{k}: {tuple(got[k])} vs {tuple(expected[k])}'
                   for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or extra or wrong:
        raise KeyError('conversion incomplete:\n'
                       f'  target keys not filled: {missing}\n'
                       f'  converted keys the model does not have: {extra}\n'
                       f'  shape mismatches: {wrong}')


def convert_file(src: str, dst: str, num_heads=None) -> dict:
    try:
        ckpt = torch.load(src, map_location='cpu', weights_only=True)
    except Exception as exc:  # pickle, zip, EOF, weights-only refusals
        raise ValueError(f'cannot read {src} as a PyTorch checkpoint: '
                         f'{type(exc).__name__}: {exc}') from exc
    conversion = convert_official_state_dict(ckpt, num_heads=num_heads)
    check_complete(conversion)
    meta = dict(converted_from=str(src), source='IMRL/BHViT official',
                arch=conversion.arch, backbone_options=conversion.options,
                num_classes=conversion.num_classes,
                mmbhvit_version=mmbhvit.__version__)
    save_slim_checkpoint(conversion.state_dict, dst, meta=meta)
    return meta


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output mmbhvit checkpoint')
    parser.add_argument('--num-heads', type=int, nargs=4, default=None,
                        help='heads per stage when the checkpoint cannot '
                        'tell (GSB models with non-official widths)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        meta = convert_file(args.src, args.dst, args.num_heads)
    except (KeyError, ValueError, OSError) as err:
        # KeyError's str() is the repr of its message: print the message
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f'error ({args.src}): {msg}', file=sys.stderr)
        return 1
    print(f'wrote {args.dst}: arch={meta["arch"]} '
          f'options={meta["backbone_options"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
