# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .compile_model import CompileModelHook
from .exact_resume import ExactResumeHook
from .nonfinite_check import NonFiniteCheckHook
from .reg_loss_switch import RegLossSwitchHook

__all__ = [
    'CompileModelHook', 'ExactResumeHook', 'NonFiniteCheckHook',
    'RegLossSwitchHook'
]
