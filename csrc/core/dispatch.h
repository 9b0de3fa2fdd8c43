// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Which kernel set runs: the best one this CPU supports (avx512 > avx2 >
// popcnt > generic on x86-64, neon > generic on aarch64), or the one named
// by the environment variable MMBHVIT_KERNELS, or set_kernel_set().
#pragma once

#include "kernel_table.h"

namespace mmbhvit {

// All sets in preference order (built or not, supported or not).
constexpr int kNumSets = 5;
extern const char* const kSetNames[kNumSets];

// The set called `name` if it was built and this CPU runs it, else nullptr
// and, when why != nullptr, *why says why not ("not built for this target",
// "CPU lacks avx512vpopcntdq", "unknown kernel set").
const KernelSet* find_kernel_set(const char* name, const char** why);

// The set in use (initially the best supported one, or MMBHVIT_KERNELS).
const KernelSet& current_kernel_set();

// Selects a set by name; false (and *why) if it cannot run here.
bool set_kernel_set(const char* name, const char** why);

}  // namespace mmbhvit
