# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from . import binary  # noqa: F401
from .backbones import BHViT

__all__ = ['BHViT']
from . import losses  # noqa: F401,E402  (BinaryWeightRegLoss)
from . import classifiers  # noqa: F401,E402  (DistillImageClassifier)
from . import heads  # noqa: F401,E402  (BinaryUPerHead, BinaryFPNHead)
from . import segmentors  # noqa: F401,E402  (DistillEncoderDecoder)
