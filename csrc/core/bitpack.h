// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Bit packing: sign bits of float rows into 64-bit words. A bit is 1 where
// the value is above its threshold (a +1), bit i of word w is element
// 64 w + i, the bits past the last element are 0.
#pragma once

#include <cstdint>

#include "isa.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

inline int popc(uint64_t v) { return __builtin_popcountll(v); }

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Scratch memory owned by one call (one thread's share of the work).
template <typename U>
struct Scratch {
  U* ptr;
  explicit Scratch(int64_t n) : ptr(new U[n > 0 ? n : 1]) {}
  ~Scratch() { delete[] ptr; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
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

// Each word's bits are gathered in a register and stored once (or-ing the
// chunks into memory makes every chunk wait for the previous store).
#if MMBHVIT_AVX512
inline void pack_row(const float* x, const float* thr, const float* sc,
                     const float* bi, int64_t n, uint64_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = n < i0 + 64 ? n : i0 + 64;
    uint64_t word = 0;
    for (int64_t i = i0; i < i1; i += 16) {
      const int64_t left = i1 - i;
      const __mmask16 m =
          left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
      __m512 v = _mm512_maskz_loadu_ps(m, x + i);
      if (sc != nullptr) {
        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, sc + i));
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bi + i));
      }
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(
          m, v, _mm512_maskz_loadu_ps(m, thr + i), _CMP_GT_OQ);
      word |= uint64_t(gt) << (i - i0);
    }
    out[i0 >> 6] = word;
  }
}
inline void pack_row(const double* x, const double* thr, const double* sc,
                     const double* bi, int64_t n, uint64_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = n < i0 + 64 ? n : i0 + 64;
    uint64_t word = 0;
    for (int64_t i = i0; i < i1; i += 8) {
      const int64_t left = i1 - i;
      const __mmask8 m =
          left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1u);
      __m512d v = _mm512_maskz_loadu_pd(m, x + i);
      if (sc != nullptr) {
        v = _mm512_mul_pd(v, _mm512_maskz_loadu_pd(m, sc + i));
        v = _mm512_add_pd(v, _mm512_maskz_loadu_pd(m, bi + i));
      }
      const __mmask8 gt = _mm512_mask_cmp_pd_mask(
          m, v, _mm512_maskz_loadu_pd(m, thr + i), _CMP_GT_OQ);
      word |= uint64_t(gt) << (i - i0);
    }
    out[i0 >> 6] = word;
  }
}
#elif MMBHVIT_AVX2
inline void pack_row(const float* x, const float* thr, const float* sc,
                     const float* bi, int64_t n, uint64_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = n < i0 + 64 ? n : i0 + 64;
    uint64_t word = 0;
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      if (sc != nullptr) {
        v = _mm256_mul_ps(v, _mm256_loadu_ps(sc + i));
        v = _mm256_add_ps(v, _mm256_loadu_ps(bi + i));
      }
      const int m = _mm256_movemask_ps(
          _mm256_cmp_ps(v, _mm256_loadu_ps(thr + i), _CMP_GT_OQ));
      word |= uint64_t(unsigned(m)) << (i - i0);
    }
    out[i0 >> 6] = word | pack_bits_scalar(x, thr, sc, bi, i, i1, i0);
  }
}
inline void pack_row(const double* x, const double* thr, const double* sc,
                     const double* bi, int64_t n, uint64_t* out) {
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t i1 = n < i0 + 64 ? n : i0 + 64;
    uint64_t word = 0;
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
      __m256d v = _mm256_loadu_pd(x + i);
      if (sc != nullptr) {
        v = _mm256_mul_pd(v, _mm256_loadu_pd(sc + i));
        v = _mm256_add_pd(v, _mm256_loadu_pd(bi + i));
      }
      const int m = _mm256_movemask_pd(
          _mm256_cmp_pd(v, _mm256_loadu_pd(thr + i), _CMP_GT_OQ));
      word |= uint64_t(unsigned(m)) << (i - i0);
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
