# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Export a trained BHViT with bit-packed 1-bit weights.

Example::

    python tools/deployment/export_binary.py \
        configs/bhvit/upernet_bhvit_ade20k.py iter_160000.pth \
        bhvit_small_ade20k.packed.pth

CHECKPOINT 'none' exports the random initialisation (for benchmarks). The
file loads with ``torch.load(path, weights_only=True)``; run it with
``mmbhvit.deploy.load_engine`` (classifier) or
``mmbhvit.deploy.mmseg_backend.use_packed_backbone`` (segmentor). See
docs/deployment.md.
"""
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmbhvit.deploy.export import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
