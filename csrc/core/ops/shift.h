// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Shift branches: a sparse circular depthwise convolution (float only).
#pragma once

#include <cstdint>

#include "../bitpack.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// ---------------------------------------------------------------------------
// Shift branches: sparse depthwise circular convolution + residual
// ---------------------------------------------------------------------------
template <typename T>
void shift(const ShiftParams<T>& p, int64_t begin, int64_t end) {
  const int64_t H = p.h, Wd = p.w, C = p.c;
  const T* src[16];
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / (H * Wd), yx = pix % (H * Wd);
    const int64_t y = yx / Wd, x = yx % Wd;
    for (int k = 0; k < p.ntaps; ++k) {
      int64_t yy = (y + p.dy[k]) % H, xx = (x + p.dx[k]) % Wd;
      if (yy < 0) yy += H;
      if (xx < 0) xx += Wd;
      src[k] = p.x + ((n * H + yy) * Wd + xx) * C;
    }
    T* __restrict out = p.y + pix * C;
    const T* __restrict res = p.res != nullptr ? p.res + pix * C : nullptr;
    const T* __restrict bias = p.bias;
    for (int64_t c = 0; c < C; ++c) out[c] = bias[c];
    for (int k = 0; k < p.ntaps; ++k) {
      const T* __restrict wk = p.wk + k * C;
      const T* __restrict s = src[k];
      for (int64_t c = 0; c < C; ++c) {
        const T v = wk[c] * s[c];
        out[c] = out[c] + v;
      }
    }
    if (res != nullptr)
      for (int64_t c = 0; c < C; ++c) out[c] = res[c] + out[c];
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
