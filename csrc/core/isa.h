// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Which instruction set the current kernel unit is compiled for. A unit in
// csrc/kernels/ defines MMBHVIT_NS (its namespace) and at most one of
// MMBHVIT_ISA_AVX512, MMBHVIT_ISA_AVX2, MMBHVIT_ISA_POPCNT, MMBHVIT_ISA_NEON
// (none: the generic unit, plain C++ for the compiler's baseline target),
// sets its target pragma and includes kernels.inc.h. The kernel headers use
// only builtins and intrinsics, never standard-library templates (the
// linker could share one instantiation between units built for different
// targets).
#pragma once

#if !defined(MMBHVIT_NS)
#error "define MMBHVIT_NS (the kernel unit's namespace) first"
#endif

#if defined(MMBHVIT_ISA_AVX512)
#define MMBHVIT_AVX512 1
#else
#define MMBHVIT_AVX512 0
#endif
#if defined(MMBHVIT_ISA_AVX2)
#define MMBHVIT_AVX2 1
#else
#define MMBHVIT_AVX2 0
#endif
#if defined(MMBHVIT_ISA_POPCNT)
#define MMBHVIT_POPCNT 1
#else
#define MMBHVIT_POPCNT 0
#endif
#if defined(MMBHVIT_ISA_NEON)
#define MMBHVIT_NEON 1
#else
#define MMBHVIT_NEON 0
#endif

// Before an epilogue loop whose arrays never overlap: lets the compiler
// vectorize it (it cannot prove the pointers distinct by itself).
#if defined(__clang__)
#define MMBHVIT_NOALIAS_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define MMBHVIT_NOALIAS_LOOP _Pragma("GCC ivdep")
#else
#define MMBHVIT_NOALIAS_LOOP
#endif

// A small kernel whose results must stay in registers in its caller.
#if defined(__GNUC__)
#define MMBHVIT_ALWAYS_INLINE __attribute__((always_inline))
#else
#define MMBHVIT_ALWAYS_INLINE
#endif

// GCC / clang vector types for the float-only kernels (shift branches,
// stem): 256-bit on AVX2 and AVX-512 (512-bit ones were not faster for the
// shift branches), 128-bit elsewhere.
#if defined(__GNUC__)
#define MMBHVIT_FLOAT_VECTORS 1
#if MMBHVIT_AVX512 || MMBHVIT_AVX2
#define MMBHVIT_FLOAT_VEC_BYTES 32
#else
#define MMBHVIT_FLOAT_VEC_BYTES 16
#endif
#else
#define MMBHVIT_FLOAT_VECTORS 0
#endif

#if MMBHVIT_AVX512 || MMBHVIT_AVX2
#include <immintrin.h>
#endif
#if MMBHVIT_NEON
#include <arm_neon.h>
#endif
