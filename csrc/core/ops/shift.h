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

#if MMBHVIT_FLOAT_VECTORS
constexpr int kShiftVecBytes = MMBHVIT_FLOAT_VEC_BYTES;

// P pixels in a row x NV vectors of channels from c0, every element in the
// fallback's order: bias, + w_k * x_k tap by tap, then res + sum. src[k]
// points at tap k of the first pixel; the pixels are C apart in the input
// and the output. A tap's weights are loaded once for the P pixels.
template <typename T, int P, int NV>
inline void shift_pixels(const T* const* src, int ntaps, const T* wk,
                         int64_t C, int64_t c0, const T* bias, const T* res,
                         T* out) {
  typedef T V __attribute__((vector_size(kShiftVecBytes)));
  constexpr int L = kShiftVecBytes / int(sizeof(T));
  V acc[P][NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) {
    V b;
    __builtin_memcpy(&b, bias + c0 + i * L, sizeof(V));
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) acc[j][i] = b;
  }
  for (int k = 0; k < ntaps; ++k) {
    const T* s = src[k] + c0;
    V w[NV];
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i)
      __builtin_memcpy(&w[i], wk + k * C + c0 + i * L, sizeof(V));
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i) {
        V sv;
        __builtin_memcpy(&sv, s + j * C + i * L, sizeof(V));
        const V v = w[i] * sv;
        acc[j][i] = acc[j][i] + v;
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < P; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      V o = acc[j][i];
      if (res != nullptr) {
        V r;
        __builtin_memcpy(&r, res + j * C + c0 + i * L, sizeof(V));
        o = r + o;
      }
      __builtin_memcpy(out + j * C + c0 + i * L, &o, sizeof(V));
    }
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

// P neighbouring pixels of a row (P > 1: only where no tap wraps), all
// channels.
template <typename T, int P>
inline void shift_run(const T* const* src, int ntaps, const T* wk, int64_t C,
                      const T* bias, const T* res, T* out) {
  int64_t c0 = 0;
#if MMBHVIT_FLOAT_VECTORS
  constexpr int64_t L = kShiftVecBytes / int64_t(sizeof(T));
  constexpr int NV = P > 1 ? 2 : 4;
  for (; c0 + NV * L <= C; c0 += NV * L)
    shift_pixels<T, P, NV>(src, ntaps, wk, C, c0, bias, res, out);
  for (; c0 + L <= C; c0 += L)
    shift_pixels<T, P, 1>(src, ntaps, wk, C, c0, bias, res, out);
#endif
  for (int j = 0; j < P; ++j) {
    const T* s[16];
    for (int k = 0; k < ntaps; ++k) s[k] = src[k] + j * C;
    for (int64_t c = c0; c < C; ++c)
      shift_channel(s, ntaps, wk, C, c, bias,
                    res != nullptr ? res + j * C : nullptr, out + j * C);
  }
}

// Pixels [begin, end) in row-major order, a row segment at a time: per row
// each tap's source row is found once; where no tap's column wraps, the
// sources of the next pixels are those of this one moved by C, and 4
// pixels share each weight load.
template <typename T>
void shift(const ShiftParams<T>& p, int64_t begin, int64_t end) {
  constexpr int kRun = 4;
  const int64_t H = p.h, Wd = p.w, C = p.c;
  int64_t dx_lo = 0, dx_hi = 0;
  for (int k = 0; k < p.ntaps; ++k) {
    dx_lo = dx_lo < p.dx[k] ? dx_lo : p.dx[k];
    dx_hi = dx_hi > p.dx[k] ? dx_hi : p.dx[k];
  }
  // columns whose every tap stays inside the row
  const int64_t in_lo = -dx_lo, in_hi = Wd - dx_hi;
  const T* row[16];
  const T* src[16];
  for (int64_t pix = begin; pix < end;) {
    const int64_t n = pix / (H * Wd), yx = pix % (H * Wd);
    const int64_t y = yx / Wd, x0 = yx % Wd;
    const int64_t x1 = x0 + (end - pix) < Wd ? x0 + (end - pix) : Wd;
    for (int k = 0; k < p.ntaps; ++k)
      row[k] = p.x + (n * H + wrap_index(y, p.dy[k], H)) * Wd * C;
    const int64_t first = pix - x0;  // the row's first pixel
    for (int64_t x = x0; x < x1;) {
      T* out = p.y + (first + x) * C;
      const T* res = p.res != nullptr ? p.res + (first + x) * C : nullptr;
      for (int k = 0; k < p.ntaps; ++k)
        src[k] = row[k] + wrap_index(x, p.dx[k], Wd) * C;
      if (x >= in_lo && x + kRun <= in_hi && x + kRun <= x1) {
        shift_run<T, kRun>(src, p.ntaps, p.wk, C, p.bias, res, out);
        x += kRun;
      } else {
        shift_run<T, 1>(src, p.ntaps, p.wk, C, p.bias, res, out);
        ++x;
      }
    }
    pix += x1 - x0;
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
