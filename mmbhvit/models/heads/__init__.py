# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .binary_heads import (BinaryConvBlock, BinaryFPN, BinaryFPNHead,
                           BinaryUPerHead)

__all__ = ['BinaryConvBlock', 'BinaryUPerHead', 'BinaryFPNHead', 'BinaryFPN']
