// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Popcount core, AVX-512 with VPOPCNTDQ / BITALG: eight outputs (64-bit
// lanes) per register, up to four registers per input row in flight; the
// last, partial block of outputs uses masked loads and stores.
#pragma once

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

template <BitOp OP>
inline __m512i bitop512(__m512i a, __m512i b) {
  return OP == BitOp::kXor ? _mm512_xor_si512(a, b) : _mm512_and_si512(a, b);
}

inline __mmask8 tail8(int64_t left) {
  return left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1u);
}

template <BitOp OP, int NK, int NB>
inline void avx512_block(const Tap* taps, int ntaps, int64_t words,
                         int64_t xs, int64_t ldw, int64_t o, int64_t n,
                         int32_t* acc, int64_t lda) {
  __mmask8 m[NB];
  for (int b = 0; b < NB; ++b) m[b] = tail8(n - o - 8 * b);
  __m512i s[NK][NB];
  for (int k = 0; k < NK; ++k)
    for (int b = 0; b < NB; ++b) s[k][b] = _mm512_setzero_si512();
  for (int t = 0; t < ntaps; ++t) {
    const uint64_t* x = taps[t].x;
    const uint64_t* w = taps[t].w + o;
    for (int64_t i = 0; i < words; ++i) {
      __m512i wv[NB];
      for (int b = 0; b < NB; ++b)
        wv[b] = _mm512_maskz_loadu_epi64(m[b], w + i * ldw + 8 * b);
      for (int k = 0; k < NK; ++k) {
        const __m512i xv =
            _mm512_set1_epi64(static_cast<long long>(x[k * xs + i]));
        for (int b = 0; b < NB; ++b)
          s[k][b] = _mm512_add_epi64(
              s[k][b], _mm512_popcnt_epi64(bitop512<OP>(wv[b], xv)));
      }
    }
  }
  for (int k = 0; k < NK; ++k)
    for (int b = 0; b < NB; ++b)
      _mm256_mask_storeu_epi32(acc + k * lda + o + 8 * b, m[b],
                               _mm512_cvtepi64_epi32(s[k][b]));
}

template <BitOp OP, int NK>
inline void popcount_accumulate(const Tap* taps, int ntaps, int64_t words,
                                int64_t xs, int64_t ldw, int64_t n,
                                int32_t* acc, int64_t lda) {
  constexpr int NB = NK >= 4 ? 1 : (NK >= 2 ? 2 : 4);
  int64_t o = 0;
  for (; o + 8 * NB <= n; o += 8 * NB)
    avx512_block<OP, NK, NB>(taps, ntaps, words, xs, ldw, o, n, acc, lda);
  for (; o < n; o += 8)
    avx512_block<OP, NK, 1>(taps, ntaps, words, xs, ldw, o, n, acc, lda);
}

// Counts of 8 neighbouring outputs (o .. o + 7, all present in the padded
// weights) for NK rows, kept in registers for a fused epilogue (see
// popcount_core_avx2.h; kFold is meaningless here).
template <BitOp OP, int NK, bool kFold>
MMBHVIT_ALWAYS_INLINE inline void count8(const Tap* taps, int ntaps,
                                         int64_t words, int64_t xs,
                                         int64_t ldw, int64_t o,
                                         __m256i* out) {
  __m512i s[NK];
  for (int k = 0; k < NK; ++k) s[k] = _mm512_setzero_si512();
  for (int t = 0; t < ntaps; ++t) {
    const uint64_t* x = taps[t].x;
    const uint64_t* w = taps[t].w + o;
    for (int64_t i = 0; i < words; ++i) {
      const __m512i wv = _mm512_loadu_si512(w + i * ldw);
      for (int k = 0; k < NK; ++k)
        s[k] = _mm512_add_epi64(
            s[k], _mm512_popcnt_epi64(bitop512<OP>(
                      wv, _mm512_set1_epi64(
                              static_cast<long long>(x[k * xs + i])))));
    }
  }
  for (int k = 0; k < NK; ++k) out[k] = _mm512_cvtepi64_epi32(s[k]);
}

// Lane path: per 512-bit vector v, acc[v * 512 / cg + j] = popcount of
// the cg-bit lane j of XOR(x_t, w_t) summed over the taps (x_t, w_t point
// at vector 0 of the tap; vectors are 8 words apart); NV vectors per pass
// share the tap pointers.
template <int NV>
inline void avx512_lanes(const Tap* taps, int ntaps, int cg, int64_t v0,
                         int32_t* acc) {
  __m512i s[NV];
  for (int v = 0; v < NV; ++v) s[v] = _mm512_setzero_si512();
  for (int t = 0; t < ntaps; ++t) {
    const uint64_t* xp = taps[t].x + v0 * 8;
    const uint64_t* wp = taps[t].w + v0 * 8;
    for (int v = 0; v < NV; ++v) {
      const __m512i x_w = _mm512_xor_si512(_mm512_loadu_si512(xp + 8 * v),
                                           _mm512_loadu_si512(wp + 8 * v));
      s[v] = cg == 16 ? _mm512_add_epi16(s[v], _mm512_popcnt_epi16(x_w))
                      : _mm512_add_epi32(s[v], _mm512_popcnt_epi32(x_w));
    }
  }
  for (int v = 0; v < NV; ++v) {
    int32_t* a = acc + (v0 + v) * (512 / cg);
    if (cg == 16) {
      _mm512_storeu_si512(a,
                          _mm512_cvtepu16_epi32(_mm512_castsi512_si256(s[v])));
      _mm512_storeu_si512(
          a + 16, _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(s[v], 1)));
    } else {
      _mm512_storeu_si512(a, s[v]);
    }
  }
}

constexpr bool kHasLanes = true;
constexpr bool kDenseLaneInput = false;  // expanded lanes
inline void popcount_lanes(const Tap* taps, int ntaps, int cg, int64_t nvec,
                           int32_t* acc) {
  int64_t v = 0;
  for (; v + 2 <= nvec; v += 2) avx512_lanes<2>(taps, ntaps, cg, v, acc);
  for (; v < nvec; ++v) avx512_lanes<1>(taps, ntaps, cg, v, acc);
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
