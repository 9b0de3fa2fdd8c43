// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// The packed-bit kernels for x86-64 CPUs with AVX2 and POPCNT (x86-64-v3):
// 256-bit popcounts with a nibble table (vpshufb), vectorised epilogues.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>  // before the target pragma: see binary_kernels.h

#include <cstdint>
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,f16c")
#define MMBHVIT_NS avx2
#define MMBHVIT_USE_AVX2 1
#include "binary_kernels.h"
#pragma GCC pop_options
#define MMBHVIT_HAS_AVX2_UNIT 1
#endif

namespace mmbhvit {
#ifdef MMBHVIT_HAS_AVX2_UNIT
bool avx2_kernels_built() { return true; }
#else
bool avx2_kernels_built() { return false; }
#endif
}  // namespace mmbhvit
