// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// Kernels for x86-64 CPUs with the POPCNT instruction but without AVX2
// (x86-64-v2): the scalar popcount core, one POPCNT per 64-bit word.
#include "../core/kernel_table.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <cstdint>
#pragma GCC push_options
#pragma GCC target("popcnt,sse4.2")
#define MMBHVIT_NS popcnt
#define MMBHVIT_ISA_POPCNT 1
#define MMBHVIT_SET_NAME "popcnt"
#define MMBHVIT_SET_FN kernels_popcnt
#define MMBHVIT_PATHS                                                \
  {"scalar popcount core: POPCNT per word, 4 tokens per weight row", \
   "scalar popcount core: POPCNT per word, taps accumulated",       \
   "scalar popcount core: POPCNT per word, 4 taps accumulated",     \
   "scalar popcount core: POPCNT per word, 4 query rows",           \
   "scalar popcount core (AND): POPCNT per word",                   \
   "scalar",                                                               \
   "stem, shift: 128-bit vectors; tokens auto-vectorised (SSE4.2)",        \
   "scalar popcount core (POPCNT), window rows as taps, 8 pixels per row", \
   "scalar popcount core (POPCNT), 8 outputs per pixel row (NCHW)"}
#include "../core/kernels.inc.h"
#pragma GCC pop_options
#else
namespace mmbhvit {
const KernelSet* kernels_popcnt() { return nullptr; }
}  // namespace mmbhvit
#endif
