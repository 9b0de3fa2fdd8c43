// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Popcount core, AVX2 (no vector popcount instruction): the bits of a
// 256-bit register are counted per byte with a 16-entry nibble table
// (vpshufb), the byte counts summed for up to 31 steps (31 * 8 < 256) and
// then folded into four 64-bit lanes (vpsadbw): four outputs per register.
#pragma once

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

template <BitOp OP>
inline __m256i bitop256(__m256i a, __m256i b) {
  return OP == BitOp::kXor ? _mm256_xor_si256(a, b) : _mm256_and_si256(a, b);
}

// Bit counts of the 32 bytes of v.
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

// lanes < left all ones (vpmaskmovq mask)
inline __m256i tail4(int64_t left) {
  const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(left < 4 ? left : 4), idx);
}

inline void store4(int32_t* dst, __m256i total, int64_t left) {
  // the low 32 bits of the four 64-bit lanes
  const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
      total, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  if (left >= 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), lo);
  } else {
    alignas(16) int32_t tmp[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), lo);
    for (int64_t j = 0; j < left; ++j) dst[j] = tmp[j];
  }
}

// kFull: all 4 NB outputs exist (plain loads), else masked loads.
//
// The (tap, word) steps run in chunks of at most 31 (a byte count stays
// below 256) with the byte counts in registers; between chunks they are
// folded into 64-bit totals, which live on the stack. With no fold test
// in the step loop and no totals live in it, the NK x NB byte counts, the
// weight register, the broadcast and the table fit the 16 ymm registers
// for NK = 8 (the 3x3 convolution's tile of pixels).
template <BitOp OP, int NK, int NB, bool kFull>
inline void avx2_block(const Tap* taps, int ntaps, int64_t words, int64_t xs,
                       int64_t ldw, int64_t o, int64_t n, int32_t* acc,
                       int64_t lda) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i mask[NB];  // used by partial blocks only
  for (int b = 0; b < NB; ++b)
    mask[b] = kFull ? zero : tail4(n - o - 4 * b);
  alignas(32) int64_t total[NK][NB][4];
  bool first = true;
  int t = 0;
  int64_t i = 0;  // next word of tap t
  while (t < ntaps) {
    __m256i part[NK][NB];
    for (int k = 0; k < NK; ++k)
      for (int b = 0; b < NB; ++b) part[k][b] = zero;
    for (int64_t room = 31; room > 0 && t < ntaps;) {
      const int64_t stop = i + (words - i < room ? words - i : room);
      const uint64_t* x = taps[t].x;
      const uint64_t* w = taps[t].w + o;
      for (int64_t j = i; j < stop; ++j) {
        __m256i wv[NB];
        for (int b = 0; b < NB; ++b) {
          const uint64_t* p = w + j * ldw + 4 * b;
          wv[b] = kFull
                      ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                      : _mm256_maskload_epi64(
                            reinterpret_cast<const long long*>(p), mask[b]);
        }
        for (int k = 0; k < NK; ++k) {
          const __m256i xv =
              _mm256_set1_epi64x(static_cast<long long>(x[k * xs + j]));
          for (int b = 0; b < NB; ++b)
            part[k][b] = _mm256_add_epi8(
                part[k][b], popcount_bytes(bitop256<OP>(wv[b], xv)));
        }
      }
      room -= stop - i;
      i = stop;
      if (i == words) {
        i = 0;
        ++t;
      }
    }
    for (int k = 0; k < NK; ++k)
      for (int b = 0; b < NB; ++b) {
        __m256i* dst = reinterpret_cast<__m256i*>(total[k][b]);
        const __m256i s = _mm256_sad_epu8(part[k][b], zero);
        _mm256_store_si256(
            dst, first ? s : _mm256_add_epi64(_mm256_load_si256(dst), s));
      }
    first = false;
  }
  for (int k = 0; k < NK; ++k)
    for (int b = 0; b < NB; ++b)
      store4(acc + k * lda + o + 4 * b,
             first ? zero
                   : _mm256_load_si256(
                         reinterpret_cast<const __m256i*>(total[k][b])),
             n - o - 4 * b);
}

template <BitOp OP, int NK>
inline void popcount_accumulate(const Tap* taps, int ntaps, int64_t words,
                                int64_t xs, int64_t ldw, int64_t n,
                                int32_t* acc, int64_t lda) {
  // outputs per pass: NK rows x NB registers of byte and 64-bit sums
  constexpr int NB = NK >= 3 ? 1 : (NK == 2 ? 2 : 3);
  int64_t o = 0;
  for (; o + 4 * NB <= n; o += 4 * NB)
    avx2_block<OP, NK, NB, true>(taps, ntaps, words, xs, ldw, o, n, acc,
                                 lda);
  for (; o + 4 <= n; o += 4)
    avx2_block<OP, NK, 1, true>(taps, ntaps, words, xs, ldw, o, n, acc, lda);
  if (o < n)
    avx2_block<OP, NK, 1, false>(taps, ntaps, words, xs, ldw, o, n, acc,
                                 lda);
}

// Counts of 8 neighbouring outputs (o .. o + 7, all present in the padded
// weights) for NK rows, kept in registers for a fused epilogue:
// out[k] = the 8 int32 counts of row k. Two weight registers per word, the
// byte counts folded with vpsadbw (kFold: every 31 steps; else ntaps * words
// <= 31), the two 64-bit-lane halves interleaved into 32-bit lanes and put
// in order with one vpermd.
template <BitOp OP, int NK, bool kFold>
MMBHVIT_ALWAYS_INLINE inline void count8(const Tap* taps, int ntaps,
                                         int64_t words, int64_t xs,
                                         int64_t ldw, int64_t o,
                                         __m256i* out) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i part[NK][2];
  __m256i total[NK];  // 32-bit lanes, interleaved order (kFold only)
  for (int k = 0; k < NK; ++k) {
    part[k][0] = part[k][1] = zero;
    total[k] = zero;
  }
  int fill = 0;
  for (int t = 0; t < ntaps; ++t) {
    const uint64_t* x = taps[t].x;
    const uint64_t* w = taps[t].w + o;
    for (int64_t i = 0; i < words; ++i) {
      const __m256i w0 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw));
      const __m256i w1 = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w + i * ldw + 4));
      for (int k = 0; k < NK; ++k) {
        const __m256i xv =
            _mm256_set1_epi64x(static_cast<long long>(x[k * xs + i]));
        part[k][0] = _mm256_add_epi8(part[k][0],
                                     popcount_bytes(bitop256<OP>(w0, xv)));
        part[k][1] = _mm256_add_epi8(part[k][1],
                                     popcount_bytes(bitop256<OP>(w1, xv)));
      }
      if (kFold && ++fill == 31) {
        for (int k = 0; k < NK; ++k) {
          total[k] = _mm256_add_epi32(
              total[k],
              _mm256_or_si256(
                  _mm256_sad_epu8(part[k][0], zero),
                  _mm256_slli_epi64(_mm256_sad_epu8(part[k][1], zero), 32)));
          part[k][0] = part[k][1] = zero;
        }
        fill = 0;
      }
    }
  }
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int k = 0; k < NK; ++k) {
    __m256i c = _mm256_or_si256(
        _mm256_sad_epu8(part[k][0], zero),
        _mm256_slli_epi64(_mm256_sad_epu8(part[k][1], zero), 32));
    if (kFold) c = _mm256_add_epi32(total[k], c);
    out[k] = _mm256_permutevar8x32_epi32(c, order);
  }
}

// Lane path (see popcount_core_avx512.h), per 256-bit half u of the
// 512-bit vectors: lane j <-> output u * 256 / cg + j, all of one channel
// group (cg = 16: the half is group u; cg = 32: group u / 4). The input is
// dense (kDenseLaneInput): per pixel one 32-bit word per group (a 16-bit
// group twice), broadcast into the lanes by the load, so a tap reads 4
// words of input instead of nvec vectors of expanded lanes. The byte
// counts are summed over the taps first (ntaps <= 9 here: at most 9 x 8 <
// 256 per byte), then pairwise into the lanes once (vpmaddubsw, then
// vpmaddwd for 32 bits); NH halves per pass share the tap pointers.
constexpr bool kDenseLaneInput = true;

template <int CG, int NH, bool kFirst = false>
inline void avx2_lanes(const Tap* taps, int ntaps, int64_t u_arg,
                       int32_t* acc) {
  // kFirst: u0 == 0 known at compile time (the operand offsets then fold
  // into the loads' displacements instead of index registers)
  const int64_t u0 = kFirst ? 0 : u_arg;
  // the group word of each half: the same one for the 4 halves of a 32-bit
  // group (u0 % 4 == 0 there)
  constexpr int kGroups = CG == 16 ? NH : 1;
  static_assert(CG == 16 || NH % 4 == 0, "32-bit groups span 4 halves");
  const int64_t g0 = CG == 16 ? u0 : u0 / 4;
  __m256i bytes[NH];
  for (int h = 0; h < NH; ++h) bytes[h] = _mm256_setzero_si256();
  for (int t = 0; t < ntaps; ++t) {
    const int32_t* xp = reinterpret_cast<const int32_t*>(taps[t].x) + g0;
    const __m256i* wp = reinterpret_cast<const __m256i*>(taps[t].w) + u0;
    __m256i xv[kGroups];
    for (int g = 0; g < kGroups; ++g)
      xv[g] = _mm256_broadcastd_epi32(_mm_loadu_si32(xp + g));
    for (int h = 0; h < NH; ++h)
      bytes[h] = _mm256_add_epi8(
          bytes[h],
          popcount_bytes(_mm256_xor_si256(
              xv[CG == 16 ? h : 0], _mm256_loadu_si256(wp + h))));
  }
  const __m256i ones8 = _mm256_set1_epi8(1);
  for (int h = 0; h < NH; ++h) {
    const int64_t u = u0 + h;
    const __m256i pairs = _mm256_maddubs_epi16(bytes[h], ones8);
    if (CG == 16) {
      int32_t* a = acc + u * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a),
                          _mm256_cvtepu16_epi32(_mm256_castsi256_si128(pairs)));
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(a + 8),
          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(pairs, 1)));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + u * 8),
                          _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    }
  }
}

constexpr bool kHasLanes = true;
inline void popcount_lanes(const Tap* taps, int ntaps, int cg, int64_t nvec,
                           int32_t* acc) {
  // 2 nvec halves: a multiple of 4 for 32-bit groups (4 halves per group)
  int64_t u = 0;
  if (cg == 16) {
    if (2 * nvec == 4) {  // 64 channels: one pass of 4 halves
      avx2_lanes<16, 4, true>(taps, ntaps, 0, acc);
      return;
    }
    for (; u + 4 <= 2 * nvec; u += 4) avx2_lanes<16, 4>(taps, ntaps, u, acc);
    for (; u < 2 * nvec; u += 2) avx2_lanes<16, 2>(taps, ntaps, u, acc);
  } else {
    for (; u < 2 * nvec; u += 4) avx2_lanes<32, 4>(taps, ntaps, u, acc);
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
