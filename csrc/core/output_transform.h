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

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
// binary_prelu for 8 neighbouring outputs in a register (float), from their
// int32 dot products: a, b, slope (and extra) point at their 8 values. The
// fused epilogues of the ops call this, so the vector code keeps the scalar
// order above.
template <bool kExtra>
inline __m256 binary_prelu8_dot(__m256i dot, const float* a, const float* b,
                                const float* extra, const float* slope) {
  __m256 z = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(a));
  z = _mm256_add_ps(z, _mm256_loadu_ps(b));
  if (kExtra) z = _mm256_add_ps(z, _mm256_loadu_ps(extra));
  const __m256 neg = _mm256_mul_ps(z, _mm256_loadu_ps(slope));
  return _mm256_blendv_ps(neg, z,
                          _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ));
}

// The same from popcounts: dot = full - 2 count.
template <bool kExtra>
inline __m256 binary_prelu8(__m256i count, __m256i full, const float* a,
                            const float* b, const float* extra,
                            const float* slope) {
  return binary_prelu8_dot<kExtra>(
      _mm256_sub_epi32(full, _mm256_add_epi32(count, count)), a, b, extra,
      slope);
}
#endif

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
