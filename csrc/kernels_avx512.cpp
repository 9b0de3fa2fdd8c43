// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// The packed-bit kernels for CPUs with AVX-512, VPOPCNTDQ and BITALG (e.g.
// Intel Ice Lake and newer, AMD Zen 4 and newer); chosen at run time.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>  // before the target pragma: see binary_kernels.h

#include <cstdint>
#pragma GCC push_options
// GCC 12 flags its own _mm512_cvtepi64_epi32 (a false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512bitalg,avx2,fma,bmi,bmi2,popcnt,f16c")
#define MMBHVIT_NS avx512
#define MMBHVIT_USE_AVX512 1
#include "binary_kernels.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#define MMBHVIT_HAS_AVX512_UNIT 1
#endif

namespace mmbhvit {
#ifdef MMBHVIT_HAS_AVX512_UNIT
bool avx512_kernels_built() { return true; }
#else
bool avx512_kernels_built() { return false; }
#endif
}  // namespace mmbhvit
