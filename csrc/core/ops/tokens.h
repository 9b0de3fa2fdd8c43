// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// MSMHA token layout: windows, merged tokens and back (float only).
#pragma once

#include <cstdint>

#include "../bitpack.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// ---------------------------------------------------------------------------
// MSMHA token layout (float data movement, pooling, channel mixing)
// ---------------------------------------------------------------------------
// One pixel of a pooling cell into the running max m and sum su over
// channels [0, C): u = x * scale + bias (norm1), or 0 beyond the map (the
// zero padding, v == nullptr); the cell's first pixel sets m = su = u, the
// others m = u > m ? u : m and su = su + u. Channels in vectors where the
// compiler has vector types, the same operations per element.
template <typename T, bool First>
inline void pool_pixel(const T* __restrict v, const T* __restrict sc,
                       const T* __restrict bi, int64_t C, T* __restrict m,
                       T* __restrict su) {
  int64_t c = 0;
#if MMBHVIT_FLOAT_VECTORS
  typedef T V __attribute__((vector_size(MMBHVIT_FLOAT_VEC_BYTES)));
  constexpr int64_t L = MMBHVIT_FLOAT_VEC_BYTES / int64_t(sizeof(T));
  for (; c + L <= C; c += L) {
    V u = V{};  // the zero padding
    if (v != nullptr) {
      V a, s, b;
      __builtin_memcpy(&a, v + c, sizeof(V));
      __builtin_memcpy(&s, sc + c, sizeof(V));
      __builtin_memcpy(&b, bi + c, sizeof(V));
      u = a * s;
      u = u + b;
    }
    if (First) {
      __builtin_memcpy(m + c, &u, sizeof(V));
      __builtin_memcpy(su + c, &u, sizeof(V));
    } else {
      V mv, sv;
      __builtin_memcpy(&mv, m + c, sizeof(V));
      __builtin_memcpy(&sv, su + c, sizeof(V));
      mv = u > mv ? u : mv;
      sv = sv + u;
      __builtin_memcpy(m + c, &mv, sizeof(V));
      __builtin_memcpy(su + c, &sv, sizeof(V));
    }
  }
#endif
  for (; c < C; ++c) {
    T u = T(0);
    if (v != nullptr) {
      u = v[c] * sc[c];
      u = u + bi[c];
    }
    m[c] = First || u > m[c] ? u : m[c];
    su[c] = First ? u : su[c] + u;
  }
}

// item = (n, pooled cell)
template <typename T>
void merged_tokens(const TokensParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, s = p.s, hp = p.nh * s, wp = p.nw * s;
  const int64_t cells = p.nh * p.nw, half = s / 2;
  Scratch<T> mx(C), sum(C);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / cells, cell = item % cells;
    const int64_t y0 = (cell / p.nw) * s - half, x0 = (cell % p.nw) * s - half;
    T* __restrict m = mx.ptr;
    T* __restrict su = sum.ptr;
    bool first = true;
    for (int64_t y = y0 < 0 ? 0 : y0; y < y0 + s && y < hp; ++y) {
      for (int64_t x = x0 < 0 ? 0 : x0; x < x0 + s && x < wp; ++x) {
        // norm1(x); beyond the map (y >= h or x >= w): the zero padding
        const T* v = y < p.h && x < p.w
                         ? p.x + ((n * p.h + y) * p.w + x) * C
                         : nullptr;
        if (first)
          pool_pixel<T, true>(v, p.scale, p.bias, C, m, su);
        else
          pool_pixel<T, false>(v, p.scale, p.bias, C, m, su);
        first = false;
      }
    }
    T* __restrict out = p.merged + item * C;
    const T area = T(s * s);  // count_include_pad
    for (int64_t c = 0; c < C; ++c) {
      const T a = p.mix[c] * m[c];
      const T b = p.rest[c] * (su[c] / area);
      out[c] = a + b;
    }
  }
}

// item = (window, token)
template <typename T>
void window_tokens(const TokensParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, s = p.s, cells = p.nh * p.nw, tpw = s * s + cells;
  const T* __restrict sc = p.scale;
  const T* __restrict bi = p.bias;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t win = item / tpw, j = item % tpw;
    const int64_t n = win / cells, wcell = win % cells;
    T* __restrict out = p.tokens + item * C;
    if (j >= s * s) {  // merged token j - s * s of image n
      const T* __restrict m = p.merged + (n * cells + (j - s * s)) * C;
      for (int64_t c = 0; c < C; ++c) out[c] = m[c];
      continue;
    }
    const int64_t y = (wcell / p.nw) * s + j / s, x = (wcell % p.nw) * s + j % s;
    if (y < p.h && x < p.w) {
      const T* __restrict v = p.x + ((n * p.h + y) * p.w + x) * C;
      for (int64_t c = 0; c < C; ++c) {
        const T u = v[c] * sc[c];
        out[c] = u + bi[c];
      }
    } else {
      for (int64_t c = 0; c < C; ++c) out[c] = T(0);
    }
  }
}

// item = (n, cell): mean over the windows of image n of merged token cell
template <typename T>
void merged_means(const UntokensParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, cells = p.nh * p.nw, tpw = p.s * p.s + cells;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / cells, cell = item % cells;
    T* __restrict out = p.merged + item * C;
    const T* __restrict a0 = p.a + ((n * cells) * tpw + p.s * p.s + cell) * C;
    for (int64_t c = 0; c < C; ++c) out[c] = a0[c];
    for (int64_t w = 1; w < cells; ++w) {
      const T* __restrict aw =
          p.a + ((n * cells + w) * tpw + p.s * p.s + cell) * C;
      for (int64_t c = 0; c < C; ++c) out[c] = out[c] + aw[c];
    }
    const T nwin = T(cells);
    for (int64_t c = 0; c < C; ++c) out[c] = out[c] / nwin;
  }
}

// item = output pixel (n, y, x), y < h, x < w
template <typename T>
void untokens(const UntokensParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, s = p.s, cells = p.nh * p.nw, tpw = s * s + cells;
  const T* __restrict mix = p.mix;
  const T* __restrict rest = p.rest;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / (p.h * p.w), yx = item % (p.h * p.w);
    const int64_t y = yx / p.w, x = yx % p.w;
    const int64_t cell = (y / s) * p.nw + x / s;
    const T* __restrict win =
        p.a + ((n * cells + cell) * tpw + (y % s) * s + x % s) * C;
    const T* __restrict mer = p.merged + (n * cells + cell) * C;
    T* __restrict out = p.out + item * C;
    for (int64_t c = 0; c < C; ++c) {
      const T a = win[c] * mix[c];
      const T b = mer[c] * rest[c];
      out[c] = a + b;
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
