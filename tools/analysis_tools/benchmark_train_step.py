# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Forward+backward time of a BHViT classifier, binary vs full precision.

    python tools/analysis_tools/benchmark_train_step.py --arch small \
        --batch 8 --size 224 --repeats 10 [--official-repo PATH]

Times one training step (forward, loss, backward; no optimizer step) of the
mmpretrain classifier with 1-bit weights/activations and of its 32-bit
counterpart (same architecture, ``weight_bits=act_bits=32``), interleaved so
that machine noise hits both alike; prints median and spread.

``--official-repo`` additionally times the official implementation
(IMRL/BHViT, a local clone; it needs ``transformers`` and ``timm`` importable,
e.g. via ``--extra-path``) on the same configuration and weights.
"""
import argparse
import statistics
import sys
import time

import torch

import mmbhvit  # noqa: F401
from mmbhvit.models import BHViT
from mmbhvit.testing.parity import build_classifier


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


def step_time(module, forward, x, target) -> float:
    """Seconds for forward + cross-entropy + backward."""
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(forward(x), target)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='small', choices=['tiny', 'small'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--official-repo', default=None)
    parser.add_argument('--extra-path', default=None,
                        help='a directory prepended to sys.path (e.g. where '
                        'transformers/timm are installed for the official '
                        'code)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.extra_path:
        sys.path.insert(0, args.extra_path)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch, ))
    entries = {}
    for bits in (1, 32):
        clf = build_classifier(_backbone_cfg(args.arch, bits), 1000)
        entries[f'mmbhvit {bits}-bit'] = (
            clf, lambda x, m=clf: m(x, mode='tensor'))
    if args.official_repo:
        for bits in (1, 32):
            off = official_model(args.official_repo, args.arch, bits, 1000)
            entries[f'official {bits}-bit'] = (off, lambda x, m=off: m(x)[0])
    for module, _ in entries.values():
        module.train()
    results = {name: [] for name in entries}
    for i in range(args.warmup + args.repeats):
        for name, (module, forward) in entries.items():  # interleaved
            dt = step_time(module, forward, x, target)
            if i >= args.warmup:
                results[name].append(dt)
    print(f'BHViT-{args.arch}, batch {args.batch}, {args.size}x{args.size}, '
          f'forward+backward, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}, {args.repeats} repeats')
    print(f'{"model":<20} {"median s":>10} {"min s":>8} {"max s":>8}')
    for name, ts in results.items():
        print(f'{name:<20} {statistics.median(ts):10.3f} {min(ts):8.3f} '
              f'{max(ts):8.3f}')
    return results


if __name__ == '__main__':
    main()
