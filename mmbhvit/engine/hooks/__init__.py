# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .reg_loss_switch import RegLossSwitchHook

__all__ = ['RegLossSwitchHook']
