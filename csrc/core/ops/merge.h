// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Binary 2x2 stride-2 patch merging: each window's pixels read once for
// their sign bits and the tiled average-pool shortcut, four taps of the
// popcount core, PReLU, post bias and position embedding.
#pragma once

#include <cstdint>

#include "../output_transform.h"
#include "../popcount_core.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// The input pixels of output pixel `item`'s 2x2 window (pix: row-major
// order, the order of the taps); returns the output position
// y * (w / 2) + x in its image.
template <typename T>
inline int64_t window_pixels(const MergeParams<T>& p, int64_t item,
                             int64_t* pix) {
  const int64_t ho = p.h / 2, wo = p.w / 2;
  const int64_t n = item / (ho * wo), yx = item % (ho * wo);
  const int64_t y = yx / wo, x = yx % wo;
  const int64_t top = (n * p.h + 2 * y) * p.w + 2 * x, bottom = top + p.w;
  pix[0] = top;
  pix[1] = top + 1;
  pix[2] = bottom;
  pix[3] = bottom + 1;
  return yx;
}

// The four taps of a window (tap weights, and the sign bits of its pixels:
// tap t's words at bits + t * tap_stride).
template <typename T>
inline void window_taps(const MergeParams<T>& p, const uint64_t* bits,
                        int64_t tap_stride, Tap* taps) {
  for (int t = 0; t < 4; ++t)
    taps[t] = Tap{bits + t * tap_stride, p.wt + t * p.words * p.cout_pad};
}

// The 2x2 window of output pixel `item`: its four taps (the pixels' sign
// bits packed into bits_out) and, per channel, the average of its four
// (normalised) input pixels (avg_out); returns window_pixels' position.
template <typename T>
inline int64_t merge_window(const MergeParams<T>& p, int64_t item, Tap* taps,
                            uint64_t* bits_out, T* __restrict avg_out) {
  int64_t pix[4];
  const int64_t yx = window_pixels(p, item, pix);
  for (int t = 0; t < 4; ++t)
    pack_row(p.x + pix[t] * p.cin, p.thr, p.in_scale, p.in_bias, p.cin,
             bits_out + t * p.words);
  window_taps(p, bits_out, p.words, taps);
  const T* __restrict x00 = p.x + pix[0] * p.cin;
  const T* __restrict x01 = p.x + pix[1] * p.cin;
  const T* __restrict x10 = p.x + pix[2] * p.cin;
  const T* __restrict x11 = p.x + pix[3] * p.cin;
  if (p.in_scale != nullptr) {  // each pixel normalised first
    const T* __restrict sc = p.in_scale;
    const T* __restrict bi = p.in_bias;
    MMBHVIT_NOALIAS_LOOP
    for (int64_t i = 0; i < p.cin; ++i) {
      T u00 = x00[i] * sc[i], u01 = x01[i] * sc[i];
      T u10 = x10[i] * sc[i], u11 = x11[i] * sc[i];
      u00 = u00 + bi[i];
      u01 = u01 + bi[i];
      u10 = u10 + bi[i];
      u11 = u11 + bi[i];
      T s = u00 + u01;
      s = s + u10;
      s = s + u11;
      avg_out[i] = s / T(4);
    }
    return yx;
  }
  MMBHVIT_NOALIAS_LOOP
  for (int64_t i = 0; i < p.cin; ++i) {
    T s = x00[i] + x01[i];
    s = s + x10[i];
    s = s + x11[i];
    avg_out[i] = s / T(4);
  }
  return yx;
}

// Fused path (AVX2, float): the counts of 8 outputs of up to 4 output
// pixels stay in registers and go straight through the epilogue (same
// float operations in the same order as the loop below). Not on AVX-512:
// there the 16-wide epilogue loop after the popcount core measured faster.
template <typename T>
inline bool merge_fused(const MergeParams<T>&, int64_t, int64_t) {
  return false;
}

#if MMBHVIT_AVX2
// merge_window's bits (tap t's words at bits_out + t * tap_stride) and
// averages in one pass over the pixels (cin % 8 == 0; the same compares as
// pack_row, the same float operations as the loops above; / 4 and * 0.25
// round alike).
template <bool kNorm>
inline void window_bits_avg8(const MergeParams<float>& p, const int64_t* pix,
                             uint64_t* bits_out, int64_t tap_stride,
                             float* avg_out) {
  const int64_t cin = p.cin;
  const float* xs[4];
  for (int t = 0; t < 4; ++t) xs[t] = p.x + pix[t] * cin;
  uint64_t word[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < cin; i += 8) {
    const __m256 th = _mm256_loadu_ps(p.thr + i);
    __m256 u[4];
    for (int t = 0; t < 4; ++t) u[t] = _mm256_loadu_ps(xs[t] + i);
    if (kNorm) {
      const __m256 sc = _mm256_loadu_ps(p.in_scale + i);
      const __m256 bi = _mm256_loadu_ps(p.in_bias + i);
      for (int t = 0; t < 4; ++t)
        u[t] = _mm256_add_ps(_mm256_mul_ps(u[t], sc), bi);
    }
    for (int t = 0; t < 4; ++t)
      word[t] |= uint64_t(_mm256_movemask_ps(
                     _mm256_cmp_ps(u[t], th, _CMP_GT_OQ)))
                 << (i & 63);
    __m256 s = _mm256_add_ps(u[0], u[1]);
    s = _mm256_add_ps(s, u[2]);
    s = _mm256_add_ps(s, u[3]);
    _mm256_storeu_ps(avg_out + i, _mm256_mul_ps(s, _mm256_set1_ps(0.25f)));
    if (((i + 8) & 63) == 0 || i + 8 == cin) {
      for (int t = 0; t < 4; ++t) {
        bits_out[t * tap_stride + (i >> 6)] = word[t];
        word[t] = 0;
      }
    }
  }
}

// NK neighbouring output pixels (items item .. item + NK - 1) sharing
// the weight and parameter loads; bits: 4 x NK x words, avg: NK x cin.
template <int NK>
inline void merge_items(const MergeParams<float>& p, int64_t item,
                        const float* prm, uint64_t* bits, float* avg,
                        __m256i full) {
  const int64_t cin = p.cin, cout = p.cout, W = p.words, CP = p.cout_pad;
  const float* pos[NK];
  float* yo[NK];
  for (int k = 0; k < NK; ++k) {
    int64_t pix[4];
    const int64_t yx = window_pixels(p, item + k, pix);
    if (p.in_scale != nullptr)
      window_bits_avg8<true>(p, pix, bits + k * W, NK * W, avg + k * cin);
    else
      window_bits_avg8<false>(p, pix, bits + k * W, NK * W, avg + k * cin);
    pos[k] = p.pos + yx * cout;
    yo[k] = p.y + (item + k) * cout;
  }
  Tap taps[4];
  window_taps(p, bits, NK * W, taps);
  for (int64_t o = 0, so = 0; o < cout;
       o += 8, so = so + 8 == cin ? 0 : so + 8) {
    __m256i cnt[NK];
    count8<BitOp::kXor, NK, false>(taps, 4, W, W, CP, o, cnt);
    const float* po = prm + 4 * o;
    for (int k = 0; k < NK; ++k) {
      __m256 z = binary_prelu8<true>(cnt[k], full, po, po + 8,
                                     avg + k * cin + so, po + 16);
      z = _mm256_add_ps(z, _mm256_loadu_ps(po + 24));
      _mm256_storeu_ps(yo[k] + o,
                       _mm256_add_ps(z, _mm256_loadu_ps(pos[k] + o)));
    }
  }
}

inline bool merge_fused(const MergeParams<float>& p, int64_t begin,
                        int64_t end) {
  const int64_t cin = p.cin, cout = p.cout, W = p.words;
  if (cout % 8 != 0 || cin % 8 != 0 || cout % cin != 0 || 4 * W > 31)
    return false;
  // a, b, slope, post_bias interleaved per block of 8 outputs
  Scratch<float> prm(4 * cout);
  const float* src[4] = {p.a, p.b, p.slope, p.post_bias};
  for (int64_t o = 0; o < cout; o += 8)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i) prm.ptr[4 * o + 8 * j + i] = src[j][o + i];
  constexpr int kItems = 4;
  Scratch<float> avg(kItems * cin);
  Scratch<uint64_t> bits(4 * kItems * W);
  const __m256i full = _mm256_set1_epi32(int32_t(4 * cin));
  int64_t item = begin;
  for (; item + kItems <= end; item += kItems)
    merge_items<kItems>(p, item, prm.ptr, bits.ptr, avg.ptr, full);
  if (item + 2 <= end) {
    merge_items<2>(p, item, prm.ptr, bits.ptr, avg.ptr, full);
    item += 2;
  }
  if (item < end) merge_items<1>(p, item, prm.ptr, bits.ptr, avg.ptr, full);
  return true;
}
#endif

template <typename T>
void merge(const MergeParams<T>& p, int64_t begin, int64_t end) {
  if (merge_fused(p, begin, end)) return;
  const int64_t cin = p.cin, cout = p.cout, W = p.words, CP = p.cout_pad;
  Scratch<int32_t> acc(CP);
  Scratch<T> avg(cin);
  Scratch<uint64_t> bits(4 * W);
  for (int64_t item = begin; item < end; ++item) {
    Tap taps[4];
    const int64_t yx = merge_window(p, item, taps, bits.ptr, avg.ptr);
    popcount_accumulate<BitOp::kXor, 1>(taps, 4, W, W, CP, cout, acc.ptr, CP);
    const T* __restrict pos = p.pos + yx * cout;
    T* __restrict yo = p.y + item * cout;
    const T* __restrict pa = p.a;
    const T* __restrict pb = p.b;
    const T* __restrict sl = p.slope;
    const T* __restrict pbias = p.post_bias;
    const T* __restrict av = avg.ptr;
    const int32_t* __restrict ac = acc.ptr;
    const int32_t full = int32_t(4 * cin);
    for (int64_t r0 = 0; r0 < cout; r0 += cin) {  // tiled shortcut
      MMBHVIT_NOALIAS_LOOP
      for (int64_t i = 0; i < cin; ++i) {
        const int64_t o = r0 + i;
        T z = binary_prelu<T, true>(full, ac[o], pa[o], pb[o], av[i], sl[o]);
        z = z + pbias[o];
        yo[o] = z + pos[o];
      }
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
