# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Bit packing of ±1 tensors into 64-bit words (the on-disk and in-kernel
format of every binary weight and activation).

Convention: along the packed (last) dimension, element ``i`` is bit
``i % 64`` of word ``i // 64``; a set bit is +1, a clear bit is -1. Words are
stored as ``torch.int64`` (two's complement of the unsigned word: torch has
no general uint64 arithmetic); the last word is zero-padded, and padding
bits are zero in weights and activations alike, so they never count in
``n - 2 popcount(a ^ b)``.
"""
import torch
from torch import Tensor

WORD_BITS = 64


def num_words(bits: int) -> int:
    """Words needed for ``bits`` bits."""
    return (bits + WORD_BITS - 1) // WORD_BITS


def _shifts(device) -> Tensor:
    return torch.arange(WORD_BITS, dtype=torch.int64, device=device)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool tensor ``(..., n)`` into int64 words
    ``(..., ceil(n / 64))``."""
    if bits.dtype != torch.bool:
        raise TypeError(f'pack_bits expects a bool tensor, got {bits.dtype}')
    n = bits.shape[-1]
    words = num_words(n)
    pad = words * WORD_BITS - n
    if pad:
        bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], -1)
    lanes = bits.reshape(*bits.shape[:-1], words, WORD_BITS).to(torch.int64)
    # distinct powers of two: the sum is the bitwise OR, and bit 63 adds
    # -2**63, which is exactly its two's complement pattern
    return (lanes << _shifts(bits.device)).sum(-1)


def unpack_bits(words: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: int64 words ``(..., w)`` → bool
    ``(..., n)``."""
    if words.dtype != torch.int64:
        raise TypeError(f'unpack_bits expects int64 words, got {words.dtype}')
    if words.shape[-1] != num_words(n):
        raise ValueError(f'{words.shape[-1]} words cannot hold exactly {n} '
                         f'bits ({num_words(n)} words expected)')
    lanes = (words.unsqueeze(-1) >> _shifts(words.device)) & 1
    return lanes.reshape(*words.shape[:-1], -1)[..., :n].bool()


def bits_to_pm1(bits: Tensor, dtype=torch.float32) -> Tensor:
    """bool → ±1 of ``dtype`` (True → +1)."""
    return bits.to(dtype) * 2 - 1
