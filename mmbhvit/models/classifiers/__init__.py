# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .distill import DistillImageClassifier, TeacherCheckpointError

__all__ = ['DistillImageClassifier', 'TeacherCheckpointError']
