// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Popcount core, ARM NEON (aarch64): CNT counts the bits of each byte of a
// 128-bit register; the byte counts are summed for up to 31 steps
// (31 * 8 < 256) and then widened pairwise into two 64-bit lanes: two
// outputs per register.
#pragma once

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

template <BitOp OP>
inline uint64x2_t bitop128(uint64x2_t a, uint64x2_t b) {
  return OP == BitOp::kXor ? veorq_u64(a, b) : vandq_u64(a, b);
}

// Byte counts -> 32-bit lane sums (four lanes, two per 64-bit output).
inline uint32x4_t widen_counts(uint8x16_t part) {
  return vpaddlq_u16(vpaddlq_u8(part));
}

template <BitOp OP, int NK, int NB>
inline void neon_block(const Tap* taps, int ntaps, int64_t words, int64_t xs,
                       int64_t ldw, int64_t o, int64_t n, int32_t* acc,
                       int64_t lda) {
  uint8x16_t part[NK][NB];
  uint32x4_t total[NK][NB];
  for (int k = 0; k < NK; ++k)
    for (int b = 0; b < NB; ++b) {
      part[k][b] = vdupq_n_u8(0);
      total[k][b] = vdupq_n_u32(0);
    }
  int fill = 0;
  for (int t = 0; t < ntaps; ++t) {
    const uint64_t* x = taps[t].x;
    const uint64_t* w = taps[t].w + o;
    for (int64_t i = 0; i < words; ++i) {
      uint64x2_t wv[NB];
      for (int b = 0; b < NB; ++b) {
        const uint64_t* p = w + i * ldw + 2 * b;
        wv[b] = n - o - 2 * b >= 2
                    ? vld1q_u64(p)
                    : vcombine_u64(vld1_u64(p), vdup_n_u64(0));
      }
      for (int k = 0; k < NK; ++k) {
        const uint64x2_t xv = vdupq_n_u64(x[k * xs + i]);
        for (int b = 0; b < NB; ++b)
          part[k][b] = vaddq_u8(
              part[k][b],
              vcntq_u8(vreinterpretq_u8_u64(bitop128<OP>(wv[b], xv))));
      }
      if (++fill == 31) {
        for (int k = 0; k < NK; ++k)
          for (int b = 0; b < NB; ++b) {
            total[k][b] = vaddq_u32(total[k][b], widen_counts(part[k][b]));
            part[k][b] = vdupq_n_u8(0);
          }
        fill = 0;
      }
    }
  }
  for (int k = 0; k < NK; ++k)
    for (int b = 0; b < NB; ++b) {
      const uint32x4_t t32 =
          vaddq_u32(total[k][b], widen_counts(part[k][b]));
      const uint64x2_t t64 = vpaddlq_u32(t32);
      int32_t* dst = acc + k * lda + o + 2 * b;
      dst[0] = int32_t(vgetq_lane_u64(t64, 0));
      if (n - o - 2 * b >= 2) dst[1] = int32_t(vgetq_lane_u64(t64, 1));
    }
}

template <BitOp OP, int NK>
inline void popcount_accumulate(const Tap* taps, int ntaps, int64_t words,
                                int64_t xs, int64_t ldw, int64_t n,
                                int32_t* acc, int64_t lda) {
  constexpr int NB = NK >= 4 ? 1 : (NK >= 2 ? 2 : 4);
  int64_t o = 0;
  for (; o + 2 * NB <= n; o += 2 * NB)
    neon_block<OP, NK, NB>(taps, ntaps, words, xs, ldw, o, n, acc, lda);
  for (; o < n; o += 2)
    neon_block<OP, NK, 1>(taps, ntaps, words, xs, ldw, o, n, acc, lda);
}

// Lane path (see popcount_core_avx512.h): byte counts widened pairwise into
// 16-bit lanes (and again into 32-bit lanes for cg = 32); a 512-bit vector
// is four 128-bit registers, lane j of register r is output r * 128/cg + j.
constexpr bool kHasLanes = true;
constexpr bool kDenseLaneInput = false;  // expanded lanes
inline void popcount_lanes(const Tap* taps, int ntaps, int cg, int64_t nvec,
                           int32_t* acc) {
  for (int64_t r = 0; r < 4 * nvec; ++r) {
    int32_t* a = acc + r * (128 / cg);
    if (cg == 16) {
      uint16x8_t s = vdupq_n_u16(0);
      for (int t = 0; t < ntaps; ++t) {
        const uint64x2_t x_w =
            veorq_u64(vld1q_u64(taps[t].x + 2 * r), vld1q_u64(taps[t].w + 2 * r));
        s = vpadalq_u8(s, vcntq_u8(vreinterpretq_u8_u64(x_w)));
      }
      vst1q_s32(a, vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(s))));
      vst1q_s32(a + 4, vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(s))));
    } else {
      uint32x4_t s = vdupq_n_u32(0);
      for (int t = 0; t < ntaps; ++t) {
        const uint64x2_t x_w =
            veorq_u64(vld1q_u64(taps[t].x + 2 * r), vld1q_u64(taps[t].w + 2 * r));
        s = vpadalq_u16(s, vpaddlq_u8(vcntq_u8(vreinterpretq_u8_u64(x_w))));
      }
      vst1q_s32(a, vreinterpretq_s32_u32(s));
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
