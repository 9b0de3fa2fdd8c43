// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Binary k x k convolution, stride 1, "same" zero padding (the
// BinaryConvBlock of the binary decode heads and FPN neck): the taps that
// fall inside the map go through the popcount core, then the epilogue of
// the 1x1 projection (proj_token) with full = n_valid * cin.
//
// Work item: one output row. Pixels whose whole window lies inside the map
// in x share their tap list, so they run kConvPixels at a time (the popcount
// core reuses each weight load for the tile); the k / 2 border pixels at
// each end of the row run alone with their own taps. For the tiles, the k
// taps of a window row are one tap of k * words words: the input pixels of
// the row are neighbours in memory, and so are their weights (tap-major),
// so the core runs k long taps instead of k * k short ones.
#pragma once

#include <cstdint>

#include "../output_transform.h"
#include "../popcount_core.h"
#include "proj.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

constexpr int kMaxConvTaps = 49;  // k <= 7
constexpr int kConvPixels = 8;     // interior pixels per weight load

// The taps of the pixels x0 .. x0 + nk - 1 of row y of image n (all with
// the same valid columns); returns how many there are. rows (interior
// pixels only): one tap per window row inside the map, k * words words
// long, else one per window position inside the map.
inline int conv_taps(const uint64_t* bits, const uint64_t* wt, int64_t n,
                     int64_t y, int64_t x0, int64_t h, int64_t w, int k,
                     int64_t words, int64_t cp, bool rows, Tap* taps) {
  const int pad = k / 2;
  int nt = 0;
  for (int ky = 0; ky < k; ++ky) {
    const int64_t yy = y + ky - pad;
    if (yy < 0 || yy >= h) continue;
    for (int kx = 0; kx < (rows ? 1 : k); ++kx) {
      const int64_t xx = x0 + kx - pad;
      if (xx < 0 || xx >= w) continue;
      taps[nt++] = Tap{bits + ((n * h + yy) * w + xx) * words,
                       wt + (ky * k + kx) * words * cp};
    }
  }
  return nt;
}

template <typename T>
void conv(const ConvParams<T>& p, int64_t begin, int64_t end) {
  const int64_t H = p.h, Wd = p.w, W = p.words, CP = p.cout_pad,
                cin = p.cin, cout = p.cout;
  const int pad = p.k / 2;
  Scratch<int32_t> acc(kConvPixels * CP);
  Scratch<T> tmp(cin + cout);
  Tap taps[kMaxConvTaps];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / H, y = row % H;
    int64_t x = 0;
    while (x < Wd) {
      // a tile of interior pixels, or one pixel near the border
      const bool inside = x >= pad && x + pad < Wd;
      int nk = 1;
      if (inside)
        while (nk < kConvPixels && x + nk + pad < Wd) ++nk;
      const int nt =
          conv_taps(p.bits, p.wt, n, y, x, H, Wd, p.k, W, CP, inside, taps);
      const int span = inside ? p.k : 1;  // window positions per tap
      popcount_rows<BitOp::kXor>(nk, taps, nt, span * W, W, CP, cout,
                                 acc.ptr, CP);
      const int32_t full = int32_t(nt * span * cin);
      for (int j = 0; j < nk; ++j) {
        const int64_t pix = (n * H + y) * Wd + x + j;
        proj_token(acc.ptr + j * CP, p.x + pix * cin, cin, cout, p.a, p.b,
                   p.slope, p.post_scale, p.post_bias, p.shortcut,
                   static_cast<const T*>(nullptr), tmp.ptr, p.y + pix * cout,
                   full);
      }
      x += nk;
    }
  }
}

}  // namespace
}  // namespace MMBHVIT_NS
}  // namespace mmbhvit
