// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The ops as their callers see them: scratch buffers, the packing steps and
// the kernel calls in order, the work split by a caller-supplied
//   pf(n_items, grain, fn)   with fn(begin, end)
// (torch's at::parallel_for in the Python binding, a plain loop in the C++
// test). Parameters are assumed checked by the caller. Built without ISA
// flags; the ISA-specific work happens behind the KernelSet pointers.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "dispatch.h"

namespace mmbhvit {

template <typename T>
const Kernels<T>& kernels_of(const KernelSet& s);
template <>
inline const Kernels<float>& kernels_of<float>(const KernelSet& s) {
  return s.f32;
}
template <>
inline const Kernels<double>& kernels_of<double>(const KernelSet& s) {
  return s.f64;
}

inline int64_t words_of(int64_t bits) { return (bits + 63) / 64; }

// About 32k word operations per task, at least one item.
inline int64_t grain_for(int64_t work_per_item) {
  const int64_t g = 32768 / (work_per_item > 0 ? work_per_item : 1);
  return g > 0 ? g : 1;
}

template <typename T, typename PF>
void run_proj(const KernelSet& s, const ProjParams<T>& p, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  pf(p.tokens, 4 * grain_for(p.words * p.cout_pad + p.cin + p.cout),
     [&](int64_t b, int64_t e) { k.proj(p, b, e); });
}

template <typename T, typename PF>
void run_ffn(const KernelSet& s, const FfnParams<T>& p, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  const int64_t work = p.expand.words * p.expand.cout_pad +
                       p.reduce.words * p.reduce.cout_pad + 4 * p.expand.cout;
  pf(p.expand.tokens, 4 * grain_for(work),
     [&](int64_t b, int64_t e) { k.ffn(p, b, e); });
}

// Whether MSGDC takes the lane path: 4 groups of 16 or 32 channels, the
// lane weights given, and a set with a lane core.
inline bool msgdc_takes_lanes(const KernelSet& s, int64_t c, int64_t groups,
                              bool have_lane_weights) {
  return groups == 4 && have_lane_weights &&
         s.msgdc_lanes(static_cast<int>(c / groups), c);
}

// p: everything but bits / expanded / lane_bits / nvec, which this sets
// (lane weights p.wx[] are read when `lanes`).
template <typename T, typename PF>
void run_msgdc(const KernelSet& s, MsgdcParams<T> p, bool lanes,
               const T* in_scale, const T* in_bias, const T* thr, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  const int64_t pixels = p.n * p.h * p.w;
  // not zero-filled: the expansion / packing writes every word the
  // convolution reads (a set with dense lane input uses 2 of 16-64 words
  // per pixel; zeroing all of them cost ~0.4 MB of stores per call)
  std::unique_ptr<uint64_t[]> bits;
  if (lanes) {
    const int64_t nvec = (p.c + 512 / p.cg - 1) / (512 / p.cg);
    bits.reset(new uint64_t[static_cast<size_t>(pixels * nvec * 8)]);
    ExpandParams<T> ep{};
    ep.x = p.x;
    ep.pixels = pixels;
    ep.c = p.c;
    ep.cg = p.cg;
    ep.nvec = nvec;
    ep.in_scale = in_scale;
    ep.in_bias = in_bias;
    ep.thr = thr;
    ep.expanded = bits.get();
    pf(pixels, grain_for(p.c + 8 * nvec),
       [&](int64_t b, int64_t e) { k.msgdc_expand(ep, b, e); });
    p.lane_bits = static_cast<int>(p.cg);
    p.nvec = nvec;
    p.expanded = bits.get();
    p.bits = nullptr;
  } else {
    bits.reset(new uint64_t[static_cast<size_t>(pixels * p.groups * p.wg)]);
    PackParams<T> pk{};
    pk.x = p.x;
    pk.pixels = pixels;
    pk.c = p.c;
    pk.groups = p.groups;
    pk.cg = p.cg;
    pk.wg = p.wg;
    pk.in_scale = in_scale;
    pk.in_bias = in_bias;
    pk.thr = thr;
    pk.bits = bits.get();
    pf(pixels, grain_for(p.c), [&](int64_t b, int64_t e) { k.pack(pk, b, e); });
    p.lane_bits = 0;
    p.nvec = 0;
    p.expanded = nullptr;
    p.bits = bits.get();
  }
  pf(pixels, grain_for(int64_t(p.ndil) * 9 * p.wg * p.c + 8 * p.c),
     [&](int64_t b, int64_t e) { k.msgdc(p, b, e); });
}

// The sign bits (x > thr) of `pixels` rows of c channels, `words` words
// per row (one channel group).
template <typename T, typename PF>
std::vector<uint64_t> pack_pixels(const Kernels<T>& k, const T* x,
                                  int64_t pixels, int64_t c, int64_t words,
                                  const T* thr, PF&& pf) {
  std::vector<uint64_t> bits(static_cast<size_t>(pixels * words));
  PackParams<T> pk{};
  pk.x = x;
  pk.pixels = pixels;
  pk.c = c;
  pk.groups = 1;
  pk.cg = c;
  pk.wg = words;
  pk.thr = thr;
  pk.bits = bits.data();
  pf(pixels, grain_for(c), [&](int64_t b, int64_t e) { k.pack(pk, b, e); });
  return bits;
}

// p: everything but bits and thr (the kernel packs each window).
template <typename T, typename PF>
void run_merge(const KernelSet& s, MergeParams<T> p, const T* thr, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  p.bits = nullptr;
  p.thr = thr;
  pf(p.n * (p.h / 2) * (p.w / 2),
     grain_for(4 * p.words * p.cout_pad + 2 * p.cout + 4 * p.cin),
     [&](int64_t b, int64_t e) { k.merge(p, b, e); });
}

// p: everything but bits.
template <typename T, typename PF>
void run_conv(const KernelSet& s, ConvParams<T> p, const T* thr, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  std::vector<uint64_t> bits =
      pack_pixels(k, p.x, p.n * p.h * p.w, p.cin, p.words, thr, pf);
  p.bits = bits.data();
  pf(p.n * p.h,
     grain_for(p.w * (int64_t(p.k) * p.k * p.words * p.cout_pad + 2 * p.cout)),
     [&](int64_t b, int64_t e) { k.conv(p, b, e); });
}

// The sign bits of q and k per head (qbits: (b, heads, t, wd), kbits:
// (b, heads, wd, t_pad), zero past t) and the ScoreParams reading them.
template <typename T, typename PF>
ScoreParams<T> pack_scores(const Kernels<T>& k, const T* q, const T* kk,
                           const T* thr_q, const T* thr_k, int64_t b,
                           int64_t t, int64_t c, int64_t heads,
                           std::vector<uint64_t>& qbits,
                           std::vector<uint64_t>& kbits, PF&& pf) {
  const int64_t d = c / heads, wd = words_of(d), t_pad = (t + 7) / 8 * 8;
  qbits.assign(static_cast<size_t>(b * heads * t * wd), 0);
  kbits.assign(static_cast<size_t>(b * heads * wd * t_pad), 0);
  HeadPackParams<T> hp{};
  hp.b = b;
  hp.t = t;
  hp.c = c;
  hp.heads = heads;
  hp.d = d;
  hp.wd = wd;
  hp.t_pad = t_pad;
  hp.x = q;
  hp.thr = thr_q;
  hp.bits = qbits.data();
  pf(b * t, grain_for(c), [&](int64_t i, int64_t e) { k.head_pack(hp, i, e); });
  HeadPackParams<T> hk = hp;
  hk.x = kk;
  hk.thr = thr_k;
  hk.bits = kbits.data();
  pf(b * t, grain_for(c),
     [&](int64_t i, int64_t e) { k.head_pack_t(hk, i, e); });
  ScoreParams<T> p{};
  p.qbits = qbits.data();
  p.kbits = kbits.data();
  p.b = b;
  p.t = t;
  p.heads = heads;
  p.wd = wd;
  p.t_pad = t_pad;
  p.d = d;
  return p;
}

// s_out: (b, heads, t, t)
template <typename T, typename PF>
void run_scores(const KernelSet& s, const T* q, const T* kk, const T* thr_q,
                const T* thr_k, int64_t b, int64_t t, int64_t c,
                int64_t heads, T scale, T* s_out, PF&& pf,
                const double* table = nullptr) {
  const Kernels<T>& k = kernels_of<T>(s);
  std::vector<uint64_t> qbits, kbits;
  ScoreParams<T> p =
      pack_scores(k, q, kk, thr_q, thr_k, b, t, c, heads, qbits, kbits, pf);
  p.scale = scale;
  p.s = s_out;
  p.table = table;
  pf(b * heads * t, grain_for(p.wd * p.t_pad + t),
     [&](int64_t i, int64_t e) { k.scores(p, i, e); });
}

// The sign bits of v along the tokens per (b, head), (b, heads, tw, d), for
// p (which gets tw and vbits).
template <typename T, typename PF>
void pack_values(const Kernels<T>& k, ContextParams<T>& p, const T* thr_v,
                 std::vector<uint64_t>& vbits, PF&& pf) {
  p.tw = words_of(p.t);
  vbits.assign(static_cast<size_t>(p.b * p.heads * p.tw * p.d), 0);
  HeadPackParams<T> hp{};
  hp.x = p.v;
  hp.b = p.b;
  hp.t = p.t;
  hp.c = p.c;
  hp.heads = p.heads;
  hp.d = p.d;
  hp.wd = words_of(p.d);
  hp.t_pad = p.t;
  hp.thr = thr_v;
  hp.bits = vbits.data();
  pf(p.b * p.heads, grain_for(p.t * p.d),
     [&](int64_t i, int64_t e) { k.token_pack(hp, i, e); });
  p.vbits = vbits.data();
}

// p: everything but vbits and tw.
template <typename T, typename PF>
void run_context(const KernelSet& s, ContextParams<T> p, const T* thr_v,
                 PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  std::vector<uint64_t> vbits;
  pack_values(k, p, thr_v, vbits, pf);
  pf(p.b * p.heads * p.t, grain_for(4 * p.tw * p.d + 4 * p.t),
     [&](int64_t i, int64_t e) { k.context(p, i, e); });
}

// scores with the table, then context, in one pass (AttentionParams); cp
// as for run_context (its p unused).
template <typename T, typename PF>
void run_attention(const KernelSet& s, ContextParams<T> cp, const T* thr_q,
                   const T* thr_k, const T* thr_v, const double* table,
                   PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  std::vector<uint64_t> qbits, kbits, vbits;
  AttentionParams<T> p{};
  p.scores = pack_scores(k, cp.q, cp.k, thr_q, thr_k, cp.b, cp.t, cp.c,
                         cp.heads, qbits, kbits, pf);
  p.scores.table = table;
  pack_values(k, cp, thr_v, vbits, pf);
  p.context = cp;
  const int64_t per_row = p.scores.wd * p.scores.t_pad + 4 * cp.tw * cp.d +
                          8 * cp.t;
  pf(cp.b * cp.heads * cp.t, grain_for(per_row),
     [&](int64_t i, int64_t e) { k.attention(p, i, e); });
}

template <typename T, typename PF>
void run_stem(const KernelSet& s, const StemParams<T>& p, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  pf(p.n * (p.h / 4) * (p.w / 4), grain_for(p.cin * 16 * p.cout),
     [&](int64_t i, int64_t e) { k.stem(p, i, e); });
}

template <typename T, typename PF>
void run_shift(const KernelSet& s, const ShiftParams<T>& p, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  pf(p.n * p.h * p.w, grain_for(int64_t(p.ntaps + 2) * p.c),
     [&](int64_t i, int64_t e) { k.shift(p, i, e); });
}

// p: everything but merged (scratch).
template <typename T, typename PF>
void run_tokens(const KernelSet& s, TokensParams<T> p, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  const int64_t cells = p.cells();
  std::vector<T> merged(static_cast<size_t>(p.n * cells * p.c));
  p.merged = merged.data();
  pf(p.n * cells, grain_for(4 * p.s * p.s * p.c),
     [&](int64_t i, int64_t e) { k.merged_tokens(p, i, e); });
  pf(p.n * cells * (p.s * p.s + cells), grain_for(2 * p.c),
     [&](int64_t i, int64_t e) { k.window_tokens(p, i, e); });
}

// p: everything but merged (scratch).
template <typename T, typename PF>
void run_untokens(const KernelSet& s, UntokensParams<T> p, PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  const int64_t cells = p.cells();
  std::vector<T> merged(static_cast<size_t>(p.n * cells * p.c));
  p.merged = merged.data();
  pf(p.n * cells, grain_for(cells * p.c),
     [&](int64_t i, int64_t e) { k.merged_means(p, i, e); });
  pf(p.n * p.h * p.w, grain_for(3 * p.c),
     [&](int64_t i, int64_t e) { k.untokens(p, i, e); });
}

// The forward of a 1-bit 1x1 convolution (SignProductParams; p: everything
// but wrows, scale, words, not_signs). w: the binarized weight
// (cout, cin), each row o only +s_o / -s_o with s_o = max|w_o| > 0. Returns
// false, with y undefined, when a weight or an input is not such a sign
// (a zero, NaN): the caller then takes another route.
template <typename T, typename PF>
bool run_sign_product(const KernelSet& s, SignProductParams<T> p, const T* w,
                      PF&& pf) {
  const Kernels<T>& k = kernels_of<T>(s);
  p.words = words_of(p.cin);
  std::vector<uint64_t> rows(static_cast<size_t>(p.cout * p.words));
  std::vector<T> scale(static_cast<size_t>(p.cout));
  int32_t not_signs = 0;
  SignWeightsParams<T> wp{w,           p.cout,       p.cin, p.words,
                          rows.data(), scale.data(), &not_signs};
  pf(p.cout, grain_for(3 * p.cin),
     [&](int64_t b, int64_t e) { k.sign_weights(wp, b, e); });
  if (not_signs) return false;
  p.wrows = rows.data();
  p.scale = scale.data();
  p.not_signs = &not_signs;
  const int64_t tiles = (p.pixels + kSignProductTile - 1) / kSignProductTile;
  pf(p.n * tiles, grain_for(kSignProductTile * p.words * p.cout / 4 + p.cin),
     [&](int64_t b, int64_t e) { k.sign_product(p, b, e); });
  return not_signs == 0;
}

}  // namespace mmbhvit
