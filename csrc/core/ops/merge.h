// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Binary 2x2 stride-2 patch merging: four taps of the popcount core, the
// tiled average-pool shortcut, PReLU, post bias and position embedding.
#pragma once

#include <cstdint>

#include "../output_transform.h"
#include "../popcount_core.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// The 2x2 window of output pixel `item`: its four taps (input bits and
// tap weights) and, per channel, the average of its four (normalised)
// input pixels (avg_out); returns the output position y * (w / 2) + x in
// its image.
template <typename T>
inline int64_t merge_window(const MergeParams<T>& p, int64_t item, Tap* taps,
                            T* __restrict avg_out) {
  const int64_t ho = p.h / 2, wo = p.w / 2;
  const int64_t n = item / (ho * wo), yx = item % (ho * wo);
  const int64_t y = yx / wo, x = yx % wo;
  const int64_t top = (n * p.h + 2 * y) * p.w + 2 * x, bottom = top + p.w;
  const int64_t pix[4] = {top, top + 1, bottom, bottom + 1};
  for (int t = 0; t < 4; ++t)
    taps[t] = Tap{p.bits + pix[t] * p.words,
                  p.wt + t * p.words * p.cout_pad};
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

// Fused path (AVX2, float): the counts of 8 outputs stay in registers and
// go straight through the epilogue (same float operations in the same
// order as the loop below). Not on AVX-512: there the 16-wide epilogue loop
// after the popcount core measured faster.
template <typename T>
inline bool merge_fused(const MergeParams<T>&, int64_t, int64_t) {
  return false;
}

#if MMBHVIT_AVX2
inline bool merge_fused(const MergeParams<float>& p, int64_t begin,
                        int64_t end) {
  const int64_t cin = p.cin, cout = p.cout, W = p.words, CP = p.cout_pad;
  if (cout % 8 != 0 || cin % 8 != 0 || cout % cin != 0 || 4 * W > 31)
    return false;
  // a, b, slope, post_bias interleaved per block of 8 outputs
  Scratch<float> prm(4 * cout);
  const float* src[4] = {p.a, p.b, p.slope, p.post_bias};
  for (int64_t o = 0; o < cout; o += 8)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i) prm.ptr[4 * o + 8 * j + i] = src[j][o + i];
  Scratch<float> avg(cin);
  const __m256i full = _mm256_set1_epi32(int32_t(4 * cin));
  for (int64_t item = begin; item < end; ++item) {
    Tap taps[4];
    const int64_t yx = merge_window(p, item, taps, avg.ptr);
    const float* pos = p.pos + yx * cout;
    float* yo = p.y + item * cout;
    for (int64_t o = 0, so = 0; o < cout; o += 8, so = so + 8 == cin ? 0 : so + 8) {
      __m256i cnt;
      count8<BitOp::kXor, 1, false>(taps, 4, W, W, CP, o, &cnt);
      const float* po = prm.ptr + 4 * o;
      __m256 z = binary_prelu8<true>(cnt, full, po, po + 8, avg.ptr + so,
                                     po + 16);
      z = _mm256_add_ps(z, _mm256_loadu_ps(po + 24));
      _mm256_storeu_ps(yo + o, _mm256_add_ps(z, _mm256_loadu_ps(pos + o)));
    }
  }
  return true;
}
#endif

template <typename T>
void merge(const MergeParams<T>& p, int64_t begin, int64_t end) {
  if (merge_fused(p, begin, end)) return;
  const int64_t cin = p.cin, cout = p.cout, W = p.words, CP = p.cout_pad;
  Scratch<int32_t> acc(CP);
  Scratch<T> avg(cin);
  for (int64_t item = begin; item < end; ++item) {
    Tap taps[4];
    const int64_t yx = merge_window(p, item, taps, avg.ptr);
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
