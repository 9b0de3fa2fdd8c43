// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Binarized attention of MSMHA: sign packing per head, the scores of ±1
// queries and keys (XOR popcount core), and the context of the bit-plane
// quantized attention map with ±1 values (AND popcount core, one row per
// bit plane) with its epilogue.
#pragma once

#include <cstdint>

#include "../output_transform.h"
#include "../popcount_core.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

inline float round_even(float v) { return __builtin_nearbyintf(v); }
inline double round_even(double v) { return __builtin_nearbyint(v); }

// Number of bit planes of an integer level in 0..levels.
inline int bit_planes(int levels) {
  int nb = 0;
  while ((1 << nb) <= levels) ++nb;
  return nb;
}

// q: item = token (b, i) -> bits (b, heads, t, wd)
template <typename T>
void head_pack(const HeadPackParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.t, i = item % p.t;
    const T* x = p.x + item * p.c;
    for (int64_t h = 0; h < p.heads; ++h)
      pack_row(x + h * p.d, p.thr + h * p.d, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), p.d,
               p.bits + ((b * p.heads + h) * p.t + i) * p.wd);
  }
}

// k: item = token (b, i) -> words (b, heads, wd, t_pad) (token innermost)
template <typename T>
void head_pack_t(const HeadPackParams<T>& p, int64_t begin, int64_t end) {
  uint64_t tmp[64];
  Scratch<uint64_t> big(p.wd > 64 ? p.wd : 1);
  uint64_t* buf = p.wd > 64 ? big.ptr : tmp;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.t, i = item % p.t;
    const T* x = p.x + item * p.c;
    for (int64_t h = 0; h < p.heads; ++h) {
      pack_row(x + h * p.d, p.thr + h * p.d, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), p.d, buf);
      uint64_t* dst = p.bits + (b * p.heads + h) * p.wd * p.t_pad + i;
      for (int64_t w = 0; w < p.wd; ++w) dst[w * p.t_pad] = buf[w];
    }
  }
}

template <typename T>
void token_pack(const HeadPackParams<T>& p, int64_t begin, int64_t end) {
  const int64_t tw = words_for(p.t);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.heads, h = item % p.heads;
    token_bits(p.x + b * p.t * p.c + h * p.d, p.c, p.thr + h * p.d, p.t, p.d,
               p.bits + item * tw * p.d);
  }
}

// The float32 attention map straight from the counts (ScoreParams::table):
// NK rows of t counts (cs apart); with c0 a row's smallest count (its largest
// score), e_j = table[c_j - c0] = exp(-2 (c_j - c0) scale) in float64, and
// p_j = float(e_j * (1 / sum_j e_j)) into rows of p (t apart), the sum
// taken left to right; the NK rows' sums run side by side.
//
// table_sums: c0 and 1 / sum of each row as table_softmax forms them, and
// the row's spread (largest c_j - c0), for attention() below; table_row:
// one row of the map from them. (table_softmax keeps its own loops: taking
// them from these two made the map 6-9 % slower.)
template <int NK>
inline void table_sums(const int32_t* cnt, int64_t cs, int64_t t,
                       const double* table, int64_t* c0, double* inv,
                       int64_t* spread) {
  double sum[NK];
  for (int k = 0; k < NK; ++k) {
    const int32_t* c = cnt + k * cs;
    int32_t lo = c[0], hi = c[0];
    for (int64_t j = 1; j < t; ++j) {
      lo = c[j] < lo ? c[j] : lo;
      hi = c[j] > hi ? c[j] : hi;
    }
    c0[k] = lo;
    spread[k] = hi - lo;
    sum[k] = 0.0;
  }
  for (int64_t j = 0; j < t; ++j)
    for (int k = 0; k < NK; ++k) sum[k] += table[cnt[k * cs + j] - c0[k]];
  for (int k = 0; k < NK; ++k) inv[k] = 1.0 / sum[k];
}

template <typename T>
inline void table_row(const int32_t* c, int64_t t, const double* table,
                      int64_t c0, double inv, T* p) {
  for (int64_t j = 0; j < t; ++j)
    p[j] = static_cast<T>(table[c[j] - c0] * inv);
}

template <int NK>
inline void table_softmax(const int32_t* cnt, int64_t cs, int64_t t,
                          const double* table, float* p) {
  int64_t c0[NK];  // 64-bit, so the compiler may fold -c0 into the base
  double sum[NK];
  for (int k = 0; k < NK; ++k) {
    const int32_t* c = cnt + k * cs;
    int32_t m = c[0];
    for (int64_t j = 1; j < t; ++j) m = c[j] < m ? c[j] : m;
    c0[k] = m;
    sum[k] = 0.0;
  }
  for (int64_t j = 0; j < t; ++j)
    for (int k = 0; k < NK; ++k) sum[k] += table[cnt[k * cs + j] - c0[k]];
  for (int k = 0; k < NK; ++k) {
    const double inv = 1.0 / sum[k];
    const int32_t* c = cnt + k * cs;
    float* pk = p + k * t;
    for (int64_t j = 0; j < t; ++j)
      pk[j] = static_cast<float>(table[c[j] - c0[k]] * inv);
  }
}

inline void table_softmax_rows(int nk, const int32_t* cnt, int64_t cs,
                               int64_t t, const double* table, float* p) {
  switch (nk) {
    case 4: table_softmax<4>(cnt, cs, t, table, p); break;
    case 3: table_softmax<3>(cnt, cs, t, table, p); break;
    case 2: table_softmax<2>(cnt, cs, t, table, p); break;
    default: table_softmax<1>(cnt, cs, t, table, p); break;
  }
}

// Fused scores (AVX2 / AVX-512, float): 4 query rows of one (b, head), the
// counts of 8 keys in registers, D * scale stored directly (the last, partial
// block of keys with a masked store); with a table, the counts go to cbuf
// and the rows through table_softmax.
template <typename T>
inline bool scores_fused(const ScoreParams<T>&, int64_t, int64_t) {
  return false;
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
// The first `left` of 8 lanes (all of them from 8 on): a vmaskmov mask
// (AVX-512's tail8 is a k-mask).
inline __m256i tail8_mask(int64_t left) {
  return _mm256_cmpgt_epi32(
      _mm256_set1_epi32(int32_t(left < 8 ? left : 8)),
      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The LSQ levels of 8 probabilities (lsq_planes' operations, below).
inline __m256i lsq_levels8(__m256 pj, __m256 lv_max, __m256 vstep,
                           __m256 vzero) {
  __m256 u = _mm256_mul_ps(pj, lv_max);
  u = _mm256_div_ps(u, vstep);
  u = _mm256_add_ps(u, vzero);
  __m256 r = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT |
                                    _MM_FROUND_NO_EXC);
  r = _mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), lv_max);
  return _mm256_cvttps_epi32(r);
}

// The counts of NK query rows (item .., all of (b, head) bh) against every
// key, into rows of cbuf t_pad apart (lanes past t: the zero-padded keys).
template <int NK>
inline void count_rows8(const ScoreParams<float>& p, int64_t item,
                        int64_t bh, int32_t* cbuf) {
  const Tap tap{p.qbits + item * p.wd, p.kbits + bh * p.wd * p.t_pad};
  for (int64_t j = 0; j < p.t; j += 8) {
    __m256i cnt[NK];
    count8<BitOp::kXor, NK, false>(&tap, 1, p.wd, p.wd, p.t_pad, j, cnt);
    for (int k = 0; k < NK; ++k)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cbuf + k * p.t_pad + j),
                          cnt[k]);
  }
}

template <int NK>
inline void scores_rows8(const ScoreParams<float>& p, int64_t item,
                         int64_t bh, int32_t* cbuf) {
  const int64_t t = p.t;
  float* s = p.s + item * t;
  if (p.table != nullptr) {
    count_rows8<NK>(p, item, bh, cbuf);
    table_softmax<NK>(cbuf, p.t_pad, t, p.table, s);
    return;
  }
  const Tap tap{p.qbits + item * p.wd, p.kbits + bh * p.wd * p.t_pad};
  const __m256i full = _mm256_set1_epi32(int32_t(p.d));
  const __m256 scale = _mm256_set1_ps(p.scale);
  for (int64_t j = 0; j < t; j += 8) {
    __m256i cnt[NK];
    count8<BitOp::kXor, NK, false>(&tap, 1, p.wd, p.wd, p.t_pad, j, cnt);
    const int64_t left = t - j;
    const __m256i mask = tail8_mask(left);
    for (int k = 0; k < NK; ++k) {
      const __m256 v = _mm256_mul_ps(
          _mm256_cvtepi32_ps(
              _mm256_sub_epi32(full, _mm256_add_epi32(cnt[k], cnt[k]))),
          scale);
      if (left >= 8)
        _mm256_storeu_ps(s + k * t + j, v);
      else
        _mm256_maskstore_ps(s + k * t + j, mask, v);
    }
  }
}

inline bool scores_fused(const ScoreParams<float>& p, int64_t begin,
                         int64_t end) {
  if (p.wd > 31 || p.t_pad % 8 != 0) return false;
  Scratch<int32_t> cbuf(p.table != nullptr ? 4 * p.t_pad : 1);
  for (int64_t item = begin; item < end;) {
    const int64_t bh = item / p.t;
    int64_t stop = (bh + 1) * p.t;
    stop = stop < end ? stop : end;
    const int nk = int(stop - item < 4 ? stop - item : 4);
    switch (nk) {
      case 4: scores_rows8<4>(p, item, bh, cbuf.ptr); break;
      case 3: scores_rows8<3>(p, item, bh, cbuf.ptr); break;
      case 2: scores_rows8<2>(p, item, bh, cbuf.ptr); break;
      default: scores_rows8<1>(p, item, bh, cbuf.ptr); break;
    }
    item += nk;
  }
  return true;
}
#endif

// The generic path's rows [item, item + nk) through table_softmax (float
// with a table; float64 takes the scores, softmax is ATen's).
inline bool table_map(const ScoreParams<float>& p, int nk, const int32_t* acc,
                      int64_t item) {
  if (p.table == nullptr) return false;
  table_softmax_rows(nk, acc, p.t_pad, p.t, p.table, p.s + item * p.t);
  return true;
}
inline bool table_map(const ScoreParams<double>&, int, const int32_t*,
                      int64_t) {
  return false;
}

// Attention scores: item = query row (b, head, i); up to four rows of the
// same (b, head) share each key load; with a table, the attention map.
template <typename T>
void scores(const ScoreParams<T>& p, int64_t begin, int64_t end) {
  if (scores_fused(p, begin, end)) return;
  constexpr int kRows = 4;
  Scratch<int32_t> acc(kRows * p.t_pad);
  const int32_t d = int32_t(p.d);
  for (int64_t item = begin; item < end;) {
    const int64_t bh = item / p.t;
    int64_t stop = (bh + 1) * p.t;
    stop = stop < end ? stop : end;
    const int nk = int(stop - item < kRows ? stop - item : kRows);
    const Tap tap{p.qbits + item * p.wd, p.kbits + bh * p.wd * p.t_pad};
    popcount_rows<BitOp::kXor>(nk, &tap, 1, p.wd, p.wd, p.t_pad, p.t,
                               acc.ptr, p.t_pad);
    if (table_map(p, nk, acc.ptr, item)) {
      item += nk;
      continue;
    }
    for (int k = 0; k < nk; ++k) {
      const int32_t* a = acc.ptr + k * p.t_pad;
      T* s = p.s + (item + k) * p.t;
      MMBHVIT_NOALIAS_LOOP
      for (int64_t j = 0; j < p.t; ++j) s[j] = binary_dot<T>(d, a[j]) * p.scale;
    }
    item += nk;
  }
}

// LSQ: level_j = clamp(round(p_j * L / step + zero), 0, L), bit planes of it.
template <typename T>
inline void lsq_planes(const T* p, int64_t t, int levels, T step, T zero,
                       int nplanes, int64_t tw, uint64_t* planes) {
  const T lv_max = T(levels);
  for (int64_t j = 0; j < t; ++j) {
    T u = p[j] * lv_max;
    u = u / step;
    u = u + zero;
    T r = round_even(u);
    r = r < T(0) ? T(0) : (r > lv_max ? lv_max : r);
    const int lv = int(r);
    for (int pl = 0; pl < nplanes; ++pl)
      if ((lv >> pl) & 1)
        planes[pl * tw + (j >> 6)] |= uint64_t(1) << (j & 63);
  }
}

// GSB: planes T0+ (T0 = 1), T0- (T0 = -1), T1, T2 of q = p / alpha; the
// bits of token j.
template <typename T>
inline void gsb_bits(T q, T lo, T hi, int64_t j, int64_t tw,
                     uint64_t* planes) {
  T r = round_even(q);
  r = r < T(0) ? T(0) : (r > T(1) ? T(1) : r);
  const int above_low = q > lo, above_high = q > hi;
  const int base = int(r) - above_low;  // -1, 0 or 1
  const uint64_t bit = uint64_t(1) << (j & 63);
  const int64_t w = j >> 6;
  if (base > 0) planes[0 * tw + w] |= bit;
  if (base < 0) planes[1 * tw + w] |= bit;
  if (above_low && !above_high) planes[2 * tw + w] |= bit;
  if (above_high) planes[3 * tw + w] |= bit;
}

template <typename T>
inline void gsb_planes(const T* p, int64_t t, T alpha, T low, T high,
                       int64_t tw, uint64_t* planes) {
  T m = T(0);
  for (int64_t j = 0; j < t; ++j) {
    const T q = p[j] / alpha;
    if (j == 0 || q > m) m = q;
  }
  const T hi = high * m, lo = low * m;
  for (int64_t j = 0; j < t; ++j) gsb_bits(p[j] / alpha, lo, hi, j, tw, planes);
}

#if MMBHVIT_AVX512
inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

inline void lsq_planes(const float* p, int64_t t, int levels, float step,
                       float zero, int nplanes, int64_t tw, uint64_t* planes) {
  const __m512 lv_max = _mm512_set1_ps(float(levels));
  const __m512 vstep = _mm512_set1_ps(step), vzero = _mm512_set1_ps(zero);
  for (int64_t j = 0; j < t; j += 16) {
    const __mmask16 m = tail16(t - j);
    __m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), lv_max);
    u = _mm512_div_ps(u, vstep);
    u = _mm512_add_ps(u, vzero);
    __m512 r = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT |
                                           _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), lv_max);
    const __m512i lv = _mm512_cvttps_epi32(r);
    for (int pl = 0; pl < nplanes; ++pl) {
      const __mmask16 bits = _mm512_mask_test_epi32_mask(
          m, lv, _mm512_set1_epi32(1 << pl));
      set_bits(planes + pl * tw, j, bits);
    }
  }
}

inline void gsb_planes(const float* p, int64_t t, float alpha, float low,
                       float high, int64_t tw, uint64_t* planes) {
  const __m512 va = _mm512_set1_ps(alpha);
  __m512 vm = _mm512_set1_ps(0.f);
  bool first = true;
  for (int64_t j = 0; j < t; j += 16) {
    const __mmask16 m = tail16(t - j);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + j), va);
    if (first) {  // masked-off lanes keep the first valid value
      vm = _mm512_mask_blend_ps(m, _mm512_set1_ps(q[0]), q);
      first = false;
    } else {
      vm = _mm512_mask_max_ps(vm, m, vm, q);
    }
  }
  const float mx = _mm512_reduce_max_ps(vm);
  const __m512 hi = _mm512_set1_ps(high * mx), lo = _mm512_set1_ps(low * mx);
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < t; j += 16) {
    const __mmask16 m = tail16(t - j);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + j), va);
    const __m512 r = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT |
                                                 _MM_FROUND_NO_EXC);
    const __mmask16 round1 = _mm512_mask_cmp_ps_mask(m, r, one, _CMP_GE_OQ);
    const __mmask16 above_low = _mm512_mask_cmp_ps_mask(m, q, lo, _CMP_GT_OQ);
    const __mmask16 above_high =
        _mm512_mask_cmp_ps_mask(m, q, hi, _CMP_GT_OQ);
    set_bits(planes + 0 * tw, j, round1 & ~above_low);
    set_bits(planes + 1 * tw, j, ~round1 & above_low & m);
    set_bits(planes + 2 * tw, j, above_low & ~above_high);
    set_bits(planes + 3 * tw, j, above_high);
  }
}
#endif

#if MMBHVIT_AVX2
// The first `left` of 8 lanes (all of them from 8 on) as the low bits of a
// movemask (the lanes of tail8_mask).
inline unsigned tail8_bits(int64_t left) {
  return left >= 8 ? 0xFFu : (1u << left) - 1u;
}

// 8 probabilities at a time, the last 8 masked (no data-dependent branch
// per probability as in the scalar code above, whose bits these are).
inline void lsq_planes(const float* p, int64_t t, int levels, float step,
                       float zero, int nplanes, int64_t tw, uint64_t* planes) {
  const __m256 lv_max = _mm256_set1_ps(float(levels));
  const __m256 vstep = _mm256_set1_ps(step), vzero = _mm256_set1_ps(zero);
  uint64_t word[8] = {};  // each plane's word, in registers (nplanes <= 8)
  for (int64_t j = 0; j < t; j += 8) {
    const __m256 pj = t - j >= 8 ? _mm256_loadu_ps(p + j)
                                 : _mm256_maskload_ps(p + j, tail8_mask(t - j));
    const unsigned valid = tail8_bits(t - j);
    const __m256i lv = lsq_levels8(pj, lv_max, vstep, vzero);
    for (int pl = 0; pl < nplanes; ++pl) {
      // bit pl of each level to the sign bit, then one bit per lane
      const unsigned m = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(
          _mm256_sll_epi32(lv, _mm_cvtsi32_si128(31 - pl)))));
      word[pl] |= uint64_t(m & valid) << (j & 63);
    }
    if ((j & 63) == 56 || j + 8 >= t)  // a word is complete: one store
      for (int pl = 0; pl < nplanes; ++pl) {
        planes[pl * tw + (j >> 6)] |= word[pl];
        word[pl] = 0;
      }
  }
}

inline void gsb_planes(const float* p, int64_t t, float alpha, float low,
                       float high, int64_t tw, uint64_t* planes) {
  // the row maximum of q = p / alpha, in the scalar code's order of
  // comparisons (the maximum of a set does not depend on it)
  float mx = p[0] / alpha;
  for (int64_t j = 1; j < t; ++j) {
    const float q = p[j] / alpha;
    if (q > mx) mx = q;
  }
  const float hi_s = high * mx, lo_s = low * mx;
  const __m256 va = _mm256_set1_ps(alpha), hi = _mm256_set1_ps(hi_s),
               lo = _mm256_set1_ps(lo_s), one = _mm256_set1_ps(1.f);
  uint64_t word[4] = {};  // each plane's word, in registers
  for (int64_t j = 0; j < t; j += 8) {
    const __m256 pj = t - j >= 8 ? _mm256_loadu_ps(p + j)
                                 : _mm256_maskload_ps(p + j, tail8_mask(t - j));
    const unsigned valid = tail8_bits(t - j);
    const __m256 q = _mm256_div_ps(pj, va);
    const __m256 r = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT |
                                            _MM_FROUND_NO_EXC);
    const unsigned round1 =
        unsigned(_mm256_movemask_ps(_mm256_cmp_ps(r, one, _CMP_GE_OQ)));
    const unsigned above_low =
        unsigned(_mm256_movemask_ps(_mm256_cmp_ps(q, lo, _CMP_GT_OQ)));
    const unsigned above_high =
        unsigned(_mm256_movemask_ps(_mm256_cmp_ps(q, hi, _CMP_GT_OQ)));
    const unsigned bits[4] = {round1 & ~above_low, ~round1 & above_low,
                              above_low & ~above_high, above_high};
    for (int pl = 0; pl < 4; ++pl)
      word[pl] |= uint64_t(bits[pl] & valid) << (j & 63);
    if ((j & 63) == 56 || j + 8 >= t)  // a word is complete: one store
      for (int pl = 0; pl < 4; ++pl) {
        planes[pl * tw + (j >> 6)] |= word[pl];
        word[pl] = 0;
      }
  }
}
#endif

// The context of one query row `item` (b, head, i) from the bit planes of
// its quantized map, with the epilogue. Scratch per thread: sums
// (nplanes * d), ctx (d).
template <typename T>
void context_row(const ContextParams<T>& p, int64_t item,
                 const uint64_t* planes, int nplanes, int32_t* sums, T* ctx) {
  const int64_t tw = p.tw, d = p.d, t = p.t;
  const int64_t bh = item / t, i = item % t;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  // sums[pl][c] = sum_j v_cj * plane_pl[j] = 2 popcount(vb & pl) - |pl|
  const uint64_t* vb = p.vbits + bh * tw * d;
  const Tap tap{planes, vb};
  popcount_rows<BitOp::kAnd>(nplanes, &tap, 1, tw, tw, d, d, sums, d);
  for (int pl = 0; pl < nplanes; ++pl) {
    const uint64_t* plane = planes + pl * tw;
    int32_t count = 0;
    for (int64_t w = 0; w < tw; ++w) count += popc(plane[w]);
    int32_t* s = sums + pl * d;
    MMBHVIT_NOALIAS_LOOP
    for (int64_t c = 0; c < d; ++c) s[c] = 2 * s[c] - count;
  }
  T* cx = ctx;
  if (p.mode == kLSQ) {
    const T step = p.step[h];
    const int32_t* s0 = sums;
    if (nplanes == 2) {  // the usual 4 levels: one fused pass
      const int32_t* s1 = sums + d;
      MMBHVIT_NOALIAS_LOOP
      for (int64_t c = 0; c < d; ++c) cx[c] = T(s0[c] + 2 * s1[c]) * step;
    } else {
      for (int64_t c = 0; c < d; ++c) {
        int32_t lv = 0;
        for (int pl = 0; pl < nplanes; ++pl)
          lv += sums[pl * d + c] * (1 << pl);
        cx[c] = T(lv) * step;
      }
    }
  } else {
    const int32_t* sp = sums;
    const int32_t* sn = sums + d;
    const int32_t* s1 = sums + 2 * d;
    const int32_t* s2 = sums + 3 * d;
    const T b1 = p.g_b1, b2 = p.g_b2, a = p.g_a;
    MMBHVIT_NOALIAS_LOOP
    for (int64_t c = 0; c < d; ++c) {
      T v = T(sp[c] - sn[c]);
      v = v + b1 * T(s1[c]);
      v = v + b2 * T(s2[c]);
      cx[c] = v * a;
    }
  }
  const int64_t tok = (b * t + i) * p.c + h * d;
  const T* __restrict qv = p.q + tok;
  const T* __restrict kv = p.k + tok;
  const T* __restrict vv = p.v + tok;
  const T* __restrict ca = p.ctx_a + h * d;
  const T* __restrict cb = p.ctx_b + h * d;
  const T* __restrict sl = p.slope + h * d;
  const T* __restrict pb = p.post_bias + h * d;
  T* __restrict out = p.out + tok;
  MMBHVIT_NOALIAS_LOOP
  for (int64_t c = 0; c < d; ++c) {
    T z = cx[c] * ca[c];
    z = z + cb[c];
    z = z + qv[c];
    z = z + kv[c];
    z = z + vv[c];
    out[c] = prelu(z, sl[c]) + pb[c];
  }
}

// Fused row (AVX2 / AVX-512, float, LSQ with 2 bit planes, d % 8 == 0, tw
// <= 31): the plane counts of 8 channels stay in registers and go straight
// through the integer level sum and the float epilogue (the same integer
// and float operations, in the same order, as context_row).
template <typename T>
inline bool context_row_fits(const ContextParams<T>&, int) {
  return false;
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
inline bool context_row_fits(const ContextParams<float>& p, int nplanes) {
  return p.mode == kLSQ && nplanes == 2 && p.d % 8 == 0 && p.tw <= 31;
}

inline void context_row2(const ContextParams<float>& p, int64_t item,
                         const uint64_t* planes) {
  const int64_t tw = p.tw, d = p.d, t = p.t;
  const int64_t bh = item / t, i = item % t;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  int32_t c0 = 0, c1 = 0;
  for (int64_t w = 0; w < tw; ++w) {
    c0 += popc(planes[w]);
    c1 += popc(planes[tw + w]);
  }
  const __m256i cnt0 = _mm256_set1_epi32(c0), cnt1 = _mm256_set1_epi32(c1);
  const __m256 step = _mm256_set1_ps(p.step[h]);
  const Tap tap{planes, p.vbits + bh * tw * d};
  const int64_t tok = (b * t + i) * p.c + h * d;
  const float* qv = p.q + tok;
  const float* kv = p.k + tok;
  const float* vv = p.v + tok;
  const float* ca = p.ctx_a + h * d;
  const float* cb = p.ctx_b + h * d;
  const float* sl = p.slope + h * d;
  const float* pb = p.post_bias + h * d;
  float* out = p.out + tok;
  for (int64_t c = 0; c < d; c += 8) {
    __m256i cnt[2];
    count8<BitOp::kAnd, 2, false>(&tap, 1, tw, tw, d, c, cnt);
    // s = 2 popcount - |plane|, level sum s0 + 2 s1
    const __m256i s0 = _mm256_sub_epi32(_mm256_add_epi32(cnt[0], cnt[0]),
                                        cnt0);
    const __m256i s1 = _mm256_sub_epi32(_mm256_add_epi32(cnt[1], cnt[1]),
                                        cnt1);
    const __m256 cx = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_add_epi32(s0, _mm256_add_epi32(s1, s1))),
        step);
    __m256 z = _mm256_mul_ps(cx, _mm256_loadu_ps(ca + c));
    z = _mm256_add_ps(z, _mm256_loadu_ps(cb + c));
    z = _mm256_add_ps(z, _mm256_loadu_ps(qv + c));
    z = _mm256_add_ps(z, _mm256_loadu_ps(kv + c));
    z = _mm256_add_ps(z, _mm256_loadu_ps(vv + c));
    const __m256 neg = _mm256_mul_ps(z, _mm256_loadu_ps(sl + c));
    z = _mm256_blendv_ps(neg, z,
                         _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ));
    _mm256_storeu_ps(out + c, _mm256_add_ps(z, _mm256_loadu_ps(pb + c)));
  }
}
#else
inline void context_row2(const ContextParams<float>&, int64_t,
                         const uint64_t*) {}
#endif
inline void context_row2(const ContextParams<double>&, int64_t,
                         const uint64_t*) {}

// The bit planes of one row of the map (LSQ or GSB).
template <typename T>
inline void map_planes(const ContextParams<T>& p, const T* prow, int64_t h,
                       int nplanes, uint64_t* planes) {
  for (int64_t k = 0; k < nplanes * p.tw; ++k) planes[k] = 0;
  if (p.mode == kLSQ)
    lsq_planes(prow, p.t, p.levels, p.step[h], p.zero[h], nplanes, p.tw,
               planes);
  else
    gsb_planes(prow, p.t, p.g_alpha, p.g_low, p.g_high, p.tw, planes);
}

template <typename T>
void context(const ContextParams<T>& p, int64_t begin, int64_t end) {
  const int nplanes = p.mode == kGSB ? 4 : bit_planes(p.levels);
  const bool fused = context_row_fits(p, nplanes);
  Scratch<uint64_t> planes(int64_t(nplanes) * p.tw);
  Scratch<int32_t> sums(int64_t(nplanes) * p.d);
  Scratch<T> ctx(p.d);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = (item / p.t) % p.heads;
    if (fused) {  // 2 planes as a constant: lsq_planes' plane loop unrolled
      map_planes(p, p.p + item * p.t, h, 2, planes.ptr);
      context_row2(p, item, planes.ptr);
    } else {
      map_planes(p, p.p + item * p.t, h, nplanes, planes.ptr);
      context_row(p, item, planes.ptr, nplanes, sums.ptr, ctx.ptr);
    }
  }
}

// ---------------------------------------------------------------------------
// MSMHA's attention in one pass per tile of query rows (float with the
// softmax table): the counts of scores(), each row's map as table_softmax
// forms it, its bit planes as map_planes takes them from that map, then the
// context of context(): the numbers of scores() and context() in turn,
// without the map in memory.
//
// LSQ levels without the map: p_j depends only on n_j = c_j - c0 and does
// not increase with it (the table falls, 1 / sum > 0, rounding is
// monotone), and with step > 0 every LSQ operation is monotone too; so a
// row's level of each n is found once, from n = 0 up until it equals the
// level of the row's largest n (usually after a few n), and each key's level
// is looked up by its count.

// The LSQ level of one probability, as lsq_planes computes it.
template <typename T>
inline int32_t lsq_level(T pj, T lv_max, T step, T zero) {
  T u = pj * lv_max;
  u = u / step;
  u = u + zero;
  T r = round_even(u);
  r = r < T(0) ? T(0) : (r > lv_max ? lv_max : r);
  return int32_t(r);
}

// lev[n] for n < the returned stop: the level of float(table[n] * inv);
// every n from stop to spread has level *last.
template <typename T>
inline int64_t lsq_row_levels(const double* table, double inv,
                              int64_t spread, int levels, T step, T zero,
                              int32_t* lev, int32_t* last) {
  const T lv_max = T(levels);
  *last = lsq_level(static_cast<T>(table[spread] * inv), lv_max, step, zero);
  int64_t n = 0;
  for (; n < spread; ++n) {
    lev[n] = lsq_level(static_cast<T>(table[n] * inv), lv_max, step, zero);
    if (lev[n] == *last) break;
  }
  return n;
}

// Bit planes of a row from its counts c (smallest c0) and levels by n.
inline void planes_by_level(const int32_t* c, int64_t t, int64_t c0,
                            const int32_t* lev, int64_t stop, int32_t last,
                            int nplanes, int64_t tw, uint64_t* planes) {
  for (int64_t j = 0; j < t; ++j) {
    const int64_t n = c[j] - c0;
    const int32_t lv = n < stop ? lev[n] : last;
    for (int pl = 0; pl < nplanes; ++pl)
      if ((lv >> pl) & 1)
        planes[pl * tw + (j >> 6)] |= uint64_t(1) << (j & 63);
  }
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
// Levels <= 3 (two planes), 8 at a time. lsq_bounds8: m[k - 1] = how many n
// (from 0) have level >= k, k = 1 .. 3 (tab: the table padded past d with
// its last value, to d + 8 values); from 8 n at a time, until a block ends
// at the level of the largest n.
inline void lsq_bounds8(const double* tab, double inv, int64_t spread,
                        int levels, float step, float zero, int64_t* m) {
  const float lv_max = float(levels);
  const int32_t last =
      lsq_level(static_cast<float>(tab[spread] * inv), lv_max, step, zero);
  const __m256d vinv = _mm256_set1_pd(inv);
  const __m256 vmax = _mm256_set1_ps(lv_max), vstep = _mm256_set1_ps(step),
               vzero = _mm256_set1_ps(zero);
  int64_t count[3] = {0, 0, 0};
  // whether lane 7 of the block from n0 is above the last level
  auto block = [&](int64_t n0) {
    const __m128 lo =
        _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_loadu_pd(tab + n0), vinv));
    const __m128 hi =
        _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_loadu_pd(tab + n0 + 4), vinv));
    const __m256i lv =
        lsq_levels8(_mm256_set_m128(hi, lo), vmax, vstep, vzero);
    for (int k = 0; k < 3; ++k)
      count[k] += popc(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(
          _mm256_cmpgt_epi32(lv, _mm256_set1_epi32(k))))));
    const unsigned above = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(
        _mm256_cmpgt_epi32(lv, _mm256_set1_epi32(last)))));
    return (above & 0x80u) != 0;
  };
  // the first two blocks without a test between them (most rows end in
  // them: a block past the last level counts nothing above it)
  bool more = block(0);
  if (spread >= 8) more = block(8);
  for (int64_t n0 = 16; more && n0 <= spread; n0 += 8) more = block(n0);
  for (int k = 0; k < 3; ++k) m[k] = last > k ? spread + 1 : count[k];
}

// Two planes from m: g_k = the keys of level >= k (c_j < c0 + m[k - 1]),
// plane 0 = g1 ^ g2 ^ g3 (the level's parity), plane 1 = g2; each word
// formed in a register and stored once (planes: 2 tw words, written whole).
inline void planes_by_bounds2(const int32_t* c, int64_t t, int64_t c0,
                              const int64_t* m, int64_t tw,
                              uint64_t* planes) {
  __m256i bound[3];
  for (int k = 0; k < 3; ++k)
    bound[k] = _mm256_set1_epi32(int32_t(c0 + m[k]));
  for (int64_t w = 0; w < tw; ++w) {
    uint64_t p0 = 0, p1 = 0;
    const int64_t end = t - 64 * w < 64 ? t - 64 * w : 64;
    for (int64_t j = 0; j < end; j += 8) {
      const __m256i cj = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(c + 64 * w + j));
      unsigned g[3];
      for (int k = 0; k < 3; ++k)
        g[k] = unsigned(_mm256_movemask_ps(
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(bound[k], cj))));
      const unsigned valid = end - j >= 8 ? 0xFFu : (1u << (end - j)) - 1u;
      p0 |= uint64_t((g[0] ^ g[1] ^ g[2]) & valid) << j;
      p1 |= uint64_t(g[1] & valid) << j;
    }
    planes[w] = p0;
    planes[tw + w] = p1;
  }
}

inline bool bounds_fit(const ContextParams<float>& p, int nplanes) {
  return nplanes == 2 && p.levels <= 3;
}
#else
inline bool bounds_fit(const ContextParams<float>&, int) { return false; }
inline void lsq_bounds8(const double*, double, int64_t, int, float, float,
                        int64_t*) {}
inline void planes_by_bounds2(const int32_t*, int64_t, int64_t,
                              const int64_t*, int64_t, uint64_t*) {}
#endif
inline bool bounds_fit(const ContextParams<double>&, int) { return false; }
inline void lsq_bounds8(const double*, double, int64_t, int, double, double,
                        int64_t*) {}

// The counts of nk rows from item (one (b, head)) into cbuf (t_pad apart).
template <typename T>
inline void attention_counts(const ScoreParams<T>& p, int nk, int64_t item,
                             int64_t bh, int32_t* cbuf) {
  const Tap tap{p.qbits + item * p.wd, p.kbits + bh * p.wd * p.t_pad};
  popcount_rows<BitOp::kXor>(nk, &tap, 1, p.wd, p.wd, p.t_pad, p.t, cbuf,
                             p.t_pad);
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
inline void attention_counts(const ScoreParams<float>& p, int nk,
                             int64_t item, int64_t bh, int32_t* cbuf) {
  if (p.wd > 31 || p.t_pad % 8 != 0) {
    attention_counts<float>(p, nk, item, bh, cbuf);
    return;
  }
  switch (nk) {
    case 4: count_rows8<4>(p, item, bh, cbuf); break;
    case 3: count_rows8<3>(p, item, bh, cbuf); break;
    case 2: count_rows8<2>(p, item, bh, cbuf); break;
    default: count_rows8<1>(p, item, bh, cbuf); break;
  }
}
#endif

template <typename T>
void attention(const AttentionParams<T>& p, int64_t begin, int64_t end) {
  const ScoreParams<T>& sp = p.scores;
  const ContextParams<T>& cp = p.context;
  const int64_t t = sp.t, t_pad = sp.t_pad, d = sp.d;
  const int nplanes = cp.mode == kGSB ? 4 : bit_planes(cp.levels);
  const bool fused = context_row_fits(cp, nplanes);
  // levels by count: a falling table of values >= 0, the first > 0
  bool falling = sp.table[0] > 0 && sp.table[d] >= 0;
  for (int64_t n = 0; n < d; ++n)
    falling = falling && sp.table[n + 1] <= sp.table[n];
  Scratch<int32_t> cbuf(4 * t_pad);
  Scratch<uint64_t> planes(int64_t(nplanes) * cp.tw);
  Scratch<int32_t> sums(int64_t(nplanes) * d);
  Scratch<T> ctx(d), prow(t);
  Scratch<int32_t> lev(d + 1);
  Scratch<double> tab(d + 8);  // the table padded with its last value
  for (int64_t n = 0; n < d + 8; ++n) tab.ptr[n] = sp.table[n <= d ? n : d];
  for (int64_t item = begin; item < end;) {
    const int64_t bh = item / t, h = bh % sp.heads;
    int64_t stop = (bh + 1) * t;
    stop = stop < end ? stop : end;
    const int nk = int(stop - item < 4 ? stop - item : 4);
    attention_counts(sp, nk, item, bh, cbuf.ptr);
    int64_t c0[4], spread[4];
    double inv[4];
    switch (nk) {
      case 4: table_sums<4>(cbuf.ptr, t_pad, t, sp.table, c0, inv, spread);
        break;
      case 3: table_sums<3>(cbuf.ptr, t_pad, t, sp.table, c0, inv, spread);
        break;
      case 2: table_sums<2>(cbuf.ptr, t_pad, t, sp.table, c0, inv, spread);
        break;
      default: table_sums<1>(cbuf.ptr, t_pad, t, sp.table, c0, inv, spread);
        break;
    }
    const bool by_level = cp.mode == kLSQ && falling && cp.step[h] > T(0) &&
                          cp.step[h] * T(0) == T(0) &&
                          cp.zero[h] * T(0) == T(0);
    // levels <= 3 by count: each row's bounds first (independent chains)
    const bool bounds = by_level && bounds_fit(cp, nplanes);
    int64_t m[4][3];
    for (int k = 0; bounds && k < nk; ++k)
      lsq_bounds8(tab.ptr, inv[k], spread[k], cp.levels, cp.step[h],
                  cp.zero[h], m[k]);
    for (int k = 0; k < nk; ++k) {
      const int32_t* c = cbuf.ptr + k * t_pad;
      if (by_level) {
        if (bounds) {
          planes_by_bounds2(c, t, c0[k], m[k], cp.tw, planes.ptr);
        } else {
          for (int64_t w = 0; w < nplanes * cp.tw; ++w) planes.ptr[w] = 0;
          int32_t last;
          const int64_t n_stop =
              lsq_row_levels(sp.table, inv[k], spread[k], cp.levels,
                             cp.step[h], cp.zero[h], lev.ptr, &last);
          planes_by_level(c, t, c0[k], lev.ptr, n_stop, last, nplanes, cp.tw,
                          planes.ptr);
        }
      } else {
        table_row(c, t, sp.table, c0[k], inv[k], prow.ptr);
        map_planes(cp, prow.ptr, h, nplanes, planes.ptr);
      }
      if (fused)
        context_row2(cp, item + k, planes.ptr);
      else
        context_row(cp, item + k, planes.ptr, nplanes, sums.ptr, ctx.ptr);
    }
    item += nk;
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
