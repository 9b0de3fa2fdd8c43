// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// The body of one kernel unit (csrc/kernels/kernels_<isa>.cpp): every op
// compiled for the unit's instruction set, collected into its KernelSet.
// The unit defines MMBHVIT_NS, its MMBHVIT_ISA_* macro, MMBHVIT_SET_NAME,
// MMBHVIT_SET_FN (the kernels_<isa>() function) and MMBHVIT_PATHS (the
// kNumOps descriptions) before including this file.
#include "kernel_table.h"
#include "ops/attention.h"
#include "ops/conv.h"
#include "ops/merge.h"
#include "ops/msgdc.h"
#include "ops/proj.h"
#include "ops/shift.h"
#include "ops/sign_product.h"
#include "ops/stem.h"
#include "ops/tokens.h"

namespace mmbhvit {
namespace MMBHVIT_NS {
namespace {

template <typename T>
constexpr Kernels<T> kernel_table() {
  return Kernels<T>{&proj<T>,          &ffn<T>,           &pack<T>,
                    &msgdc<T>,         &msgdc_expand<T>,  &merge<T>,
                    &head_pack<T>,     &head_pack_t<T>,   &token_pack<T>,
                    &scores<T>,        &context<T>,       &attention<T>,
                    &shift<T>,         &merged_tokens<T>, &window_tokens<T>,
                    &merged_means<T>,  &untokens<T>,      &conv<T>,
                    &sign_product<T>,  &sign_weights<T>,  &stem<T>};
}

const KernelSet kSet = {MMBHVIT_SET_NAME, MMBHVIT_PATHS, &msgdc_lanes,
                        kernel_table<float>(), kernel_table<double>()};

}  // namespace
}  // namespace MMBHVIT_NS

const KernelSet* MMBHVIT_SET_FN() { return &MMBHVIT_NS::kSet; }

}  // namespace mmbhvit
