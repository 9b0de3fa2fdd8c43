// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Binary 1x1 projection with residual shortcut (BinaryResidualProj) and
// the binary MLP of a block (expand + reduce fused per tile of tokens).
#pragma once

#include <cstdint>

#include "../nibble_lut.h"
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
inline void proj_pass(const int32_t* __restrict pc, int32_t full, int64_t o0,
                      int64_t n, const T* __restrict sc, const T* __restrict a,
                      const T* __restrict b, const T* __restrict slope,
                      const T* __restrict ps, const T* __restrict pb,
                      const T* res, T* y) {  // y may be res
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

// full: the number of bit pairs behind each count (cin for a 1x1
// projection, n_valid_taps * cin for a convolution).
template <typename T>
inline void proj_token(const int32_t* pc, const T* x, int64_t cin,
                       int64_t cout, const T* a, const T* b, const T* slope,
                       const T* ps, const T* pb, int shortcut, const T* res,
                       T* tmp, T* y, int32_t full) {
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
  } else if (shortcut == kChunkMean) {
    // left to right over the r chunks of cout channels, then / r
    const int64_t r = cin / cout;
    for (int64_t o = 0; o < cout; ++o) tmp[o] = x[o];
    for (int64_t j = 1; j < r; ++j) {
      const T* xj = x + j * cout;
      for (int64_t o = 0; o < cout; ++o) tmp[o] = tmp[o] + xj[o];
    }
    const T tr = T(r);
    for (int64_t o = 0; o < cout; ++o) tmp[o] = tmp[o] / tr;
    sc = tmp;
  }
  for (int64_t o0 = 0; o0 < cout; o0 += block) {
    if (sc != nullptr && res != nullptr)
      proj_pass<T, true, true>(pc, full, o0, block, sc, a, b, slope, ps, pb,
                               res, y);
    else if (sc != nullptr)
      proj_pass<T, true, false>(pc, full, o0, block, sc, a, b, slope, ps, pb,
                                res, y);
    else if (res != nullptr)
      proj_pass<T, false, true>(pc, full, o0, block, sc, a, b, slope, ps, pb,
                                res, y);
    else
      proj_pass<T, false, false>(pc, full, o0, block, sc, a, b, slope, ps, pb,
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

// The group-mean shortcut of one token: sums[o] = mean of x over group o.
template <typename T>
inline void group_means(const T* x, int64_t cin, int64_t cout, T* tmp,
                        T* sums) {
  const int64_t r = cin / cout;
  group_sums(x, cout, r, tmp, sums);
  const T tr = T(r);
  for (int64_t o = 0; o < cout; ++o) sums[o] = sums[o] / tr;
}

// Fused path (AVX2 / AVX-512, float): the counts of 8 outputs for 4 tokens
// stay in registers and go straight through the epilogue (no int32 round
// trip through memory, no separate epilogue pass); the ffn also takes the
// sign bits of the hidden values there. Same float operations, same order
// as proj_pass.
template <typename T>
inline bool proj_fused(const ProjParams<T>&, int64_t, int64_t) {
  return false;
}
template <typename T>
inline bool ffn_fused(const FfnParams<T>&, int64_t, int64_t) {
  return false;
}
template <typename T>
inline bool ffn_nibbles(const FfnParams<T>&, int64_t, int64_t) {
  return false;
}

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "proj_tile8 stores sign bits as bytes of little-endian words");

// prelu(D a + b (+ sc)) * ps + pb (+ res) for outputs o .. o + 7; prm:
// a, b, slope, ps, pb of these outputs, 8 floats each (EpiParams)
// (epilogue8_dot: from the int32 dot products D instead of the counts)
// (kUnitScale: every post_scale is 1, z * 1 == z is skipped)
template <bool kSc, bool kRes, bool kUnitScale = false>
inline __m256 epilogue8_dot(__m256i dot, const float* prm, const float* sc,
                            const float* res) {
  const __m256 z = binary_prelu8_dot<kSc>(dot, prm, prm + 8, sc, prm + 16);
  __m256 v = kUnitScale ? z : _mm256_mul_ps(z, _mm256_loadu_ps(prm + 24));
  v = _mm256_add_ps(v, _mm256_loadu_ps(prm + 32));
  if (kRes) v = _mm256_add_ps(_mm256_loadu_ps(res), v);
  return v;
}
template <bool kSc, bool kRes>
inline __m256 epilogue8(__m256i count, __m256i full, const float* prm,
                        const float* sc, const float* res) {
  return epilogue8_dot<kSc, kRes>(
      _mm256_sub_epi32(full, _mm256_add_epi32(count, count)), prm, sc, res);
}

// The epilogue vectors of a projection interleaved per block of 8 outputs
// (a, b, slope, post_scale, post_bias): one pointer in the output loop.
struct EpiParams {
  Scratch<float> v;
  explicit EpiParams(const ProjParams<float>& p) : v(5 * p.cout) {
    const float* src[5] = {p.a, p.b, p.slope, p.post_scale, p.post_bias};
    for (int64_t o = 0; o < p.cout; o += 8)
      for (int j = 0; j < 5; ++j)
        for (int i = 0; i < 8; ++i) v.ptr[5 * o + 8 * j + i] = src[j][o + i];
  }
};

constexpr int kShortNone = 0, kShortDirect = 1, kShortTile = 2;

// The counts of 8 outputs (from o) for NK rows of W words (count8 with the
// accumulator its word count needs).
template <int NK>
MMBHVIT_ALWAYS_INLINE inline void count8_words(const Tap* tap, int64_t W,
                                               int64_t CP, int64_t o,
                                               __m256i* cnt) {
  if (W == 1)  // one word: the byte counts need no accumulator
    count8<BitOp::kXor, NK, false>(tap, 1, 1, 1, CP, o, cnt);
  else if (W <= 31)
    count8<BitOp::kXor, NK, false>(tap, 1, W, W, CP, o, cnt);
  else
    count8<BitOp::kXor, NK, true>(tap, 1, W, W, CP, o, cnt);
}

// One tile of kTokens rows (packed, W words apart in bits), every output:
// row k: y[k ys + o], shortcut sc[k scs + o] (kShortTile: o % cin),
// residual res[k rs + o]; kPack: also the sign bits y > pthr into
// pbits + k * pw.
template <int kShort, bool kRes, bool kPack>
inline void proj_tile8(const ProjParams<float>& p, const float* prm,
                       const uint64_t* bits, const float* sc, int64_t scs,
                       const float* res, int64_t rs, float* y, int64_t ys,
                       const float* pthr, uint64_t* pbits, int64_t pw) {
  constexpr int NK = kTokens;
  const int64_t W = p.words, CP = p.cout_pad, cout = p.cout, cin = p.cin;
  const Tap tap{bits, p.wt};
  const __m256i full = _mm256_set1_epi32(int32_t(cin));
  // kPack: the sign bits of outputs o .. o + 7 are byte o / 8 of the row's
  // words (little-endian), stored as a byte: no read-modify-write chain
  unsigned char* pb8 = reinterpret_cast<unsigned char*>(pbits);
  if (kPack && (cout & 63) != 0)  // bytes past cout stay zero
    for (int k = 0; k < NK; ++k) pbits[k * pw + (cout >> 6)] = 0;
  int64_t so = 0;  // kShortTile: o % cin (no division per block)
  for (int64_t o = 0; o < cout; o += 8) {
    __m256i cnt[NK];
    count8_words<NK>(&tap, W, CP, o, cnt);
    const float* po = prm + 5 * o;
    for (int k = 0; k < NK; ++k) {
      const __m256 v = epilogue8<kShort != kShortNone, kRes>(
          cnt[k], full, po,
          kShort != kShortNone
              ? sc + k * scs + (kShort == kShortTile ? so : o)
              : nullptr,
          kRes ? res + k * rs + o : nullptr);
      _mm256_storeu_ps(y + k * ys + o, v);
      if (kPack)
        pb8[k * pw * 8 + (o >> 3)] = static_cast<unsigned char>(
            _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(pthr + o),
                                             _CMP_GT_OQ)));
    }
    if (kShort == kShortTile) so = so + 8 == cin ? 0 : so + 8;
  }
}

// The group means of 32 neighbouring values (registers v[0..3], 8
// values each) for groups of r = 4 or 8: the pairwise sums of group_sums
// with vhaddps, then / r, stored at out (32 / r floats).
inline void group_means32(const __m256* v, int64_t r, float* out) {
  const __m256 l2 =
      _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  // l2: [v0 0-3, v1 0-3, v2 0-3, v3 0-3 | v0 4-7, v1 4-7, v2 4-7, v3 4-7]
  if (r == 8) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(l2),
                                _mm256_extractf128_ps(l2, 1));
    _mm_storeu_ps(out, _mm_div_ps(s, _mm_set1_ps(8.f)));
  } else {
    const __m256 s = _mm256_permutevar8x32_ps(
        l2, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_ps(out, _mm256_div_ps(s, _mm256_set1_ps(4.f)));
  }
}

// The group means of fused_group_means for r = 4 and r = 8 (float, cout
// % 8 == 0), 32 inputs at a time.
inline void group_means8(const float* x, int64_t cout, int64_t r,
                         float* out) {
  for (int64_t i = 0; i < cout * r; i += 32) {
    const __m256 v[4] = {_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i + 8),
                         _mm256_loadu_ps(x + i + 16),
                         _mm256_loadu_ps(x + i + 24)};
    group_means32(v, r, out + i / r);
  }
}

inline void fused_group_means(const float* x, int64_t cin, int64_t cout,
                              float* tmp, float* sums) {
  const int64_t r = cin / cout;
  if (r == 4 || r == 8)
    group_means8(x, cout, r, sums);
  else
    group_means(x, cin, cout, tmp, sums);
}

// The sign bits (v > thr) of 32 outputs, stored as the 4 bytes at rb
// (little-endian words), and their group means (group_means32) at means:
// what an MLP expansion hands its reduction.
MMBHVIT_ALWAYS_INLINE inline void signs_and_means32(const __m256* v,
                                                    const float* thr,
                                                    int64_t r,
                                                    unsigned char* rb,
                                                    float* means) {
  uint32_t signs = 0;
  for (int j = 0; j < 4; ++j)
    signs |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(
                 v[j], _mm256_loadu_ps(thr + 8 * j), _CMP_GT_OQ)))
             << (8 * j);
  __builtin_memcpy(rb, &signs, 4);
  group_means32(v, r, means);
}

inline bool fused_shape(const ProjParams<float>& p) {
  if (p.cout % 8 != 0) return false;
  if (p.shortcut == kTile) return p.cin % 8 == 0 && p.cout % p.cin == 0;
  if (p.shortcut == kIdentity) return p.cin == p.cout;
  if (p.shortcut == kGroupMean) return p.cin % p.cout == 0;
  return p.shortcut == kNone;
}

// A tile of rows [t0, t0 + nk) of a (tokens, n) array as kTokens rows n
// apart: in place when nk == kTokens, else copied into pad (rows past nk
// repeat row 0); outputs of a partial tile go to pad and are copied back
// with tile_out.
inline const float* tile_in(const float* base, int64_t t0, int nk, int64_t n,
                            float* pad) {
  if (base == nullptr) return nullptr;
  if (nk == kTokens) return base + t0 * n;
  for (int k = 0; k < kTokens; ++k) {
    const float* src = base + (t0 + (k < nk ? k : 0)) * n;
    for (int64_t i = 0; i < n; ++i) pad[k * n + i] = src[i];
  }
  return pad;
}
inline void tile_out(const float* pad, int nk, int64_t n, float* dst) {
  for (int64_t i = 0; i < nk * n; ++i) dst[i] = pad[i];
}

template <bool kPack>
inline void proj_tile_dispatch(const ProjParams<float>& p, const float* prm,
                               const uint64_t* bits, const float* sc,
                               int64_t scs, const float* res, float* y,
                               const float* pthr, uint64_t* pbits,
                               int64_t pw) {
  const int64_t n = p.cout;
#define MMBHVIT_TILE(S, R) \
  proj_tile8<S, R, kPack>(p, prm, bits, sc, scs, res, n, y, n, pthr, pbits, pw)
  if (p.shortcut == kNone)
    res ? MMBHVIT_TILE(kShortNone, true) : MMBHVIT_TILE(kShortNone, false);
  else if (p.shortcut == kTile)
    res ? MMBHVIT_TILE(kShortTile, true) : MMBHVIT_TILE(kShortTile, false);
  else
    res ? MMBHVIT_TILE(kShortDirect, true)
        : MMBHVIT_TILE(kShortDirect, false);
#undef MMBHVIT_TILE
}

// The shortcut rows of a tile (scs apart): x itself, or its group means.
inline const float* tile_shortcut(const ProjParams<float>& p, const float* x,
                                  float* tmp, float* means, int64_t* scs) {
  if (p.shortcut != kGroupMean) {
    *scs = p.cin;
    return x;
  }
  for (int k = 0; k < kTokens; ++k)
    fused_group_means(x + k * p.cin, p.cin, p.cout, tmp, means + k * p.cout);
  *scs = p.cout;
  return means;
}

inline bool proj_fused(const ProjParams<float>& p, int64_t begin,
                       int64_t end) {
  if (!fused_shape(p)) return false;
  const int64_t W = p.words, cin = p.cin, cout = p.cout;
  const EpiParams prm(p);
  Scratch<uint64_t> bits(kTokens * W);
  Scratch<float> tmp(cin);
  Scratch<float> means(kTokens * cout);
  Scratch<float> xpad(kTokens * cin), rpad(kTokens * cout),
      ypad(kTokens * cout);
  for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
    const int nk = int(end - t0 < kTokens ? end - t0 : kTokens);
    const float* x = tile_in(p.x, t0, nk, cin, xpad.ptr);
    const float* res = tile_in(p.residual, t0, nk, cout, rpad.ptr);
    float* y = nk == kTokens ? p.y + t0 * cout : ypad.ptr;
    for (int k = 0; k < kTokens; ++k)
      pack_row(x + k * cin, p.thr, static_cast<const float*>(nullptr),
               static_cast<const float*>(nullptr), cin, bits.ptr + k * W);
    int64_t scs = 0;
    const float* sc = tile_shortcut(p, x, tmp.ptr, means.ptr, &scs);
    proj_tile_dispatch<false>(p, prm.v.ptr, bits.ptr, sc, scs, res, y,
                              nullptr, nullptr, 0);
    if (nk < kTokens) tile_out(ypad.ptr, nk, cout, p.y + t0 * cout);
  }
  return true;
}

// The MLPs the fused kernels take: a tile-shortcut expansion without a
// residual, a group-mean reduction, both in whole blocks of 8 outputs.
inline bool ffn_fused_shape(const FfnParams<float>& p) {
  return fused_shape(p.expand) && fused_shape(p.reduce) &&
         p.expand.shortcut == kTile && p.expand.residual == nullptr &&
         p.reduce.shortcut == kGroupMean;
}

#if MMBHVIT_AVX2
constexpr int64_t kLutTokens = 64;  // tokens per block of the table path

// The table sums of one token (its sign bits: ew words at xb) at one block
// of 32 hidden outputs: D / 2 per output, int8.
MMBHVIT_ALWAYS_INLINE inline __m256i nibble_sums(const int8_t* table,
                                                 const uint64_t* xb,
                                                 int64_t ew) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0;
  for (int64_t i = 0; i < ew; ++i) {
    // rows of word i's 16 nibbles: 16 values x 32 bytes apart
    const uint64_t w = xb[i];
    const int8_t* ti = table + i * 16 * 512;
    for (int q = 0; q < 16; q += 2) {
      s0 = _mm256_add_epi8(
          s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                  ti + q * 512 + (w >> (4 * q) & 15) * 32)));
      s1 = _mm256_add_epi8(
          s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                  ti + (q + 1) * 512 + (w >> (4 * q + 4) & 15) * 32)));
    }
  }
  return _mm256_add_epi8(s0, s1);
}

// The rest of the expansion of NT tokens at one block of 32 hidden outputs,
// from their table sums (32 bytes per token at sums; rows c floats / rbs
// bytes apart): epilogue (the NT tokens share the parameter loads), sign
// bits (4 bytes per token at rb) and group means (32 / r per token at
// means).
template <int NT, bool kUnitScale>
MMBHVIT_ALWAYS_INLINE inline void nibble_expand(
    const int8_t* sums, const float* po, const float* sc, int64_t c,
    const float* thr, int64_t r, unsigned char* rb, int64_t rbs,
    float* means) {
  __m256 v[NT][4];
  for (int j = 0; j < 4; ++j)
    for (int t = 0; t < NT; ++t) {
      const __m256i h = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
          reinterpret_cast<const __m128i*>(sums + 32 * t + 8 * j)));
      v[t][j] = epilogue8_dot<true, false, kUnitScale>(
          _mm256_add_epi32(h, h), po + 40 * j, sc + t * c + 8 * j, nullptr);
    }
  for (int t = 0; t < NT; ++t)
    signs_and_means32(v[t], thr, r, rb + t * rbs, means + t * c);
}

// The expansion of nb <= kLutTokens tokens (x: nb rows of c floats, their
// sign bits xbits: ew words each) for every block of 32 hidden outputs: the
// table sums of all the tokens first, then their epilogues; sign bits into
// rb8 (rows rbs bytes apart), group means into means (rows of c).
template <bool kUnitScale>
inline void nibble_block(const int8_t* lut, const float* prm,
                         const float* thr, const uint64_t* xbits, int64_t ew,
                         const float* x, int64_t nb, int64_t c, int64_t hid,
                         unsigned char* rb8, int64_t rbs, float* means) {
  const int64_t npos = c / 4, r = hid / c;
  alignas(32) int8_t sums[kLutTokens * 32];
  for (int64_t o0 = 0; o0 < hid; o0 += 32) {
    const int8_t* table = lut + o0 * npos * 16;
    const float* po = prm + 5 * o0;
    for (int64_t k = 0; k < nb; ++k)
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 32 * k),
                         nibble_sums(table, xbits + k * ew, ew));
    int64_t k = 0;
    for (; k + 2 <= nb; k += 2)
      nibble_expand<2, kUnitScale>(sums + 32 * k, po, x + k * c + o0 % c, c,
                                   thr + o0, r, rb8 + k * rbs + (o0 >> 3),
                                   rbs, means + k * c + o0 / r);
    if (k < nb)
      nibble_expand<1, kUnitScale>(sums + 32 * k, po, x + k * c + o0 % c, c,
                                   thr + o0, r, rb8 + k * rbs + (o0 >> 3),
                                   rbs, means + k * c + o0 / r);
  }
}

// The MLP with its expansion read from the nibble table (nibble_lut.h), in
// blocks of kLutTokens tokens: per block of 32 hidden outputs, each token's
// cin / 4 table rows are summed first (int8, one load-and-add each; a
// block's rows stay in L1 for all the tokens), then the sums widen to int32
// and double into the dot products, and the epilogue of proj_tile8 follows.
// The hidden values themselves are never stored: only their sign bits and
// the group means the reduction's shortcut takes (hidden / cin = 4 or 8).
// The reduction then runs per tile of kTokens tokens as in ffn_fused. Same
// counts, same float operations in the same order.
inline bool ffn_nibbles(const FfnParams<float>& p, int64_t begin,
                        int64_t end) {
  const ProjParams<float>& e = p.expand;
  const ProjParams<float>& rd = p.reduce;
  if (!ffn_fused_shape(p) || e.lut == nullptr ||
      !nibble_lut_fits(e.cin, e.cout) ||
      (e.cout != 4 * e.cin && e.cout != 8 * e.cin))
    return false;
  const int64_t c = e.cin, hid = e.cout, ew = e.words, rw = rd.words;
  const EpiParams eprm(e), rprm(rd);
  // every post_scale 1 (no LayerScale after the expansion's RPReLU): the
  // product z * 1 == z is left out
  bool unit = true;
  for (int64_t o = 0; o < hid; ++o) unit = unit && e.post_scale[o] == 1.f;
  Scratch<uint64_t> xbits(kLutTokens * ew);
  Scratch<uint64_t> rbits(kLutTokens * rw);
  Scratch<float> means(kLutTokens * c);
  Scratch<float> rpad(kTokens * c), ypad(kTokens * c);
  unsigned char* rb8 = reinterpret_cast<unsigned char*>(rbits.ptr);
  for (int64_t t0 = begin; t0 < end; t0 += kLutTokens) {
    const int64_t nb = end - t0 < kLutTokens ? end - t0 : kLutTokens;
    for (int64_t k = 0; k < nb; ++k) {
      uint64_t* xb = xbits.ptr + k * ew;
      pack_row(e.x + (t0 + k) * c, e.thr, static_cast<const float*>(nullptr),
               static_cast<const float*>(nullptr), c, xb);
    }
    // whole tiles of kTokens rows for the reduction: rows past nb are 0
    for (int64_t k = nb; k < (nb + kTokens - 1) / kTokens * kTokens; ++k) {
      for (int64_t i = 0; i < c; ++i) means.ptr[k * c + i] = 0.f;
      for (int64_t i = 0; i < rw; ++i) rbits.ptr[k * rw + i] = 0;
    }
    if (unit)
      nibble_block<true>(e.lut, eprm.v.ptr, rd.thr, xbits.ptr, ew,
                         e.x + t0 * c, nb, c, hid, rb8, rw * 8, means.ptr);
    else
      nibble_block<false>(e.lut, eprm.v.ptr, rd.thr, xbits.ptr, ew,
                          e.x + t0 * c, nb, c, hid, rb8, rw * 8, means.ptr);
    for (int64_t k0 = 0; k0 < nb; k0 += kTokens) {
      const int64_t t = t0 + k0;
      const int nk = int(nb - k0 < kTokens ? nb - k0 : kTokens);
      const float* res = tile_in(rd.residual, t, nk, c, rpad.ptr);
      float* y = nk == kTokens ? rd.y + t * c : ypad.ptr;
      proj_tile_dispatch<false>(rd, rprm.v.ptr, rbits.ptr + k0 * rw,
                                means.ptr + k0 * c, c, res, y, nullptr,
                                nullptr, 0);
      if (nk < kTokens) tile_out(ypad.ptr, nk, c, rd.y + t * c);
    }
  }
  return true;
}
#else
inline bool ffn_nibbles(const FfnParams<float>&, int64_t, int64_t) {
  return false;
}
#endif

#if MMBHVIT_AVX512
// The expansion of a tile of kTokens tokens as proj_tile8<kShortTile, false,
// true>, but its hidden values never stored: per block of 32 outputs, the
// sign bits against the reduction's thresholds (4 bytes per token) and the
// group means of the reduction's shortcut (group_means32, r = 4 or 8, 32 / r
// per token at means + k * cout / r) straight from the registers (AVX-512
// has the 32 vector registers the 4 x 4 blocks take).
inline void expand_tile32(const ProjParams<float>& e, const float* prm,
                          const uint64_t* bits, const float* x, int64_t r,
                          const float* pthr, uint64_t* pbits, int64_t pw,
                          float* means) {
  constexpr int NK = kTokens;
  const int64_t W = e.words, CP = e.cout_pad, cout = e.cout, cin = e.cin;
  const Tap tap{bits, e.wt};
  const __m256i full = _mm256_set1_epi32(int32_t(cin));
  unsigned char* pb8 = reinterpret_cast<unsigned char*>(pbits);
  if ((cout & 63) != 0)  // bytes past cout stay zero
    for (int k = 0; k < NK; ++k) pbits[k * pw + (cout >> 6)] = 0;
  const int64_t nm = cout / r, mstep = 32 / r;
  int64_t so = 0;  // o % cin
  int64_t mo = 0;  // o / r
  for (int64_t o = 0; o < cout; o += 32, mo += mstep) {
    __m256 v[NK][4];
    for (int j = 0; j < 4; ++j) {
      const int64_t oj = o + 8 * j;
      __m256i cnt[NK];
      count8_words<NK>(&tap, W, CP, oj, cnt);
      for (int k = 0; k < NK; ++k)
        v[k][j] = epilogue8<true, false>(cnt[k], full, prm + 5 * oj,
                                         x + k * cin + so, nullptr);
      so = so + 8 == cin ? 0 : so + 8;
    }
    for (int k = 0; k < NK; ++k)
      signs_and_means32(v[k], pthr + o, r, pb8 + k * pw * 8 + (o >> 3),
                        means + k * nm + mo);
  }
}

inline bool expand_tile32_fits(const FfnParams<float>& p) {
  const int64_t r = p.reduce.cin / p.reduce.cout;
  return p.expand.cout % 32 == 0 && (r == 4 || r == 8);
}
#endif

inline bool ffn_fused(const FfnParams<float>& p, int64_t begin, int64_t end) {
  const ProjParams<float>& e = p.expand;
  const ProjParams<float>& rd = p.reduce;
  if (!ffn_fused_shape(p)) return false;
  const int64_t c = e.cin, hid = e.cout, ew = e.words, rw = rd.words;
  const EpiParams eprm(e), rprm(rd);
  Scratch<uint64_t> ebits(kTokens * ew);
  Scratch<uint64_t> rbits(kTokens * rw);
  Scratch<float> hidden(kTokens * hid);
  Scratch<float> tmp(hid);
  Scratch<float> means(kTokens * c);
  Scratch<float> xpad(kTokens * c), rpad(kTokens * c), ypad(kTokens * c);
#if MMBHVIT_AVX512
  const bool in_registers = expand_tile32_fits(p);
#endif
  for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
    const int nk = int(end - t0 < kTokens ? end - t0 : kTokens);
    const float* x = tile_in(e.x, t0, nk, c, xpad.ptr);
    const float* res = tile_in(rd.residual, t0, nk, c, rpad.ptr);
    float* y = nk == kTokens ? rd.y + t0 * c : ypad.ptr;
    for (int k = 0; k < kTokens; ++k)
      pack_row(x + k * c, e.thr, static_cast<const float*>(nullptr),
               static_cast<const float*>(nullptr), c, ebits.ptr + k * ew);
    int64_t scs = c;
    const float* sc = means.ptr;
#if MMBHVIT_AVX512
    if (in_registers)
      expand_tile32(e, eprm.v.ptr, ebits.ptr, x, hid / c, rd.thr, rbits.ptr,
                    rw, means.ptr);
    else
#endif
    {
      proj_tile8<kShortTile, false, true>(e, eprm.v.ptr, ebits.ptr, x, c,
                                          nullptr, 0, hidden.ptr, hid,
                                          rd.thr, rbits.ptr, rw);
      sc = tile_shortcut(rd, hidden.ptr, tmp.ptr, means.ptr, &scs);
    }
    proj_tile_dispatch<false>(rd, rprm.v.ptr, rbits.ptr, sc, scs, res, y,
                              nullptr, nullptr, 0);
    if (nk < kTokens) tile_out(ypad.ptr, nk, c, rd.y + t0 * c);
  }
  return true;
}
#endif

template <typename T>
void proj(const ProjParams<T>& p, int64_t begin, int64_t end) {
  if (proj_fused(p, begin, end)) return;
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
                 tmp.ptr, p.y + t * cout, int32_t(cin));
    }
  }
}

// expand (tile shortcut) then reduce (group-mean shortcut) per tile of
// tokens, the hidden activations never leaving the cache
template <typename T>
void ffn(const FfnParams<T>& p, int64_t begin, int64_t end) {
  if (ffn_nibbles(p, begin, end) || ffn_fused(p, begin, end)) return;
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
                 static_cast<const T*>(nullptr), tmp.ptr, hk, int32_t(c));
      pack_row(hk, r.thr, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), hid, bits.ptr + k * r.words);
    }
    proj_popcounts(nk, bits.ptr, r.words, r.wt, c, r.cout_pad, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      const int64_t t = t0 + k;
      proj_token(acc.ptr + k * r.cout_pad, hidden.ptr + k * hid, hid, c, r.a,
                 r.b, r.slope, r.post_scale, r.post_bias, r.shortcut,
                 r.residual != nullptr ? r.residual + t * c : nullptr,
                 tmp.ptr, r.y + t * c, int32_t(hid));
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
