// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The one popcount core of every binary op. For NK input rows and n
// outputs it accumulates over taps and words:
//
//   acc[k * lda + o] = sum_t sum_i popcount(op(x_t[k * xs + i],
//                                              w_t[i * ldw + o]))
//
// with op = XOR (±1 dot products: dot = bits - 2 popcount) or AND (a 0/1
// bit plane times ±1 bits). x_t: the packed input of tap t (a pixel of a
// convolution window, a token, a bit plane), w_t: its weights, `words`
// 64-bit words long, outputs innermost. A vector register holds
// neighbouring outputs of one weight word and the input word is broadcast,
// so each ISA counts 64-bit lanes: popcount_core_<isa>.h.
//
// MSGDC's lane path (popcount_lanes) instead counts 16- or 32-bit lanes,
// each lane an (output, tap) pair of a grouped convolution with 16- or
// 32-channel groups (see MsgdcParams); at most 9 taps (AVX2 sums byte
// counts over the taps: at most 31 fit a byte).
//
// count8 (AVX2 and AVX-512 only) returns the counts of 8 neighbouring
// outputs in a register instead of storing them, for the fused epilogues
// of proj / ffn / merge / attention (ops/*.h, float only).
#pragma once

#include <cstdint>

#include "bitpack.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

enum class BitOp { kXor, kAnd };

struct Tap {
  const uint64_t* x;  // NK rows, xs words apart
  const uint64_t* w;  // (words, ldw), outputs innermost
};

template <BitOp OP>
inline uint64_t bitop(uint64_t a, uint64_t b) {
  return OP == BitOp::kXor ? (a ^ b) : (a & b);
}

// Plain C++ (the generic set, and every set's reference for tails).
template <BitOp OP, int NK>
inline void popcount_scalar(const Tap* taps, int ntaps, int64_t words,
                            int64_t xs, int64_t ldw, int64_t n, int32_t* acc,
                            int64_t lda) {
  for (int k = 0; k < NK; ++k)
    for (int64_t o = 0; o < n; ++o) acc[k * lda + o] = 0;
  for (int t = 0; t < ntaps; ++t) {
    for (int64_t i = 0; i < words; ++i) {
      const uint64_t* wrow = taps[t].w + i * ldw;
      for (int k = 0; k < NK; ++k) {
        const uint64_t xw = taps[t].x[k * xs + i];
        int32_t* a = acc + k * lda;
        for (int64_t o = 0; o < n; ++o) a[o] += popc(bitop<OP>(xw, wrow[o]));
      }
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit

#if MMBHVIT_AVX512
#include "popcount_core_avx512.h"
#elif MMBHVIT_AVX2
#include "popcount_core_avx2.h"
#elif MMBHVIT_NEON
#include "popcount_core_neon.h"
#else
// POPCNT and generic: the scalar loop (POPCNT: __builtin_popcountll is one
// instruction; generic: the compiler's bit-twiddling sequence).
namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {
template <BitOp OP, int NK>
inline void popcount_accumulate(const Tap* taps, int ntaps, int64_t words,
                                int64_t xs, int64_t ldw, int64_t n,
                                int32_t* acc, int64_t lda) {
  popcount_scalar<OP, NK>(taps, ntaps, words, xs, ldw, n, acc, lda);
}
constexpr bool kHasLanes = false;
constexpr bool kDenseLaneInput = false;
inline void popcount_lanes(const Tap*, int, int, int64_t, int32_t*) {}
}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
#endif

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

// popcount_accumulate with a run-time row count nk in 1..8.
template <BitOp OP>
inline void popcount_rows(int nk, const Tap* taps, int ntaps, int64_t words,
                          int64_t xs, int64_t ldw, int64_t n, int32_t* acc,
                          int64_t lda) {
  switch (nk) {
#define MMBHVIT_ROWS(K)                                                  \
  case K:                                                                \
    popcount_accumulate<OP, K>(taps, ntaps, words, xs, ldw, n, acc, lda); \
    break;
    MMBHVIT_ROWS(1)
    MMBHVIT_ROWS(2)
    MMBHVIT_ROWS(3)
    MMBHVIT_ROWS(4)
    MMBHVIT_ROWS(5)
    MMBHVIT_ROWS(6)
    MMBHVIT_ROWS(7)
    MMBHVIT_ROWS(8)
#undef MMBHVIT_ROWS
    default: break;
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
