# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .distill import DistillEncoderDecoder, pixel_distill_loss

__all__ = ['DistillEncoderDecoder', 'pixel_distill_loss']
