// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Torch bindings of the packed-bit BHViT kernels (module mmbhvit._binary_ops).
// Each op checks its tensors, picks the kernel flavour for this CPU
// (AVX-512 VPOPCNTDQ, AVX2 + POPCNT, or generic) and splits the work over
// torch's intra-op threads (at::parallel_for, so torch.set_num_threads
// applies). The float parts run in the input's dtype (float32 or float64);
// the ±1 products are integer popcounts. mmbhvit/deploy/ops.py holds the
// reference semantics of every op (its pure-PyTorch fallback).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "kernel_api.h"

namespace mmbhvit {

bool avx512_kernels_built();
bool avx2_kernels_built();

namespace {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has(Isa isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512:
      return avx512_kernels_built() && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vpopcntdq") &&
             __builtin_cpu_supports("avx512bitalg") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("popcnt");
    case Isa::kAvx2:
      return avx2_kernels_built() && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("popcnt");
    default:
      return true;
  }
#else
  return isa == Isa::kGeneric;
#endif
}

Isa best_isa() {
  if (cpu_has(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_has(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kGeneric;
}

Isa& current_isa() {
  static Isa isa = best_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MMBHVIT_CALL(fn, T, params, b, e)                        \
  do {                                                           \
    switch (current_isa()) {                                     \
      case Isa::kAvx512: avx512::fn<T>(params, b, e); break;     \
      case Isa::kAvx2: avx2::fn<T>(params, b, e); break;         \
      default: generic::fn<T>(params, b, e); break;              \
    }                                                            \
  } while (0)
#else
#define MMBHVIT_CALL(fn, T, params, b, e) generic::fn<T>(params, b, e)
#endif

// Runs kernel fn over items [0, n) on torch's intra-op threads.
#define MMBHVIT_PARALLEL(fn, T, params, n, grain)                       \
  at::parallel_for(0, (n), (grain), [&](int64_t b_, int64_t e_) {       \
    MMBHVIT_CALL(fn, T, params, b_, e_);                                \
  })

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

template <typename T>
const T* ptr(const torch::Tensor& t) {
  return t.data_ptr<T>();
}

const uint64_t* wptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint64_t*>(t.data_ptr<int64_t>());
}

uint64_t* wptr_mut(torch::Tensor& t) {
  return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>());
}

int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

int64_t grain_for(int64_t work_per_item) {
  // about 32k word-operations per task, at least one item
  const int64_t g = 32768 / (work_per_item > 0 ? work_per_item : 1);
  return g > 0 ? g : 1;
}

// ---------------------------------------------------------------------------
struct ProjArgs {
  torch::Tensor thr, wt, a, b, slope, post_scale, post_bias;
  int64_t cout, shortcut;
};

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

ProjArgs proj_args(const std::vector<torch::Tensor>& t, int64_t cout,
                   int64_t shortcut) {
  TORCH_CHECK(t.size() == 7, "expected (thr, wt, a, b, slope, post_scale, "
              "post_bias)");
  return ProjArgs{t[0], t[1], t[2], t[3], t[4], t[5], t[6], cout, shortcut};
}

torch::Tensor ffn(const torch::Tensor& x, const torch::Tensor& residual,
                  const std::vector<torch::Tensor>& expand, int64_t hidden,
                  int64_t expand_shortcut,
                  const std::vector<torch::Tensor>& reduce,
                  int64_t reduce_shortcut) {
  check_float(x, x, "x");
  const int64_t c = x.size(-1);
  const int64_t tokens = c > 0 ? x.numel() / c : 0;
  ProjArgs e = proj_args(expand, hidden, expand_shortcut);
  ProjArgs r = proj_args(reduce, c, reduce_shortcut);
  check_proj(x, c, e);
  check_proj(x, hidden, r);
  check_tokens_like(residual, x, "residual");
  torch::Tensor y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_ffn", [&] {
    FfnParams<scalar_t> p{};
    p.expand = proj_params<scalar_t>(e, c);
    p.expand.x = ptr<scalar_t>(x);
    p.expand.tokens = tokens;
    p.reduce = proj_params<scalar_t>(r, hidden);
    p.reduce.tokens = tokens;
    p.reduce.residual = ptr<scalar_t>(residual);
    p.reduce.y = y.data_ptr<scalar_t>();
    const int64_t work = p.expand.words * p.expand.cout_pad +
                         p.reduce.words * p.reduce.cout_pad + 4 * hidden;
    MMBHVIT_PARALLEL(ffn, scalar_t, p, tokens, 4 * grain_for(work));
  });
  return y;
}

torch::Tensor proj(const torch::Tensor& x, const torch::Tensor& thr,
                   const torch::Tensor& wt, int64_t cout,
                   const torch::Tensor& a, const torch::Tensor& b,
                   const torch::Tensor& slope, const torch::Tensor& post_scale,
                   const torch::Tensor& post_bias, int64_t shortcut,
                   const c10::optional<torch::Tensor>& residual) {
  check_float(x, x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have a channel dimension");
  const int64_t cin = x.size(-1);
  const int64_t tokens = cin > 0 ? x.numel() / cin : 0;
  const ProjArgs args{thr, wt, a, b, slope, post_scale, post_bias, cout,
                      shortcut};
  check_proj(x, cin, args);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = cout;
  torch::Tensor y = torch::empty(out_sizes, x.options());
  if (residual.has_value()) {
    check_float(*residual, x, "residual");
    TORCH_CHECK(residual->sizes() == y.sizes(), "residual must be ",
                y.sizes(), ", got ", residual->sizes());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_proj", [&] {
    ProjParams<scalar_t> p = proj_params<scalar_t>(args, cin);
    p.x = ptr<scalar_t>(x);
    p.tokens = tokens;
    p.residual = residual.has_value() ? ptr<scalar_t>(*residual) : nullptr;
    p.y = y.data_ptr<scalar_t>();
    MMBHVIT_PARALLEL(proj, scalar_t, p, tokens,
                     4 * grain_for(p.words * p.cout_pad + cin + cout));
  });
  return y;
}

// ---------------------------------------------------------------------------
template <typename T>
PackParams<T> pack_params(const torch::Tensor& x, int64_t c, int64_t groups,
                          const c10::optional<torch::Tensor>& in_scale,
                          const c10::optional<torch::Tensor>& in_bias,
                          const torch::Tensor& thr, torch::Tensor& bits) {
  PackParams<T> p{};
  p.x = ptr<T>(x);
  p.pixels = c > 0 ? x.numel() / c : 0;
  p.c = c;
  p.groups = groups;
  p.cg = c / groups;
  p.wg = words_for(p.cg);
  p.in_scale = in_scale.has_value() ? ptr<T>(*in_scale) : nullptr;
  p.in_bias = in_bias.has_value() ? ptr<T>(*in_bias) : nullptr;
  p.thr = ptr<T>(thr);
  p.bits = wptr_mut(bits);
  return p;
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
    const torch::Tensor& n2_bias, const std::vector<torch::Tensor>& lane_wts) {
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
  // lane path (AVX-512 and AVX2 kernels): 4 groups of 16 or 32 channels
  bool lanes = false;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  const int cgi = static_cast<int>(cg);
  lanes = groups == 4 && static_cast<int>(lane_wts.size()) == ndil &&
          ((current_isa() == Isa::kAvx512 && avx512::msgdc_lanes(cgi, c)) ||
           (current_isa() == Isa::kAvx2 && avx2::msgdc_lanes(cgi, c)));
#endif
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
  torch::Tensor bits =
      lanes ? torch::empty({n, h, w, nvec, 8},
                           x.options().dtype(torch::kInt64))
            : torch::empty({n, h, w, groups, wg},
                           x.options().dtype(torch::kInt64));
  torch::Tensor h_out = torch::empty_like(x);
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
    if (lanes) {
      ExpandParams<scalar_t> ep{};
      ep.x = ptr<scalar_t>(x);
      ep.pixels = n * h * w;
      ep.c = c;
      ep.cg = cg;
      ep.nvec = nvec;
      ep.in_scale = ptr<scalar_t>(in_scale);
      ep.in_bias = ptr<scalar_t>(in_bias);
      ep.thr = ptr<scalar_t>(thr);
      ep.expanded = wptr_mut(bits);
      MMBHVIT_PARALLEL(msgdc_expand, scalar_t, ep, ep.pixels,
                       grain_for(c + 8 * nvec));
    } else {
      c10::optional<torch::Tensor> sc(in_scale), bi(in_bias);
      auto pk = pack_params<scalar_t>(x, c, groups, sc, bi, thr, bits);
      MMBHVIT_PARALLEL(pack, scalar_t, pk, pk.pixels, grain_for(c));
    }
    MsgdcParams<scalar_t> p{};
    p.x = ptr<scalar_t>(x);
    p.bits = wptr(bits);
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
    if (lanes) {
      p.lane_bits = static_cast<int>(cg);
      p.nvec = nvec;
      p.expanded = wptr(bits);
      for (int i = 0; i < ndil; ++i) p.wx[i] = wptr(lane_wts[i]);
    }
    MMBHVIT_PARALLEL(msgdc, scalar_t, p, n * h * w,
                     grain_for(int64_t(ndil) * 9 * wg * c + 8 * c));
  });
  return {h_out, hn_out};
}

// ---------------------------------------------------------------------------
torch::Tensor merge(const torch::Tensor& x, const torch::Tensor& thr,
                    const torch::Tensor& wt, int64_t cout,
                    const torch::Tensor& a, const torch::Tensor& b,
                    const torch::Tensor& slope, const torch::Tensor& post_bias,
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
  for (auto* t : {&a, &b, &slope, &post_bias})
    check_vec(*t, x, cout, "per-channel parameter");
  check_vec(pos, x, (h / 2) * (w / 2) * cout, "pos");
  torch::Tensor bits =
      torch::empty({n, h, w, 1, words}, x.options().dtype(torch::kInt64));
  torch::Tensor y = torch::empty({n, h / 2, w / 2, cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmbhvit_merge", [&] {
    c10::optional<torch::Tensor> none;
    auto pk = pack_params<scalar_t>(x, cin, 1, none, none, thr, bits);
    MMBHVIT_PARALLEL(pack, scalar_t, pk, pk.pixels, grain_for(cin));
    MergeParams<scalar_t> p{};
    p.x = ptr<scalar_t>(x);
    p.bits = wptr(bits);
    p.n = n;
    p.h = h;
    p.w = w;
    p.cin = cin;
    p.cout = cout;
    p.words = words;
    p.cout_pad = wt.size(2);
    p.wt = wptr(wt);
    p.a = ptr<scalar_t>(a);
    p.b = ptr<scalar_t>(b);
    p.slope = ptr<scalar_t>(slope);
    p.post_bias = ptr<scalar_t>(post_bias);
    p.pos = ptr<scalar_t>(pos);
    p.y = y.data_ptr<scalar_t>();
    MMBHVIT_PARALLEL(merge, scalar_t, p, n * (h / 2) * (w / 2),
                     grain_for(4 * words * p.cout_pad + 2 * cout));
  });
  return y;
}

// ---------------------------------------------------------------------------
torch::Tensor attn_scores(const torch::Tensor& q, const torch::Tensor& k,
                          const torch::Tensor& thr_q,
                          const torch::Tensor& thr_k, int64_t heads,
                          double scale) {
  check_float(q, q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be (B, T, C), got ", q.sizes());
  check_tokens_like(k, q, "k");
  const int64_t b = q.size(0), t = q.size(1), c = q.size(2);
  TORCH_CHECK(heads >= 1 && c % heads == 0, "channels not divisible by heads");
  const int64_t d = c / heads, wd = words_for(d), t_pad = (t + 7) / 8 * 8;
  check_vec(thr_q, q, c, "thr_q");
  check_vec(thr_k, q, c, "thr_k");
  auto wopt = q.options().dtype(torch::kInt64);
  torch::Tensor qbits = torch::empty({b, heads, t, wd}, wopt);
  torch::Tensor kbits = torch::zeros({b, heads, wd, t_pad}, wopt);
  torch::Tensor s = torch::empty({b, heads, t, t}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mmbhvit_scores", [&] {
    HeadPackParams<scalar_t> hp{};
    hp.b = b;
    hp.t = t;
    hp.c = c;
    hp.heads = heads;
    hp.d = d;
    hp.wd = wd;
    hp.t_pad = t_pad;
    hp.x = ptr<scalar_t>(q);
    hp.thr = ptr<scalar_t>(thr_q);
    hp.bits = wptr_mut(qbits);
    MMBHVIT_PARALLEL(head_pack, scalar_t, hp, b * t, grain_for(c));
    hp.x = ptr<scalar_t>(k);
    hp.thr = ptr<scalar_t>(thr_k);
    hp.bits = wptr_mut(kbits);
    MMBHVIT_PARALLEL(head_pack_t, scalar_t, hp, b * t, grain_for(c));
    ScoreParams<scalar_t> p{};
    p.qbits = wptr(qbits);
    p.kbits = wptr(kbits);
    p.b = b;
    p.t = t;
    p.heads = heads;
    p.wd = wd;
    p.t_pad = t_pad;
    p.d = d;
    p.scale = static_cast<scalar_t>(scale);
    p.s = s.data_ptr<scalar_t>();
    MMBHVIT_PARALLEL(scores, scalar_t, p, b * heads * t,
                     grain_for(wd * t_pad + t));
  });
  return s;
}

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
  check_float(q, q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be (B, T, C), got ", q.sizes());
  check_tokens_like(k, q, "k");
  check_tokens_like(v, q, "v");
  const int64_t b = q.size(0), t = q.size(1), c = q.size(2);
  TORCH_CHECK(heads >= 1 && c % heads == 0, "channels not divisible by heads");
  const int64_t d = c / heads, tw = words_for(t);
  check_float(probs, q, "probs");
  TORCH_CHECK(probs.dim() == 4 && probs.size(0) == b &&
                  probs.size(1) == heads && probs.size(2) == t &&
                  probs.size(3) == t,
              "probs must be (", b, ", ", heads, ", ", t, ", ", t, "), got ",
              probs.sizes());
  check_vec(thr_v, q, c, "thr_v");
  for (auto* x : {&ctx_a, &ctx_b, &slope, &post_bias})
    check_vec(*x, q, c, "per-channel parameter");
  TORCH_CHECK(mode == kLSQ || mode == kGSB, "mode must be 0 (LSQ) or 1 (GSB)");
  if (mode == kLSQ) {
    TORCH_CHECK(levels >= 1 && levels < 256, "levels must be in 1..255");
    TORCH_CHECK(step.has_value() && zero.has_value(), "LSQ needs step, zero");
    check_vec(*step, q, heads, "step");
    check_vec(*zero, q, heads, "zero");
  } else {
    TORCH_CHECK(gsb.size() == 6,
                "GSB needs (alpha, a, b1, b2, low, high), got ", gsb.size());
  }
  torch::Tensor vbits =
      torch::empty({b, heads, tw, d}, q.options().dtype(torch::kInt64));
  torch::Tensor out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mmbhvit_context", [&] {
    HeadPackParams<scalar_t> hp{};
    hp.x = ptr<scalar_t>(v);
    hp.b = b;
    hp.t = t;
    hp.c = c;
    hp.heads = heads;
    hp.d = d;
    hp.wd = words_for(d);
    hp.t_pad = t;
    hp.thr = ptr<scalar_t>(thr_v);
    hp.bits = wptr_mut(vbits);
    MMBHVIT_PARALLEL(token_pack, scalar_t, hp, b * heads, grain_for(t * d));
    ContextParams<scalar_t> p{};
    p.p = ptr<scalar_t>(probs);
    p.q = ptr<scalar_t>(q);
    p.k = ptr<scalar_t>(k);
    p.v = ptr<scalar_t>(v);
    p.vbits = wptr(vbits);
    p.b = b;
    p.t = t;
    p.c = c;
    p.heads = heads;
    p.d = d;
    p.tw = tw;
    p.mode = static_cast<int>(mode);
    p.levels = static_cast<int>(levels);
    if (mode == kLSQ) {
      p.step = ptr<scalar_t>(*step);
      p.zero = ptr<scalar_t>(*zero);
    } else {
      p.g_alpha = static_cast<scalar_t>(gsb[0]);
      p.g_a = static_cast<scalar_t>(gsb[1]);
      p.g_b1 = static_cast<scalar_t>(gsb[2]);
      p.g_b2 = static_cast<scalar_t>(gsb[3]);
      p.g_low = static_cast<scalar_t>(gsb[4]);
      p.g_high = static_cast<scalar_t>(gsb[5]);
    }
    p.ctx_a = ptr<scalar_t>(ctx_a);
    p.ctx_b = ptr<scalar_t>(ctx_b);
    p.slope = ptr<scalar_t>(slope);
    p.post_bias = ptr<scalar_t>(post_bias);
    p.out = out.data_ptr<scalar_t>();
    MMBHVIT_PARALLEL(context, scalar_t, p, b * heads * t,
                     grain_for(4 * tw * d + 4 * t));
  });
  return out;
}

// ---------------------------------------------------------------------------
torch::Tensor shift(const torch::Tensor& x,
                    const c10::optional<torch::Tensor>& res,
                    const torch::Tensor& dy, const torch::Tensor& dx,
                    const torch::Tensor& wk, const torch::Tensor& bias) {
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
  torch::Tensor y = torch::empty_like(x);
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
    MMBHVIT_PARALLEL(shift, scalar_t, p, n * h * w,
                     grain_for(int64_t(ntaps + 2) * c));
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
  torch::Tensor merged = torch::empty({n, cells, c}, x.options());
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
    p.merged = merged.data_ptr<scalar_t>();
    p.tokens = tokens.data_ptr<scalar_t>();
    MMBHVIT_PARALLEL(merged_tokens, scalar_t, p, n * cells,
                     grain_for(4 * s * s * c));
    MMBHVIT_PARALLEL(window_tokens, scalar_t, p, n * cells * (s * s + cells),
                     grain_for(2 * c));
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
  torch::Tensor merged = torch::empty({n, cells, c}, a.options());
  torch::Tensor out = torch::empty({n, h, w, c}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mmbhvit_untokens", [&] {
    UntokensParams<scalar_t> p{};
    static_cast<WindowGrid&>(p) = g;
    p.a = ptr<scalar_t>(a);
    p.mix = ptr<scalar_t>(mix);
    p.rest = ptr<scalar_t>(rest);
    p.merged = merged.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    MMBHVIT_PARALLEL(merged_means, scalar_t, p, n * cells,
                     grain_for(cells * c));
    MMBHVIT_PARALLEL(untokens, scalar_t, p, n * h * w, grain_for(3 * c));
  });
  return out;
}

std::string get_isa() { return isa_name(current_isa()); }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (Isa i : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric})
    if (cpu_has(i)) out.push_back(isa_name(i));
  return out;
}

void set_isa(const std::string& name) {
  for (Isa i : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric}) {
    if (name == isa_name(i)) {
      TORCH_CHECK(cpu_has(i), "kernel set '", name,
                  "' is not supported on this CPU / build");
      current_isa() = i;
      return;
    }
  }
  TORCH_CHECK(false, "unknown kernel set '", name,
              "' (avx512, avx2 or generic)");
}

}  // namespace
}  // namespace mmbhvit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mmbhvit;
  m.doc() = "Packed-bit (XNOR/AND + popcount) kernels of the BHViT engine";
  m.def("isa", &get_isa, "kernel set in use");
  m.def("available_isas", &available_isas, "kernel sets this CPU can run");
  m.def("set_isa", &set_isa, "select a kernel set (for tests)");
  m.def("proj", &proj, "binary 1x1 projection with residual shortcut",
        py::arg("x"), py::arg("thr"), py::arg("wt"), py::arg("cout"),
        py::arg("a"), py::arg("b"), py::arg("slope"), py::arg("post_scale"),
        py::arg("post_bias"), py::arg("shortcut"),
        py::arg("residual") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("ffn", &ffn, "binary MLP (expand, reduce, + residual), fused",
        py::arg("x"), py::arg("residual"), py::arg("expand"),
        py::arg("hidden"), py::arg("expand_shortcut"), py::arg("reduce"),
        py::arg("reduce_shortcut"),
        py::call_guard<py::gil_scoped_release>());
  m.def("msgdc", &msgdc, "MSGDC token mixer + residual (+ next norm)",
        py::arg("x"), py::arg("in_scale"), py::arg("in_bias"), py::arg("thr"),
        py::arg("groups"), py::arg("dilations"), py::arg("wts"),
        py::arg("a"), py::arg("b"), py::arg("slopes"), py::arg("out_scale"),
        py::arg("out_bias"), py::arg("n2_scale"), py::arg("n2_bias"),
        py::arg("lane_wts") = std::vector<torch::Tensor>(),
        py::call_guard<py::gil_scoped_release>());
  m.def("merge", &merge, "binary 2x2 stride-2 patch merging",
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_scores", &attn_scores, "scores of binary queries and keys",
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_context", &attn_context,
        "context of a bit-plane attention map with binary values",
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_tokens", &attn_tokens,
        "MSMHA tokens: norm1, padding, windows + merged tokens (pre-LN)",
        py::call_guard<py::gil_scoped_release>());
  m.def("attn_untokens", &attn_untokens,
        "MSMHA tokens back to a map: windows, merged-token means, mix, crop",
        py::call_guard<py::gil_scoped_release>());
  m.def("shift", &shift, "sparse circular depthwise conv + residual",
        py::arg("x"), py::arg("res"), py::arg("dy"), py::arg("dx"),
        py::arg("wk"), py::arg("bias"),
        py::call_guard<py::gil_scoped_release>());
}
