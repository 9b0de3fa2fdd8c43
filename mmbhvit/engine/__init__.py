# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Training-loop helpers (hooks), registered in mmengine's root registries
and therefore visible from the mmpretrain and mmseg scopes."""
from .hooks import (CompileModelHook, ExactResumeHook, NonFiniteCheckHook,
                    RegLossSwitchHook)

__all__ = [
    'CompileModelHook', 'ExactResumeHook', 'NonFiniteCheckHook',
    'RegLossSwitchHook'
]
