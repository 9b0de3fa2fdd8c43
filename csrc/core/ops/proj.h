// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Binary 1x1 projection with residual shortcut (BinaryResidualProj) and
// the binary MLP of a block (expand + reduce fused per tile of tokens).
#pragma once

#include <cstdint>

#include "../output_transform.h"
#include "../popcount_core.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

constexpr int kTokens = 4;  // tokens sharing each weight load

// out[o] = sum of x[o r .. o r + r - 1]: pairwise (tree) order when r is a
// power of two, ((x0 + x1) + (x2 + x3)) + ..., else left to right; tmp
// holds n = cout * r values.
template <typename T>
inline void group_sums(const T* x, int64_t cout, int64_t r, T* tmp, T* out) {
  if (r == 1) {
    for (int64_t o = 0; o < cout; ++o) out[o] = x[o];
    return;
  }
  if ((r & (r - 1)) == 0) {
    int64_t n = cout * r / 2;
    const T* src = x;
    T* dst = r == 2 ? out : tmp;
    for (int64_t i = 0; i < n; ++i) dst[i] = src[2 * i] + src[2 * i + 1];
    for (int64_t len = r / 2; len > 1; len /= 2) {
      n /= 2;
      src = dst;
      dst = len == 2 ? out : tmp;  // in place: dst[i] reads src[2i], 2i+1
      for (int64_t i = 0; i < n; ++i) dst[i] = src[2 * i] + src[2 * i + 1];
    }
    return;
  }
  for (int64_t o = 0; o < cout; ++o) {
    T s = x[o * r];
    for (int64_t j = 1; j < r; ++j) s = s + x[o * r + j];
    out[o] = s;
  }
}

// One token, outputs [o0, o0 + n): y = prelu(D a + b + shortcut) * ps + pb
// (+ res). kSc, kRes are compile-time so the loop vectorizes (the PReLU as
// a blend).
template <typename T, bool kSc, bool kRes>
inline void proj_pass(const int32_t* __restrict pc, int64_t cin, int64_t o0,
                      int64_t n, const T* __restrict sc, const T* __restrict a,
                      const T* __restrict b, const T* __restrict slope,
                      const T* __restrict ps, const T* __restrict pb,
                      const T* __restrict res, T* __restrict y) {
  const int32_t full = int32_t(cin);
  MMBHVIT_NOALIAS_LOOP
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = o0 + i;
    T v = binary_prelu<T, kSc>(full, pc[o], a[o], b[o], kSc ? sc[i] : T(0),
                               slope[o]);
    v = v * ps[o];
    v = v + pb[o];
    if (kRes) v = res[o] + v;
    y[o] = v;
  }
}

template <typename T>
inline void proj_token(const int32_t* pc, const T* x, int64_t cin,
                       int64_t cout, const T* a, const T* b, const T* slope,
                       const T* ps, const T* pb, int shortcut, const T* res,
                       T* tmp, T* y) {
  // the shortcut values of output block [o0, o0 + n): sc[0 .. n)
  const T* sc = nullptr;
  int64_t block = cout;
  if (shortcut == kIdentity) {
    sc = x;
  } else if (shortcut == kTile) {
    sc = x;
    block = cin;
  } else if (shortcut == kGroupMean) {
    const int64_t r = cin / cout;
    T* sums = tmp + cin;  // tmp holds cin + cout values
    group_sums(x, cout, r, tmp, sums);
    const T tr = T(r);
    for (int64_t o = 0; o < cout; ++o) sums[o] = sums[o] / tr;
    sc = sums;
  }
  for (int64_t o0 = 0; o0 < cout; o0 += block) {
    if (sc != nullptr && res != nullptr)
      proj_pass<T, true, true>(pc, cin, o0, block, sc, a, b, slope, ps, pb,
                               res, y);
    else if (sc != nullptr)
      proj_pass<T, true, false>(pc, cin, o0, block, sc, a, b, slope, ps, pb,
                                res, y);
    else if (res != nullptr)
      proj_pass<T, false, true>(pc, cin, o0, block, sc, a, b, slope, ps, pb,
                                res, y);
    else
      proj_pass<T, false, false>(pc, cin, o0, block, sc, a, b, slope, ps, pb,
                                 res, y);
  }
}

// Popcounts of nk packed tokens (W words apart) against all outputs.
inline void proj_popcounts(int nk, const uint64_t* bits, int64_t words,
                           const uint64_t* wt, int64_t cout, int64_t cp,
                           int32_t* acc) {
  const Tap tap{bits, wt};
  popcount_rows<BitOp::kXor>(nk, &tap, 1, words, words, cp, cout, acc, cp);
}

template <typename T>
void proj(const ProjParams<T>& p, int64_t begin, int64_t end) {
  const int64_t W = p.words, CP = p.cout_pad, cin = p.cin, cout = p.cout;
  Scratch<uint64_t> bits(kTokens * W);
  Scratch<int32_t> acc(kTokens * CP);
  Scratch<T> tmp(cin + cout);
  for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
    const int nk = int(end - t0 < kTokens ? end - t0 : kTokens);
    for (int k = 0; k < nk; ++k)
      pack_row(p.x + (t0 + k) * cin, p.thr, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), cin, bits.ptr + k * W);
    proj_popcounts(nk, bits.ptr, W, p.wt, cout, CP, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      const int64_t t = t0 + k;
      proj_token(acc.ptr + k * CP, p.x + t * cin, cin, cout, p.a, p.b,
                 p.slope, p.post_scale, p.post_bias, p.shortcut,
                 p.residual != nullptr ? p.residual + t * cout : nullptr,
                 tmp.ptr, p.y + t * cout);
    }
  }
}

// expand (tile shortcut) then reduce (group-mean shortcut) per tile of
// tokens, the hidden activations never leaving the cache
template <typename T>
void ffn(const FfnParams<T>& p, int64_t begin, int64_t end) {
  const ProjParams<T>& e = p.expand;
  const ProjParams<T>& r = p.reduce;
  const int64_t c = e.cin, hid = e.cout;
  Scratch<uint64_t> bits(kTokens * (e.words > r.words ? e.words : r.words));
  Scratch<int32_t> acc(kTokens * (e.cout_pad > r.cout_pad ? e.cout_pad
                                                           : r.cout_pad));
  Scratch<T> hidden(kTokens * hid);
  Scratch<T> tmp(hid + c);
  for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
    const int nk = int(end - t0 < kTokens ? end - t0 : kTokens);
    for (int k = 0; k < nk; ++k)
      pack_row(e.x + (t0 + k) * c, e.thr, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), c, bits.ptr + k * e.words);
    proj_popcounts(nk, bits.ptr, e.words, e.wt, hid, e.cout_pad, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      T* hk = hidden.ptr + k * hid;
      proj_token(acc.ptr + k * e.cout_pad, e.x + (t0 + k) * c, c, hid, e.a,
                 e.b, e.slope, e.post_scale, e.post_bias, e.shortcut,
                 static_cast<const T*>(nullptr), tmp.ptr, hk);
      pack_row(hk, r.thr, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), hid, bits.ptr + k * r.words);
    }
    proj_popcounts(nk, bits.ptr, r.words, r.wt, c, r.cout_pad, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      const int64_t t = t0 + k;
      proj_token(acc.ptr + k * r.cout_pad, hidden.ptr + k * hid, hid, c, r.a,
                 r.b, r.slope, r.post_scale, r.post_bias, r.shortcut,
                 r.residual != nullptr ? r.residual + t * c : nullptr,
                 tmp.ptr, r.y + t * c);
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
