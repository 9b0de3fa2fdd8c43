// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// Kernels for aarch64 (NEON is part of the baseline, e.g. the Cortex-A76
// of the paper's edge measurements): CNT byte counts, widened pairwise.
#include "../core/kernel_table.h"

#if defined(__aarch64__)
#include <cstdint>
#define MMBHVIT_NS neon
#define MMBHVIT_ISA_NEON 1
#define MMBHVIT_SET_NAME "neon"
#define MMBHVIT_SET_FN kernels_neon
#define MMBHVIT_PATHS                                                      \
  {"popcount core: NEON CNT, 2 outputs/register, 4 tokens per weight load", \
   "lane core: CNT + UADALP per (output, tap) lane (16/32-channel "         \
   "groups); else popcount core: CNT, taps accumulated",                   \
   "popcount core: CNT, 4 taps accumulated, 8 outputs per pass",           \
   "popcount core: CNT, 4 query rows per key load",                        \
   "popcount core (AND): CNT, one row per bit plane",                      \
   "scalar",                                                               \
   "stem, shift: 128-bit vectors; tokens auto-vectorised (NEON)",          \
   "popcount core: CNT, window rows as taps, 8 pixels per weight load",       \
   "popcount core: CNT, 8 outputs per pixel load (NCHW)"}
#include "../core/kernels.inc.h"
#else
namespace mmbhvit {
const KernelSet* kernels_neon() { return nullptr; }
}  // namespace mmbhvit
#endif
