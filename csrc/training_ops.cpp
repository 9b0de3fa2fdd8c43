// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Training-time CPU ops of the binary layers (module mmbhvit._binary_ops,
// used by mmbhvit/models/binary/fused.py): the activation sign with its
// straight-through window, RPReLU and the weight binarizer, forward and
// backward. Each op is one pass over memory (the binarizer's backward: per
// weight row, its sum, then its values from cache). Composed from PyTorch
// ops they take 2 (sign), ~10 (RPReLU backward) and 3-4 (binarizer) passes
// and as many fresh tensors; they run on every binary layer in every step.
//
// Element values equal the composed PyTorch expressions bit for bit: same
// float operations in the same order, one rounding each (the extension is
// built with -ffp-contract=off). Per-channel sums (RPReLU parameter
// gradients, the shift's gradient, the mean the binarizer's backward
// subtracts) run in a fixed order (ChannelSums), so they do not
// depend on the thread count; they differ from torch.sum / torch.mean in
// the last bits.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace mmbhvit {
namespace {

// Lanes of the per-plane accumulators: independent partial sums (in the
// data's dtype) that the compiler keeps in vector registers.
constexpr int kLanes = 16;

struct Layout {
  int64_t n, c, s;  // batch, channels, elements per (batch, channel) plane
};

Layout nchw_layout(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat ||
                  x.scalar_type() == torch::kDouble,
              name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.dim() >= 2, name, " must have a channel dim (N, C, ...)");
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c)};
}

void check_channel_vector(const torch::Tensor& v, const torch::Tensor& x,
                          int64_t c, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == x.scalar_type(),
              name, " must be a CPU tensor of dtype ", x.scalar_type());
  TORCH_CHECK(v.is_contiguous() && v.numel() == c, name, " must hold ", c,
              " contiguous values (one per channel), got ", v.numel());
}

void check_same(const torch::Tensor& g, const torch::Tensor& x,
                const char* name) {
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.sizes() == x.sizes(),
              name, " must match the saved input: ", x.scalar_type(), " ",
              x.sizes(), ", got ", g.scalar_type(), " ", g.sizes());
}

// Calls fn(plane, channel) for every (batch, channel) plane, split over
// torch's intra-op threads.
template <typename F>
void for_planes(const Layout& l, F&& fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(l.s, 1));
  at::parallel_for(0, l.n * l.c, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) fn(p, p % l.c);
  });
}

// sign(u): +1, -1, and 0 for zeros and NaN (as torch.sign).
template <typename T>
inline T sign_of(T u) {
  return static_cast<T>(u > T(0)) - static_cast<T>(u < T(0));
}

// The polynomial STE window of SignSTE times the incoming gradient, in the
// order of the composed expression: ((|u| * -2) + 2), clamped at 0, times g.
template <typename T>
inline T sign_window(T u, T g) {
  T w = std::abs(u) * T(-2) + T(2);
  w = w < T(0) ? T(0) : w;  // a NaN stays NaN, as clamp_(min=0)
  return w * g;
}

// Calls step(i, lane) for i in [0, s): whole blocks of kLanes with a
// compile-time lane (so the compiler vectorises the block), then the tail.
template <typename F>
inline void for_lanes(int64_t s, F&& step) {
  const int64_t body = s - s % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  for (int64_t i = body; i < s; ++i) step(i, static_cast<int>(i - body));
}

// Per-channel sums of K quantities over every dim but the channel. The
// body of a plane is summed in kLanes lanes of the data's dtype (plane
// task), then lanes and the planes of a channel in double, in a fixed order.
template <typename T, int K>
struct ChannelSums {
  explicit ChannelSums(const Layout& l)
      : l(l), partial(static_cast<size_t>(l.n * l.c * K)) {}

  struct Lanes {
    T v[K][kLanes] = {};

    // sum k over the lanes, in double
    double total(int k) const {
      double t = 0;
      for (int j = 0; j < kLanes; ++j) t += v[k][j];
      return t;
    }
  };

  // stores the lanes of plane p
  void put(int64_t p, const Lanes& lanes) {
    for (int k = 0; k < K; ++k) partial[p * K + k] = lanes.total(k);
  }

  // sum k of channel ch
  double total(int64_t ch, int k) const {
    double t = 0;
    for (int64_t n = 0; n < l.n; ++n) t += partial[(n * l.c + ch) * K + k];
    return t;
  }

  Layout l;
  std::vector<double> partial;
};

// --------------------------------------------------------------------------
// sign(x + b) and its straight-through gradient (b per channel, optional)
// --------------------------------------------------------------------------
torch::Tensor sign_ste_forward(const torch::Tensor& x,
                               const c10::optional<torch::Tensor>& bias) {
  const Layout l = nchw_layout(x, "x");
  if (bias) check_channel_vector(*bias, x, l.c, "bias");
  torch::Tensor out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sign_ste_forward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pb = bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.data_ptr<scalar_t>();
    for_planes(l, [&](int64_t p, int64_t ch) {
      const scalar_t b = pb ? pb[ch] : scalar_t(0);
      const scalar_t* xi = px + p * l.s;
      scalar_t* oi = po + p * l.s;
      if (pb) {
        for (int64_t i = 0; i < l.s; ++i) oi[i] = sign_of(xi[i] + b);
      } else {
        for (int64_t i = 0; i < l.s; ++i) oi[i] = sign_of(xi[i]);
      }
    });
  });
  return out;
}

// What shifted_window adds to each window term: nothing, the shortcut's
// gradient (identity shortcut), or that divided by the group size (mean).
enum ShortcutGrad { kNoShortcut, kIdentityGrad, kMeanGrad };

// The window pass of sign(x + b) with the bias gradient summed in it (the
// sum of the window terms d). Each element is written as d, or, given a
// shortcut gradient gs (kS), d + gs[n, c / ratio] (kIdentityGrad) or
// d + gs[n, c / ratio] / ratio (kMeanGrad). Returns grad_bias.
template <ShortcutGrad kS, typename scalar_t>
torch::Tensor shifted_window(const Layout& l, const scalar_t* px,
                             const scalar_t* pg, const scalar_t* pb,
                             scalar_t* po, const torch::Tensor& x,
                             const scalar_t* gs, int64_t ratio) {
  const int64_t groups = l.c / ratio;
  const scalar_t r = static_cast<scalar_t>(ratio);
  ChannelSums<scalar_t, 1> sums(l);
  for_planes(l, [&](int64_t p, int64_t ch) {
    const scalar_t b = pb[ch];
    const int64_t o = p * l.s;
    const scalar_t* sp =
        kS == kNoShortcut ? nullptr
                          : gs + ((p / l.c) * groups + ch / ratio) * l.s;
    typename ChannelSums<scalar_t, 1>::Lanes acc;
    for_lanes(l.s, [&](int64_t i, int j) {
      const scalar_t d = sign_window(px[o + i] + b, pg[o + i]);
      if constexpr (kS == kNoShortcut)
        po[o + i] = d;
      else if constexpr (kS == kIdentityGrad)
        po[o + i] = d + sp[i];
      else
        po[o + i] = d + sp[i] / r;
      acc.v[0][j] += d;
    });
    sums.put(p, acc);
  });
  torch::Tensor gb = torch::empty({l.c}, x.options());
  scalar_t* pgb = gb.data_ptr<scalar_t>();
  for (int64_t ch = 0; ch < l.c; ++ch)
    pgb[ch] = static_cast<scalar_t>(sums.total(ch, 0));
  return gb;
}

// Returns [grad_x] or, with a bias, [grad_x, grad_bias] (grad_bias: the
// per-channel sum of grad_x).
std::vector<torch::Tensor> sign_ste_backward(
    const torch::Tensor& grad, const torch::Tensor& x,
    const c10::optional<torch::Tensor>& bias) {
  const Layout l = nchw_layout(x, "x");
  if (bias) check_channel_vector(*bias, x, l.c, "bias");
  check_same(grad, x, "grad");
  const torch::Tensor g = grad.contiguous();
  torch::Tensor out = torch::empty_like(x);
  std::vector<torch::Tensor> result{out};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sign_ste_backward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    if (!bias) {
      for_planes(l, [&](int64_t p, int64_t) {
        const int64_t o = p * l.s;
        for (int64_t i = 0; i < l.s; ++i)
          po[o + i] = sign_window(px[o + i], pg[o + i]);
      });
      return;
    }
    result.push_back(shifted_window<kNoShortcut, scalar_t>(
        l, px, pg, bias->data_ptr<scalar_t>(), po, x, nullptr, 1));
  });
  return result;
}

// The backward of x feeding both sign(x + b) and a shortcut that is x
// itself (ratio 1) or the mean of groups of `ratio` consecutive channels
// (channel c in group c / ratio): [grad_x, grad_bias] with
//   grad_x = window(x + b) * grad + shortcut_grad[group] (/ ratio),
//   grad_bias = sum of the window term alone,
// the values of the two gradients added by autograd (the mean's backward
// divides by ratio, one rounding, then the sum, one rounding), in one pass
// instead of three.
std::vector<torch::Tensor> sign_shortcut_backward(
    const torch::Tensor& grad, const torch::Tensor& x,
    const torch::Tensor& bias, const torch::Tensor& shortcut_grad,
    int64_t ratio) {
  const Layout l = nchw_layout(x, "x");
  check_channel_vector(bias, x, l.c, "bias");
  check_same(grad, x, "grad");
  TORCH_CHECK(ratio >= 1 && l.c % ratio == 0, "ratio must divide the ",
              l.c, " channels, got ", ratio);
  std::vector<int64_t> want = x.sizes().vec();
  want[1] = l.c / ratio;
  TORCH_CHECK(shortcut_grad.scalar_type() == x.scalar_type() &&
                  shortcut_grad.sizes() == want,
              "shortcut_grad must be ", x.scalar_type(), " ",
              c10::IntArrayRef(want), ", got ",
              shortcut_grad.scalar_type(), " ", shortcut_grad.sizes());
  const torch::Tensor g = grad.contiguous();
  const torch::Tensor gs = shortcut_grad.contiguous();
  torch::Tensor out = torch::empty_like(x);
  torch::Tensor gb;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sign_shortcut_backward", [&] {
    const auto run = [&](auto kind) {
      gb = shifted_window<decltype(kind)::value, scalar_t>(
          l, x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
          bias.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x,
          gs.data_ptr<scalar_t>(), ratio);
    };
    if (ratio == 1)
      run(std::integral_constant<ShortcutGrad, kIdentityGrad>{});
    else
      run(std::integral_constant<ShortcutGrad, kMeanGrad>{});
  });
  return {out, gb};
}

// --------------------------------------------------------------------------
// RPReLU: y = prelu_a(x - gamma) + zeta, per channel
// --------------------------------------------------------------------------
Layout rprelu_layout(const torch::Tensor& x, const torch::Tensor& bias_in,
                     const torch::Tensor& slope) {
  const Layout l = nchw_layout(x, "x");
  check_channel_vector(bias_in, x, l.c, "bias_in");
  check_channel_vector(slope, x, l.c, "slope");
  return l;
}

torch::Tensor rprelu_forward(const torch::Tensor& x,
                             const torch::Tensor& bias_in,
                             const torch::Tensor& slope,
                             const torch::Tensor& bias_out) {
  const Layout l = rprelu_layout(x, bias_in, slope);
  check_channel_vector(bias_out, x, l.c, "bias_out");
  torch::Tensor out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rprelu_forward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pgam = bias_in.data_ptr<scalar_t>();
    const scalar_t* pa = slope.data_ptr<scalar_t>();
    const scalar_t* pz = bias_out.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for_planes(l, [&](int64_t p, int64_t ch) {
      const scalar_t gam = pgam[ch], a = pa[ch], z = pz[ch];
      const scalar_t* xi = px + p * l.s;
      scalar_t* oi = po + p * l.s;
      for (int64_t i = 0; i < l.s; ++i) {
        const scalar_t t = xi[i] - gam;
        oi[i] = (t > scalar_t(0) ? t : a * t) + z;
      }
    });
  });
  return out;
}

// Returns [grad_x, grad_bias_in, grad_slope, grad_bias_out]:
//   grad_x       = g where t > 0, a * g elsewhere   (t = x - gamma)
//   grad_bias_in = -sum grad_x,  grad_slope = sum g * min(t, 0),
//   grad_bias_out = sum g        (sums over every dim but the channel)
std::vector<torch::Tensor> rprelu_backward(const torch::Tensor& grad,
                                           const torch::Tensor& x,
                                           const torch::Tensor& bias_in,
                                           const torch::Tensor& slope) {
  const Layout l = rprelu_layout(x, bias_in, slope);
  check_same(grad, x, "grad");
  const torch::Tensor g = grad.contiguous();
  torch::Tensor gx = torch::empty_like(x);
  auto opts = x.options();
  torch::Tensor g_in = torch::empty({l.c}, opts);
  torch::Tensor g_slope = torch::empty({l.c}, opts);
  torch::Tensor g_out = torch::empty({l.c}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rprelu_backward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* pgam = bias_in.data_ptr<scalar_t>();
    const scalar_t* pa = slope.data_ptr<scalar_t>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    // sums of grad_x, g * min(t, 0) and g
    ChannelSums<scalar_t, 3> sums(l);
    for_planes(l, [&](int64_t p, int64_t ch) {
      const scalar_t gam = pgam[ch], a = pa[ch];
      const int64_t o = p * l.s;
      typename ChannelSums<scalar_t, 3>::Lanes acc;
      for_lanes(l.s, [&](int64_t i, int j) {
        const scalar_t t = px[o + i] - gam, gv = pg[o + i];
        const scalar_t d = t > scalar_t(0) ? gv : a * gv;
        pgx[o + i] = d;
        acc.v[0][j] += d;
        acc.v[1][j] += gv * (t < scalar_t(0) ? t : scalar_t(0));
        acc.v[2][j] += gv;
      });
      sums.put(p, acc);
    });
    scalar_t* pin = g_in.data_ptr<scalar_t>();
    scalar_t* psl = g_slope.data_ptr<scalar_t>();
    scalar_t* pout = g_out.data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < l.c; ++ch) {
      pin[ch] = static_cast<scalar_t>(-sums.total(ch, 0));
      psl[ch] = static_cast<scalar_t>(sums.total(ch, 1));
      pout[ch] = static_cast<scalar_t>(sums.total(ch, 2));
    }
  });
  return {gx, g_in, g_slope, g_out};
}

// --------------------------------------------------------------------------
// The weight binarizer: per output channel o (dim 0, the other dims are its
// row of k values), w_hat = mean|w_o| * sign(w - mean(w_o))
// --------------------------------------------------------------------------
// A weight (O, ...) as O planes of one channel: for_planes runs over its
// output channels (rows of k = numel / O values).
Layout weight_rows(const torch::Tensor& w, const char* name) {
  const Layout l = nchw_layout(w, name);  // dtype, device, contiguity
  TORCH_CHECK(l.n > 0 && w.numel() > 0, name, " must not be empty");
  return {l.n, 1, w.numel() / l.n};
}

// scale * sign(w - mean), both per output channel (the caller's means: the
// values are then those of the composed expression, bit for bit).
torch::Tensor centred_sign_forward(const torch::Tensor& w,
                                   const torch::Tensor& scale,
                                   const torch::Tensor& mean) {
  const Layout r = weight_rows(w, "weight");
  check_channel_vector(scale, w, r.n, "scale");
  check_channel_vector(mean, w, r.n, "mean");
  torch::Tensor out = torch::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "centred_sign_forward", [&] {
    const scalar_t* pw = w.data_ptr<scalar_t>();
    const scalar_t* ps = scale.data_ptr<scalar_t>();
    const scalar_t* pm = mean.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for_planes(r, [&](int64_t row, int64_t) {
      const int64_t o = row * r.s;
      const scalar_t sc = ps[row], m = pm[row];
      for (int64_t i = 0; i < r.s; ++i)
        po[o + i] = sign_of(pw[o + i] - m) * sc;
    });
  });
  return out;
}

// grad_c = grad where |w - mean(w_o)| <= 1 (0 outside; NaN passes, as
// aten::hardtanh_backward), returned minus its own mean per output channel.
torch::Tensor centred_sign_backward(const torch::Tensor& grad,
                                    const torch::Tensor& w,
                                    const torch::Tensor& mean) {
  const Layout r = weight_rows(w, "weight");
  check_same(grad, w, "grad");
  check_channel_vector(mean, w, r.n, "mean");
  const torch::Tensor g = grad.contiguous();
  torch::Tensor out = torch::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "centred_sign_backward", [&] {
    const scalar_t* pw = w.data_ptr<scalar_t>();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* pm = mean.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for_planes(r, [&](int64_t row, int64_t) {
      const int64_t o = row * r.s;
      const scalar_t m = pm[row];
      auto inside = [&](int64_t i) {  // both loads unconditional: SIMD
        const scalar_t gv = pg[o + i], c = pw[o + i] - m;
        return std::abs(c) > scalar_t(1) ? scalar_t(0) : gv;
      };
      typename ChannelSums<scalar_t, 1>::Lanes acc;
      for_lanes(r.s, [&](int64_t i, int j) { acc.v[0][j] += inside(i); });
      const auto mg = static_cast<scalar_t>(acc.total(0) / r.s);
      for (int64_t i = 0; i < r.s; ++i) po[o + i] = inside(i) - mg;
    });
  });
  return out;
}

}  // namespace

void register_training_ops(pybind11::module& m) {
  m.def("sign_ste_forward", &sign_ste_forward,
        "sign(x + bias), bias per channel (dim 1) or None",
        py::arg("x"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("sign_ste_backward", &sign_ste_backward,
        "[grad * max(2 - 2|x + bias|, 0)] (the SignSTE window), and with a "
        "bias its per-channel sum",
        py::arg("grad"), py::arg("x"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("sign_shortcut_backward", &sign_shortcut_backward,
        "[grad_x, grad_bias] of x feeding sign(x + bias) (grad: its "
        "gradient) and a shortcut, x itself (ratio 1) or the mean of "
        "groups of ratio channels (shortcut_grad: its gradient)",
        py::arg("grad"), py::arg("x"), py::arg("bias"),
        py::arg("shortcut_grad"), py::arg("ratio"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rprelu_forward", &rprelu_forward,
        "prelu(x - bias_in, slope) + bias_out, all per channel (dim 1)",
        py::arg("x"), py::arg("bias_in"), py::arg("slope"),
        py::arg("bias_out"), py::call_guard<py::gil_scoped_release>());
  m.def("rprelu_backward", &rprelu_backward,
        "[grad_x, grad_bias_in, grad_slope, grad_bias_out] of rprelu_forward",
        py::arg("grad"), py::arg("x"), py::arg("bias_in"), py::arg("slope"),
        py::call_guard<py::gil_scoped_release>());
  m.def("centred_sign_forward", &centred_sign_forward,
        "scale_o * sign(w - mean_o), per output channel o (dim 0)",
        py::arg("weight"), py::arg("scale"), py::arg("mean"),
        py::call_guard<py::gil_scoped_release>());
  m.def("centred_sign_backward", &centred_sign_backward,
        "grad_c - mean(grad_c) per output channel, grad_c = grad where "
        "|w - mean(w_o)| <= 1",
        py::arg("grad"), py::arg("weight"), py::arg("mean"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace mmbhvit
