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

// Channels [c0, c0 + NV * lanes) of one output pixel: the sum over the taps
// kept in NV vector registers (GCC / clang vector types), each element formed
// in the fallback's order: bias, + w_k * x_k tap by tap, then res + sum.
// 256-bit vectors on AVX-512 too: 512-bit ones were not faster here.
#if defined(__GNUC__)
#define MMBHVIT_SHIFT_VECTORS 1
#if MMBHVIT_AVX512 || MMBHVIT_AVX2
constexpr int kShiftVecBytes = 32;
#else
constexpr int kShiftVecBytes = 16;
#endif

template <typename T, int NV>
inline void shift_block(const T* const* src, int ntaps, const T* wk,
                        int64_t C, int64_t c0, const T* bias, const T* res,
                        T* out) {
  typedef T V __attribute__((vector_size(kShiftVecBytes)));
  constexpr int L = kShiftVecBytes / int(sizeof(T));
  V acc[NV];
#pragma GCC unroll 4
  for (int i = 0; i < NV; ++i)
    __builtin_memcpy(&acc[i], bias + c0 + i * L, sizeof(V));
  for (int k = 0; k < ntaps; ++k) {
    const T* s = src[k] + c0;
    const T* w = wk + k * C + c0;
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      V sv, wv;
      __builtin_memcpy(&sv, s + i * L, sizeof(V));
      __builtin_memcpy(&wv, w + i * L, sizeof(V));
      const V v = wv * sv;
      acc[i] = acc[i] + v;
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NV; ++i) {
    V o = acc[i];
    if (res != nullptr) {
      V r;
      __builtin_memcpy(&r, res + c0 + i * L, sizeof(V));
      o = r + o;
    }
    __builtin_memcpy(out + c0 + i * L, &o, sizeof(V));
  }
}
#endif

// The same for one channel (the tail, and compilers without vector types).
template <typename T>
inline void shift_channel(const T* const* src, int ntaps, const T* wk,
                          int64_t C, int64_t c, const T* bias, const T* res,
                          T* out) {
  T acc = bias[c];
  for (int k = 0; k < ntaps; ++k) {
    const T v = wk[k * C + c] * src[k][c];
    acc = acc + v;
  }
  out[c] = res != nullptr ? res[c] + acc : acc;
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
    T* out = p.y + pix * C;
    const T* res = p.res != nullptr ? p.res + pix * C : nullptr;
    int64_t c0 = 0;
#if MMBHVIT_SHIFT_VECTORS
    constexpr int64_t L = kShiftVecBytes / int64_t(sizeof(T));
    for (; c0 + 4 * L <= C; c0 += 4 * L)
      shift_block<T, 4>(src, p.ntaps, p.wk, C, c0, p.bias, res, out);
    for (; c0 + L <= C; c0 += L)
      shift_block<T, 1>(src, p.ntaps, p.wk, C, c0, p.bias, res, out);
#endif
    for (; c0 < C; ++c0)
      shift_channel(src, p.ntaps, p.wk, C, c0, p.bias, res, out);
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
