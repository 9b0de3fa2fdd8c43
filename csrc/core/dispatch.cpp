// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
#include "dispatch.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace mmbhvit {

const char* const kSetNames[kNumSets] = {"avx512", "avx2", "popcnt", "neon",
                                         "generic"};

namespace {

#if defined(__GNUC__) && defined(__x86_64__)
// The first CPU feature of a set this CPU lacks, or nullptr.
const char* missing_feature(const char* name) {
  __builtin_cpu_init();
  struct Need {
    const char* set;
    const char* features;  // space-separated
  };
  static const Need needs[] = {
      {"avx512",
       "avx512f avx512bw avx512dq avx512vl avx512vpopcntdq avx512bitalg avx2 "
       "fma bmi bmi2 f16c popcnt"},
      {"avx2", "avx2 fma bmi bmi2 f16c popcnt"},
      {"popcnt", "popcnt sse4.2"},
  };
  for (const Need& n : needs) {
    if (std::strcmp(n.set, name) != 0) continue;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s", n.features);
    for (char* f = std::strtok(buf, " "); f; f = std::strtok(nullptr, " ")) {
      // __builtin_cpu_supports needs a literal: compare against the list
      bool has = false;
#define MMBHVIT_FEATURE(s) \
  else if (std::strcmp(f, s) == 0) has = __builtin_cpu_supports(s);
      if (false) {
      }
      MMBHVIT_FEATURE("avx512f")
      MMBHVIT_FEATURE("avx512bw")
      MMBHVIT_FEATURE("avx512dq")
      MMBHVIT_FEATURE("avx512vl")
      MMBHVIT_FEATURE("avx512vpopcntdq")
      MMBHVIT_FEATURE("avx512bitalg")
      MMBHVIT_FEATURE("avx2")
      MMBHVIT_FEATURE("fma")
      MMBHVIT_FEATURE("bmi")
      MMBHVIT_FEATURE("bmi2")
      MMBHVIT_FEATURE("f16c")
      MMBHVIT_FEATURE("popcnt")
      MMBHVIT_FEATURE("sse4.2")
#undef MMBHVIT_FEATURE
      if (!has) {
        static char missing[64];
        std::snprintf(missing, sizeof missing, "CPU lacks %s", f);
        return missing;
      }
    }
  }
  return nullptr;
}
#else
const char* missing_feature(const char*) { return nullptr; }
#endif

const KernelSet* built_set(const char* name) {
  if (std::strcmp(name, "avx512") == 0) return kernels_avx512();
  if (std::strcmp(name, "avx2") == 0) return kernels_avx2();
  if (std::strcmp(name, "popcnt") == 0) return kernels_popcnt();
  if (std::strcmp(name, "neon") == 0) return kernels_neon();
  if (std::strcmp(name, "generic") == 0) return kernels_generic();
  return nullptr;
}

const KernelSet*& current() {
  static const KernelSet* set = [] {
    const char* env = std::getenv("MMBHVIT_KERNELS");
    if (env != nullptr && *env != '\0') {
      const char* why = nullptr;
      const KernelSet* s = find_kernel_set(env, &why);
      if (s != nullptr) return s;
      std::fprintf(stderr,
                   "mmbhvit: MMBHVIT_KERNELS=%s cannot run here (%s); using "
                   "the best supported kernel set\n",
                   env, why);
    }
    for (const char* name : kSetNames) {
      const KernelSet* s = find_kernel_set(name, nullptr);
      if (s != nullptr) return s;
    }
    return kernels_generic();
  }();
  return set;
}

}  // namespace

const KernelSet* find_kernel_set(const char* name, const char** why) {
  bool known = false;
  for (const char* n : kSetNames) known = known || std::strcmp(n, name) == 0;
  if (!known) {
    if (why) *why = "unknown kernel set (avx512, avx2, popcnt, neon, generic)";
    return nullptr;
  }
  const KernelSet* s = built_set(name);
  if (s == nullptr) {
    if (why) *why = "not built for this target";
    return nullptr;
  }
  const char* missing = missing_feature(name);
  if (missing != nullptr) {
    if (why) *why = missing;
    return nullptr;
  }
  return s;
}

const KernelSet& current_kernel_set() { return *current(); }

bool set_kernel_set(const char* name, const char** why) {
  const KernelSet* s = find_kernel_set(name, why);
  if (s == nullptr) return false;
  current() = s;
  return true;
}

}  // namespace mmbhvit
