# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""A small binarization library: quantizers, binary layers and attention
binarizers, each usable and testable on its own."""
from .attention import GSBAttentionBinarizer, LSQAttentionQuantizer
from .layers import (BinaryConv2d, LayerScale, LearnableBias, RPReLU,
                     RPReLUFunction, binary_conv_layers)
from .quantizers import (CentredSignSTE, ClippedSignSTE, QuantizerFunction,
                         RoundSTE, ScaleGrad, ShiftedSignShortcut,
                         ShiftedSignSTE, SignSTE, amp_backward, amp_forward,
                         binarize_weight, clipped_ste_grad,
                         integer_range_bits, quantizer_function, sign_ste,
                         sign_ste_with_shortcut)

__all__ = [
    'QuantizerFunction', 'quantizer_function', 'integer_range_bits',
    'SignSTE', 'ShiftedSignSTE', 'ShiftedSignShortcut', 'ClippedSignSTE',
    'CentredSignSTE', 'sign_ste_with_shortcut',
    'ScaleGrad', 'RoundSTE', 'binarize_weight', 'clipped_ste_grad',
    'sign_ste', 'amp_forward', 'amp_backward', 'BinaryConv2d',
    'LearnableBias', 'RPReLU', 'RPReLUFunction', 'LayerScale',
    'binary_conv_layers',
    'GSBAttentionBinarizer', 'LSQAttentionQuantizer'
]
