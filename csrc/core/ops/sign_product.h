// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The forward of a 1-bit 1x1 convolution in training (SignProductConv1x1),
// on the model's own NCHW maps: the dot products of ±1 inputs and ±1
// weights are integers, counted exactly by the popcount core, then scaled.
//
// The roles of the core's operands are swapped with respect to proj: the
// broadcast rows are output channels (weight rows) and the vector operand
// is the tile's pixels, packed with the pixels innermost (word i of pixel
// j at i * kSignProductTile + j). That is the layout in which the packing
// reads each channel's row of pixels contiguously, and the counts come out
// along the pixels, the way y is stored: neither side needs a transpose.
// On AVX2 / AVX-512 (float) the counts of 4 channels x 8 pixels stay in
// registers (count8) and the scale and bias are applied there; elsewhere
// they go through memory (popcount_rows), with the same float operations.
//
// Inputs may also be 0 (sign(0) = 0, e.g. where a zero-initialised bias
// meets an exact 0): a tile with zeros is counted twice, once with its
// zeros as -1 (bits A) and once as +1 (bits B = A | zero mask), and
// D = (D_A + D_B) / 2 = cin - count_A - count_B is exact: the zeros'
// terms cancel. Tiles without zeros are counted once (D = cin - 2 count).
#pragma once

#include <cstdint>

#include "../popcount_core.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// The sign bits (v > 0) of the pixels p0 .. p0 + np - 1 of image n, along
// the pixels (bits[w * kSignProductTile + j], zero past np), and in zbits
// those of v == 0. Returns 0 (all +-1), 1 (zeros too) or 2 (another
// value, e.g. NaN).
template <typename T>
inline int sign_product_pack(const SignProductParams<T>& p, int64_t n,
                             int64_t p0, int64_t np, uint64_t* bits,
                             uint64_t* zbits) {
  constexpr int64_t kT = kSignProductTile;
  for (int64_t i = 0; i < p.words * kT; ++i) bits[i] = zbits[i] = 0;
  const T* xn = p.x + (n * p.cin) * p.pixels + p0;
  int32_t bad = 0, zero = 0;
  for (int64_t c = 0; c < p.cin; ++c) {
    const T* xr = xn + c * p.pixels;
    uint64_t* b = bits + (c >> 6) * kT;
    uint64_t* z = zbits + (c >> 6) * kT;
    const int sh = static_cast<int>(c & 63);
    for (int64_t j = 0; j < np; ++j) {
      const T v = xr[j];
      const int32_t is0 = static_cast<int32_t>(v == T(0));
      bad |= static_cast<int32_t>((v != T(1)) & (v != T(-1))) & (is0 ^ 1);
      zero |= is0;
      b[j] |= static_cast<uint64_t>(v > T(0)) << sh;
      z[j] |= static_cast<uint64_t>(is0) << sh;
    }
  }
  if (bad) return 2;
  if (!zero) return 0;
  for (int64_t i = 0; i < p.words * kT; ++i) zbits[i] |= bits[i];
  return 1;  // zbits: bits B
}

// y = (cin - count_A - count_B) * scale (+ bias), one rounding each
// (count2 = count_A + count_B).
template <typename T>
inline T sign_product_value(int32_t cin, int32_t count2, T scale,
                            const T* bias, int64_t o) {
  const T v = static_cast<T>(cin - count2) * scale;
  return bias != nullptr ? v + bias[o] : v;
}

template <typename T>
inline bool sign_product_fused(const SignProductParams<T>&, int64_t, int64_t,
                               const uint64_t*, const uint64_t*, int64_t,
                               int64_t) {
  return false;
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
constexpr int kSignProductRows = 4;  // output channels per pass

// bits_b: the tile's bits B (zeros present), or nullptr
template <bool kFold, bool kTwo>
inline void sign_product_rows(const SignProductParams<float>& p,
                              const uint64_t* bits, const uint64_t* bits_b,
                              int64_t o0, int64_t np, float* yn) {
  constexpr int NK = kSignProductRows;
  const int64_t P = p.pixels, W = p.words;
  const __m256i full = _mm256_set1_epi32(static_cast<int32_t>(p.cin));
  __m256 sc[NK], bi[NK];
  for (int k = 0; k < NK; ++k) {
    sc[k] = _mm256_set1_ps(p.scale[o0 + k]);
    bi[k] = _mm256_set1_ps(p.bias != nullptr ? p.bias[o0 + k] : 0.f);
  }
  const Tap tap{p.wrows + o0 * W, bits};
  const Tap tap_b{p.wrows + o0 * W, bits_b};
  for (int64_t j = 0; j < np; j += 8) {
    __m256i cnt[NK], cnt_b[NK];
    count8<BitOp::kXor, NK, kFold>(&tap, 1, W, W, kSignProductTile, j, cnt);
    if (kTwo)
      count8<BitOp::kXor, NK, kFold>(&tap_b, 1, W, W, kSignProductTile, j,
                                     cnt_b);
    for (int k = 0; k < NK; ++k) {
      const __m256i c2 = _mm256_add_epi32(cnt[k], kTwo ? cnt_b[k] : cnt[k]);
      __m256 v = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_sub_epi32(full, c2)), sc[k]);
      if (p.bias != nullptr) v = _mm256_add_ps(v, bi[k]);
      float* y = yn + (o0 + k) * P + j;
      if (np - j >= 8) {
        _mm256_storeu_ps(y, v);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        for (int64_t i = 0; i < np - j; ++i) y[i] = tmp[i];
      }
    }
  }
}

// Channels 0 .. o_end - 1 (a multiple of 4).
inline bool sign_product_fused(const SignProductParams<float>& p,
                               int64_t n, int64_t p0, const uint64_t* bits,
                               const uint64_t* bits_b, int64_t np,
                               int64_t o_end) {
  float* yn = p.y + n * p.cout * p.pixels + p0;
  const bool fold = p.words > 31;
  for (int64_t o0 = 0; o0 < o_end; o0 += kSignProductRows) {
    if (bits_b != nullptr) {
      if (fold)
        sign_product_rows<true, true>(p, bits, bits_b, o0, np, yn);
      else
        sign_product_rows<false, true>(p, bits, bits_b, o0, np, yn);
    } else if (fold) {
      sign_product_rows<true, false>(p, bits, nullptr, o0, np, yn);
    } else {
      sign_product_rows<false, false>(p, bits, nullptr, o0, np, yn);
    }
  }
  return true;
}
#endif

// The unsigned integer of T's size: |x| as its bits (sign bit cleared)
// orders like |x| for non-negative values, and a NaN's bits exceed
// infinity's, so an integer maximum (which vectorises, unlike a float
// maximum with NaN semantics) gives max|x|, or a NaN.
template <typename T>
struct SameSizeUint;
template <>
struct SameSizeUint<float> {
  using type = uint32_t;
};
template <>
struct SameSizeUint<double> {
  using type = uint64_t;
};

template <typename T>
inline T max_abs(const T* x, int64_t n) {
  using U = typename SameSizeUint<T>::type;
  const U magnitude = ~(U(1) << (8 * sizeof(U) - 1));
  U m = 0;
  for (int64_t i = 0; i < n; ++i) {
    U b;
    __builtin_memcpy(&b, x + i, sizeof(U));
    b &= magnitude;
    m = b > m ? b : m;
  }
  T r;
  __builtin_memcpy(&r, &m, sizeof(U));
  return r;
}

template <typename T>
void sign_weights(const SignWeightsParams<T>& p, int64_t begin, int64_t end) {
  int32_t bad = 0;
  for (int64_t o = begin; o < end; ++o) {
    const T* wr = p.w + o * p.cin;
    const T sc = max_abs(wr, p.cin);
    bad |= static_cast<int32_t>(!(sc > T(0)));  // a zero row, or NaN
    int32_t off = 0;
    for (int64_t c = 0; c < p.cin; ++c)
      off |= static_cast<int32_t>((wr[c] != sc) & (wr[c] != -sc));
    bad |= off;
    uint64_t* r = p.rows + o * p.words;
    for (int64_t c0 = 0; c0 < p.cin; c0 += 64) {
      const int64_t m = p.cin - c0 < 64 ? p.cin - c0 : 64;
      uint64_t word = 0;
      for (int64_t c = 0; c < m; ++c)
        word |= static_cast<uint64_t>(wr[c0 + c] > T(0)) << c;
      r[c0 >> 6] = word;
    }
    p.scale[o] = sc;
  }
  if (bad) __atomic_store_n(p.not_signs, 1, __ATOMIC_RELAXED);
}

template <typename T>
void sign_product(const SignProductParams<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t kT = kSignProductTile;
  const int64_t P = p.pixels, W = p.words, cout = p.cout;
  const int64_t tiles = (P + kT - 1) / kT;
  const int32_t cin = static_cast<int32_t>(p.cin);
  Scratch<uint64_t> bits(W * kT), bits_b(W * kT);
  Scratch<int32_t> acc(8 * kT), acc_b(8 * kT);
  bool all_signs = true;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / tiles, p0 = (item % tiles) * kT;
    const int64_t np = P - p0 < kT ? P - p0 : kT;
    const int kind = sign_product_pack(p, n, p0, np, bits.ptr, bits_b.ptr);
    if (kind == 2) {
      all_signs = false;
      break;
    }
    const uint64_t* b2 = kind == 1 ? bits_b.ptr : nullptr;
    // whole groups of 4 channels in registers where the set can
    int64_t o = cout / 4 * 4;
    if (!sign_product_fused(p, n, p0, bits.ptr, b2, np, o)) o = 0;
    T* yn = p.y + n * cout * P + p0;
    for (; o < cout; o += 8) {
      const int nk = static_cast<int>(cout - o < 8 ? cout - o : 8);
      const Tap t{p.wrows + o * W, bits.ptr};
      popcount_rows<BitOp::kXor>(nk, &t, 1, W, W, kT, np, acc.ptr, kT);
      const int32_t* second = acc.ptr;  // no zeros: count A twice
      if (b2 != nullptr) {
        const Tap tb{p.wrows + o * W, b2};
        popcount_rows<BitOp::kXor>(nk, &tb, 1, W, W, kT, np, acc_b.ptr, kT);
        second = acc_b.ptr;
      }
      for (int k = 0; k < nk; ++k) {
        const T sc = p.scale[o + k];
        const int32_t* a = acc.ptr + k * kT;
        const int32_t* a2 = second + k * kT;
        T* yo = yn + (o + k) * P;
        for (int64_t j = 0; j < np; ++j)
          yo[j] = sign_product_value(cin, a[j] + a2[j], sc, p.bias, o + k);
      }
    }
  }
  if (!all_signs) __atomic_store_n(p.not_signs, 1, __ATOMIC_RELAXED);
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
