// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Packed-bit kernels of the BHViT inference engine. This header is included
// by one translation unit per instruction set, after MMBHVIT_NS has been
// defined to that unit's namespace and its target pragma set; it uses only
// compiler builtins and intrinsics (no standard-library templates, which
// the linker could share between units built for different targets).
//
// The ±1 dot products are exact integers: popcounts of XOR (or AND, for
// the 0/1 attention planes) of 64-bit words. With AVX-512 VPOPCNTDQ eight
// words are counted per instruction, eight output channels side by side;
// with AVX2 a nibble lookup table (vpshufb) counts 256 bits at a time;
// the generic kernels use the scalar popcount.
#include <cstdint>

#include "kernel_api.h"

// MMBHVIT_USE_AVX512 is set by kernels_avx512.cpp (a target pragma does not
// define the __AVX512*__ macros, so the unit says it explicitly).
#if defined(MMBHVIT_USE_AVX512) && MMBHVIT_USE_AVX512
#include <immintrin.h>
#define MMBHVIT_VPOPCNT 1
#else
#define MMBHVIT_VPOPCNT 0
#endif
// MMBHVIT_USE_AVX2 (kernels_avx2.cpp): 256-bit paths with a nibble-table
// popcount (vpshufb), for CPUs without AVX-512 VPOPCNTDQ.
#if defined(MMBHVIT_USE_AVX2) && MMBHVIT_USE_AVX2 && !MMBHVIT_VPOPCNT
#include <immintrin.h>
#define MMBHVIT_AVX2 1
#else
#define MMBHVIT_AVX2 0
#endif

namespace mmbhvit {
namespace MMBHVIT_NS {

namespace {

inline int popc(uint64_t v) { return __builtin_popcountll(v); }

inline float round_even(float v) { return __builtin_nearbyintf(v); }
inline double round_even(double v) { return __builtin_nearbyint(v); }

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Number of bit planes of an integer level in 0..levels.
inline int bit_planes(int levels) {
  int nb = 0;
  while ((1 << nb) <= levels) ++nb;
  return nb;
}

// Scratch memory owned by one call (one thread's share of the work).
template <typename U>
struct Scratch {
  U* ptr;
  explicit Scratch(int64_t n) : ptr(new U[n > 0 ? n : 1]) {}
  ~Scratch() { delete[] ptr; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---------------------------------------------------------------------------
// Sign packing: bit i = (x[i] * sc[i] + bi[i] > thr[i]) (sc == nullptr: x > thr)
// ---------------------------------------------------------------------------
template <typename T>
inline void pack_row_scalar(const T* x, const T* thr, const T* sc,
                            const T* bi, int64_t n, uint64_t* out) {
  const int64_t nw = words_for(n);
  for (int64_t w = 0; w < nw; ++w) out[w] = 0;
  for (int64_t i = 0; i < n; ++i) {
    T v = x[i];
    if (sc != nullptr) {
      v = v * sc[i];
      v = v + bi[i];
    }
    if (v > thr[i]) out[i >> 6] |= uint64_t(1) << (i & 63);
  }
}

#if MMBHVIT_VPOPCNT
inline void pack_row(const float* x, const float* thr, const float* sc,
                     const float* bi, int64_t n, uint64_t* out) {
  const int64_t nw = words_for(n);
  for (int64_t w = 0; w < nw; ++w) out[w] = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 m =
        left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    if (sc != nullptr) {
      v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, sc + i));
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bi + i));
    }
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(
        m, v, _mm512_maskz_loadu_ps(m, thr + i), _CMP_GT_OQ);
    out[i >> 6] |= uint64_t(gt) << (i & 63);
  }
}
inline void pack_row(const double* x, const double* thr, const double* sc,
                     const double* bi, int64_t n, uint64_t* out) {
  const int64_t nw = words_for(n);
  for (int64_t w = 0; w < nw; ++w) out[w] = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t left = n - i;
    const __mmask8 m =
        left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1u);
    __m512d v = _mm512_maskz_loadu_pd(m, x + i);
    if (sc != nullptr) {
      v = _mm512_mul_pd(v, _mm512_maskz_loadu_pd(m, sc + i));
      v = _mm512_add_pd(v, _mm512_maskz_loadu_pd(m, bi + i));
    }
    const __mmask8 gt = _mm512_mask_cmp_pd_mask(
        m, v, _mm512_maskz_loadu_pd(m, thr + i), _CMP_GT_OQ);
    out[i >> 6] |= uint64_t(gt) << (i & 63);
  }
}
#elif MMBHVIT_AVX2
inline void pack_row(const float* x, const float* thr, const float* sc,
                     const float* bi, int64_t n, uint64_t* out) {
  const int64_t nw = words_for(n);
  for (int64_t w = 0; w < nw; ++w) out[w] = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (sc != nullptr) {
      v = _mm256_mul_ps(v, _mm256_loadu_ps(sc + i));
      v = _mm256_add_ps(v, _mm256_loadu_ps(bi + i));
    }
    const int m = _mm256_movemask_ps(
        _mm256_cmp_ps(v, _mm256_loadu_ps(thr + i), _CMP_GT_OQ));
    out[i >> 6] |= uint64_t(unsigned(m)) << (i & 63);
  }
  for (; i < n; ++i) {
    float v = x[i];
    if (sc != nullptr) {
      v = v * sc[i];
      v = v + bi[i];
    }
    if (v > thr[i]) out[i >> 6] |= uint64_t(1) << (i & 63);
  }
}
inline void pack_row(const double* x, const double* thr, const double* sc,
                     const double* bi, int64_t n, uint64_t* out) {
  const int64_t nw = words_for(n);
  for (int64_t w = 0; w < nw; ++w) out[w] = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256d v = _mm256_loadu_pd(x + i);
    if (sc != nullptr) {
      v = _mm256_mul_pd(v, _mm256_loadu_pd(sc + i));
      v = _mm256_add_pd(v, _mm256_loadu_pd(bi + i));
    }
    const int m = _mm256_movemask_pd(
        _mm256_cmp_pd(v, _mm256_loadu_pd(thr + i), _CMP_GT_OQ));
    out[i >> 6] |= uint64_t(unsigned(m)) << (i & 63);
  }
  for (; i < n; ++i) {
    double v = x[i];
    if (sc != nullptr) {
      v = v * sc[i];
      v = v + bi[i];
    }
    if (v > thr[i]) out[i >> 6] |= uint64_t(1) << (i & 63);
  }
}
#else
template <typename T>
inline void pack_row(const T* x, const T* thr, const T* sc, const T* bi,
                     int64_t n, uint64_t* out) {
  pack_row_scalar(x, thr, sc, bi, n, out);
}
#endif

#if MMBHVIT_AVX2
// Bit counts of the 32 bytes of v (nibble lookup table, vpshufb).
inline __m256i popcount_bytes(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3,
                                         2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3,
                                         1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo),
                         _mm256_shuffle_epi8(table, hi));
}
#endif

// ---------------------------------------------------------------------------
// acc[k][o] = sum_w popcount(xb[k][w] ^ wt[w][o]) for NK rows and all o
// (cp = padded output count, a multiple of 8).
// ---------------------------------------------------------------------------
template <int NK>
inline void xor_popcount_rows(const uint64_t* xb, int64_t words,
                              const uint64_t* wt, int64_t cp, int32_t* acc) {
#if MMBHVIT_VPOPCNT
  for (int64_t o = 0; o < cp; o += 8) {
    __m512i s[NK];
    for (int k = 0; k < NK; ++k) s[k] = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; ++w) {
      const __m512i wv = _mm512_loadu_si512(wt + w * cp + o);
      for (int k = 0; k < NK; ++k) {
        const __m512i xv =
            _mm512_set1_epi64(static_cast<long long>(xb[k * words + w]));
        s[k] = _mm512_add_epi64(
            s[k], _mm512_popcnt_epi64(_mm512_xor_si512(wv, xv)));
      }
    }
    for (int k = 0; k < NK; ++k)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + k * cp + o),
                          _mm512_cvtepi64_epi32(s[k]));
  }
#elif MMBHVIT_AVX2
  // 4 outputs per register; byte counts add up for at most 31 words (8 * 31
  // < 256) before they are summed into 64-bit lanes (vpsadbw)
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t o = 0; o < cp; o += 4) {
    __m256i total[NK], part[NK];
    for (int k = 0; k < NK; ++k) total[k] = part[k] = zero;
    int fill = 0;
    for (int64_t w = 0; w < words; ++w) {
      const __m256i wv = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(wt + w * cp + o));
      for (int k = 0; k < NK; ++k) {
        const __m256i xv =
            _mm256_set1_epi64x(static_cast<long long>(xb[k * words + w]));
        part[k] = _mm256_add_epi8(
            part[k], popcount_bytes(_mm256_xor_si256(wv, xv)));
      }
      if (++fill == 31) {
        for (int k = 0; k < NK; ++k) {
          total[k] = _mm256_add_epi64(total[k], _mm256_sad_epu8(part[k], zero));
          part[k] = zero;
        }
        fill = 0;
      }
    }
    for (int k = 0; k < NK; ++k) {
      total[k] = _mm256_add_epi64(total[k], _mm256_sad_epu8(part[k], zero));
      alignas(32) int64_t lanes[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total[k]);
      for (int j = 0; j < 4; ++j) acc[k * cp + o + j] = int32_t(lanes[j]);
    }
  }
#else
  for (int k = 0; k < NK; ++k)
    for (int64_t o = 0; o < cp; ++o) acc[k * cp + o] = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t* wrow = wt + w * cp;
    for (int k = 0; k < NK; ++k) {
      const uint64_t xw = xb[k * words + w];
      int32_t* a = acc + k * cp;
      for (int64_t o = 0; o < cp; ++o) a[o] += popc(xw ^ wrow[o]);
    }
  }
#endif
}

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

// One token of a binary projection, in one pass over the outputs:
// y = prelu(D a + b + shortcut, slope) * ps + pb (+ res), D = cin - 2 pc.
// Operation order (one rounding each) as in the PyTorch fallback.
// (kSc, kRes: compile-time, so the loop has no conditional load and
// vectorizes on every instruction set, the PReLU as a blend.)
template <typename T, bool kSc, bool kRes>
inline void proj_pass(const int32_t* __restrict pc, int64_t cin, int64_t o0,
                      int64_t n, const T* __restrict sc, const T* __restrict a,
                      const T* __restrict b, const T* __restrict slope,
                      const T* __restrict ps, const T* __restrict pb,
                      const T* __restrict res, T* __restrict y) {
  const int32_t n_in = int32_t(cin);  // int32 -> float vectorizes anywhere
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = o0 + i;
    T v = T(n_in - 2 * pc[o]) * a[o];
    v = v + b[o];
    if (kSc) v = v + sc[i];
    const T neg = v * slope[o];
    v = v > T(0) ? v : neg;
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

}  // namespace

// ---------------------------------------------------------------------------
// Binary 1x1 projection with residual shortcut (BinaryResidualProj)
// ---------------------------------------------------------------------------
namespace {

constexpr int kTokens = 4;  // tokens sharing each weight load

inline void popcount_tile(int nk, const uint64_t* bits, int64_t words,
                          const uint64_t* wt, int64_t cp, int32_t* acc) {
  switch (nk) {
    case 4: xor_popcount_rows<4>(bits, words, wt, cp, acc); break;
    case 3: xor_popcount_rows<3>(bits, words, wt, cp, acc); break;
    case 2: xor_popcount_rows<2>(bits, words, wt, cp, acc); break;
    default: xor_popcount_rows<1>(bits, words, wt, cp, acc); break;
  }
}

}  // namespace

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
    popcount_tile(nk, bits.ptr, W, p.wt, CP, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      const int64_t t = t0 + k;
      proj_token(acc.ptr + k * CP, p.x + t * cin, cin, cout, p.a, p.b,
                 p.slope, p.post_scale, p.post_bias, p.shortcut,
                 p.residual != nullptr ? p.residual + t * cout : nullptr,
                 tmp.ptr, p.y + t * cout);
    }
  }
}

// ---------------------------------------------------------------------------
// Binary MLP: expand (tile shortcut) then reduce (group-mean shortcut) per
// tile of tokens, the hidden activations never leaving the cache
// ---------------------------------------------------------------------------
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
    popcount_tile(nk, bits.ptr, e.words, e.wt, e.cout_pad, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      T* hk = hidden.ptr + k * hid;
      proj_token(acc.ptr + k * e.cout_pad, e.x + (t0 + k) * c, c, hid, e.a,
                 e.b, e.slope, e.post_scale, e.post_bias, e.shortcut,
                 static_cast<const T*>(nullptr), tmp.ptr, hk);
      pack_row(hk, r.thr, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), hid, bits.ptr + k * r.words);
    }
    popcount_tile(nk, bits.ptr, r.words, r.wt, r.cout_pad, acc.ptr);
    for (int k = 0; k < nk; ++k) {
      const int64_t t = t0 + k;
      proj_token(acc.ptr + k * r.cout_pad, hidden.ptr + k * hid, hid, c, r.a,
                 r.b, r.slope, r.post_scale, r.post_bias, r.shortcut,
                 r.residual != nullptr ? r.residual + t * c : nullptr,
                 tmp.ptr, r.y + t * c);
    }
  }
}

// ---------------------------------------------------------------------------
// Sign bits of a channels-last map, per channel group
// ---------------------------------------------------------------------------
template <typename T>
void pack(const PackParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const T* x = p.x + i * p.c;
    uint64_t* out = p.bits + i * p.groups * p.wg;
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t c0 = g * p.cg;
      pack_row(x + c0, p.thr + c0,
               p.in_scale != nullptr ? p.in_scale + c0 : nullptr,
               p.in_bias != nullptr ? p.in_bias + c0 : nullptr, p.cg,
               out + g * p.wg);
    }
  }
}

// ---------------------------------------------------------------------------
// MSGDC: three (ndil) binary grouped dilated 3x3 convolutions
// ---------------------------------------------------------------------------
// Whether the lane path runs for this group width and channel count.
bool msgdc_lanes(int lane_bits, int64_t c) {
#if MMBHVIT_VPOPCNT || MMBHVIT_AVX2
  return (lane_bits == 16 || lane_bits == 32) && c % 4 == 0 &&
         c / 4 == lane_bits && 512 % c == 0;
#else
  (void)lane_bits;
  (void)c;
  return false;
#endif
}

// item = pixel: dense sign bits of the pixel, then per 512-bit block v the
// input lanes of outputs v * 512/cg + j: lane j holds the cg bits of the
// group of that output. A 64-bit word holds 64/cg lanes of one group, so it
// is the group's bits repeated.
template <typename T>
void msgdc_expand(const ExpandParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, cg = p.cg, nl = 512 / cg, nvec = p.nvec;
  const int64_t groups = C / cg;
  if (cg != 16 && cg != 32) return;  // not a lane-path shape
  const uint64_t repeat = cg == 16 ? 0x0001000100010001ull
                                   : 0x0000000100000001ull;
  const uint64_t mask = (uint64_t(1) << cg) - 1;
  uint64_t dense[8];
  for (int64_t pix = begin; pix < end; ++pix) {
    pack_row(p.x + pix * C, p.thr, p.in_scale, p.in_bias, C, dense);
    uint64_t* out = p.expanded + pix * nvec * 8;
    for (int64_t v = 0; v < nvec; ++v) {
      for (int64_t wi = 0; wi < 8; ++wi) {
        int64_t g = (v * nl + wi * (64 / cg)) / cg;
        g = g < groups ? g : groups - 1;
        const uint64_t chunk = (dense[(g * cg) >> 6] >> ((g * cg) & 63)) & mask;
        out[v * 8 + wi] = chunk * repeat;
      }
    }
  }
}

template <typename T>
void msgdc(const MsgdcParams<T>& p, int64_t begin, int64_t end) {
  const int64_t H = p.h, Wd = p.w, C = p.c, G = p.groups, cg = p.cg,
                wg = p.wg, CP = p.cout_pad;
  const int64_t pix_words = G * wg;
  Scratch<int32_t> acc(CP > 512 ? CP : 512);
  Scratch<T> sum(C);
  const bool lanes = p.lane_bits != 0;
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / (H * Wd), yx = pix % (H * Wd);
    const int64_t y = yx / Wd, x = yx % Wd;
    for (int di = 0; di < p.ndil; ++di) {
      const int64_t d = p.dil[di];
      const uint64_t* taps[9];
      int tap_id[9];
      int nv = 0;
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t yy = y + (ky - 1) * d;
        if (yy < 0 || yy >= H) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t xx = x + (kx - 1) * d;
          if (xx < 0 || xx >= Wd) continue;
          const int64_t q = (n * H + yy) * Wd + xx;
          taps[nv] = lanes ? p.expanded + q * p.nvec * 8
                           : p.bits + q * pix_words;
          tap_id[nv] = ky * 3 + kx;
          ++nv;
        }
      }
      const uint64_t* wt = p.wt[di];
#if MMBHVIT_VPOPCNT
      if (lanes) {
        const uint64_t* wx = p.wx[di];
        for (int64_t v = 0; v < p.nvec; ++v) {
          __m512i s = _mm512_setzero_si512();
          for (int t = 0; t < nv; ++t) {
            const __m512i xv = _mm512_loadu_si512(taps[t] + v * 8);
            const __m512i wv =
                _mm512_loadu_si512(wx + (tap_id[t] * p.nvec + v) * 8);
            const __m512i x_w = _mm512_xor_si512(xv, wv);
            s = cg == 16 ? _mm512_add_epi16(s, _mm512_popcnt_epi16(x_w))
                         : _mm512_add_epi32(s, _mm512_popcnt_epi32(x_w));
          }
          int32_t* a = acc.ptr + v * (512 / cg);
          if (cg == 16) {
            _mm512_storeu_si512(a, _mm512_cvtepu16_epi32(
                                       _mm512_castsi512_si256(s)));
            _mm512_storeu_si512(a + 16, _mm512_cvtepu16_epi32(
                                            _mm512_extracti64x4_epi64(s, 1)));
          } else {
            _mm512_storeu_si512(a, s);
          }
        }
      } else if (cg % 8 == 0) {
        for (int64_t o = 0; o < C; o += 8) {
          const int64_t g = o / cg;
          __m512i s = _mm512_setzero_si512();
          for (int v = 0; v < nv; ++v) {
            const uint64_t* xb = taps[v] + g * wg;
            const uint64_t* wrow = wt + tap_id[v] * wg * CP + o;
            for (int64_t w = 0; w < wg; ++w) {
              const __m512i xv =
                  _mm512_set1_epi64(static_cast<long long>(xb[w]));
              const __m512i wv = _mm512_loadu_si512(wrow + w * CP);
              s = _mm512_add_epi64(
                  s, _mm512_popcnt_epi64(_mm512_xor_si512(wv, xv)));
            }
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc.ptr + o),
                              _mm512_cvtepi64_epi32(s));
        }
      } else
#elif MMBHVIT_AVX2
      if (lanes) {
        // 256-bit halves u of the 512-bit blocks: lane j <-> output
        // u * 256/cg + j; per-lane counts from byte counts (maddubs/madd)
        const uint64_t* wx = p.wx[di];
        const __m256i ones8 = _mm256_set1_epi8(1);
        const __m256i ones16 = _mm256_set1_epi16(1);
        for (int64_t u = 0; u < 2 * p.nvec; ++u) {
          __m256i s = _mm256_setzero_si256();
          for (int t = 0; t < nv; ++t) {
            const __m256i xv = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(taps[t] + u * 4));
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<
                const __m256i*>(wx + tap_id[t] * p.nvec * 8 + u * 4));
            const __m256i pairs = _mm256_maddubs_epi16(
                popcount_bytes(_mm256_xor_si256(xv, wv)), ones8);
            s = cg == 16 ? _mm256_add_epi16(s, pairs)
                         : _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones16));
          }
          if (cg == 16) {
            int32_t* a = acc.ptr + u * 16;
            _mm256_storeu_si256(
                reinterpret_cast<__m256i*>(a),
                _mm256_cvtepu16_epi32(_mm256_castsi256_si128(s)));
            _mm256_storeu_si256(
                reinterpret_cast<__m256i*>(a + 8),
                _mm256_cvtepu16_epi32(_mm256_extracti128_si256(s, 1)));
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc.ptr + u * 8),
                                s);
          }
        }
      } else
#endif
      {
        for (int64_t o = 0; o < C; ++o) acc.ptr[o] = 0;
        for (int v = 0; v < nv; ++v) {
          const uint64_t* wtap = wt + tap_id[v] * wg * CP;
          for (int64_t g = 0; g < G; ++g) {
            const uint64_t* xb = taps[v] + g * wg;
            for (int64_t w = 0; w < wg; ++w) {
              const uint64_t xw = xb[w];
              const uint64_t* wrow = wtap + w * CP + g * cg;
              int32_t* a = acc.ptr + g * cg;
              for (int64_t o = 0; o < cg; ++o) a[o] += popc(xw ^ wrow[o]);
            }
          }
        }
      }
      const T* __restrict a = p.a[di];
      const T* __restrict b = p.b[di];
      const T* __restrict sl = p.slope[di];
      const int32_t* __restrict ac = acc.ptr;
      T* __restrict sm = sum.ptr;
      const int32_t full = int32_t(nv * cg);
      if (di == 0) {
        for (int64_t o = 0; o < C; ++o) {
          T z = T(full - 2 * ac[o]) * a[o];
          z = z + b[o];
          const T neg = z * sl[o];
          sm[o] = z > T(0) ? z : neg;
        }
      } else {
        for (int64_t o = 0; o < C; ++o) {
          T z = T(full - 2 * ac[o]) * a[o];
          z = z + b[o];
          const T neg = z * sl[o];
          z = z > T(0) ? z : neg;
          sm[o] = sm[o] + z;
        }
      }
    }
    const T* __restrict xin = p.x + pix * C;
    T* __restrict h = p.h_out + pix * C;
    T* __restrict hn = p.hn_out + pix * C;
    const T* __restrict os = p.out_scale;
    const T* __restrict ob = p.out_bias;
    const T* __restrict n2s = p.n2_scale;
    const T* __restrict n2b = p.n2_bias;
    const T* __restrict sm = sum.ptr;
    for (int64_t o = 0; o < C; ++o) {
      T t = sm[o] * os[o];
      t = t + ob[o];
      const T hv = xin[o] + t;
      h[o] = hv;
      T u = hv * n2s[o];
      hn[o] = u + n2b[o];
    }
  }
}

// ---------------------------------------------------------------------------
// Binary 2x2 stride-2 patch merging
// ---------------------------------------------------------------------------
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
#if MMBHVIT_VPOPCNT
    for (int64_t o = 0; o < CP; o += 8) {
      __m512i s = _mm512_setzero_si512();
      for (int tap = 0; tap < 4; ++tap) {
        const uint64_t* xb = p.bits + pix[tap] * W;
        const uint64_t* wrow = p.wt + tap * W * CP + o;
        for (int64_t w = 0; w < W; ++w) {
          const __m512i xv = _mm512_set1_epi64(static_cast<long long>(xb[w]));
          s = _mm512_add_epi64(
              s, _mm512_popcnt_epi64(
                     _mm512_xor_si512(_mm512_loadu_si512(wrow + w * CP), xv)));
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc.ptr + o),
                          _mm512_cvtepi64_epi32(s));
    }
#else
    for (int64_t o = 0; o < CP; ++o) acc.ptr[o] = 0;
    for (int tap = 0; tap < 4; ++tap) {
      const uint64_t* xb = p.bits + pix[tap] * W;
      for (int64_t w = 0; w < W; ++w) {
        const uint64_t xw = xb[w];
        const uint64_t* wrow = p.wt + (tap * W + w) * CP;
        for (int64_t o = 0; o < CP; ++o) acc.ptr[o] += popc(xw ^ wrow[o]);
      }
    }
#endif
    const T* __restrict x00 = p.x + pix[0] * cin;
    const T* __restrict x01 = p.x + pix[1] * cin;
    const T* __restrict x10 = p.x + pix[2] * cin;
    const T* __restrict x11 = p.x + pix[3] * cin;
    T* __restrict avg_out = avg.ptr;
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
      for (int64_t i = 0; i < cin; ++i) {
        const int64_t o = r0 + i;
        T z = T(full - 2 * ac[o]) * pa[o];
        z = z + pb[o];
        z = z + av[i];
        const T neg = z * sl[o];
        z = z > T(0) ? z : neg;
        z = z + pbias[o];
        yo[o] = z + pos[o];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Attention: sign packing per head
// ---------------------------------------------------------------------------
// q: item = token (b, i) -> bits (b, heads, t, wd)
template <typename T>
void head_pack(const HeadPackParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.t, i = item % p.t;
    const T* x = p.x + item * p.c;
    for (int64_t h = 0; h < p.heads; ++h)
      pack_row(x + h * p.d, p.thr + h * p.d, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), p.d,
               p.bits + ((b * p.heads + h) * p.t + i) * p.wd);
  }
}

// k: item = token (b, i) -> words (b, heads, wd, t_pad) (token innermost)
template <typename T>
void head_pack_t(const HeadPackParams<T>& p, int64_t begin, int64_t end) {
  uint64_t tmp[64];
  Scratch<uint64_t> big(p.wd > 64 ? p.wd : 1);
  uint64_t* buf = p.wd > 64 ? big.ptr : tmp;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.t, i = item % p.t;
    const T* x = p.x + item * p.c;
    for (int64_t h = 0; h < p.heads; ++h) {
      pack_row(x + h * p.d, p.thr + h * p.d, static_cast<const T*>(nullptr),
               static_cast<const T*>(nullptr), p.d, buf);
      uint64_t* dst = p.bits + (b * p.heads + h) * p.wd * p.t_pad + i;
      for (int64_t w = 0; w < p.wd; ++w) dst[w * p.t_pad] = buf[w];
    }
  }
}

// v: item = (b, head) -> bits along tokens (b, heads, tw, d)
namespace {

// Sign bits of x[j, c] > thr[c] along j: dst[w][c] bit j % 64 (w = j / 64).
template <typename T>
inline void token_bits(const T* x, int64_t stride, const T* thr, int64_t t,
                       int64_t d, uint64_t* dst) {
  const int64_t tw = words_for(t);
  for (int64_t k = 0; k < tw * d; ++k) dst[k] = 0;
  for (int64_t j = 0; j < t; ++j) {
    const T* xj = x + j * stride;
    uint64_t* row = dst + (j >> 6) * d;
    const uint64_t bit = uint64_t(1) << (j & 63);
    for (int64_t c = 0; c < d; ++c)
      if (xj[c] > thr[c]) row[c] |= bit;
  }
}

#if MMBHVIT_VPOPCNT
inline void token_bits(const float* x, int64_t stride, const float* thr,
                       int64_t t, int64_t d, uint64_t* dst) {
  if (d % 8 != 0) {
    token_bits<float>(x, stride, thr, t, d, dst);
    return;
  }
  for (int64_t w = 0; w * 64 < t; ++w) {
    const int64_t j1 = t < w * 64 + 64 ? t : w * 64 + 64;
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      const __m256 th = _mm256_loadu_ps(thr + c0);
      __m512i acc = _mm512_setzero_si512();
      for (int64_t j = w * 64; j < j1; ++j) {
        const __mmask8 m = _mm256_cmp_ps_mask(
            _mm256_loadu_ps(x + j * stride + c0), th, _CMP_GT_OQ);
        acc = _mm512_mask_or_epi64(
            acc, m, acc,
            _mm512_set1_epi64(static_cast<long long>(uint64_t(1) << (j & 63))));
      }
      _mm512_storeu_si512(dst + w * d + c0, acc);
    }
  }
}
#endif

}  // namespace

template <typename T>
void token_pack(const HeadPackParams<T>& p, int64_t begin, int64_t end) {
  const int64_t tw = words_for(p.t);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.heads, h = item % p.heads;
    token_bits(p.x + b * p.t * p.c + h * p.d, p.c, p.thr + h * p.d, p.t, p.d,
               p.bits + item * tw * p.d);
  }
}

// ---------------------------------------------------------------------------
// Attention scores: item = query row (b, head, i)
// ---------------------------------------------------------------------------
template <typename T>
void scores(const ScoreParams<T>& p, int64_t begin, int64_t end) {
  Scratch<int32_t> acc(p.t_pad);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / p.t;
    const uint64_t* q = p.qbits + item * p.wd;
    const uint64_t* kt = p.kbits + bh * p.wd * p.t_pad;
    xor_popcount_rows<1>(q, p.wd, kt, p.t_pad, acc.ptr);
    T* s = p.s + item * p.t;
    const int32_t d = int32_t(p.d);
    for (int64_t j = 0; j < p.t; ++j) s[j] = T(d - 2 * acc.ptr[j]) * p.scale;
  }
}

// ---------------------------------------------------------------------------
// Attention context with bit-plane attention maps: item = row (b, head, i)
// ---------------------------------------------------------------------------
namespace {

inline void set_bits(uint64_t* plane, int64_t j, uint64_t mask16) {
  plane[j >> 6] |= mask16 << (j & 63);
}

// LSQ: level_j = clamp(round(p_j * L / step + zero), 0, L), bit planes of it.
template <typename T>
inline void lsq_planes(const T* p, int64_t t, int levels, T step, T zero,
                       int nplanes, int64_t tw, uint64_t* planes) {
  const T lv_max = T(levels);
  for (int64_t j = 0; j < t; ++j) {
    T u = p[j] * lv_max;
    u = u / step;
    u = u + zero;
    T r = round_even(u);
    r = r < T(0) ? T(0) : (r > lv_max ? lv_max : r);
    const int lv = int(r);
    for (int pl = 0; pl < nplanes; ++pl)
      if ((lv >> pl) & 1) planes[pl * tw + (j >> 6)] |= uint64_t(1) << (j & 63);
  }
}

// GSB: planes T0+ (T0 = 1), T0- (T0 = -1), T1, T2 of q = p / alpha.
template <typename T>
inline void gsb_planes(const T* p, int64_t t, T alpha, T low, T high,
                       int64_t tw, uint64_t* planes) {
  T m = T(0);
  for (int64_t j = 0; j < t; ++j) {
    const T q = p[j] / alpha;
    if (j == 0 || q > m) m = q;
  }
  const T hi = high * m, lo = low * m;
  for (int64_t j = 0; j < t; ++j) {
    const T q = p[j] / alpha;
    T r = round_even(q);
    r = r < T(0) ? T(0) : (r > T(1) ? T(1) : r);
    const int above_low = q > lo, above_high = q > hi;
    const int base = int(r) - above_low;  // -1, 0 or 1
    const uint64_t bit = uint64_t(1) << (j & 63);
    const int64_t w = j >> 6;
    if (base > 0) planes[0 * tw + w] |= bit;
    if (base < 0) planes[1 * tw + w] |= bit;
    if (above_low && !above_high) planes[2 * tw + w] |= bit;
    if (above_high) planes[3 * tw + w] |= bit;
  }
}

#if MMBHVIT_VPOPCNT
inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

inline void lsq_planes(const float* p, int64_t t, int levels, float step,
                       float zero, int nplanes, int64_t tw, uint64_t* planes) {
  const __m512 lv_max = _mm512_set1_ps(float(levels));
  const __m512 vstep = _mm512_set1_ps(step), vzero = _mm512_set1_ps(zero);
  for (int64_t j = 0; j < t; j += 16) {
    const __mmask16 m = tail16(t - j);
    __m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), lv_max);
    u = _mm512_div_ps(u, vstep);
    u = _mm512_add_ps(u, vzero);
    __m512 r = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT |
                                           _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), lv_max);
    const __m512i lv = _mm512_cvttps_epi32(r);
    for (int pl = 0; pl < nplanes; ++pl) {
      const __mmask16 bits = _mm512_mask_test_epi32_mask(
          m, lv, _mm512_set1_epi32(1 << pl));
      set_bits(planes + pl * tw, j, bits);
    }
  }
}

inline void gsb_planes(const float* p, int64_t t, float alpha, float low,
                       float high, int64_t tw, uint64_t* planes) {
  const __m512 va = _mm512_set1_ps(alpha);
  __m512 vm = _mm512_set1_ps(0.f);
  bool first = true;
  for (int64_t j = 0; j < t; j += 16) {
    const __mmask16 m = tail16(t - j);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + j), va);
    if (first) {  // masked-off lanes keep the first valid value
      vm = _mm512_mask_blend_ps(m, _mm512_set1_ps(q[0]), q);
      first = false;
    } else {
      vm = _mm512_mask_max_ps(vm, m, vm, q);
    }
  }
  const float mx = _mm512_reduce_max_ps(vm);
  const __m512 hi = _mm512_set1_ps(high * mx), lo = _mm512_set1_ps(low * mx);
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < t; j += 16) {
    const __mmask16 m = tail16(t - j);
    const __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + j), va);
    const __m512 r = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT |
                                                 _MM_FROUND_NO_EXC);
    const __mmask16 round1 = _mm512_mask_cmp_ps_mask(m, r, one, _CMP_GE_OQ);
    const __mmask16 above_low = _mm512_mask_cmp_ps_mask(m, q, lo, _CMP_GT_OQ);
    const __mmask16 above_high =
        _mm512_mask_cmp_ps_mask(m, q, hi, _CMP_GT_OQ);
    set_bits(planes + 0 * tw, j, round1 & ~above_low);
    set_bits(planes + 1 * tw, j, ~round1 & above_low & m);
    set_bits(planes + 2 * tw, j, above_low & ~above_high);
    set_bits(planes + 3 * tw, j, above_high);
  }
}
#endif

}  // namespace

template <typename T>
void context(const ContextParams<T>& p, int64_t begin, int64_t end) {
  const int64_t tw = p.tw, d = p.d, t = p.t;
  const int nplanes = p.mode == kGSB ? 4 : bit_planes(p.levels);
  Scratch<uint64_t> planes(int64_t(nplanes) * tw);
  Scratch<int32_t> sums(int64_t(nplanes) * d);
  Scratch<T> ctx(d);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / t, i = item % t;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* prow = p.p + item * t;
    for (int64_t k = 0; k < nplanes * tw; ++k) planes.ptr[k] = 0;
    if (p.mode == kLSQ)
      lsq_planes(prow, t, p.levels, p.step[h], p.zero[h], nplanes, tw,
                 planes.ptr);
    else
      gsb_planes(prow, t, p.g_alpha, p.g_low, p.g_high, tw, planes.ptr);
    // sums[pl][c] = sum_j v_cj * plane_pl[j] = 2 popcount(vb & pl) - |pl|
    const uint64_t* vb = p.vbits + bh * tw * d;
    for (int pl = 0; pl < nplanes; ++pl) {
      const uint64_t* plane = planes.ptr + pl * tw;
      int32_t* s = sums.ptr + pl * d;
      int32_t count = 0;
      for (int64_t w = 0; w < tw; ++w) count += popc(plane[w]);
      int64_t c0 = 0;
#if MMBHVIT_VPOPCNT
      const __m512i vcount = _mm512_set1_epi64(count);
      for (; c0 + 8 <= d; c0 += 8) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t w = 0; w < tw; ++w) {
          const __m512i pv = _mm512_set1_epi64(static_cast<long long>(plane[w]));
          acc = _mm512_add_epi64(
              acc, _mm512_popcnt_epi64(_mm512_and_si512(
                       _mm512_loadu_si512(vb + w * d + c0), pv)));
        }
        acc = _mm512_sub_epi64(_mm512_add_epi64(acc, acc), vcount);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + c0),
                            _mm512_cvtepi64_epi32(acc));
      }
#endif
      for (int64_t c = c0; c < d; ++c) {
        int32_t a = 0;
        for (int64_t w = 0; w < tw; ++w) a += popc(vb[w * d + c] & plane[w]);
        s[c] = 2 * a - count;
      }
    }
    T* cx = ctx.ptr;
    if (p.mode == kLSQ) {
      const T step = p.step[h];
      const int32_t* s0 = sums.ptr;
      if (nplanes == 2) {  // the usual 4 levels: one fused pass
        const int32_t* s1 = sums.ptr + d;
        for (int64_t c = 0; c < d; ++c) cx[c] = T(s0[c] + 2 * s1[c]) * step;
      } else {
        for (int64_t c = 0; c < d; ++c) {
          int32_t lv = 0;
          for (int pl = 0; pl < nplanes; ++pl) lv += sums.ptr[pl * d + c] * (1 << pl);
          cx[c] = T(lv) * step;
        }
      }
    } else {
      const int32_t* sp = sums.ptr;
      const int32_t* sn = sums.ptr + d;
      const int32_t* s1 = sums.ptr + 2 * d;
      const int32_t* s2 = sums.ptr + 3 * d;
      const T b1 = p.g_b1, b2 = p.g_b2, a = p.g_a;
      for (int64_t c = 0; c < d; ++c) {
        T v = T(sp[c] - sn[c]);
        v = v + b1 * T(s1[c]);
        v = v + b2 * T(s2[c]);
        cx[c] = v * a;
      }
    }
    const int64_t tok = (b * t + i) * p.c + h * d;
    const T* __restrict qv = p.q + tok;
    const T* __restrict kv = p.k + tok;
    const T* __restrict vv = p.v + tok;
    const T* __restrict ca = p.ctx_a + h * d;
    const T* __restrict cb = p.ctx_b + h * d;
    const T* __restrict sl = p.slope + h * d;
    const T* __restrict pb = p.post_bias + h * d;
    T* __restrict out = p.out + tok;
    for (int64_t c = 0; c < d; ++c) {
      T z = cx[c] * ca[c];
      z = z + cb[c];
      z = z + qv[c];
      z = z + kv[c];
      z = z + vv[c];
      const T neg = z * sl[c];
      z = z > T(0) ? z : neg;
      out[c] = z + pb[c];
    }
  }
}

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

// ---------------------------------------------------------------------------
// MSMHA token layout (float data movement, pooling, channel mixing)
// ---------------------------------------------------------------------------
// item = (n, pooled cell)
template <typename T>
void merged_tokens(const TokensParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, s = p.s, hp = p.nh * s, wp = p.nw * s;
  const int64_t cells = p.nh * p.nw, half = s / 2;
  Scratch<T> mx(C), sum(C);
  const T* __restrict sc = p.scale;
  const T* __restrict bi = p.bias;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / cells, cell = item % cells;
    const int64_t y0 = (cell / p.nw) * s - half, x0 = (cell % p.nw) * s - half;
    T* __restrict m = mx.ptr;
    T* __restrict su = sum.ptr;
    bool first = true;
    for (int64_t y = y0 < 0 ? 0 : y0; y < y0 + s && y < hp; ++y) {
      for (int64_t x = x0 < 0 ? 0 : x0; x < x0 + s && x < wp; ++x) {
        if (y < p.h && x < p.w) {  // norm1(x); beyond: the zero padding
          const T* __restrict v = p.x + ((n * p.h + y) * p.w + x) * C;
          for (int64_t c = 0; c < C; ++c) {
            T u = v[c] * sc[c];
            u = u + bi[c];
            m[c] = first || u > m[c] ? u : m[c];
            su[c] = first ? u : su[c] + u;
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            m[c] = first || T(0) > m[c] ? T(0) : m[c];
            su[c] = first ? T(0) : su[c] + T(0);
          }
        }
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

#define MMBHVIT_INSTANTIATE(T)                                              \
  template void proj<T>(const ProjParams<T>&, int64_t, int64_t);            \
  template void ffn<T>(const FfnParams<T>&, int64_t, int64_t);              \
  template void pack<T>(const PackParams<T>&, int64_t, int64_t);            \
  template void msgdc<T>(const MsgdcParams<T>&, int64_t, int64_t);          \
  template void msgdc_expand<T>(const ExpandParams<T>&, int64_t, int64_t);  \
  template void merge<T>(const MergeParams<T>&, int64_t, int64_t);          \
  template void head_pack<T>(const HeadPackParams<T>&, int64_t, int64_t);   \
  template void head_pack_t<T>(const HeadPackParams<T>&, int64_t, int64_t); \
  template void token_pack<T>(const HeadPackParams<T>&, int64_t, int64_t);  \
  template void scores<T>(const ScoreParams<T>&, int64_t, int64_t);         \
  template void context<T>(const ContextParams<T>&, int64_t, int64_t);      \
  template void shift<T>(const ShiftParams<T>&, int64_t, int64_t);          \
  template void merged_tokens<T>(const TokensParams<T>&, int64_t, int64_t); \
  template void window_tokens<T>(const TokensParams<T>&, int64_t, int64_t); \
  template void merged_means<T>(const UntokensParams<T>&, int64_t,          \
                                int64_t);                                   \
  template void untokens<T>(const UntokensParams<T>&, int64_t, int64_t);

MMBHVIT_INSTANTIATE(float)
MMBHVIT_INSTANTIATE(double)
#undef MMBHVIT_INSTANTIATE

}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
