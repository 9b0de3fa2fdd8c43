// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Nibble tables of a binary projection with a short input (the MLP
// expansion of stages 1-2: 64 or 128 inputs). Instead of XOR-popcounting
// the weights against each token, the AVX2 kernel adds, for each 4-bit
// nibble of the token's packed input, one precomputed row of 32 int8
// values: the row for nibble position q holding value v gives, for each of
// 32 outputs, 2 - popcount(v ^ w) with w the output's weight bits at that
// nibble. Over the cin / 4 nibbles the sum is 32 words - count = D / 2
// (D = cin - 2 count, the ±1 dot product), exact in int8 for cin <= 192.
// Layout: [cout / 32 blocks][cin / 4 positions][16 values][32 outputs].
// Built once per layer (4 cin cout bytes); plain C++, no kernel set.
#pragma once

#include <cstdint>

namespace mmbhvit {

// Shapes the table serves: no padding bits (cin a multiple of 64), sums
// within int8 (cin <= 192), whole blocks of 32 outputs.
inline bool nibble_lut_fits(int64_t cin, int64_t cout) {
  return cin > 0 && cin % 64 == 0 && cin <= 192 && cout > 0 &&
         cout % 32 == 0;
}

inline int64_t nibble_lut_bytes(int64_t cin, int64_t cout) {
  return 4 * cin * cout;
}

// wt: the kernels' transposed weights (cin / 64 words, cout_pad); out:
// nibble_lut_bytes(cin, cout) bytes. Requires nibble_lut_fits(cin, cout).
void build_nibble_lut(const uint64_t* wt, int64_t cin, int64_t cout,
                      int64_t cout_pad, int8_t* out);

}  // namespace mmbhvit
