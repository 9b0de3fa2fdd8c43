// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The kernels of one instruction set as a table of function pointers. Each
// csrc/kernels/kernels_<isa>.cpp fills one table with the templates of
// csrc/core/ops/*.h compiled under its own target flags; dispatch.h picks
// the table for this CPU. Every kernel handles the work items [begin, end)
// so the caller can split the work across threads.
#pragma once

#include <cstdint>

#include "params.h"

namespace mmbhvit {

// The binary ops whose kernel path is reported (info / kernel_paths()).
enum Op : int {
  kOpProj = 0,  // proj and ffn
  kOpMsgdc,
  kOpMerge,
  kOpScores,
  kOpContext,
  kOpPack,      // sign packing (rows, per head, along tokens, bit planes)
  kOpFloat,     // float-only ops: stem, shift, attention token layout
  kOpConv,      // dense binary k x k convolution (decode heads)
  kOpSignProduct,  // training forward of a 1-bit 1x1 layer (NCHW)
  kNumOps
};

template <typename T>
struct Kernels {
  void (*proj)(const ProjParams<T>&, int64_t, int64_t);
  void (*ffn)(const FfnParams<T>&, int64_t, int64_t);
  void (*pack)(const PackParams<T>&, int64_t, int64_t);
  void (*msgdc)(const MsgdcParams<T>&, int64_t, int64_t);
  void (*msgdc_expand)(const ExpandParams<T>&, int64_t, int64_t);
  void (*merge)(const MergeParams<T>&, int64_t, int64_t);
  void (*head_pack)(const HeadPackParams<T>&, int64_t, int64_t);
  void (*head_pack_t)(const HeadPackParams<T>&, int64_t, int64_t);
  void (*token_pack)(const HeadPackParams<T>&, int64_t, int64_t);
  void (*scores)(const ScoreParams<T>&, int64_t, int64_t);
  void (*context)(const ContextParams<T>&, int64_t, int64_t);
  void (*attention)(const AttentionParams<T>&, int64_t, int64_t);
  void (*shift)(const ShiftParams<T>&, int64_t, int64_t);
  void (*merged_tokens)(const TokensParams<T>&, int64_t, int64_t);
  void (*window_tokens)(const TokensParams<T>&, int64_t, int64_t);
  void (*merged_means)(const UntokensParams<T>&, int64_t, int64_t);
  void (*untokens)(const UntokensParams<T>&, int64_t, int64_t);
  void (*conv)(const ConvParams<T>&, int64_t, int64_t);
  void (*sign_product)(const SignProductParams<T>&, int64_t, int64_t);
  void (*sign_weights)(const SignWeightsParams<T>&, int64_t, int64_t);
  void (*stem)(const StemParams<T>&, int64_t, int64_t);
};

struct KernelSet {
  const char* name;              // "avx512", "avx2", "popcnt", "neon", ...
  const char* path[kNumOps];     // how each op computes on this set
  // whether the MSGDC lane path runs for group width lane_bits, c channels
  bool (*msgdc_lanes)(int lane_bits, int64_t c);
  Kernels<float> f32;
  Kernels<double> f64;
};

// One per translation unit in csrc/kernels/; nullptr when the unit was not
// built for this target (x86 sets on ARM, NEON on x86).
const KernelSet* kernels_avx512();
const KernelSet* kernels_avx2();
const KernelSet* kernels_popcnt();
const KernelSet* kernels_neon();
const KernelSet* kernels_generic();

}  // namespace mmbhvit
