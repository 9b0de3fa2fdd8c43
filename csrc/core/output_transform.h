// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The float epilogue of the binary ops, in one place. Each step is one
// float operation rounded once (the kernels are built with
// -ffp-contract=off), in the order the PyTorch fallback
// (mmbhvit/deploy/ops.py) evaluates it, so both backends give the same
// numbers:
//
//   D    = full - 2 * count           (±1 dot product from an XOR popcount)
//   z    = D * a
//   z    = z + b
//   z    = z + shortcut ...           (op-specific terms, left to right)
//   z    = prelu(z) = z > 0 ? z : z * slope
//   then op-specific post terms (scale, bias, residual, position).
#pragma once

#include <cstdint>

#include "isa.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// The ±1 dot product of `full` bit pairs with `count` differing bits.
template <typename T>
inline T binary_dot(int32_t full, int32_t count) {
  return T(full - 2 * count);
}

// D * a + b
template <typename T>
inline T scale_shift(int32_t full, int32_t count, T a, T b) {
  T z = binary_dot<T>(full, count) * a;
  return z + b;
}

template <typename T>
inline T prelu(T z, T slope) {
  const T neg = z * slope;
  return z > T(0) ? z : neg;
}

// The whole transform of the binary convolutions with a PReLU:
// prelu(D * a + b + extra, slope) (extra: one shortcut term, or 0 terms).
template <typename T, bool kExtra>
inline T binary_prelu(int32_t full, int32_t count, T a, T b, T extra,
                      T slope) {
  T z = scale_shift<T>(full, count, a, b);
  if (kExtra) z = z + extra;
  return prelu(z, slope);
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
