// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The stem: 4x4 stride-4 convolution, GELU, positional embedding (float
// only), from the NCHW image straight to the channels-last map.
#pragma once

#include <cstdint>

#include "../bitpack.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// ---------------------------------------------------------------------------
// GELU without a transcendental function, a * 0.5 * (1 + erf(a / sqrt 2)),
// erf(u) ~ u P(u^2) / Q(u^2) for |u| <= 4 (float32 1 beyond), clamped to
// [-1, 1]. P, Q: a rational least-squares fit (Lawson-weighted, degree 5 /
// 6 in u^2), stored as float32 values. Evaluated in float32 it is within
// 4.5e-7 of erf, and the GELU is as close to float64's as ATen's float32
// GELU (tests/test_deploy.py). Every operation is one IEEE rounding in
// this order, so the PyTorch fallback (mmbhvit/deploy/blocks/stem.py)
// gives the same bits on any SIMD level. U: T or a vector of T.
// ---------------------------------------------------------------------------
// A constant c as U (0 + c folds at compile time; not for runtime values,
// where it would turn -0 into +0).
template <typename T, typename U>
inline U splat(T c) {
  return U{} + c;
}

// K values (vectors) at a time, every step over all K before the next:
// the polynomials are long dependency chains, which then interleave.
#define MMBHVIT_EACH(...) \
  _Pragma("GCC unroll 8") for (int k = 0; k < K; ++k) { __VA_ARGS__; }

template <typename T, typename U, int K>
MMBHVIT_ALWAYS_INLINE inline void gelu_rational(U* a) {
  const U lim = splat<T, U>(T(4)), one = splat<T, U>(T(1));
  U u[K], z[K], num[K], den[K];
  MMBHVIT_EACH(u[k] = a[k] * splat<T, U>(T(0x1.6a09e6p-1f)))
  MMBHVIT_EACH(u[k] = u[k] < -lim ? -lim : u[k])
  MMBHVIT_EACH(u[k] = u[k] > lim ? lim : u[k])
  MMBHVIT_EACH(z[k] = u[k] * u[k])
  static constexpr float kNum[] = {0x1.fb431ap-18f, 0x1.c3cf68p-12f,
                                   0x1.1754d0p-8f,  0x1.cbb09cp-5f,
                                   0x1.89f130p-3f,  0x1.20dd76p+0f};
  static constexpr float kDen[] = {0x1.444decp-22f, 0x1.47c71cp-14f,
                                   0x1.7d1bbep-10f, 0x1.0d36b4p-6f,
                                   0x1.e1f230p-4f,  0x1.01f28cp-1f, 1.0f};
  MMBHVIT_EACH(num[k] = splat<T, U>(T(kNum[0])))
  MMBHVIT_EACH(den[k] = splat<T, U>(T(kDen[0])))
#pragma GCC unroll 8
  for (int j = 1; j < 7; ++j) {
    const U cn = splat<T, U>(T(kNum[j < 6 ? j : 5]));
    const U cd = splat<T, U>(T(kDen[j]));
    if (j < 6) MMBHVIT_EACH(num[k] = num[k] * z[k] + cn)
    MMBHVIT_EACH(den[k] = den[k] * z[k] + cd)
  }
  MMBHVIT_EACH(u[k] = (u[k] * num[k]) / den[k])  // erf
  MMBHVIT_EACH(u[k] = u[k] < -one ? -one : u[k])
  MMBHVIT_EACH(u[k] = u[k] > one ? one : u[k])
  MMBHVIT_EACH(a[k] = (a[k] * splat<T, U>(T(0.5))) * (one + u[k]))
}
#undef MMBHVIT_EACH

// The taps of one output pixel for NV vectors of channels from c0: x0 is
// the patch's top-left value in channel 0, plane the image's h * w. The
// 16 products of an input channel are summed as a tree (the 4 of a row in
// pairs, then the 4 rows in pairs) and the channels' sums added to the
// bias in order: about half the float32 round-off of adding the 48
// products one by one (which had more than oneDNN's convolution), and
// shorter dependency chains.
#if MMBHVIT_FLOAT_VECTORS
template <typename T, typename V>
MMBHVIT_ALWAYS_INLINE inline V stem_row(const T* wt, int64_t C,
                                        const T* row) {
  V w0, w1, w2, w3;
  __builtin_memcpy(&w0, wt, sizeof(V));
  __builtin_memcpy(&w1, wt + C, sizeof(V));
  __builtin_memcpy(&w2, wt + 2 * C, sizeof(V));
  __builtin_memcpy(&w3, wt + 3 * C, sizeof(V));
  const V a = w0 * row[0], b = w1 * row[1];  // the scalar is broadcast
  const V c = w2 * row[2], d = w3 * row[3];
  return (a + b) + (c + d);
}

template <typename T, int NV>
inline void stem_block(const StemParams<T>& p, const T* x0, int64_t plane,
                       int64_t c0, T* out) {
  typedef T V __attribute__((vector_size(MMBHVIT_FLOAT_VEC_BYTES)));
  constexpr int L = MMBHVIT_FLOAT_VEC_BYTES / int(sizeof(T));
  const int64_t C = p.cout, W = p.w;
  V acc[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i)
    __builtin_memcpy(&acc[i], p.bias + c0 + i * L, sizeof(V));
  for (int64_t ci = 0; ci < p.cin; ++ci) {
    const T* x = x0 + ci * plane;
    const T* wt = p.wt + ci * 16 * C + c0;
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      const T* w = wt + i * L;
      const V r0 = stem_row<T, V>(w, C, x);
      const V r1 = stem_row<T, V>(w + 4 * C, C, x + W);
      const V r2 = stem_row<T, V>(w + 8 * C, C, x + 2 * W);
      const V r3 = stem_row<T, V>(w + 12 * C, C, x + 3 * W);
      acc[i] = acc[i] + ((r0 + r1) + (r2 + r3));
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i)
    __builtin_memcpy(out + c0 + i * L, &acc[i], sizeof(V));
}
#endif

template <typename T>
inline T stem_row_channel(const T* wt, int64_t C, const T* row) {
  const T a = wt[0] * row[0], b = wt[C] * row[1];
  const T c = wt[2 * C] * row[2], d = wt[3 * C] * row[3];
  return (a + b) + (c + d);
}

template <typename T>
inline void stem_channel(const StemParams<T>& p, const T* x0, int64_t plane,
                         int64_t c, T* out) {
  T acc = p.bias[c];
  const int64_t C = p.cout, W = p.w;
  for (int64_t ci = 0; ci < p.cin; ++ci) {
    const T* x = x0 + ci * plane;
    const T* w = p.wt + ci * 16 * C + c;
    const T r0 = stem_row_channel(w, C, x);
    const T r1 = stem_row_channel(w + 4 * C, C, x + W);
    const T r2 = stem_row_channel(w + 8 * C, C, x + 2 * W);
    const T r3 = stem_row_channel(w + 12 * C, C, x + 3 * W);
    acc = acc + ((r0 + r1) + (r2 + r3));
  }
  out[c] = acc;
}

// GELU and + pos over n values in place (pos: n values or nullptr), 4
// vectors per step (gelu_rational interleaves their chains).
template <typename T, typename U, int K>
inline void stem_epilogue_step(bool gelu, const T* pos, T* y) {
  constexpr int L = int(sizeof(U) / sizeof(T));
  U o[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) __builtin_memcpy(&o[k], y + k * L, sizeof(U));
  if (gelu) gelu_rational<T, U, K>(o);
  if (pos != nullptr) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      U q;
      __builtin_memcpy(&q, pos + k * L, sizeof(U));
      o[k] = o[k] + q;
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) __builtin_memcpy(y + k * L, &o[k], sizeof(U));
}

template <typename T>
inline void stem_epilogue(bool gelu, const T* pos, T* y, int64_t n) {
  int64_t i = 0;
#if MMBHVIT_FLOAT_VECTORS
  typedef T V __attribute__((vector_size(MMBHVIT_FLOAT_VEC_BYTES)));
  constexpr int64_t L = MMBHVIT_FLOAT_VEC_BYTES / int64_t(sizeof(T));
  for (; i + 4 * L <= n; i += 4 * L)
    stem_epilogue_step<T, V, 4>(gelu, pos != nullptr ? pos + i : nullptr,
                                y + i);
  for (; i + L <= n; i += L)
    stem_epilogue_step<T, V, 1>(gelu, pos != nullptr ? pos + i : nullptr,
                                y + i);
#endif
  for (; i < n; ++i)
    stem_epilogue_step<T, T, 1>(gelu, pos != nullptr ? pos + i : nullptr,
                                y + i);
}

// The convolution of a run of pixels (at most kStemRun, within one image)
// first, then their GELU and positional embedding from L1.
constexpr int64_t kStemRun = 16;

template <typename T>
void stem(const StemParams<T>& p, int64_t begin, int64_t end) {
  const int64_t oh = p.h / 4, ow = p.w / 4, plane = p.h * p.w, C = p.cout;
  for (int64_t first = begin; first < end;) {
    const int64_t n = first / (oh * ow), yx0 = first % (oh * ow);
    int64_t last = first + kStemRun < end ? first + kStemRun : end;
    if (last - first > oh * ow - yx0) last = first + (oh * ow - yx0);
    for (int64_t item = first; item < last; ++item) {
      const int64_t yx = item % (oh * ow);
      const T* x0 =
          p.x + n * p.cin * plane + (yx / ow) * 4 * p.w + (yx % ow) * 4;
      T* out = p.y + item * C;
      int64_t c0 = 0;
#if MMBHVIT_FLOAT_VECTORS
      constexpr int64_t L = MMBHVIT_FLOAT_VEC_BYTES / int64_t(sizeof(T));
      for (; c0 + 8 * L <= C; c0 += 8 * L)
        stem_block<T, 8>(p, x0, plane, c0, out);
      for (; c0 + L <= C; c0 += L) stem_block<T, 1>(p, x0, plane, c0, out);
#endif
      for (; c0 < C; ++c0) stem_channel(p, x0, plane, c0, out);
    }
    if (p.gelu || p.pos != nullptr)
      stem_epilogue(p.gelu != 0, p.pos != nullptr ? p.pos + yx0 * C : nullptr,
                    p.y + first * C, (last - first) * C);
    first = last;
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
