// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// MSGDC: up to four binary grouped dilated 3x3 convolutions sharing one
// packed input, each with its PReLU, summed, plus the block's residual and
// the next norm. Padded taps are simply not visited.
#pragma once

#include <cstdint>

#include "../output_transform.h"
#include "../popcount_core.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// Sign bits of a channels-last map, per channel group.
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

// Whether the lane path runs for this group width and channel count.
bool msgdc_lanes(int lane_bits, int64_t c) {
  return kHasLanes && (lane_bits == 16 || lane_bits == 32) && c % 4 == 0 &&
         c / 4 == lane_bits && 512 % c == 0;
}

// Words of lane-path input per pixel: the dense group words
// (kDenseLaneInput: one 32-bit word per group, a 16-bit group twice), or
// nvec expanded 512-bit vectors.
inline int64_t lane_input_words(int64_t nvec, int64_t groups) {
  return kDenseLaneInput ? (groups + 1) / 2 : nvec * 8;
}

// item = pixel: dense sign bits of the pixel, then either its group words
// (kDenseLaneInput) or, per 512-bit block v, the input lanes of outputs
// v * 512/cg + j: lane j holds the cg bits of the group of that output. A
// 64-bit word holds 64/cg lanes of one group, so it is the group's bits
// repeated.
template <typename T>
void msgdc_expand(const ExpandParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.c, cg = p.cg, nl = 512 / cg, nvec = p.nvec;
  const int64_t groups = C / cg;
  if (cg != 16 && cg != 32) return;  // not a lane-path shape
  const uint64_t repeat = cg == 16 ? 0x0001000100010001ull
                                   : 0x0000000100000001ull;
  const uint64_t mask = (uint64_t(1) << cg) - 1;
  if (kDenseLaneInput) {
    uint64_t dense[8];
    const int64_t nw = lane_input_words(nvec, groups);
    for (int64_t pix = begin; pix < end; ++pix) {
      pack_row(p.x + pix * C, p.thr, p.in_scale, p.in_bias, C, dense);
      uint64_t* out = p.expanded + pix * nw;
      for (int64_t k = 0; k < nw; ++k) out[k] = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t sh = g * cg;
        // a 32-bit word: the group's bits once (cg = 32) or twice (16)
        const uint64_t word =
            (((dense[sh >> 6] >> (sh & 63)) & mask) * repeat) & 0xffffffffull;
        out[g >> 1] |= word << (32 * (g & 1));
      }
    }
    return;
  }
  // bit offset (g * cg) of the group of each output word (lane shapes:
  // C = 4 cg <= 128, so nvec = C cg / 512 <= 8)
  int64_t shift[64];
  if (nvec > 8) return;
  for (int64_t v = 0; v < nvec; ++v)
    for (int64_t wi = 0; wi < 8; ++wi) {
      int64_t g = (v * nl + wi * (64 / cg)) / cg;
      g = g < groups ? g : groups - 1;
      shift[v * 8 + wi] = g * cg;
    }
  uint64_t dense[8];
  for (int64_t pix = begin; pix < end; ++pix) {
    pack_row(p.x + pix * C, p.thr, p.in_scale, p.in_bias, C, dense);
    uint64_t* out = p.expanded + pix * nvec * 8;
    for (int64_t k = 0; k < nvec * 8; ++k) {
      const int64_t sh = shift[k];
      out[k] = ((dense[sh >> 6] >> (sh & 63)) & mask) * repeat;
    }
  }
}

// The epilogue of one pixel for three dilations (below): the generic loop,
// or 8 channels per step with the vectors interleaved (AVX2 / AVX-512,
// float; same float operations in the same order).
template <typename T>
struct MsgdcEpilogue {
  explicit MsgdcEpilogue(const MsgdcParams<T>&) {}
  bool fused() const { return false; }
  void run(const int32_t*, int64_t, const int32_t*, const T*, T*, T*) const {}
};

#if MMBHVIT_AVX2 || MMBHVIT_AVX512
template <>
struct MsgdcEpilogue<float> {
  static constexpr int kVectors = 13;  // a, b, slope x 3, out, norm affine
  Scratch<float> v;
  int64_t c;
  bool ok;
  explicit MsgdcEpilogue(const MsgdcParams<float>& p)
      : v(p.ndil == 3 && p.c % 8 == 0 ? kVectors * p.c : 0),
        c(p.c),
        ok(p.ndil == 3 && p.c % 8 == 0) {
    if (!ok) return;
    const float* src[kVectors] = {
        p.a[0],     p.b[0],    p.slope[0], p.a[1],    p.b[1],
        p.slope[1], p.a[2],    p.b[2],     p.slope[2], p.out_scale,
        p.out_bias, p.n2_scale, p.n2_bias};
    for (int64_t o = 0; o < c; o += 8)
      for (int j = 0; j < kVectors; ++j)
        for (int i = 0; i < 8; ++i)
          v.ptr[kVectors * o + 8 * j + i] = src[j][o + i];
  }
  bool fused() const { return ok; }

  // prelu(D a + b) of one dilation; prm: its a, b, slope
  static inline __m256 branch(__m256i count, __m256i full, const float* prm) {
    return binary_prelu8<false>(count, full, prm, prm + 8, nullptr,
                                prm + 16);
  }

  // acc: the counts of dilation di at acc + di * cs
  void run(const int32_t* acc, int64_t cs, const int32_t* full,
           const float* xin, float* h, float* hn) const {
    const __m256i f0 = _mm256_set1_epi32(full[0]);
    const __m256i f1 = _mm256_set1_epi32(full[1]);
    const __m256i f2 = _mm256_set1_epi32(full[2]);
    const float* prm = v.ptr;
    for (int64_t o = 0; o < c; o += 8, prm += 8 * kVectors) {
      const __m256i* a = reinterpret_cast<const __m256i*>(acc + o);
      __m256 sm = branch(_mm256_loadu_si256(a), f0, prm);
      sm = _mm256_add_ps(
          sm, branch(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                         acc + cs + o)),
                     f1, prm + 24));
      sm = _mm256_add_ps(
          sm, branch(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                         acc + 2 * cs + o)),
                     f2, prm + 48));
      __m256 t = _mm256_mul_ps(sm, _mm256_loadu_ps(prm + 72));
      t = _mm256_add_ps(t, _mm256_loadu_ps(prm + 80));
      const __m256 hv = _mm256_add_ps(_mm256_loadu_ps(xin + o), t);
      _mm256_storeu_ps(h + o, hv);
      const __m256 u = _mm256_mul_ps(hv, _mm256_loadu_ps(prm + 88));
      _mm256_storeu_ps(hn + o, _mm256_add_ps(u, _mm256_loadu_ps(prm + 96)));
    }
  }
};
#endif

template <typename T>
void msgdc(const MsgdcParams<T>& p, int64_t begin, int64_t end) {
  const int64_t H = p.h, Wd = p.w, C = p.c, G = p.groups, cg = p.cg,
                wg = p.wg, CP = p.cout_pad;
  const int64_t pix_words = G * wg;
  // the counts of every dilation (one epilogue pass per pixel), CS apart
  const int64_t CS = CP > 512 ? CP : 512;
  Scratch<int32_t> acc(kMaxDilations * CS);
  const bool lanes = p.lane_bits != 0;
  const int ndil = p.ndil;
  const MsgdcEpilogue<T> epilogue(p);
  const int64_t lane_words = lane_input_words(p.nvec, G);
  // per dilation and tap: its weights, and its input's offset from the
  // pixel's own words (for the taps inside the map)
  const int64_t in_words = lanes ? lane_words : pix_words;
  int64_t tap_off[kMaxDilations][9];
  const uint64_t* tap_w[kMaxDilations][9];
  for (int di = 0; di < ndil; ++di)
    for (int tap = 0; tap < 9; ++tap) {
      const int64_t d = p.dil[di], dy = (tap / 3 - 1) * d,
                    dx = (tap % 3 - 1) * d;
      tap_off[di][tap] = (dy * Wd + dx) * in_words;
      tap_w[di][tap] = lanes ? p.wx[di] + tap * p.nvec * 8
                             : p.wt[di] + tap * wg * CP;
    }
  const uint64_t* in_base = lanes ? p.expanded : p.bits;
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t yx = pix % (H * Wd);
    const int64_t y = yx / Wd, x = yx % Wd;
    const uint64_t* xq = in_base + pix * in_words;
    int32_t full[kMaxDilations] = {0, 0, 0, 0};
    for (int di = 0; di < ndil; ++di) {
      const int64_t d = p.dil[di];
      // the valid taps, built in place (no tap-index array read back as a
      // vector: that stalls on store forwarding); bounds checked only for
      // pixels within d of the border
      Tap taps[9];
      int nv = 0;
      if (y >= d && y < H - d && x >= d && x < Wd - d) {
        for (int tap = 0; tap < 9; ++tap)
          taps[tap] = Tap{xq + tap_off[di][tap], tap_w[di][tap]};
        nv = 9;
      } else {
        for (int ky = 0; ky < 3; ++ky) {
          const int64_t yy = y + (ky - 1) * d;
          if (yy < 0 || yy >= H) continue;
          for (int kx = 0; kx < 3; ++kx) {
            const int64_t xx = x + (kx - 1) * d;
            if (xx < 0 || xx >= Wd) continue;
            const int tap = ky * 3 + kx;
            taps[nv++] = Tap{xq + tap_off[di][tap], tap_w[di][tap]};
          }
        }
      }
      int32_t* ad = acc.ptr + di * CS;
      if (lanes) {
        popcount_lanes(taps, nv, int(cg), p.nvec, ad);
      } else {
        Tap gt[9];
        for (int64_t g = 0; g < G; ++g) {
          for (int t = 0; t < nv; ++t)
            gt[t] = Tap{taps[t].x + g * wg, taps[t].w + g * cg};
          popcount_accumulate<BitOp::kXor, 1>(gt, nv, wg, wg, CP, cg,
                                              ad + g * cg, CP);
        }
      }
      full[di] = int32_t(nv * cg);
    }
    // sum of the dilations' PReLUs (left to right), affine, residual, norm
    const T* xin = p.x + pix * C;  // h may be x: read before written
    T* h = p.h_out + pix * C;
    T* __restrict hn = p.hn_out + pix * C;
    const T* __restrict os = p.out_scale;
    const T* __restrict ob = p.out_bias;
    const T* __restrict n2s = p.n2_scale;
    const T* __restrict n2b = p.n2_bias;
    const int32_t* __restrict ac0 = acc.ptr;
    const T* __restrict a0 = p.a[0];
    const T* __restrict b0 = p.b[0];
    const T* __restrict s0 = p.slope[0];
    const int32_t f0 = full[0];
    if (epilogue.fused()) {
      epilogue.run(ac0, CS, full, xin, h, hn);
    } else if (ndil == 3) {
      const int32_t* __restrict ac1 = acc.ptr + CS;
      const int32_t* __restrict ac2 = acc.ptr + 2 * CS;
      const T* __restrict a1 = p.a[1];
      const T* __restrict b1 = p.b[1];
      const T* __restrict s1 = p.slope[1];
      const T* __restrict a2 = p.a[2];
      const T* __restrict b2 = p.b[2];
      const T* __restrict s2 = p.slope[2];
      const int32_t f1 = full[1], f2 = full[2];
      MMBHVIT_NOALIAS_LOOP
      for (int64_t o = 0; o < C; ++o) {
        T sm = binary_prelu<T, false>(f0, ac0[o], a0[o], b0[o], T(0), s0[o]);
        sm = sm + binary_prelu<T, false>(f1, ac1[o], a1[o], b1[o], T(0), s1[o]);
        sm = sm + binary_prelu<T, false>(f2, ac2[o], a2[o], b2[o], T(0), s2[o]);
        T t = sm * os[o];
        t = t + ob[o];
        const T hv = xin[o] + t;
        h[o] = hv;
        T u = hv * n2s[o];
        hn[o] = u + n2b[o];
      }
    } else {
      MMBHVIT_NOALIAS_LOOP
      for (int64_t o = 0; o < C; ++o) {
        T sm = binary_prelu<T, false>(f0, ac0[o], a0[o], b0[o], T(0), s0[o]);
        for (int di = 1; di < ndil; ++di)
          sm = sm + binary_prelu<T, false>(full[di], acc.ptr[di * CS + o],
                                           p.a[di][o], p.b[di][o], T(0),
                                           p.slope[di][o]);
        T t = sm * os[o];
        t = t + ob[o];
        const T hv = xin[o] + t;
        h[o] = hv;
        T u = hv * n2s[o];
        hn[o] = u + n2b[o];
      }
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
