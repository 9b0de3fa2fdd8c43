// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Plain-data parameters of the packed-bit kernels (csrc/core). The kernels
// are compiled once per instruction set (csrc/kernels/kernels_*.cpp) and
// reached through a table of function pointers (kernel_table.h). Nothing
// here depends on torch or on the standard library, so the kernel
// translation units can be built with their own target flags.
//
// Conventions shared by every kernel:
//   * activations are channels-last: (tokens, channels) or (N, H, W, C);
//   * a sign is one bit: bit = 1 means +1, bit = 0 means -1; bit i of 64-bit
//     word w holds channel 64 w + i; bits past the last channel are 0 in
//     both operands, so they never count;
//   * for two packed ±1 vectors of n channels, dot = n - 2 popcount(a ^ b);
//     a padded tap contributes nothing because it is simply not visited;
//   * weights are "transposed" for the kernels: (taps, words, cout_pad),
//     cout_pad a multiple of 8, outputs innermost (a vector register holds
//     neighbouring outputs of one weight word);
//   * every float epilogue evaluates its operations in a fixed order, one
//     rounding per operation (built with -ffp-contract=off), the order the
//     pure-PyTorch fallback (mmbhvit/deploy/ops.py) uses as well.
#pragma once

#include <cstdint>

namespace mmbhvit {

// kGroupMean: output o averages inputs o r .. o r + r - 1 (BinaryResidualProj);
// kChunkMean: output o averages inputs o, o + cout, ..., o + (r - 1) cout
// (the mean of r concatenated maps, BinaryConvBlock).
enum Shortcut : int {
  kNone = 0,
  kIdentity = 1,
  kTile = 2,
  kGroupMean = 3,
  kChunkMean = 4
};
enum AttnMode : int { kLSQ = 0, kGSB = 1 };

// y = prelu(a * D + b + shortcut(x), slope) * post_scale + post_bias
//     (+ residual),  D = the ±1 dot product of sign bits and weight bits,
// where the sign bit of x is x > thr.
template <typename T>
struct ProjParams {
  const T* x;           // (tokens, cin)
  int64_t tokens, cin, cout;
  const T* thr;         // (cin)
  const uint64_t* wt;   // (words, cout_pad)
  int64_t words, cout_pad;
  const T* a;
  const T* b;
  const T* slope;
  const T* post_scale;
  const T* post_bias;   // (cout) each
  int shortcut;
  const T* residual;    // (tokens, cout) or nullptr
  T* y;                 // (tokens, cout)
  // the nibble table of wt (nibble_lut.h) or nullptr; taken by the AVX2
  // MLP expansion, ignored elsewhere
  const int8_t* lut;
};

// Binary MLP of a block: expand (x -> hidden, tile shortcut), then reduce
// (hidden -> c, group-mean shortcut, + residual), fused per token tile.
// expand.y and reduce.x are not used (the hidden tile stays in scratch).
template <typename T>
struct FfnParams {
  ProjParams<T> expand;
  ProjParams<T> reduce;
};

// Sign bits of a channels-last map, per channel group:
// bit = (x * in_scale + in_bias > thr); in_scale == nullptr means x > thr.
template <typename T>
struct PackParams {
  const T* x;           // (pixels, c)
  int64_t pixels, c, groups, cg, wg;  // cg = c / groups, wg = words per group
  const T* in_scale;
  const T* in_bias;
  const T* thr;
  uint64_t* bits;       // (pixels, groups, wg)
};

// MSGDC: up to 4 binary 3x3 grouped convolutions (dilation d, padding d)
// sharing one packed input, each followed by a PReLU, summed, affine, plus
// the residual x; also writes hn = h * n2_scale + n2_bias.
constexpr int kMaxDilations = 4;
template <typename T>
struct MsgdcParams {
  const T* x;           // (n, h, w, c)
  const uint64_t* bits; // (n, h, w, groups, wg)
  int64_t n, h, w, c, groups, cg, wg, cout_pad;
  int ndil;
  int dil[kMaxDilations];
  const uint64_t* wt[kMaxDilations];  // (9, wg, cout_pad); output o reads
                                      // the words of its own group
  const T* a[kMaxDilations];
  const T* b[kMaxDilations];
  const T* slope[kMaxDilations];
  const T* out_scale;
  const T* out_bias;
  const T* n2_scale;
  const T* n2_bias;
  T* h_out;             // (n, h, w, c)
  T* hn_out;            // (n, h, w, c)
  // Lane path (AVX-512, AVX2, NEON; group width cg = lane_bits in {16, 32},
  // C | 512): a 512-bit block holds 512 / cg (output, tap) pairs, each
  // cg-bit lane counted on its own (VPOPCNTW / VPOPCNTD; AVX2 and NEON:
  // byte counts summed per lane). lane_bits == 0: word path.
  int lane_bits;
  int64_t nvec;                        // ceil(c / (512 / cg))
  const uint64_t* expanded;            // (n, h, w, nvec, 8): lane j of
                                       // vector v = input bits of the group
                                       // of output v * 512 / cg + j; or,
                                       // where the core's kDenseLaneInput,
                                       // (n, h, w, groups / 2): one 32-bit
                                       // word per group (msgdc_expand)
  const uint64_t* wx[kMaxDilations];   // (9, nvec, 8): lane j of vector v
                                       // = weights of output v * 512/cg + j
};

// Input of the MSGDC lane path: x -> sign bits -> (pixels, nvec, 8) words.
template <typename T>
struct ExpandParams {
  const T* x;
  int64_t pixels, c, cg, nvec;
  const T* in_scale;
  const T* in_bias;
  const T* thr;
  uint64_t* expanded;
};

// What the binary spatial ops (patch merging, k x k convolution) share: a
// channels-last map, its sign bits, the packed weights of every tap and the
// per-channel epilogue prelu(a D + b + ..., slope) ... + post_bias.
template <typename T>
struct SpatialParams {
  const T* x;           // (n, h, w, cin)
  const uint64_t* bits; // (n, h, w, words); merge: unused (see thr)
  int64_t n, h, w, cin, cout, words, cout_pad;
  const uint64_t* wt;   // (taps, words, cout_pad)
  const T* a;
  const T* b;
  const T* slope;
  const T* post_bias;   // (cout) each
  T* y;
};

// Binary 2x2 stride-2 patch merging on an even-sized map x0 (already
// normalised and zero-padded): y = prelu(a D + b + tile(avgpool2(x0)))
// + post_bias + pos; 4 taps, y is (n, h / 2, w / 2, cout). Every pixel
// is in exactly one window, so the kernel packs the sign bits of a
// window's 4 pixels itself, from the pixels it reads for the shortcut.
template <typename T>
struct MergeParams : SpatialParams<T> {
  const T* pos;         // (h / 2, w / 2, cout)
  const T* thr;         // (cin) the sign thresholds
  const T* in_scale;    // the input norm, x * in_scale + in_bias, applied
  const T* in_bias;     // here (merge_norm), or nullptr: x is normalised
};

// Binary k x k convolution, stride 1, zero padding k / 2 (BinaryConvBlock
// of the decode heads): y = prelu(a D + b + shortcut(x), slope)
// * post_scale + post_bias, D over the taps inside the map (a padded tap is
// not visited: full = n_valid * cin); k * k taps, y is (n, h, w, cout).
template <typename T>
struct ConvParams : SpatialParams<T> {
  int k;                // odd
  const T* post_scale;  // (cout)
  int shortcut;
};

// Attention scores of ±1 queries and keys: s = scale * (d - 2 popcount).
template <typename T>
struct ScoreParams {
  const uint64_t* qbits;  // (b, heads, t, wd)
  const uint64_t* kbits;  // (b, heads, wd, t_pad) (transposed)
  int64_t b, t, heads, wd, t_pad, d;
  T scale;
  T* s;                   // (b, heads, t, t)
  // float only: exp(-2 n scale), n = 0 .. d (float64); s is then the
  // softmax of the scores (table_softmax), not the scores
  const double* table = nullptr;
};

// Sign bits (x > thr) of queries/keys/values, per head. head_pack: channel
// bits per token, (b, heads, t, wd); head_pack_t: the same words with the
// token innermost, (b, heads, wd, t_pad); token_pack: bits along the tokens
// per channel, (b, heads, words(t), d) (bit j of a word = token j).
template <typename T>
struct HeadPackParams {
  const T* x;             // (b, t, c)
  int64_t b, t, c, heads, d, wd, t_pad;
  const T* thr;
  uint64_t* bits;
};

// Context of the quantized attention map with ±1 values, plus the epilogue
// out = prelu(ctx_a * ctx + ctx_b + q + k + v, slope) + post_bias.
// vbits: per (b, head) the sign bits of v along tokens, (tw, d) words.
template <typename T>
struct ContextParams {
  const T* p;             // (b, heads, t, t) softmax output
  const T* q;
  const T* k;
  const T* v;             // (b, t, c)
  const uint64_t* vbits;  // (b, heads, tw, d)
  int64_t b, t, c, heads, d, tw;
  int mode;
  int levels;             // LSQ: levels (3 -> 2 bit planes)
  const T* step;
  const T* zero;          // LSQ: (heads)
  T g_alpha, g_a, g_b1, g_b2, g_low, g_high;  // GSB
  const T* ctx_a;
  const T* ctx_b;
  const T* slope;
  const T* post_bias;
  T* out;                 // (b, t, c)
};

// MSMHA's attention from the q/k/v sign bits to the context's epilogue in
// one pass (float with the softmax table, ScoreParams::table): scores.s and
// context.p (the map) are not used. Work item: a query row (b, head, i).
template <typename T>
struct AttentionParams {
  ScoreParams<T> scores;
  ContextParams<T> context;
};

// MSMHA token layout. attn_tokens: norm1 affine, zero padding to multiples
// of s, s x s windows, and merged tokens = mix * maxpool + rest * avgpool
// (kernel = stride = s, padding s / 2, the padding counts in the average)
// appended to every window: (n * nh * nw, s * s + nh * nw, c), before the
// LayerNorm. attn_untokens: window tokens back in place, merged tokens
// averaged over the windows (left to right) and upsampled, mixed per
// channel, cropped to h x w.
// n maps of h x w x c cut into nh x nw windows of s x s (the last ones
// zero-padded).
struct WindowGrid {
  int64_t n, h, w, c, s, nh, nw;
  int64_t cells() const { return nh * nw; }
};

template <typename T>
struct TokensParams : WindowGrid {
  const T* x;             // (n, h, w, c)
  const T* scale;
  const T* bias;          // norm1 affine
  const T* mix;
  const T* rest;          // mix, 1 - mix
  T* merged;              // (n, nh * nw, c) scratch
  T* tokens;              // (n * nh * nw, s * s + nh * nw, c)
};

template <typename T>
struct UntokensParams : WindowGrid {
  const T* a;             // (n * nh * nw, s * s + nh * nw, c)
  const T* mix;
  const T* rest;          // out_mix, 1 - out_mix
  T* merged;              // (n, nh * nw, c) scratch: window means
  T* out;                 // (n, h, w, c)
};

// Depthwise convolution with a few taps and circular indexing, plus bias
// and residual: y = res + (bias + sum_k w_k x[(i + dy_k) % H, (j + dx_k) % W]).
template <typename T>
struct ShiftParams {
  const T* x;             // (n, h, w, c)
  const T* res;           // (n, h, w, c) or nullptr
  int64_t n, h, w, c;
  int ntaps;
  const int32_t* dy;
  const int32_t* dx;
  const T* wk;            // (ntaps, c)
  const T* bias;          // (c)
  T* y;
};

// The stem: a 4x4 stride-4 convolution of an NCHW image (h, w multiples of
// 4) with the norm folded in, then optionally GELU (gelu_rational below)
// and a positional embedding; channels-last output. Per element: the
// products w_t * x_t (t = (ci, ky, kx)) summed per input channel as a tree,
// the channels' sums added to the bias in order, gelu, + pos (ops/stem.h).
// Work item: one output pixel.
template <typename T>
struct StemParams {
  const T* x;             // (n, cin, h, w)
  int64_t n, cin, h, w, cout;
  const T* wt;            // (cin * 16, cout): tap-major
  const T* bias;          // (cout)
  int gelu;
  const T* pos;           // (h / 4, w / 4, cout) or nullptr
  T* y;                   // (n, h / 4, w / 4, cout)
};

// Training forward of a 1-bit 1x1 convolution on NCHW maps (the layer's
// input already signs, its weight binarized): per image n, output o and
// pixel j, y = (cin - 2 popcount(x_j ^ w_o)) * scale[o] (+ bias[o]), one
// rounding per operation. Work item: a tile of kSignProductTile pixels of
// one image; x is packed by the kernel itself, bits along the pixels.
// Inputs may be +1, -1 or 0; any other value (NaN) sets *not_signs (y is
// then garbage).
constexpr int64_t kSignProductTile = 256;  // pixels per work item
template <typename T>
struct SignProductParams {
  const T* x;             // (n, cin, pixels)
  const uint64_t* wrows;  // (cout, words), bit = weight > 0
  const T* scale;         // (cout)
  const T* bias;          // (cout) or nullptr
  int64_t n, cin, cout, pixels, words;
  int32_t* not_signs;
  T* y;                   // (n, cout, pixels)
};

// Its weights: rows[o] = sign bits (w > 0) of row o, scale[o] = max|w_o|;
// a row with a value other than +-scale[o], or scale[o] not > 0, sets
// *not_signs. Work item: one output channel.
template <typename T>
struct SignWeightsParams {
  const T* w;             // (cout, cin)
  int64_t cout, cin, words;
  uint64_t* rows;         // (cout, words)
  T* scale;               // (cout)
  int32_t* not_signs;
};

}  // namespace mmbhvit
