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

template <int NK>
inline void scores_rows8(const ScoreParams<float>& p, int64_t item,
                         int64_t bh, int32_t* cbuf) {
  const Tap tap{p.qbits + item * p.wd, p.kbits + bh * p.wd * p.t_pad};
  const __m256i full = _mm256_set1_epi32(int32_t(p.d));
  const __m256 scale = _mm256_set1_ps(p.scale);
  const int64_t t = p.t;
  float* s = p.s + item * t;
  for (int64_t j = 0; j < t; j += 8) {
    __m256i cnt[NK];
    count8<BitOp::kXor, NK, false>(&tap, 1, p.wd, p.wd, p.t_pad, j, cnt);
    const int64_t left = t - j;
    const __m256i mask = tail8_mask(left);
    if (p.table != nullptr) {
      for (int k = 0; k < NK; ++k)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cbuf + k * p.t_pad + j),
                            cnt[k]);
      continue;
    }
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
  if (p.table != nullptr) table_softmax<NK>(cbuf, p.t_pad, t, p.table, s);
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
  for (int64_t j = 0; j < t; j += 8) {
    const __m256 pj = t - j >= 8 ? _mm256_loadu_ps(p + j)
                                 : _mm256_maskload_ps(p + j, tail8_mask(t - j));
    const unsigned valid = tail8_bits(t - j);
    __m256 u = _mm256_mul_ps(pj, lv_max);
    u = _mm256_div_ps(u, vstep);
    u = _mm256_add_ps(u, vzero);
    __m256 r = _mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT |
                                      _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), lv_max);
    const __m256i lv = _mm256_cvttps_epi32(r);
    for (int pl = 0; pl < nplanes; ++pl) {
      // bit pl of each level to the sign bit, then one bit per lane
      const unsigned m = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(
          _mm256_sll_epi32(lv, _mm_cvtsi32_si128(31 - pl)))));
      set_bits(planes + pl * tw, j, m & valid);
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
    set_bits(planes + 0 * tw, j, round1 & ~above_low & valid);
    set_bits(planes + 1 * tw, j, ~round1 & above_low & valid);
    set_bits(planes + 2 * tw, j, above_low & ~above_high & valid);
    set_bits(planes + 3 * tw, j, above_high & valid);
  }
}
#endif

// Fused path (AVX2 / AVX-512, float, LSQ with 2 bit planes, d % 8 == 0):
// per query row the plane counts of 8 channels stay in registers and go
// straight through the integer level sum and the float epilogue (the same
// integer and float operations, in the same order, as the loop below).
template <typename T>
inline bool context_fused(const ContextParams<T>&, int64_t, int64_t) {
  return false;
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
inline bool context_fused(const ContextParams<float>& p, int64_t begin,
                          int64_t end) {
  const int64_t tw = p.tw, d = p.d, t = p.t;
  if (p.mode != kLSQ || bit_planes(p.levels) != 2 || d % 8 != 0 || tw > 31)
    return false;
  Scratch<uint64_t> planes(2 * tw);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / t, i = item % t;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    for (int64_t k = 0; k < 2 * tw; ++k) planes.ptr[k] = 0;
    lsq_planes(p.p + item * t, t, p.levels, p.step[h], p.zero[h], 2, tw,
               planes.ptr);
    int32_t c0 = 0, c1 = 0;
    for (int64_t w = 0; w < tw; ++w) {
      c0 += popc(planes.ptr[w]);
      c1 += popc(planes.ptr[tw + w]);
    }
    const __m256i cnt0 = _mm256_set1_epi32(c0), cnt1 = _mm256_set1_epi32(c1);
    const __m256 step = _mm256_set1_ps(p.step[h]);
    const Tap tap{planes.ptr, p.vbits + bh * tw * d};
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
  return true;
}
#endif

template <typename T>
void context(const ContextParams<T>& p, int64_t begin, int64_t end) {
  if (context_fused(p, begin, end)) return;
  const int64_t tw = p.tw, d = p.d, t = p.t;
  const int nplanes = p.mode == kGSB ? 4 : bit_planes(p.levels);
  Scratch<uint64_t> planes(int64_t(nplanes) * tw);
  Scratch<int32_t> sums(int64_t(nplanes) * d);
  Scratch<T> ctx(d);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / t, i = item % t;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* prow = p.p + item * t;
    for (int64_t k = 0; k < nplanes * tw; ++k) planes.ptr[k] = 0;
    if (p.mode == kLSQ)
      lsq_planes(prow, t, p.levels, p.step[h], p.zero[h], nplanes, tw,
                 planes.ptr);
    else
      gsb_planes(prow, t, p.g_alpha, p.g_low, p.g_high, tw, planes.ptr);
    // sums[pl][c] = sum_j v_cj * plane_pl[j] = 2 popcount(vb & pl) - |pl|
    const uint64_t* vb = p.vbits + bh * tw * d;
    const Tap tap{planes.ptr, vb};
    popcount_rows<BitOp::kAnd>(nplanes, &tap, 1, tw, tw, d, d, sums.ptr, d);
    for (int pl = 0; pl < nplanes; ++pl) {
      const uint64_t* plane = planes.ptr + pl * tw;
      int32_t count = 0;
      for (int64_t w = 0; w < tw; ++w) count += popc(plane[w]);
      int32_t* s = sums.ptr + pl * d;
      MMBHVIT_NOALIAS_LOOP
      for (int64_t c = 0; c < d; ++c) s[c] = 2 * s[c] - count;
    }
    T* cx = ctx.ptr;
    if (p.mode == kLSQ) {
      const T step = p.step[h];
      const int32_t* s0 = sums.ptr;
      if (nplanes == 2) {  // the usual 4 levels: one fused pass
        const int32_t* s1 = sums.ptr + d;
        MMBHVIT_NOALIAS_LOOP
        for (int64_t c = 0; c < d; ++c) cx[c] = T(s0[c] + 2 * s1[c]) * step;
      } else {
        for (int64_t c = 0; c < d; ++c) {
          int32_t lv = 0;
          for (int pl = 0; pl < nplanes; ++pl)
            lv += sums.ptr[pl * d + c] * (1 << pl);
          cx[c] = T(lv) * step;
        }
      }
    } else {
      const int32_t* sp = sums.ptr;
      const int32_t* sn = sums.ptr + d;
      const int32_t* s1 = sums.ptr + 2 * d;
      const int32_t* s2 = sums.ptr + 3 * d;
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
}
}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
