// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// Kernels for x86-64 CPUs with AVX2, FMA, BMI and POPCNT (x86-64-v3): the
// popcount core counts 256 bits at a time with a nibble table (vpshufb).
#include "../core/kernel_table.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>  // before the target pragma

#include <cstdint>
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,f16c")
#define MMBHVIT_NS avx2
#define MMBHVIT_ISA_AVX2 1
#define MMBHVIT_SET_NAME "avx2"
#define MMBHVIT_SET_FN kernels_avx2
#define MMBHVIT_PATHS                                                      \
  {"popcount core: vpshufb nibble table, 8 outputs x 4 tokens per weight "  \
   "load, counts in registers, epilogue fused (float); MLP expansions of "  \
   "64-192 inputs: int8 rows of a per-layer nibble table (float)",         \
   "lane core: group word broadcast, vpshufb per (output, tap) lane, "      \
   "bytes summed over taps, "                                              \
   "vpmaddubsw once (16/32-channel groups); else popcount core: vpshufb, "  \
   "taps accumulated; one epilogue pass for all dilations",                \
   "popcount core: vpshufb, 4 taps accumulated, 8 outputs in registers, "   \
   "epilogue fused (float; sign bits and shortcut in one pass per window)", \
   "popcount core: vpshufb, 4 query rows per key load, counts in "          \
   "registers (float)",                                                    \
   "popcount core (AND): vpshufb, both bit planes in registers, epilogue "  \
   "fused (float, LSQ 2 planes); AVX2 planes",                             \
   "AVX2 compare + movemask",                                              \
   "stem, shift: 256-bit vectors; tokens auto-vectorised (AVX2)",          \
   "popcount core: vpshufb, window rows as taps, 8 pixels per weight load",   \
   "popcount core: vpshufb, 8 outputs x 4 pixels per load (NCHW)"}
#include "../core/kernels.inc.h"
#pragma GCC pop_options
#else
namespace mmbhvit {
const KernelSet* kernels_avx2() { return nullptr; }
}  // namespace mmbhvit
#endif
