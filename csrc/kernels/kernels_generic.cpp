// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// Kernels in plain C++ for the compiler's baseline target: run on any CPU.
#include "../core/kernel_table.h"

#include <cstdint>
#define MMBHVIT_NS generic
#define MMBHVIT_SET_NAME "generic"
#define MMBHVIT_SET_FN kernels_generic
#define MMBHVIT_PATHS                                                      \
  {"scalar popcount core (compiler popcount), 4 tokens per weight row",    \
   "scalar popcount core, taps accumulated",                               \
   "scalar popcount core, 4 taps accumulated",                             \
   "scalar popcount core, 4 query rows", "scalar popcount core (AND)",     \
   "scalar",                                                               \
   "stem, shift: 128-bit vectors; tokens auto-vectorised (baseline)",      \
   "scalar popcount core, window rows as taps, 8 pixels per weight row",      \
   "scalar popcount core, 8 outputs per pixel row (NCHW)"}
#include "../core/kernels.inc.h"
