// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Bit packing: sign bits of float rows into 64-bit words. A bit is 1 where
// the value is above its threshold (a +1), bit i of word w is element
// 64 w + i, the bits past the last element are 0.
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"
#include "scratch.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

inline int popc(uint64_t v) { return __builtin_popcountll(v); }

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Scratch memory owned by one call (one thread's share of the work), from
// the thread's ScratchStack (scratch.h): scopes end in reverse order, so
// each one gives back the top of the stack. What does not fit comes from
// new[].
template <typename U>
struct Scratch {
  U* ptr;
  explicit Scratch(int64_t n)
      : bytes_((size_t(n > 0 ? n : 1) * sizeof(U) + 63) / 64 * 64) {
    unsigned char* p = scratch_stack().take(bytes_);
    stacked_ = p != nullptr;
    if (stacked_) {
      ptr = reinterpret_cast<U*>(p);
      return;
    }
    try {
      ptr = new U[n > 0 ? n : 1];
    } catch (...) {
      scratch_stack().give(bytes_, false);
      throw;
    }
  }
  ~Scratch() {
    if (!stacked_) delete[] ptr;
    scratch_stack().give(bytes_, stacked_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

 private:
  size_t bytes_;
  bool stacked_;
};

// ORs the bits of `mask` into plane starting at bit j (j % 64 + width of
// mask <= 64).
inline void set_bits(uint64_t* plane, int64_t j, uint64_t mask) {
  plane[j >> 6] |= mask << (j & 63);
}

// bit i = (x[i] * sc[i] + bi[i] > thr[i]) (sc == nullptr: x[i] > thr[i]),
// for each j in [i, i1), at bit (j - i0) of the returned word
template <typename T>
inline uint64_t pack_bits_scalar(const T* x, const T* thr, const T* sc,
                                 const T* bi, int64_t i, int64_t i1,
                                 int64_t i0) {
  uint64_t word = 0;
  for (; i < i1; ++i) {
    T v = x[i];
    if (sc != nullptr) {
      v = v * sc[i];
      v = v + bi[i];
    }
    if (v > thr[i]) word |= uint64_t(1) << (i - i0);
  }
  return word;
}

template <typename T>
inline void pack_row_scalar(const T* x, const T* thr, const T* sc,
                            const T* bi, int64_t n, uint64_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = n < i0 + 64 ? n : i0 + 64;
    out[i0 >> 6] = pack_bits_scalar(x, thr, sc, bi, i0, i1, i0);
  }
}

// One SIMD vector of T (float or double) for pack_row: loads of the first
// `m` lanes (AVX-512: a lane mask; AVX2: whole vectors only), mul, add and
// the lane mask of a > b.
#if MMBHVIT_AVX512
template <typename T>
struct PackVec;
template <>
struct PackVec<float> {
  static constexpr int kLanes = 16;
  using V = __m512;
  static V load(unsigned m, const float* p) {
    return _mm512_maskz_loadu_ps(__mmask16(m), p);
  }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static unsigned gt(unsigned m, V a, V b) {
    return _mm512_mask_cmp_ps_mask(__mmask16(m), a, b, _CMP_GT_OQ);
  }
};
template <>
struct PackVec<double> {
  static constexpr int kLanes = 8;
  using V = __m512d;
  static V load(unsigned m, const double* p) {
    return _mm512_maskz_loadu_pd(__mmask8(m), p);
  }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static unsigned gt(unsigned m, V a, V b) {
    return _mm512_mask_cmp_pd_mask(__mmask8(m), a, b, _CMP_GT_OQ);
  }
};
#elif MMBHVIT_AVX2
template <typename T>
struct PackVec;
template <>
struct PackVec<float> {
  static constexpr int kLanes = 8;
  using V = __m256;
  static V load(unsigned, const float* p) { return _mm256_loadu_ps(p); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static unsigned gt(unsigned, V a, V b) {
    return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)));
  }
};
template <>
struct PackVec<double> {
  static constexpr int kLanes = 4;
  using V = __m256d;
  static V load(unsigned, const double* p) { return _mm256_loadu_pd(p); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static unsigned gt(unsigned, V a, V b) {
    return unsigned(_mm256_movemask_pd(_mm256_cmp_pd(a, b, _CMP_GT_OQ)));
  }
};
#endif

#if MMBHVIT_AVX512 || MMBHVIT_AVX2
// Each word's bits are gathered in a register and stored once (or-ing the
// chunks into memory makes every chunk wait for the previous store).
// AVX-512 masks the last partial vector; AVX2 leaves it to the scalar loop.
template <typename T>
inline void pack_row(const T* x, const T* thr, const T* sc, const T* bi,
                     int64_t n, uint64_t* out) {
  using P = PackVec<T>;
  constexpr int L = P::kLanes;
  constexpr bool masked = MMBHVIT_AVX512 != 0;
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = n < i0 + 64 ? n : i0 + 64;
    uint64_t word = 0;
    int64_t i = i0;
    for (; masked ? i < i1 : i + L <= i1; i += L) {
      const int64_t left = i1 - i;
      const unsigned m = left >= L ? (1u << L) - 1u : (1u << left) - 1u;
      typename P::V v = P::load(m, x + i);
      if (sc != nullptr) {
        v = P::mul(v, P::load(m, sc + i));
        v = P::add(v, P::load(m, bi + i));
      }
      word |= uint64_t(P::gt(m, v, P::load(m, thr + i))) << (i - i0);
    }
    out[i0 >> 6] = word | pack_bits_scalar(x, thr, sc, bi, i, i1, i0);
  }
}
#else
template <typename T>
inline void pack_row(const T* x, const T* thr, const T* sc, const T* bi,
                     int64_t n, uint64_t* out) {
  pack_row_scalar(x, thr, sc, bi, n, out);
}
#endif

// Sign bits of x[j, c] > thr[c] along j (rows `stride` apart):
// dst[w][c] bit j % 64, w = j / 64 (the ±1 values of attention, packed
// along the tokens they are summed over).
template <typename T>
inline void token_bits(const T* x, int64_t stride, const T* thr, int64_t t,
                       int64_t d, uint64_t* dst) {
  const int64_t tw = words_for(t);
  for (int64_t k = 0; k < tw * d; ++k) dst[k] = 0;
  for (int64_t j = 0; j < t; ++j) {
    const T* xj = x + j * stride;
    uint64_t* row = dst + (j >> 6) * d;
    const uint64_t bit = uint64_t(1) << (j & 63);
    for (int64_t c = 0; c < d; ++c)
      if (xj[c] > thr[c]) row[c] |= bit;
  }
}

#if MMBHVIT_AVX512
inline void token_bits(const float* x, int64_t stride, const float* thr,
                       int64_t t, int64_t d, uint64_t* dst) {
  if (d % 8 != 0) {
    token_bits<float>(x, stride, thr, t, d, dst);
    return;
  }
  for (int64_t w = 0; w * 64 < t; ++w) {
    const int64_t j1 = t < w * 64 + 64 ? t : w * 64 + 64;
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      const __m256 th = _mm256_loadu_ps(thr + c0);
      __m512i acc = _mm512_setzero_si512();
      for (int64_t j = w * 64; j < j1; ++j) {
        const __mmask8 m = _mm256_cmp_ps_mask(
            _mm256_loadu_ps(x + j * stride + c0), th, _CMP_GT_OQ);
        acc = _mm512_mask_or_epi64(
            acc, m, acc,
            _mm512_set1_epi64(static_cast<long long>(uint64_t(1) << (j & 63))));
      }
      _mm512_storeu_si512(dst + w * d + c0, acc);
    }
  }
}
#endif

#if MMBHVIT_AVX2
// 8 channels per step: the compare masks sign-extended to 64-bit lanes
// select the token's bit.
inline void token_bits(const float* x, int64_t stride, const float* thr,
                       int64_t t, int64_t d, uint64_t* dst) {
  if (d % 8 != 0) {
    token_bits<float>(x, stride, thr, t, d, dst);
    return;
  }
  for (int64_t w = 0; w * 64 < t; ++w) {
    const int64_t j1 = t < w * 64 + 64 ? t : w * 64 + 64;
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      const __m128 th0 = _mm_loadu_ps(thr + c0), th1 = _mm_loadu_ps(thr + c0 + 4);
      __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
      for (int64_t j = w * 64; j < j1; ++j) {
        const float* xj = x + j * stride + c0;
        const __m256i bit =
            _mm256_set1_epi64x(static_cast<long long>(uint64_t(1) << (j & 63)));
        const __m256i m0 = _mm256_cvtepi32_epi64(
            _mm_castps_si128(_mm_cmpgt_ps(_mm_loadu_ps(xj), th0)));
        const __m256i m1 = _mm256_cvtepi32_epi64(
            _mm_castps_si128(_mm_cmpgt_ps(_mm_loadu_ps(xj + 4), th1)));
        acc0 = _mm256_or_si256(acc0, _mm256_and_si256(m0, bit));
        acc1 = _mm256_or_si256(acc1, _mm256_and_si256(m1, bit));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + w * d + c0), acc0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + w * d + c0 + 4),
                          acc1);
    }
  }
}
#endif

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
