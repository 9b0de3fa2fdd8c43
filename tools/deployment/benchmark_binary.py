# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Batch-1 CPU latency of (a) the PyTorch fp32 counterpart, (b) the PyTorch
binary model (simulated 1-bit) and (c) the packed engine, side by side.

Examples::

    # BHViT-small classifier at 224 and BHViT-small + UPerNet at 512
    python tools/deployment/benchmark_binary.py --profile
    # one config, trained weights, 2 threads only
    python tools/deployment/benchmark_binary.py \
        configs/bhvit/upernet_bhvit_ade20k.py --checkpoint iter_160000.pth \
        --threads 2

Results and their discussion: docs/deployment.md.
"""
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmbhvit.deploy.benchmark import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
