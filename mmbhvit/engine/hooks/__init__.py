# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .exact_resume import ExactResumeHook
from .nonfinite_check import NonFiniteCheckHook
from .reg_loss_switch import RegLossSwitchHook

__all__ = ['ExactResumeHook', 'NonFiniteCheckHook', 'RegLossSwitchHook']
