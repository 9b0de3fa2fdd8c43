// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// Kernels for x86-64 CPUs with AVX-512 VPOPCNTDQ and BITALG (Intel Ice Lake
// and newer, AMD Zen 4 and newer); chosen at run time (dispatch.cpp).
#include "../core/kernel_table.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>  // before the target pragma

#include <cstdint>
#pragma GCC push_options
// GCC 12 flags its own _mm512_cvtepi64_epi32 (a false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512bitalg,avx2,fma,bmi,bmi2,popcnt,f16c")
#define MMBHVIT_NS avx512
#define MMBHVIT_ISA_AVX512 1
#define MMBHVIT_SET_NAME "avx512"
#define MMBHVIT_SET_FN kernels_avx512
#define MMBHVIT_PATHS                                                       \
  {"popcount core: VPOPCNTQ, 8 outputs x 4 tokens per weight load, counts " \
   "in registers, epilogue fused (float); MLP expansions keep their "      \
   "hidden values in registers (sign bits and group means only)",          \
   "lane core: VPOPCNTW/D per (output, tap) lane (16/32-channel groups); "  \
   "else popcount core: VPOPCNTQ, 8 outputs/register, taps accumulated; "  \
   "one epilogue pass for all dilations",                                  \
   "popcount core: VPOPCNTQ, 4 taps accumulated, 32 outputs per pass",     \
   "popcount core: VPOPCNTQ, 4 query rows per key load, counts in "        \
   "registers (float)",                                                    \
   "popcount core (AND): VPOPCNTQ, both bit planes in registers, epilogue " \
   "fused (float, LSQ 2 planes); AVX-512 planes",                          \
   "AVX-512 compare masks",                                                \
   "stem, shift: 256-bit vectors; tokens auto-vectorised (AVX-512)",       \
   "popcount core: VPOPCNTQ, window rows as taps, 8 pixels per weight load",   \
   "popcount core: VPOPCNTQ, 8 outputs per pixel load (NCHW)"}
#include "../core/kernels.inc.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
namespace mmbhvit {
const KernelSet* kernels_avx512() { return nullptr; }
}  // namespace mmbhvit
#endif
