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

template <typename T>
void merge(const MergeParams<T>& p, int64_t begin, int64_t end) {
  const int64_t H = p.h, Wd = p.w, ho = H / 2, wo = Wd / 2, cin = p.cin,
                cout = p.cout, W = p.words, CP = p.cout_pad;
  Scratch<int32_t> acc(CP);
  Scratch<T> avg(cin);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / (ho * wo), yx = item % (ho * wo);
    const int64_t y = yx / wo, x = yx % wo;
    const int64_t pix[4] = {(n * H + 2 * y) * Wd + 2 * x,
                            (n * H + 2 * y) * Wd + 2 * x + 1,
                            (n * H + 2 * y + 1) * Wd + 2 * x,
                            (n * H + 2 * y + 1) * Wd + 2 * x + 1};
    Tap taps[4];
    for (int t = 0; t < 4; ++t)
      taps[t] = Tap{p.bits + pix[t] * W, p.wt + t * W * CP};
    popcount_accumulate<BitOp::kXor, 1>(taps, 4, W, W, CP, cout, acc.ptr, CP);
    const T* __restrict x00 = p.x + pix[0] * cin;
    const T* __restrict x01 = p.x + pix[1] * cin;
    const T* __restrict x10 = p.x + pix[2] * cin;
    const T* __restrict x11 = p.x + pix[3] * cin;
    T* __restrict avg_out = avg.ptr;
    MMBHVIT_NOALIAS_LOOP
    for (int64_t i = 0; i < cin; ++i) {
      T s = x00[i] + x01[i];
      s = s + x10[i];
      s = s + x11[i];
      avg_out[i] = s / T(4);
    }
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
