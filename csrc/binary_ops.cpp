// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Torch bindings of the packed-bit BHViT kernels (module mmbhvit._binary_ops).
// Each op checks its tensors and runs the kernel core (csrc/core: the
// kernel set picked for this CPU, see core/dispatch.h) with the work split
// over torch's intra-op threads (at::parallel_for, so torch.set_num_threads
// applies). The float parts run in the input's dtype (float32 or float64);
// the ±1 products are integer popcounts. mmbhvit/deploy/ops.py holds the
// reference semantics of every op (its pure-PyTorch fallback).
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/dispatch.h"
#include "core/nibble_lut.h"
#include "core/runner.h"

namespace mmbhvit {
namespace {

const KernelSet& kset() { return current_kernel_set(); }

// Splits items [0, n) over torch's intra-op threads.
struct TorchParallel {
  template <typename F>
  void operator()(int64_t n, int64_t grain, F&& fn) const {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e); });
  }
};

void check_float(const torch::Tensor& t, const torch::Tensor& like,
                 const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_vec(const torch::Tensor& t, const torch::Tensor& like,
               int64_t n, const char* name) {
  check_float(t, like, name);
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got ",
              t.numel());
}

void check_words(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 &&
                  t.is_contiguous(),
              name, " must be a contiguous CPU int64 tensor of packed bits");
}

void check_tokens_like(const torch::Tensor& t, const torch::Tensor& like,
                       const char* name) {
  check_float(t, like, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must be ", like.sizes(),
              ", got ", t.sizes());
}

// The output (`sizes`, x's dtype) of an op that adds a residual: a new
// tensor, or `out` (e.g. the residual itself, when the caller has no
// further use for it: the kernels read each residual element before
// writing the output element at the same place, and an output written over
// a buffer that was just in cache costs less than a new one). out must not
// overlap `around` (an input read beyond the output's own element, if
// any), and may overlap `res` only entirely.
torch::Tensor output_tensor(const torch::Tensor& x, at::IntArrayRef sizes,
                            const c10::optional<torch::Tensor>& out,
                            const torch::Tensor* around,
                            const torch::Tensor* res) {
  if (!out.has_value()) return torch::empty(sizes, x.options());
  check_float(*out, x, "out");
  TORCH_CHECK(out->sizes() == sizes, "out must be ", sizes, ", got ",
              out->sizes());
  TORCH_CHECK(around == nullptr || at::get_overlap_status(*out, *around) ==
                                       at::MemOverlapStatus::No,
              "out must not share memory with x (read around each output)");
  TORCH_CHECK(res == nullptr || at::get_overlap_status(*out, *res) !=
                                    at::MemOverlapStatus::Partial,
              "out may be the residual itself, not part of it");
  return *out;
}

// The data of a tensor whose dtype the op has checked: the untyped accessor
// is inline, while data_ptr<T>() is a library call that checks the dtype
// again (~0.7 % of a forward, on tensors whose metadata is out of cache).
template <typename T>
const T* ptr(const torch::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == c10::CppTypeToScalarType<T>());
  return static_cast<const T*>(t.const_data_ptr());
}

const uint64_t* wptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint64_t*>(ptr<int64_t>(t));
}

int64_t words_for(int64_t bits) { return words_of(bits); }

// ---------------------------------------------------------------------------
struct ProjArgs {
  torch::Tensor thr, wt, a, b, slope, post_scale, post_bias;
  int64_t cout, shortcut;
  // A plan's projection is checked once, for inputs of `cin` channels in
  // the dtype of its tensors, and its pointers kept (params below): a
  // call then reads none of its tensors' metadata (~1 % of a forward, most
  // of it cache misses on tensors the kernels have not touched for a while)
  int64_t checked_cin = -1;
  ProjParams<float> f32{};
  ProjParams<double> f64{};

  void prepare(int64_t cin);
  bool prepared(const torch::Tensor& x, int64_t cin) const {
    return cin == checked_cin && x.scalar_type() == thr.scalar_type();
  }
  template <typename T>
  const ProjParams<T>& params() const;
};
template <>
const ProjParams<float>& ProjArgs::params<float>() const {
  return f32;
}
template <>
const ProjParams<double>& ProjArgs::params<double>() const {
  return f64;
}

void check_proj(const torch::Tensor& x, int64_t cin, const ProjArgs& p) {
  TORCH_CHECK(cin > 0 && p.cout > 0, "channel counts must be positive, got ",
              cin, " -> ", p.cout);
  check_vec(p.thr, x, cin, "thr");
  check_words(p.wt, "wt");
  const int64_t words = words_for(cin);
  TORCH_CHECK(p.wt.dim() == 2 && p.wt.size(0) == words &&
                  p.wt.size(1) >= p.cout && p.wt.size(1) % 8 == 0,
              "wt must be (", words, ", cout_pad >= ", p.cout,
              ", a multiple of 8), got ", p.wt.sizes());
  for (auto* t : {&p.a, &p.b, &p.slope, &p.post_scale, &p.post_bias})
    check_vec(*t, x, p.cout, "per-channel parameter");
  TORCH_CHECK(p.shortcut >= kNone && p.shortcut <= kGroupMean,
              "bad shortcut");
  if (p.shortcut == kIdentity)
    TORCH_CHECK(cin == p.cout, "identity: cin != cout");
  if (p.shortcut == kTile)
    TORCH_CHECK(p.cout % cin == 0, "tile shortcut: cout % cin != 0");
  if (p.shortcut == kGroupMean)
    TORCH_CHECK(cin % p.cout == 0, "mean shortcut: cin % cout != 0");
}

template <typename T>
ProjParams<T> proj_params(const ProjArgs& a, int64_t cin) {
  ProjParams<T> p{};
  p.cin = cin;
  p.cout = a.cout;
  p.thr = ptr<T>(a.thr);
  p.wt = wptr(a.wt);
  p.words = words_for(cin);
  p.cout_pad = a.wt.size(1);
  p.a = ptr<T>(a.a);
  p.b = ptr<T>(a.b);
  p.slope = ptr<T>(a.slope);
  p.post_scale = ptr<T>(a.post_scale);
  p.post_bias = ptr<T>(a.post_bias);
  p.shortcut = static_cast<int>(a.shortcut);
  return p;
}

void ProjArgs::prepare(int64_t cin) {
  check_proj(thr, cin, *this);
  if (thr.scalar_type() == torch::kFloat32)
    f32 = proj_params<float>(*this, cin);
  else
    f64 = proj_params<double>(*this, cin);
  checked_cin = cin;
}

// a's checked parameters for x (cin channels), or those of a plan's
// projection, checked once
template <typename T>
ProjParams<T> checked_params(const torch::Tensor& x, int64_t cin,
                             const ProjArgs& a) {
  if (a.prepared(x, cin)) return a.params<T>();
  check_proj(x, cin, a);
  return proj_params<T>(a, cin);
}

ProjArgs proj_args(const std::vector<torch::Tensor>& t, int64_t cout,
                   int64_t shortcut) {
  TORCH_CHECK(t.size() == 7, "expected (thr, wt, a, b, slope, post_scale, "
              "post_bias)");
  return ProjArgs{t[0], t[1], t[2], t[3], t[4], t[5], t[6], cout, shortcut};
}

// The nibble table of a projection's transposed weights (nibble_lut.h), or
// an empty tensor when the shape does not take one.
torch::Tensor nibble_lut(const torch::Tensor& wt, int64_t cin, int64_t cout) {
  TORCH_CHECK(wt.device().is_cpu() && wt.dim() == 2 && wt.is_contiguous(),
              "wt must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(wt.scalar_type() == torch::kInt64, "wt must be int64");
  TORCH_CHECK(wt.size(0) == words_for(cin) && wt.size(1) >= cout,
              "wt of shape ", wt.sizes(), " does not hold ", cin, " -> ",
              cout, " weights");
  if (!nibble_lut_fits(cin, cout)) return torch::empty({0}, torch::kInt8);
  torch::Tensor lut =
      torch::empty({nibble_lut_bytes(cin, cout)}, torch::kInt8);
  build_nibble_lut(wptr(wt), cin, cout, wt.size(1), lut.data_ptr<int8_t>());
  return lut;
}

torch::Tensor ffn_impl(const torch::Tensor& x, const torch::Tensor& residual,
                       const ProjArgs& e, const ProjArgs& r,
                       const c10::optional<torch::Tensor>& expand_lut,
                       const c10::optional<torch::Tensor>& out) {
  check_float(x, x, "x");
  const int64_t c = x.size(-1), hidden = e.cout;
  const int64_t tokens = c > 0 ? x.numel() / c : 0;
  TORCH_CHECK(r.cout == c, "the reduction gives ", r.cout,
              " channels, x has ", c);
  check_tokens_like(residual, x, "residual");
  const int8_t* lut = nullptr;
  if (expand_lut.has_value() && expand_lut->numel() > 0) {
    const torch::Tensor& t = *expand_lut;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt8 &&
                    t.is_contiguous(),
                "expand_lut must be a contiguous int8 CPU tensor");
    TORCH_CHECK(nibble_lut_fits(c, hidden) &&
                    t.numel() == nibble_lut_bytes(c, hidden),
                "expand_lut of ", t.numel(), " bytes is not the nibble "
                "table of a ", c, " -> ", hidden, " expansion");
    lut = static_cast<const int8_t*>(t.const_data_ptr());
  }
  torch::Tensor y = output_tensor(x, x.sizes(), out, &x, &residual);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_ffn", [&] {
    FfnParams<scalar_t> p{};
    p.expand = checked_params<scalar_t>(x, c, e);
    p.expand.x = ptr<scalar_t>(x);
    p.expand.tokens = tokens;
    p.expand.lut = lut;
    p.reduce = checked_params<scalar_t>(x, hidden, r);
    p.reduce.tokens = tokens;
    p.reduce.residual = ptr<scalar_t>(residual);
    p.reduce.y = y.data_ptr<scalar_t>();
    run_ffn(kset(), p, TorchParallel());
  });
  return y;
}

torch::Tensor ffn(const torch::Tensor& x, const torch::Tensor& residual,
                  const std::vector<torch::Tensor>& expand, int64_t hidden,
                  int64_t expand_shortcut,
                  const std::vector<torch::Tensor>& reduce,
                  int64_t reduce_shortcut,
                  const c10::optional<torch::Tensor>& expand_lut,
                  const c10::optional<torch::Tensor>& out) {
  // ffn_impl checks x (x.size(-1): only its channel count is read here)
  return ffn_impl(x, residual, proj_args(expand, hidden, expand_shortcut),
                  proj_args(reduce, x.size(-1), reduce_shortcut), expand_lut,
                  out);
}

// The next block norm of the rows [b, e) of y (c values each): yn = y * s,
// then yn + bias, the two roundings of the PyTorch fallback.
template <typename T>
void affine_rows(const T* y, T* yn, int64_t b, int64_t e, int64_t c,
                 const T* s, const T* bias) {
  for (int64_t r = b; r < e; ++r) {
    const T* __restrict src = y + r * c;
    T* __restrict dst = yn + r * c;
    for (int64_t o = 0; o < c; ++o) {
      const T v = src[o] * s[o];
      dst[o] = v + bias[o];
    }
  }
}

// TorchParallel that also writes the next norm of each range of tokens the
// projection has just written (while they are in cache).
template <typename T>
struct ParallelWithNorm {
  const T* y;
  T* yn;
  int64_t c;
  const T* s;
  const T* bias;
  template <typename F>
  void operator()(int64_t n, int64_t grain, F&& fn) const {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
      fn(b, e);
      affine_rows(y, yn, b, e, c, s, bias);
    });
  }
};

// y = proj(x) (+ residual); with norm_scale / norm_bias also
// yn = y * norm_scale + norm_bias (the next block norm), returned as {y, yn}.
std::vector<torch::Tensor> proj_impl(
    const torch::Tensor& x, const ProjArgs& args,
    const c10::optional<torch::Tensor>& residual,
    const c10::optional<torch::Tensor>& norm_scale,
    const c10::optional<torch::Tensor>& norm_bias,
    const c10::optional<torch::Tensor>& out) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have a channel dimension");
  const int64_t cin = x.size(-1), cout = args.cout;
  const int64_t tokens = cin > 0 ? x.numel() / cin : 0;
  const bool prepared = args.prepared(x, cin);
  if (!prepared) check_proj(x, cin, args);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = cout;
  if (residual.has_value()) {
    check_float(*residual, x, "residual");
    TORCH_CHECK(residual->sizes() == out_sizes, "residual must be ",
                out_sizes, ", got ", residual->sizes());
  }
  // a token's residual is read before its outputs are written
  torch::Tensor y = output_tensor(x, out_sizes, out, &x,
                                  residual.has_value() ? &*residual : nullptr);
  const bool norm = norm_scale.has_value();
  TORCH_CHECK(norm == norm_bias.has_value(),
              "norm_scale and norm_bias go together");
  torch::Tensor yn;
  if (norm) {
    check_vec(*norm_scale, x, cout, "norm_scale");
    check_vec(*norm_bias, x, cout, "norm_bias");
    yn = torch::empty_like(y);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_proj", [&] {
    ProjParams<scalar_t> p = prepared ? args.params<scalar_t>()
                                      : proj_params<scalar_t>(args, cin);
    p.x = ptr<scalar_t>(x);
    p.tokens = tokens;
    p.residual = residual.has_value() ? ptr<scalar_t>(*residual) : nullptr;
    p.y = y.data_ptr<scalar_t>();
    if (norm) {
      run_proj(kset(), p,
               ParallelWithNorm<scalar_t>{p.y, yn.data_ptr<scalar_t>(), cout,
                                          ptr<scalar_t>(*norm_scale),
                                          ptr<scalar_t>(*norm_bias)});
    } else {
      run_proj(kset(), p, TorchParallel());
    }
  });
  if (norm) return {y, yn};
  return {y};
}

torch::Tensor proj(const torch::Tensor& x, const torch::Tensor& thr,
                   const torch::Tensor& wt, int64_t cout,
                   const torch::Tensor& a, const torch::Tensor& b,
                   const torch::Tensor& slope, const torch::Tensor& post_scale,
                   const torch::Tensor& post_bias, int64_t shortcut,
                   const c10::optional<torch::Tensor>& residual,
                   const c10::optional<torch::Tensor>& out) {
  const ProjArgs args{thr, wt, a, b, slope, post_scale, post_bias, cout,
                      shortcut};
  return proj_impl(x, args, residual, c10::nullopt, c10::nullopt, out)[0];
}

std::vector<torch::Tensor> proj_norm(
    const torch::Tensor& x, const std::vector<torch::Tensor>& params,
    int64_t cout, int64_t shortcut,
    const c10::optional<torch::Tensor>& residual,
    const torch::Tensor& norm_scale, const torch::Tensor& norm_bias,
    const c10::optional<torch::Tensor>& out) {
  return proj_impl(x, proj_args(params, cout, shortcut), residual, norm_scale,
                   norm_bias, out);
}

// ---------------------------------------------------------------------------
std::vector<torch::Tensor> msgdc(
    const torch::Tensor& x, const torch::Tensor& in_scale,
    const torch::Tensor& in_bias, const torch::Tensor& thr, int64_t groups,
    const std::vector<int64_t>& dilations,
    const std::vector<torch::Tensor>& wts, const std::vector<torch::Tensor>& as,
    const std::vector<torch::Tensor>& bs,
    const std::vector<torch::Tensor>& slopes, const torch::Tensor& out_scale,
    const torch::Tensor& out_bias, const torch::Tensor& n2_scale,
    const torch::Tensor& n2_bias, const std::vector<torch::Tensor>& lane_wts,
    const c10::optional<torch::Tensor>& out) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C), got ", x.sizes());
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  TORCH_CHECK(groups >= 1 && c % groups == 0, "bad groups");
  const int64_t cg = c / groups, wg = words_for(cg);
  const int ndil = static_cast<int>(dilations.size());
  TORCH_CHECK(ndil >= 1 && ndil <= kMaxDilations, "1..", kMaxDilations,
              " dilations supported");
  TORCH_CHECK(static_cast<int>(wts.size()) == ndil &&
                  static_cast<int>(as.size()) == ndil &&
                  static_cast<int>(bs.size()) == ndil &&
                  static_cast<int>(slopes.size()) == ndil,
              "one weight/a/b/slope per dilation");
  // lane path (kernel sets with a lane core): 4 groups of 16 or 32 channels
  const KernelSet& ks = kset();
  const bool lanes = msgdc_takes_lanes(ks, c, groups,
                                       static_cast<int>(lane_wts.size()) == ndil);
  const int64_t nvec = lanes ? (c + 512 / cg - 1) / (512 / cg) : 0;
  if (lanes) {
    for (int i = 0; i < ndil; ++i) {
      check_words(lane_wts[i], "msgdc lane weight");
      TORCH_CHECK(lane_wts[i].dim() == 3 && lane_wts[i].size(0) == 9 &&
                      lane_wts[i].size(1) == nvec && lane_wts[i].size(2) == 8,
                  "msgdc lane weight must be (9, ", nvec, ", 8), got ",
                  lane_wts[i].sizes());
    }
  }
  // h may be written over x: its bits are packed before any output, then
  // each pixel reads its own x before writing its h
  torch::Tensor h_out = output_tensor(x, x.sizes(), out, nullptr, &x);
  torch::Tensor hn_out = torch::empty_like(x);
  for (auto* t : {&in_scale, &in_bias, &thr, &out_scale, &out_bias,
                  &n2_scale, &n2_bias})
    check_vec(*t, x, c, "per-channel parameter");
  const int64_t cout_pad = wts[0].size(-1);
  for (int i = 0; i < ndil; ++i) {
    check_words(wts[i], "msgdc weight");
    TORCH_CHECK(wts[i].dim() == 3 && wts[i].size(0) == 9 &&
                    wts[i].size(1) == wg && wts[i].size(2) == cout_pad &&
                    cout_pad >= c && cout_pad % 8 == 0,
                "msgdc weight must be (9, ", wg, ", cout_pad), got ",
                wts[i].sizes());
    check_vec(as[i], x, c, "a");
    check_vec(bs[i], x, c, "b");
    check_vec(slopes[i], x, c, "slope");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_msgdc", [&] {
    MsgdcParams<scalar_t> p{};
    p.x = ptr<scalar_t>(x);
    p.n = n;
    p.h = h;
    p.w = w;
    p.c = c;
    p.groups = groups;
    p.cg = cg;
    p.wg = wg;
    p.cout_pad = cout_pad;
    p.ndil = ndil;
    for (int i = 0; i < ndil; ++i) {
      p.dil[i] = static_cast<int>(dilations[i]);
      p.wt[i] = wptr(wts[i]);
      p.a[i] = ptr<scalar_t>(as[i]);
      p.b[i] = ptr<scalar_t>(bs[i]);
      p.slope[i] = ptr<scalar_t>(slopes[i]);
    }
    p.out_scale = ptr<scalar_t>(out_scale);
    p.out_bias = ptr<scalar_t>(out_bias);
    p.n2_scale = ptr<scalar_t>(n2_scale);
    p.n2_bias = ptr<scalar_t>(n2_bias);
    p.h_out = h_out.data_ptr<scalar_t>();
    p.hn_out = hn_out.data_ptr<scalar_t>();
    if (lanes)
      for (int i = 0; i < ndil; ++i) p.wx[i] = wptr(lane_wts[i]);
    run_msgdc(ks, p, lanes, ptr<scalar_t>(in_scale), ptr<scalar_t>(in_bias),
              ptr<scalar_t>(thr), TorchParallel());
  });
  return {h_out, hn_out};
}

// ---------------------------------------------------------------------------
// The fields of SpatialParams from checked tensors: x (N, H, W, C) and the
// packed weights wt (taps, words, cout_pad); y is the output.
template <typename T>
void fill_spatial(SpatialParams<T>& p, const torch::Tensor& x,
                  const torch::Tensor& wt, int64_t cout,
                  const torch::Tensor& a, const torch::Tensor& b,
                  const torch::Tensor& slope, const torch::Tensor& post_bias,
                  torch::Tensor& y) {
  p.x = ptr<T>(x);
  p.n = x.size(0);
  p.h = x.size(1);
  p.w = x.size(2);
  p.cin = x.size(3);
  p.cout = cout;
  p.words = wt.size(1);
  p.cout_pad = wt.size(2);
  p.wt = wptr(wt);
  p.a = ptr<T>(a);
  p.b = ptr<T>(b);
  p.slope = ptr<T>(slope);
  p.post_bias = ptr<T>(post_bias);
  p.y = y.data_ptr<T>();
}

// in_scale defined: x before the input norm (merge_norm).
static torch::Tensor merge_impl(const torch::Tensor& x,
                                const torch::Tensor* in_scale,
                                const torch::Tensor* in_bias,
                                const torch::Tensor& thr,
                                const torch::Tensor& wt, int64_t cout,
                                const torch::Tensor& a, const torch::Tensor& b,
                                const torch::Tensor& slope,
                                const torch::Tensor& post_bias,
                                const torch::Tensor& pos) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() == 4 && x.size(1) % 2 == 0 && x.size(2) % 2 == 0,
              "x must be (N, H, W, C) with even H, W, got ", x.sizes());
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cin = x.size(3);
  TORCH_CHECK(cin > 0 && cout > 0 && cout % cin == 0,
              "binary merging tiles its input: cout must be a positive "
              "multiple of cin, got ", cin, " -> ", cout);
  const int64_t words = words_for(cin);
  check_words(wt, "wt");
  TORCH_CHECK(wt.dim() == 3 && wt.size(0) == 4 && wt.size(1) == words &&
                  wt.size(2) >= cout && wt.size(2) % 8 == 0,
              "merge weight must be (4, ", words, ", cout_pad), got ",
              wt.sizes());
  check_vec(thr, x, cin, "thr");
  if (in_scale != nullptr) {
    check_vec(*in_scale, x, cin, "in_scale");
    check_vec(*in_bias, x, cin, "in_bias");
  }
  for (auto* t : {&a, &b, &slope, &post_bias})
    check_vec(*t, x, cout, "per-channel parameter");
  check_vec(pos, x, (h / 2) * (w / 2) * cout, "pos");
  torch::Tensor y = torch::empty({n, h / 2, w / 2, cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_merge", [&] {
    MergeParams<scalar_t> p{};
    fill_spatial(p, x, wt, cout, a, b, slope, post_bias, y);
    p.pos = ptr<scalar_t>(pos);
    if (in_scale != nullptr) {
      p.in_scale = ptr<scalar_t>(*in_scale);
      p.in_bias = ptr<scalar_t>(*in_bias);
    }
    run_merge(kset(), p, ptr<scalar_t>(thr), TorchParallel());
  });
  return y;
}

torch::Tensor merge(const torch::Tensor& x, const torch::Tensor& thr,
                    const torch::Tensor& wt, int64_t cout,
                    const torch::Tensor& a, const torch::Tensor& b,
                    const torch::Tensor& slope, const torch::Tensor& post_bias,
                    const torch::Tensor& pos) {
  return merge_impl(x, nullptr, nullptr, thr, wt, cout, a, b, slope,
                    post_bias, pos);
}

torch::Tensor merge_norm(const torch::Tensor& x, const torch::Tensor& in_scale,
                         const torch::Tensor& in_bias,
                         const torch::Tensor& thr, const torch::Tensor& wt,
                         int64_t cout, const torch::Tensor& a,
                         const torch::Tensor& b, const torch::Tensor& slope,
                         const torch::Tensor& post_bias,
                         const torch::Tensor& pos) {
  return merge_impl(x, &in_scale, &in_bias, thr, wt, cout, a, b, slope,
                    post_bias, pos);
}

// ---------------------------------------------------------------------------
torch::Tensor conv(const torch::Tensor& x, const torch::Tensor& thr,
                   const torch::Tensor& wt, int64_t cout, int64_t k,
                   const torch::Tensor& a, const torch::Tensor& b,
                   const torch::Tensor& slope, const torch::Tensor& post_scale,
                   const torch::Tensor& post_bias, int64_t shortcut) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C), got ", x.sizes());
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), cin = x.size(3);
  TORCH_CHECK(k >= 1 && k % 2 == 1 && k * k <= 49,
              "kernel size must be odd and at most 7, got ", k);
  TORCH_CHECK(cin > 0 && cout > 0, "channel counts must be positive, got ",
              cin, " -> ", cout);
  const int64_t words = words_for(cin);
  check_words(wt, "wt");
  TORCH_CHECK(wt.dim() == 3 && wt.size(0) == k * k && wt.size(1) == words &&
                  wt.size(2) >= cout && wt.size(2) % 8 == 0,
              "conv weight must be (", k * k, ", ", words,
              ", cout_pad >= ", cout, ", a multiple of 8), got ", wt.sizes());
  check_vec(thr, x, cin, "thr");
  for (auto* t : {&a, &b, &slope, &post_scale, &post_bias})
    check_vec(*t, x, cout, "per-channel parameter");
  TORCH_CHECK(shortcut >= kNone && shortcut <= kChunkMean, "bad shortcut");
  if (shortcut == kIdentity)
    TORCH_CHECK(cin == cout, "identity shortcut: cin != cout");
  if (shortcut == kTile)
    TORCH_CHECK(cout % cin == 0, "tile shortcut: cout % cin != 0");
  if (shortcut == kGroupMean || shortcut == kChunkMean)
    TORCH_CHECK(cin % cout == 0, "mean shortcut: cin % cout != 0");
  torch::Tensor y = torch::empty({n, h, w, cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_conv", [&] {
    ConvParams<scalar_t> p{};
    fill_spatial(p, x, wt, cout, a, b, slope, post_bias, y);
    p.k = static_cast<int>(k);
    p.post_scale = ptr<scalar_t>(post_scale);
    p.shortcut = static_cast<int>(shortcut);
    run_conv(kset(), p, ptr<scalar_t>(thr), TorchParallel());
  });
  return y;
}

// ---------------------------------------------------------------------------
// The softmax table of attn_scores / attention (float32 q only).
const double* table_data(const torch::Tensor& tb, const torch::Tensor& q,
                         int64_t heads) {
  const int64_t c = q.size(2);
  TORCH_CHECK(q.scalar_type() == torch::kFloat32,
              "table: the attention map from a table is float32 only (q is ",
              q.scalar_type(), ")");
  TORCH_CHECK(tb.device().is_cpu() && tb.scalar_type() == torch::kFloat64 &&
                  tb.dim() == 1 && tb.size(0) == c / heads + 1 &&
                  tb.is_contiguous(),
              "table must be a contiguous CPU float64 vector of head dim "
              "+ 1 = ", c / heads + 1, " values, got ", tb.scalar_type(),
              " ", tb.sizes());
  return tb.data_ptr<double>();
}

// q (B, T, C) and k like it, C split into `heads`.
void check_heads(const torch::Tensor& q, const torch::Tensor& k,
                 int64_t heads) {
  check_float(q, q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be (B, T, C), got ", q.sizes());
  check_tokens_like(k, q, "k");
  TORCH_CHECK(heads >= 1 && q.size(2) % heads == 0,
              "channels not divisible by heads");
}

torch::Tensor attn_scores(const torch::Tensor& q, const torch::Tensor& k,
                          const torch::Tensor& thr_q,
                          const torch::Tensor& thr_k, int64_t heads,
                          double scale,
                          const c10::optional<torch::Tensor>& table) {
  check_heads(q, k, heads);
  const int64_t b = q.size(0), t = q.size(1), c = q.size(2);
  check_vec(thr_q, q, c, "thr_q");
  check_vec(thr_k, q, c, "thr_k");
  const double* tab = table.has_value() ? table_data(*table, q, heads)
                                        : nullptr;
  torch::Tensor s = torch::empty({b, heads, t, t}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mmbhvit_scores", [&] {
    run_scores(kset(), ptr<scalar_t>(q), ptr<scalar_t>(k),
               ptr<scalar_t>(thr_q), ptr<scalar_t>(thr_k), b, t, c, heads,
               static_cast<scalar_t>(scale), s.data_ptr<scalar_t>(),
               TorchParallel(), tab);
  });
  return s;
}

// The quantizer and epilogue arguments of attn_context / attention.
struct ContextArgs {
  int64_t mode, levels;
  const c10::optional<torch::Tensor>& step;
  const c10::optional<torch::Tensor>& zero;
  const std::vector<double>& gsb;
  const torch::Tensor& ctx_a;
  const torch::Tensor& ctx_b;
  const torch::Tensor& slope;
  const torch::Tensor& post_bias;

  void check(const torch::Tensor& q, const torch::Tensor& v,
             const torch::Tensor& thr_v, int64_t heads) const {
    check_tokens_like(v, q, "v");
    const int64_t c = q.size(2);
    check_vec(thr_v, q, c, "thr_v");
    for (auto* x : {&ctx_a, &ctx_b, &slope, &post_bias})
      check_vec(*x, q, c, "per-channel parameter");
    TORCH_CHECK(mode == kLSQ || mode == kGSB,
                "mode must be 0 (LSQ) or 1 (GSB)");
    if (mode == kLSQ) {
      TORCH_CHECK(levels >= 1 && levels < 256, "levels must be in 1..255");
      TORCH_CHECK(step.has_value() && zero.has_value(),
                  "LSQ needs step, zero");
      check_vec(*step, q, heads, "step");
      check_vec(*zero, q, heads, "zero");
    } else {
      TORCH_CHECK(gsb.size() == 6,
                  "GSB needs (alpha, a, b1, b2, low, high), got ", gsb.size());
    }
  }

  // everything but p, vbits and tw
  template <typename T>
  ContextParams<T> params(const torch::Tensor& q, const torch::Tensor& k,
                          const torch::Tensor& v, int64_t heads,
                          torch::Tensor& out) const {
    ContextParams<T> p{};
    p.q = ptr<T>(q);
    p.k = ptr<T>(k);
    p.v = ptr<T>(v);
    p.b = q.size(0);
    p.t = q.size(1);
    p.c = q.size(2);
    p.heads = heads;
    p.d = p.c / heads;
    p.mode = static_cast<int>(mode);
    p.levels = static_cast<int>(levels);
    if (mode == kLSQ) {
      p.step = ptr<T>(*step);
      p.zero = ptr<T>(*zero);
    } else {
      p.g_alpha = static_cast<T>(gsb[0]);
      p.g_a = static_cast<T>(gsb[1]);
      p.g_b1 = static_cast<T>(gsb[2]);
      p.g_b2 = static_cast<T>(gsb[3]);
      p.g_low = static_cast<T>(gsb[4]);
      p.g_high = static_cast<T>(gsb[5]);
    }
    p.ctx_a = ptr<T>(ctx_a);
    p.ctx_b = ptr<T>(ctx_b);
    p.slope = ptr<T>(slope);
    p.post_bias = ptr<T>(post_bias);
    p.out = out.data_ptr<T>();
    return p;
  }
};

torch::Tensor attn_context(const torch::Tensor& probs, const torch::Tensor& q,
                           const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& thr_v, int64_t heads,
                           int64_t mode, int64_t levels,
                           const c10::optional<torch::Tensor>& step,
                           const c10::optional<torch::Tensor>& zero,
                           const std::vector<double>& gsb,
                           const torch::Tensor& ctx_a,
                           const torch::Tensor& ctx_b,
                           const torch::Tensor& slope,
                           const torch::Tensor& post_bias) {
  check_heads(q, k, heads);
  const int64_t b = q.size(0), t = q.size(1);
  check_float(probs, q, "probs");
  TORCH_CHECK(probs.dim() == 4 && probs.size(0) == b &&
                  probs.size(1) == heads && probs.size(2) == t &&
                  probs.size(3) == t,
              "probs must be (", b, ", ", heads, ", ", t, ", ", t, "), got ",
              probs.sizes());
  const ContextArgs args{mode, levels, step, zero, gsb,
                         ctx_a, ctx_b, slope, post_bias};
  args.check(q, v, thr_v, heads);
  torch::Tensor out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mmbhvit_context", [&] {
    ContextParams<scalar_t> p = args.params<scalar_t>(q, k, v, heads, out);
    p.p = ptr<scalar_t>(probs);
    run_context(kset(), p, ptr<scalar_t>(thr_v), TorchParallel());
  });
  return out;
}

// attn_context(attn_scores(q, k, ..., table), q, k, v, ...) in one pass
// (float32 with the softmax table): the same numbers, the map never stored.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k,
                        const torch::Tensor& v, const torch::Tensor& thr_q,
                        const torch::Tensor& thr_k,
                        const torch::Tensor& thr_v, int64_t heads,
                        const torch::Tensor& table, int64_t mode,
                        int64_t levels,
                        const c10::optional<torch::Tensor>& step,
                        const c10::optional<torch::Tensor>& zero,
                        const std::vector<double>& gsb,
                        const torch::Tensor& ctx_a,
                        const torch::Tensor& ctx_b,
                        const torch::Tensor& slope,
                        const torch::Tensor& post_bias) {
  check_heads(q, k, heads);
  check_vec(thr_q, q, q.size(2), "thr_q");
  check_vec(thr_k, q, q.size(2), "thr_k");
  const double* tab = table_data(table, q, heads);
  const ContextArgs args{mode, levels, step, zero, gsb,
                         ctx_a, ctx_b, slope, post_bias};
  args.check(q, v, thr_v, heads);
  torch::Tensor out = torch::empty_like(q);
  ContextParams<float> p = args.params<float>(q, k, v, heads, out);
  run_attention(kset(), p, ptr<float>(thr_q), ptr<float>(thr_k),
                ptr<float>(thr_v), tab, TorchParallel());
  return out;
}

// ---------------------------------------------------------------------------
// The training forward of a 1-bit 1x1 convolution: x (N, C, H, W) of signs,
// weight (O, C, 1, 1) binarized (rows of +s_o / -s_o). An undefined tensor
// (None in Python) when an input or a weight is not such a sign.
torch::Tensor sign_product(const torch::Tensor& x, const torch::Tensor& weight,
                           const c10::optional<torch::Tensor>& bias) {
  check_float(x, x, "x");
  check_float(weight, x, "weight");
  TORCH_CHECK(x.dim() == 4, "x must be (N, C, H, W), got ", x.sizes());
  const int64_t n = x.size(0), cin = x.size(1);
  const int64_t pixels = x.size(2) * x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == cin &&
                  weight.size(2) == 1 && weight.size(3) == 1 &&
                  weight.size(0) > 0 && cin > 0,
              "weight must be (O, ", cin, ", 1, 1), got ", weight.sizes());
  const int64_t cout = weight.size(0);
  if (bias.has_value()) check_vec(*bias, x, cout, "bias");
  torch::Tensor y = torch::empty({n, cout, x.size(2), x.size(3)}, x.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_sign_product", [&] {
    SignProductParams<scalar_t> p{};
    p.x = ptr<scalar_t>(x);
    p.bias = bias.has_value() ? ptr<scalar_t>(*bias) : nullptr;
    p.n = n;
    p.cin = cin;
    p.cout = cout;
    p.pixels = pixels;
    p.y = y.data_ptr<scalar_t>();
    ok = run_sign_product(kset(), p, ptr<scalar_t>(weight), TorchParallel());
  });
  return ok ? y : torch::Tensor();
}

// ---------------------------------------------------------------------------
torch::Tensor stem(const torch::Tensor& x, const torch::Tensor& wt,
                   const torch::Tensor& bias,
                   const c10::optional<torch::Tensor>& pos, bool gelu) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() == 4 && x.size(2) % 4 == 0 && x.size(3) % 4 == 0,
              "x must be (N, C, H, W) with H and W multiples of 4, got ",
              x.sizes());
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(wt.dim() == 2 && wt.size(0) == cin * 16,
              "wt must be (", cin * 16, ", C_out), got ", wt.sizes());
  check_float(wt, x, "wt");
  const int64_t cout = wt.size(1);
  check_vec(bias, x, cout, "bias");
  if (pos.has_value()) check_vec(*pos, x, (h / 4) * (w / 4) * cout, "pos");
  torch::Tensor y = torch::empty({n, h / 4, w / 4, cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_stem", [&] {
    StemParams<scalar_t> p{};
    p.x = ptr<scalar_t>(x);
    p.n = n;
    p.cin = cin;
    p.h = h;
    p.w = w;
    p.cout = cout;
    p.wt = ptr<scalar_t>(wt);
    p.bias = ptr<scalar_t>(bias);
    p.gelu = gelu ? 1 : 0;
    p.pos = pos.has_value() ? ptr<scalar_t>(*pos) : nullptr;
    p.y = y.data_ptr<scalar_t>();
    run_stem(kset(), p, TorchParallel());
  });
  return y;
}

// ---------------------------------------------------------------------------
torch::Tensor shift(const torch::Tensor& x,
                    const c10::optional<torch::Tensor>& res,
                    const torch::Tensor& dy, const torch::Tensor& dx,
                    const torch::Tensor& wk, const torch::Tensor& bias,
                    const c10::optional<torch::Tensor>& out) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C), got ", x.sizes());
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  TORCH_CHECK(dy.scalar_type() == torch::kInt32 &&
                  dx.scalar_type() == torch::kInt32 && dy.is_contiguous() &&
                  dx.is_contiguous() && dy.numel() == dx.numel(),
              "dy, dx must be int32 vectors of the same length");
  const int ntaps = static_cast<int>(dy.numel());
  TORCH_CHECK(ntaps <= 16, "at most 16 taps");
  check_vec(wk, x, int64_t(ntaps) * c, "wk");
  check_vec(bias, x, c, "bias");
  if (res.has_value()) check_tokens_like(*res, x, "res");
  torch::Tensor y = output_tensor(x, x.sizes(), out, &x,
                                  res.has_value() ? &*res : nullptr);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_shift", [&] {
    ShiftParams<scalar_t> p{};
    p.x = ptr<scalar_t>(x);
    p.res = res.has_value() ? ptr<scalar_t>(*res) : nullptr;
    p.n = n;
    p.h = h;
    p.w = w;
    p.c = c;
    p.ntaps = ntaps;
    p.dy = dy.data_ptr<int32_t>();
    p.dx = dx.data_ptr<int32_t>();
    p.wk = ptr<scalar_t>(wk);
    p.bias = ptr<scalar_t>(bias);
    p.y = y.data_ptr<scalar_t>();
    run_shift(kset(), p, TorchParallel());
  });
  return y;
}

// ---------------------------------------------------------------------------
static WindowGrid window_grid(int64_t n, int64_t h, int64_t w, int64_t c,
                              int64_t s) {
  TORCH_CHECK(s >= 1, "window size must be positive");
  return WindowGrid{n, h, w, c, s, (h + s - 1) / s, (w + s - 1) / s};
}

torch::Tensor attn_tokens(const torch::Tensor& x, const torch::Tensor& scale,
                          const torch::Tensor& bias, const torch::Tensor& mix,
                          const torch::Tensor& rest, int64_t s) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C), got ", x.sizes());
  const int64_t c = x.size(3);
  for (auto* t : {&scale, &bias, &mix, &rest})
    check_vec(*t, x, c, "per-channel parameter");
  const WindowGrid g = window_grid(x.size(0), x.size(1), x.size(2), c, s);
  const int64_t n = g.n, cells = g.cells();
  torch::Tensor tokens =
      torch::empty({n * cells, s * s + cells, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_tokens", [&] {
    TokensParams<scalar_t> p{};
    static_cast<WindowGrid&>(p) = g;
    p.x = ptr<scalar_t>(x);
    p.scale = ptr<scalar_t>(scale);
    p.bias = ptr<scalar_t>(bias);
    p.mix = ptr<scalar_t>(mix);
    p.rest = ptr<scalar_t>(rest);
    p.tokens = tokens.data_ptr<scalar_t>();
    run_tokens(kset(), p, TorchParallel());
  });
  return tokens;
}

torch::Tensor attn_untokens(const torch::Tensor& a, const torch::Tensor& mix,
                            const torch::Tensor& rest, int64_t n, int64_t h,
                            int64_t w, int64_t s) {
  check_float(a, a, "a");
  TORCH_CHECK(n >= 1 && h >= 1 && w >= 1, "bad sizes");
  TORCH_CHECK(a.dim() == 3, "a must be 3-d, got ", a.sizes());
  const int64_t c = a.size(2);
  const WindowGrid g = window_grid(n, h, w, c, s);
  const int64_t cells = g.cells();
  TORCH_CHECK(a.size(0) == n * cells && a.size(1) == s * s + cells,
              "a must be (", n * cells, ", ", s * s + cells, ", C), got ",
              a.sizes());
  check_vec(mix, a, c, "mix");
  check_vec(rest, a, c, "rest");
  torch::Tensor out = torch::empty({n, h, w, c}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mmbhvit_untokens", [&] {
    UntokensParams<scalar_t> p{};
    static_cast<WindowGrid&>(p) = g;
    p.a = ptr<scalar_t>(a);
    p.mix = ptr<scalar_t>(mix);
    p.rest = ptr<scalar_t>(rest);
    p.out = out.data_ptr<scalar_t>();
    run_untokens(kset(), p, TorchParallel());
  });
  return out;
}

// ---------------------------------------------------------------------------
// The MSMHA token mixer of one block as one call: the ops PackedMSMHA.forward
// runs one by one (mmbhvit/deploy/blocks/msmha.py), in the same order and
// through the same functions, so the same numbers (with the float32 softmax
// table, attention(): scores and context in one pass, the same numbers as
// the two ops); its tensors are bound once, when the engine is built. Per
// forward this saves ~8 Python-level op calls per block (their argument
// conversion and interpreter time).
struct MSMHAPlan {
  int64_t window;
  torch::Tensor mix, rest, ln_weight, ln_bias;
  double ln_eps;
  ProjArgs q, k, v, proj;
  int64_t heads;
  double scale;
  c10::optional<torch::Tensor> table;
  torch::Tensor thr_q, thr_k, thr_v;
  int64_t mode, levels;
  c10::optional<torch::Tensor> step, zero;
  std::vector<double> gsb;
  torch::Tensor ctx_a, ctx_b, ctx_slope, ctx_post, out_mix, out_rest;

  // (h, norm2(h)) with h = x + MSMHA(norm1(x)); out: where to write h
  std::vector<torch::Tensor> forward(
      const torch::Tensor& x, const torch::Tensor& norm1_scale,
      const torch::Tensor& norm1_bias, const torch::Tensor& norm2_scale,
      const torch::Tensor& norm2_bias,
      const c10::optional<torch::Tensor>& out) const {
    // attn_tokens checks x (a contiguous (N, H, W, C) map of the dtype)
    torch::Tensor tok =
        attn_tokens(x, norm1_scale, norm1_bias, mix, rest, window);
    const int64_t n = x.size(0), h = x.size(1), w = x.size(2);
    tok = at::layer_norm(tok, {x.size(3)}, ln_weight, ln_bias, ln_eps);
    const c10::optional<torch::Tensor> none;
    const torch::Tensor qt = proj_impl(tok, q, none, none, none, none)[0];
    const torch::Tensor kt = proj_impl(tok, k, none, none, none, none)[0];
    const torch::Tensor vt = proj_impl(tok, v, none, none, none, none)[0];
    torch::Tensor a;
    if (table.has_value()) {  // scores and context in one pass
      a = attention(qt, kt, vt, thr_q, thr_k, thr_v, heads, *table, mode,
                    levels, step, zero, gsb, ctx_a, ctx_b, ctx_slope,
                    ctx_post);
    } else {
      const torch::Tensor p =
          at::softmax(attn_scores(qt, kt, thr_q, thr_k, heads, scale, table),
                      -1);
      a = attn_context(p, qt, kt, vt, thr_v, heads, mode, levels, step, zero,
                       gsb, ctx_a, ctx_b, ctx_slope, ctx_post);
    }
    const torch::Tensor mixed =
        attn_untokens(a, out_mix, out_rest, n, h, w, window);
    return proj_impl(mixed, proj, x, norm2_scale, norm2_bias, out);
  }
};

// The other ops of a block with their tensors bound (the plans of
// PackedMSGDC, PackedFFN and PackedShift), and a block as one call: the
// ops of PackedBlock.forward in its order (mmbhvit/deploy/blocks/block.py).
struct MSGDCPlan {
  torch::Tensor thr;
  int64_t groups;
  std::vector<int64_t> dilations;
  std::vector<torch::Tensor> wts, as, bs, slopes, lane_wts;
  torch::Tensor out_scale, out_bias;

  std::vector<torch::Tensor> forward(
      const torch::Tensor& x, const torch::Tensor& norm1_scale,
      const torch::Tensor& norm1_bias, const torch::Tensor& norm2_scale,
      const torch::Tensor& norm2_bias,
      const c10::optional<torch::Tensor>& out) const {
    return msgdc(x, norm1_scale, norm1_bias, thr, groups, dilations, wts, as,
                 bs, slopes, out_scale, out_bias, norm2_scale, norm2_bias,
                 lane_wts, out);
  }
};

struct FFNPlan {
  ProjArgs expand, reduce;  // prepared
  c10::optional<torch::Tensor> expand_lut;

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual,
                        const c10::optional<torch::Tensor>& out) const {
    return ffn_impl(x, residual, expand, reduce, expand_lut, out);
  }
};

struct ShiftPlan {
  torch::Tensor dy, dx, weight, bias;

  torch::Tensor forward(const torch::Tensor& x,
                        const c10::optional<torch::Tensor>& res,
                        const c10::optional<torch::Tensor>& out) const {
    return shift(x, res, dy, dx, weight, bias, out);
  }
};

struct BlockPlan {
  torch::Tensor norm1_scale, norm1_bias, norm2_scale, norm2_bias;
  std::shared_ptr<MSMHAPlan> msmha;  // the token mixer: one of the two
  std::shared_ptr<MSGDCPlan> msgdc;
  std::shared_ptr<FFNPlan> ffn;
  std::shared_ptr<ShiftPlan> shifts;  // or none

  // the block's output, written over x (as PackedBlock.forward)
  torch::Tensor forward(const torch::Tensor& x) const {
    // h = x + mixer(norm1(x)), written over x, and norm2(h)
    const std::vector<torch::Tensor> h_hn =
        msmha ? msmha->forward(x, norm1_scale, norm1_bias, norm2_scale,
                               norm2_bias, x)
              : msgdc->forward(x, norm1_scale, norm1_bias, norm2_scale,
                               norm2_bias, x);
    const torch::Tensor &h = h_hn[0], &hn = h_hn[1];
    torch::Tensor out = ffn->forward(hn, h, h);
    if (shifts) out = shifts->forward(hn, out, out);
    return out;
  }
};

std::string get_isa() { return kset().name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* name : kSetNames)
    if (find_kernel_set(name, nullptr) != nullptr) out.push_back(name);
  return out;
}

void set_isa(const std::string& name) {
  const char* why = nullptr;
  TORCH_CHECK(set_kernel_set(name.c_str(), &why), "kernel set '", name,
              "' cannot run here: ", why);
}

// {set name: None if it runs here, else why not}
std::vector<std::pair<std::string, std::string>> kernel_sets() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const char* name : kSetNames) {
    const char* why = nullptr;
    find_kernel_set(name, &why);
    out.emplace_back(name, why == nullptr ? "" : why);
  }
  return out;
}

// The core clock while this thread runs, in Hz (0 where not measured): the
// best of 50 timings of a chain of dependent register adds (one cycle each;
// register-register, which no x86 core folds away). For the popcount peak
// of tools/deployment/benchmark_binary.py.
double cpu_clock_hz() {
#if defined(__GNUC__) && defined(__x86_64__)
  double best = 0;
  const uint64_t one = 1;
  for (int r = 0; r < 50; ++r) {
    uint64_t x = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 250000; ++i)
      __asm__ volatile(
          "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
          "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
          : "+r"(x)
          : "r"(one));
    const double dt = std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
    const double hz = 8.0 * 250000 / dt;
    best = hz > best ? hz : best;
  }
  return best;
#else
  return 0.0;
#endif
}

// {op: how it computes with the current kernel set}
std::vector<std::pair<std::string, std::string>> kernel_paths() {
  static const char* const ops[kNumOps] = {
      "proj/ffn", "msgdc", "merge", "attn_scores", "attn_context",
      "sign packing", "float ops (stem, shift, attn_tokens, attn_untokens)",
      "conv (heads)", "sign_product (training 1x1)"};
  std::vector<std::pair<std::string, std::string>> out;
  for (int i = 0; i < kNumOps; ++i) out.emplace_back(ops[i], kset().path[i]);
  // every set: the engine's float32 map from the softmax table
  out[3].second += "; float32: the softmax taken in the kernel (numerators "
                   "from a float64 exp table, row sums in float64)";
  out[4].second += "; float32 in a block: one pass from the scores' counts "
                   "(the map not stored, LSQ levels looked up by count)";
  return out;
}

}  // namespace

// training_ops.cpp: fused CPU ops of the binary layers for training
void register_training_ops(pybind11::module& m);

}  // namespace mmbhvit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mmbhvit;
  m.doc() = "Packed-bit (XNOR/AND + popcount) kernels of the BHViT engine";
  m.def("isa", &get_isa, "kernel set in use");
  m.def("available_isas", &available_isas, "kernel sets this CPU can run");
  m.def("set_isa", &set_isa, "select a kernel set (for tests)");
  m.def("kernel_sets", &kernel_sets,
        "[(set, '' if it runs on this CPU else why not)], preferred first");
  m.def("cpu_clock_hz", &cpu_clock_hz,
        "core clock (dependent-add chain), Hz; 0 if not measured here",
        py::call_guard<py::gil_scoped_release>());
  m.def("kernel_paths", &kernel_paths,
        "[(op, how it computes with the kernel set in use)]");
  m.def("proj", &proj, "binary 1x1 projection with residual shortcut",
        py::arg("x"), py::arg("thr"), py::arg("wt"), py::arg("cout"),
        py::arg("a"), py::arg("b"), py::arg("slope"), py::arg("post_scale"),
        py::arg("post_bias"), py::arg("shortcut"),
        py::arg("residual") = py::none(), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("proj_norm", &proj_norm,
        "proj with residual, and the next block norm of its output: "
        "[y, y * norm_scale + norm_bias]",
        py::arg("x"), py::arg("params"), py::arg("cout"), py::arg("shortcut"),
        py::arg("residual"), py::arg("norm_scale"), py::arg("norm_bias"),
        py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("ffn", &ffn, "binary MLP (expand, reduce, + residual), fused",
        py::arg("x"), py::arg("residual"), py::arg("expand"),
        py::arg("hidden"), py::arg("expand_shortcut"), py::arg("reduce"),
        py::arg("reduce_shortcut"), py::arg("expand_lut") = py::none(),
        py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("nibble_lut", &nibble_lut,
        "nibble table of a projection's weights for the AVX2 MLP "
        "expansion (empty when the shape takes none)",
        py::arg("wt"), py::arg("cin"), py::arg("cout"));
  m.def("msgdc", &msgdc, "MSGDC token mixer + residual (+ next norm)",
        py::arg("x"), py::arg("in_scale"), py::arg("in_bias"), py::arg("thr"),
        py::arg("groups"), py::arg("dilations"), py::arg("wts"),
        py::arg("a"), py::arg("b"), py::arg("slopes"), py::arg("out_scale"),
        py::arg("out_bias"), py::arg("n2_scale"), py::arg("n2_bias"),
        py::arg("lane_wts") = std::vector<torch::Tensor>(),
        py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("merge", &merge, "binary 2x2 stride-2 patch merging",
        py::call_guard<py::gil_scoped_release>());
  m.def("merge_norm", &merge_norm,
        "binary 2x2 stride-2 patch merging after its input norm",
        py::call_guard<py::gil_scoped_release>());
  m.def("conv", &conv,
        "binary k x k convolution (stride 1, zero padding) + shortcut, "
        "PReLU, affine",
        py::arg("x"), py::arg("thr"), py::arg("wt"), py::arg("cout"),
        py::arg("k"), py::arg("a"), py::arg("b"), py::arg("slope"),
        py::arg("post_scale"), py::arg("post_bias"), py::arg("shortcut"),
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_scores", &attn_scores,
        "scores of binary queries and keys (with table: their softmax, "
        "float32)",
        py::arg("q"), py::arg("k"), py::arg("thr_q"), py::arg("thr_k"),
        py::arg("heads"), py::arg("scale"), py::arg("table") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_context", &attn_context,
        "context of a bit-plane attention map with binary values",
        py::call_guard<py::gil_scoped_release>());
  m.def("attention", &attention,
        "attn_scores with the softmax table, then attn_context, in one pass "
        "(float32; the same numbers)",
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_tokens", &attn_tokens,
        "MSMHA tokens: norm1, padding, windows + merged tokens (pre-LN)",
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_untokens", &attn_untokens,
        "MSMHA tokens back to a map: windows, merged-token means, mix, crop",
        py::call_guard<py::gil_scoped_release>());
  m.def("sign_product", &sign_product,
        "training forward of a 1-bit 1x1 convolution on NCHW signs: "
        "(C - 2 popcount) * scale_o (+ bias), None if an input or a weight "
        "is not a sign",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("stem", &stem,
        "4x4 stride-4 convolution (+ GELU, + positional embedding), NCHW "
        "in, NHWC out",
        py::arg("x"), py::arg("wt"), py::arg("bias"), py::arg("pos"),
        py::arg("gelu"), py::call_guard<py::gil_scoped_release>());
  m.def("shift", &shift, "sparse circular depthwise conv + residual",
        py::arg("x"), py::arg("res"), py::arg("dy"), py::arg("dx"),
        py::arg("wk"), py::arg("bias"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  py::class_<MSMHAPlan, std::shared_ptr<MSMHAPlan>>(
      m, "MSMHAPlan",
                        "an MSMHA token mixer's ops bound to its tensors, "
                        "run as one call")
      .def(py::init([](int64_t window, torch::Tensor mix, torch::Tensor rest,
                       torch::Tensor ln_weight, torch::Tensor ln_bias,
                       double ln_eps,
                       const std::vector<std::vector<torch::Tensor>>& projs,
                       const std::vector<int64_t>& couts,
                       const std::vector<int64_t>& shortcuts, int64_t heads,
                       double scale, c10::optional<torch::Tensor> table,
                       torch::Tensor thr_q, torch::Tensor thr_k,
                       torch::Tensor thr_v, int64_t mode, int64_t levels,
                       c10::optional<torch::Tensor> step,
                       c10::optional<torch::Tensor> zero,
                       std::vector<double> gsb, torch::Tensor ctx_a,
                       torch::Tensor ctx_b, torch::Tensor ctx_slope,
                       torch::Tensor ctx_post, torch::Tensor out_mix,
                       torch::Tensor out_rest) {
             TORCH_CHECK(projs.size() == 4 && couts.size() == 4 &&
                             shortcuts.size() == 4,
                         "projs, couts, shortcuts: q, k, v and proj");
             auto plan = std::make_shared<MSMHAPlan>();
             MSMHAPlan& p = *plan;
             p.window = window;
             p.mix = mix;
             p.rest = rest;
             p.ln_weight = ln_weight;
             p.ln_bias = ln_bias;
             p.ln_eps = ln_eps;
             ProjArgs* dst[4] = {&p.q, &p.k, &p.v, &p.proj};
             for (int i = 0; i < 4; ++i) {
               *dst[i] = proj_args(projs[i], couts[i], shortcuts[i]);
               dst[i]->prepare(dst[i]->thr.numel());
             }
             p.heads = heads;
             p.scale = scale;
             p.table = table;
             p.thr_q = thr_q;
             p.thr_k = thr_k;
             p.thr_v = thr_v;
             p.mode = mode;
             p.levels = levels;
             p.step = step;
             p.zero = zero;
             p.gsb = std::move(gsb);
             p.ctx_a = ctx_a;
             p.ctx_b = ctx_b;
             p.ctx_slope = ctx_slope;
             p.ctx_post = ctx_post;
             p.out_mix = out_mix;
             p.out_rest = out_rest;
             return plan;
           }),
           py::arg("window"), py::arg("mix"), py::arg("rest"),
           py::arg("ln_weight"), py::arg("ln_bias"), py::arg("ln_eps"),
           py::arg("projs"), py::arg("couts"), py::arg("shortcuts"),
           py::arg("heads"), py::arg("scale"), py::arg("table"),
           py::arg("thr_q"), py::arg("thr_k"), py::arg("thr_v"),
           py::arg("mode"), py::arg("levels"), py::arg("step"),
           py::arg("zero"), py::arg("gsb"), py::arg("ctx_a"),
           py::arg("ctx_b"), py::arg("ctx_slope"), py::arg("ctx_post"),
           py::arg("out_mix"), py::arg("out_rest"))
      .def("forward", &MSMHAPlan::forward,
           "(h, norm2(h)), h = x + MSMHA(norm1(x)); out: where to write h",
           py::arg("x"), py::arg("norm1_scale"), py::arg("norm1_bias"),
           py::arg("norm2_scale"), py::arg("norm2_bias"),
           py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>());
  py::class_<MSGDCPlan, std::shared_ptr<MSGDCPlan>>(
      m, "MSGDCPlan", "msgdc with an MSGDC mixer's tensors bound")
      .def(py::init([](torch::Tensor thr, int64_t groups,
                       std::vector<int64_t> dilations,
                       std::vector<torch::Tensor> wts,
                       std::vector<torch::Tensor> as,
                       std::vector<torch::Tensor> bs,
                       std::vector<torch::Tensor> slopes,
                       torch::Tensor out_scale, torch::Tensor out_bias,
                       std::vector<torch::Tensor> lane_wts) {
             return std::make_shared<MSGDCPlan>(MSGDCPlan{
                 thr, groups, std::move(dilations), std::move(wts),
                 std::move(as), std::move(bs), std::move(slopes),
                 std::move(lane_wts), out_scale, out_bias});
           }),
           py::arg("thr"), py::arg("groups"), py::arg("dilations"),
           py::arg("wts"), py::arg("a"), py::arg("b"), py::arg("slopes"),
           py::arg("out_scale"), py::arg("out_bias"), py::arg("lane_wts"))
      .def("forward", &MSGDCPlan::forward,
           "(h, norm2(h)), h = x + MSGDC(norm1(x)); out: where to write h",
           py::arg("x"), py::arg("norm1_scale"), py::arg("norm1_bias"),
           py::arg("norm2_scale"), py::arg("norm2_bias"),
           py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>());
  py::class_<FFNPlan, std::shared_ptr<FFNPlan>>(
      m, "FFNPlan", "ffn with a binary MLP's tensors bound")
      .def(py::init([](std::vector<torch::Tensor> expand, int64_t hidden,
                       int64_t expand_shortcut,
                       std::vector<torch::Tensor> reduce,
                       int64_t reduce_shortcut,
                       c10::optional<torch::Tensor> expand_lut) {
             auto plan = std::make_shared<FFNPlan>();
             TORCH_CHECK(!expand.empty() && !reduce.empty(),
                         "expand, reduce: (thr, wt, a, b, slope, "
                         "post_scale, post_bias)");
             const int64_t c = expand[0].numel();
             plan->expand = proj_args(expand, hidden, expand_shortcut);
             plan->reduce = proj_args(reduce, c, reduce_shortcut);
             plan->expand.prepare(c);
             plan->reduce.prepare(hidden);
             plan->expand_lut = expand_lut;
             return plan;
           }),
           py::arg("expand"), py::arg("hidden"), py::arg("expand_shortcut"),
           py::arg("reduce"), py::arg("reduce_shortcut"),
           py::arg("expand_lut") = py::none())
      .def("forward", &FFNPlan::forward, "reduce(expand(x)) + residual",
           py::arg("x"), py::arg("residual"), py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>());
  py::class_<ShiftPlan, std::shared_ptr<ShiftPlan>>(
      m, "ShiftPlan", "shift with the shift branches' tensors bound")
      .def(py::init([](torch::Tensor dy, torch::Tensor dx,
                       torch::Tensor weight, torch::Tensor bias) {
             return std::make_shared<ShiftPlan>(
                 ShiftPlan{dy, dx, weight, bias});
           }),
           py::arg("dy"), py::arg("dx"), py::arg("weight"), py::arg("bias"))
      .def("forward", &ShiftPlan::forward,
           "res + the shift branches of x; out: where to write it",
           py::arg("x"), py::arg("res") = py::none(),
           py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>());
  py::class_<BlockPlan, std::shared_ptr<BlockPlan>>(
      m, "BlockPlan", "a block's ops (token mixer, MLP, shift branches) "
      "run as one call")
      .def(py::init([](torch::Tensor norm1_scale, torch::Tensor norm1_bias,
                       torch::Tensor norm2_scale, torch::Tensor norm2_bias,
                       std::shared_ptr<MSMHAPlan> msmha,
                       std::shared_ptr<MSGDCPlan> msgdc,
                       std::shared_ptr<FFNPlan> ffn,
                       std::shared_ptr<ShiftPlan> shifts) {
             TORCH_CHECK((msmha == nullptr) != (msgdc == nullptr),
                         "a block plan takes one token mixer: msmha or "
                         "msgdc");
             TORCH_CHECK(ffn != nullptr, "a block plan needs its ffn");
             return std::make_shared<BlockPlan>(BlockPlan{
                 norm1_scale, norm1_bias, norm2_scale, norm2_bias, msmha,
                 msgdc, ffn, shifts});
           }),
           py::arg("norm1_scale"), py::arg("norm1_bias"),
           py::arg("norm2_scale"), py::arg("norm2_bias"),
           py::arg("msmha") = nullptr, py::arg("msgdc") = nullptr,
           py::arg("ffn") = nullptr, py::arg("shifts") = nullptr)
      .def("forward", &BlockPlan::forward,
           "the block's output (x may be overwritten)", py::arg("x"),
           py::call_guard<py::gil_scoped_release>());
  register_training_ops(m);
}
