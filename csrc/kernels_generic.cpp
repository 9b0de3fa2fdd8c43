// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
// The packed-bit kernels built for the compiler's baseline target: runs on
// any CPU (x86-64 without POPCNT, ARM, ...).
#define MMBHVIT_NS generic
#include "binary_kernels.h"
