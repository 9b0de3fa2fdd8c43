// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
#include "nibble_lut.h"

namespace mmbhvit {

void build_nibble_lut(const uint64_t* wt, int64_t cin, int64_t cout,
                      int64_t cout_pad, int8_t* out) {
  const int64_t positions = cin / 4;
  for (int64_t blk = 0; blk < cout / 32; ++blk)
    for (int64_t q = 0; q < positions; ++q) {
      const uint64_t* word = wt + (q / 16) * cout_pad + blk * 32;
      const int shift = static_cast<int>(4 * (q % 16));
      int8_t* rows = out + (blk * positions + q) * 16 * 32;
      for (int v = 0; v < 16; ++v)
        for (int j = 0; j < 32; ++j) {
          const unsigned w = static_cast<unsigned>(word[j] >> shift) & 15u;
          const unsigned diff = static_cast<unsigned>(v) ^ w;
          const int count = static_cast<int>((diff & 1u) + (diff >> 1 & 1u) +
                                             (diff >> 2 & 1u) + (diff >> 3));
          rows[v * 32 + j] = static_cast<int8_t>(2 - count);
        }
    }
}

}  // namespace mmbhvit
