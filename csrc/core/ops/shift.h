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
// i + d wrapped into [0, size): a compare and an add when |d| <= size (every
// map at least as large as the filter), a division only for smaller maps.
inline int64_t wrap_index(int64_t i, int64_t d, int64_t size) {
  int64_t j = i + d;
  if (j < 0) {
    j += size;
    if (j < 0) j = (j % size + size) % size;
  } else if (j >= size) {
    j -= size;
    if (j >= size) j %= size;
  }
  return j;
}

template <typename T>
void shift(const ShiftParams<T>& p, int64_t begin, int64_t end) {
  const int64_t H = p.h, Wd = p.w, C = p.c;
  const T* src[16];
  int64_t y = -1, x = 0, n = 0;
  for (int64_t pix = begin; pix < end; ++pix) {
    if (y < 0) {  // the first pixel of the range; then step along rows
      n = pix / (H * Wd);
      const int64_t yx = pix % (H * Wd);
      y = yx / Wd;
      x = yx % Wd;
    }
    for (int k = 0; k < p.ntaps; ++k) {
      const int64_t yy = wrap_index(y, p.dy[k], H);
      const int64_t xx = wrap_index(x, p.dx[k], Wd);
      src[k] = p.x + ((n * H + yy) * Wd + xx) * C;
    }
    if (++x == Wd) {
      x = 0;
      if (++y == H) y = 0, ++n;
    }
    T* __restrict out = p.y + pix * C;
    const T* __restrict res = p.res != nullptr ? p.res + pix * C : nullptr;
    const T* __restrict bias = p.bias;
    MMBHVIT_NOALIAS_LOOP
    for (int64_t c = 0; c < C; ++c) out[c] = bias[c];
    for (int k = 0; k < p.ntaps; ++k) {
      const T* __restrict wk = p.wk + k * C;
      const T* __restrict s = src[k];
      MMBHVIT_NOALIAS_LOOP
      for (int64_t c = 0; c < C; ++c) {
        const T v = wk[c] * s[c];
        out[c] = out[c] + v;
      }
    }
    if (res != nullptr) {
      MMBHVIT_NOALIAS_LOOP
      for (int64_t c = 0; c < C; ++c) out[c] = res[c] + out[c];
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
