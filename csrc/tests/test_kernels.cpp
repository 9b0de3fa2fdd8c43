// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Standalone test of the kernel core (no Python, no torch): runs every op of
// every kernel set on the golden cases written by
// tools/deployment/write_kernel_goldens.py (inputs + the PyTorch fallback's
// outputs) and requires bit-identical results. The work of each op is split
// into three uneven chunks, as threads would split it.
//
//   test_kernels [--goldens DIR] [--sets avx2,popcnt,...]
//
// Prints one line per kernel set: "pass: <set> (<n> cases)",
// "FAIL: <set> ..." or "skipped: <set> (<why>)" for a set this CPU or this
// build cannot run. Exit status 1 if any requested set failed, 2 if a set
// named with --sets is skipped, 0 otherwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../core/dispatch.h"
#include "../core/nibble_lut.h"
#include "../core/runner.h"
#include "../core/scratch.h"

using namespace mmbhvit;

namespace {

struct Array {
  int dtype = 0;  // 0 f32, 1 f64, 2 i64, 3 i32
  std::vector<int64_t> dims;
  std::vector<char> data;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
  template <typename U>
  const U* as() const {
    return reinterpret_cast<const U*>(data.data());
  }
};

using Case = std::map<std::string, Array>;

bool read_case(const std::string& path, Case& out, std::string& err) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    err = "cannot open " + path;
    return false;
  }
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "MMBKGLD1", 8) != 0) {
    err = path + ": not a golden file";
    return false;
  }
  uint32_t count = 0;
  f.read(reinterpret_cast<char*>(&count), 4);
  static const int64_t size_of[4] = {4, 8, 8, 4};
  for (uint32_t i = 0; i < count && f; ++i) {
    uint32_t len = 0;
    f.read(reinterpret_cast<char*>(&len), 4);
    std::string name(len, '\0');
    f.read(&name[0], len);
    unsigned char dt = 0, nd = 0;
    f.read(reinterpret_cast<char*>(&dt), 1);
    f.read(reinterpret_cast<char*>(&nd), 1);
    Array a;
    a.dtype = dt;
    a.dims.resize(nd);
    if (nd) f.read(reinterpret_cast<char*>(a.dims.data()), 8 * nd);
    a.data.resize(static_cast<size_t>(a.numel() * size_of[dt & 3]));
    f.read(a.data.data(), static_cast<std::streamsize>(a.data.size()));
    out[name] = std::move(a);
  }
  if (!f) {
    err = path + ": truncated";
    return false;
  }
  return true;
}

// Splits [0, n) into three uneven chunks (n / 5, n / 2, the rest).
struct Chunks {
  template <typename F>
  void operator()(int64_t n, int64_t /*grain*/, F&& fn) const {
    const int64_t a = n / 5, b = a + n / 2;
    if (a > 0) fn(0, a);
    if (b > a) fn(a, b);
    if (n > b) fn(b, n);
  }
};

class Runner {
 public:
  // in_place: the ops with a residual (projection, MLP, shift branches;
  // MSGDC's residual is its input) write their output over a copy of it,
  // as the engine runs them
  Runner(const KernelSet& s, const Case& c, bool in_place = false)
      : s_(s), c_(c), in_place_(in_place) {}

  bool takes_in_place() const {
    const int64_t op = at("op").as<int64_t>()[0];
    return op == 1 || op == 2 || ((op == 0 || op == 6) && meta(op ? 0 : 3));
  }

  const Array& at(const char* name) const {
    auto it = c_.find(name);
    if (it == c_.end()) throw std::string("golden has no array ") + name;
    return it->second;
  }
  bool has(const char* name) const { return c_.count(name) != 0; }
  int64_t meta(int i) const { return at("meta").as<int64_t>()[i]; }
  template <typename T>
  const T* f(const char* name) const {
    return at(name).as<T>();
  }
  const uint64_t* w(const char* name) const {
    return at(name).as<uint64_t>();
  }

  // Runs the op; returns the outputs in the order of the out* arrays.
  template <typename T>
  std::vector<std::vector<T>> run() const {
    const int op = static_cast<int>(at("op").as<int64_t>()[0]);
    switch (op) {
      case 0: return {proj<T>()};
      case 1: return {ffn<T>()};
      case 2: return msgdc<T>();
      case 3: return {merge<T>()};
      case 4: return {scores<T>()};
      case 5: return {context<T>()};
      case 6: return {shift<T>()};
      case 7: return {tokens<T>()};
      case 8: return {untokens<T>()};
      case 9: return {conv<T>()};
      case 10: return {sign_product<T>()};
      case 11: return {stem<T>()};
      case 12: return {attention<T>()};
      default: throw std::string("unknown op");
    }
  }

 private:
  template <typename T>
  ProjParams<T> proj_params(const char* pre, int64_t cin, int64_t cout,
                            int shortcut) const {
    auto n = [&](const char* k) { return std::string(pre) + k; };
    ProjParams<T> p{};
    p.cin = cin;
    p.cout = cout;
    p.thr = f<T>(n("thr").c_str());
    const Array& wt = at(n("wt").c_str());
    p.wt = wt.as<uint64_t>();
    p.words = wt.dims[0];
    p.cout_pad = wt.dims[1];
    p.a = f<T>(n("a").c_str());
    p.b = f<T>(n("b").c_str());
    p.slope = f<T>(n("slope").c_str());
    p.post_scale = f<T>(n("post_scale").c_str());
    p.post_bias = f<T>(n("post_bias").c_str());
    p.shortcut = shortcut;
    return p;
  }

  template <typename T>
  std::vector<T> proj() const {
    const int64_t cin = meta(0), cout = meta(1);
    ProjParams<T> p = proj_params<T>("", cin, cout, int(meta(2)));
    p.x = f<T>("x");
    p.tokens = at("x").numel() / cin;
    p.residual = meta(3) ? f<T>("residual") : nullptr;
    std::vector<T> y = output<T>("residual", p.tokens * cout);
    p.y = y.data();
    if (in_place_) p.residual = y.data();
    run_proj(s_, p, Chunks());
    return y;
  }

  template <typename T>
  std::vector<T> ffn() const {
    const int64_t c = meta(0), hid = meta(1);
    FfnParams<T> p{};
    p.expand = proj_params<T>("e_", c, hid, int(meta(2)));
    p.expand.x = f<T>("x");
    p.expand.tokens = at("x").numel() / c;
    p.reduce = proj_params<T>("r_", hid, c, int(meta(3)));
    p.reduce.tokens = p.expand.tokens;
    p.reduce.residual = f<T>("residual");
    // the nibble table, as the engine passes it (read by the AVX2 set)
    std::vector<int8_t> lut;
    if (nibble_lut_fits(c, hid)) {
      lut.resize(static_cast<size_t>(nibble_lut_bytes(c, hid)));
      build_nibble_lut(p.expand.wt, c, hid, p.expand.cout_pad, lut.data());
      p.expand.lut = lut.data();
    }
    std::vector<T> y = output<T>("residual", p.expand.tokens * c);
    p.reduce.y = y.data();
    if (in_place_) p.reduce.residual = y.data();
    run_ffn(s_, p, Chunks());
    return y;
  }

  template <typename T>
  std::vector<std::vector<T>> msgdc() const {
    const Array& x = at("x");
    MsgdcParams<T> p{};
    p.x = x.as<T>();
    p.n = x.dims[0];
    p.h = x.dims[1];
    p.w = x.dims[2];
    p.c = x.dims[3];
    p.groups = meta(0);
    p.cg = p.c / p.groups;
    p.wg = words_of(p.cg);
    p.ndil = int(meta(1));
    p.cout_pad = at("wt0").dims[2];
    const bool lane_weights = meta(2) != 0;
    char name[32];
    for (int i = 0; i < p.ndil; ++i) {
      p.dil[i] = int(meta(3 + i));
      std::snprintf(name, sizeof name, "wt%d", i);
      p.wt[i] = w(name);
      if (lane_weights) {
        std::snprintf(name, sizeof name, "lane_wt%d", i);
        p.wx[i] = w(name);
      }
      std::snprintf(name, sizeof name, "a%d", i);
      p.a[i] = f<T>(name);
      std::snprintf(name, sizeof name, "b%d", i);
      p.b[i] = f<T>(name);
      std::snprintf(name, sizeof name, "slope%d", i);
      p.slope[i] = f<T>(name);
    }
    p.out_scale = f<T>("out_scale");
    p.out_bias = f<T>("out_bias");
    p.n2_scale = f<T>("n2_scale");
    p.n2_bias = f<T>("n2_bias");
    std::vector<T> h = output<T>("x", x.numel()), hn(h.size());
    p.h_out = h.data();
    p.hn_out = hn.data();
    if (in_place_) p.x = h.data();
    const bool lanes = msgdc_takes_lanes(s_, p.c, p.groups, lane_weights);
    run_msgdc(s_, p, lanes, f<T>("in_scale"), f<T>("in_bias"), f<T>("thr"),
              Chunks());
    return {h, hn};
  }

  // The SpatialParams fields of merge and conv cases: input "x", packed
  // weights "wt", meta(0) = cout, the epilogue vectors (not y).
  template <typename T>
  void spatial(SpatialParams<T>& p) const {
    const Array& x = at("x");
    p.x = x.as<T>();
    p.n = x.dims[0];
    p.h = x.dims[1];
    p.w = x.dims[2];
    p.cin = x.dims[3];
    p.cout = meta(0);
    p.words = words_of(p.cin);
    p.cout_pad = at("wt").dims[2];
    p.wt = w("wt");
    p.a = f<T>("a");
    p.b = f<T>("b");
    p.slope = f<T>("slope");
    p.post_bias = f<T>("post_bias");
  }

  template <typename T>
  std::vector<T> merge() const {
    MergeParams<T> p{};
    spatial(p);
    p.pos = f<T>("pos");
    if (has("in_scale")) {  // merge_norm
      p.in_scale = f<T>("in_scale");
      p.in_bias = f<T>("in_bias");
    }
    std::vector<T> y(static_cast<size_t>(p.n * (p.h / 2) * (p.w / 2) * p.cout));
    p.y = y.data();
    run_merge(s_, p, f<T>("thr"), Chunks());
    return y;
  }

  template <typename T>
  std::vector<T> scores() const {
    const Array& q = at("q");
    const int64_t b = q.dims[0], t = q.dims[1], c = q.dims[2], h = meta(0);
    std::vector<T> s(static_cast<size_t>(b * h * t * t));
    // a table: the float32 attention map instead of the scores
    const double* table = has("table") ? at("table").as<double>() : nullptr;
    if (table != nullptr && sizeof(T) != sizeof(float))
      throw std::string("the attention map from a table is float32 only");
    run_scores(s_, q.as<T>(), f<T>("k"), f<T>("thr_q"), f<T>("thr_k"), b, t,
               c, h, static_cast<T>(at("scale").as<double>()[0]), s.data(),
               Chunks(), table);
    return s;
  }

  template <typename T>
  std::vector<T> context() const {
    std::vector<T> out(static_cast<size_t>(at("q").numel()));
    ContextParams<T> p = context_params<T>(out.data());
    p.p = f<T>("p");
    run_context(s_, p, f<T>("thr_v"), Chunks());
    return out;
  }

  template <typename T>
  std::vector<T> attention() const {
    if (sizeof(T) != sizeof(float))
      throw std::string("the attention in one pass is float32 only");
    std::vector<T> out(static_cast<size_t>(at("q").numel()));
    run_attention(s_, context_params<T>(out.data()), f<T>("thr_q"),
                  f<T>("thr_k"), f<T>("thr_v"), at("table").as<double>(),
                  Chunks());
    return out;
  }

  // everything but the map p (context) and the sign bits
  template <typename T>
  ContextParams<T> context_params(T* out) const {
    const Array& q = at("q");
    ContextParams<T> p{};
    p.q = q.as<T>();
    p.k = f<T>("k");
    p.v = f<T>("v");
    p.b = q.dims[0];
    p.t = q.dims[1];
    p.c = q.dims[2];
    p.heads = meta(0);
    p.d = p.c / p.heads;
    p.mode = int(meta(1));
    p.levels = int(meta(2));
    if (p.mode == kLSQ) {
      p.step = f<T>("step");
      p.zero = f<T>("zero");
    } else {
      const double* g = at("gsb").as<double>();
      p.g_alpha = T(g[0]);
      p.g_a = T(g[1]);
      p.g_b1 = T(g[2]);
      p.g_b2 = T(g[3]);
      p.g_low = T(g[4]);
      p.g_high = T(g[5]);
    }
    p.ctx_a = f<T>("ctx_a");
    p.ctx_b = f<T>("ctx_b");
    p.slope = f<T>("slope");
    p.post_bias = f<T>("post_bias");
    p.out = out;
    return p;
  }

  template <typename T>
  std::vector<T> shift() const {
    const Array& x = at("x");
    ShiftParams<T> p{};
    p.x = x.as<T>();
    p.res = meta(0) ? f<T>("res") : nullptr;
    p.n = x.dims[0];
    p.h = x.dims[1];
    p.w = x.dims[2];
    p.c = x.dims[3];
    p.ntaps = int(at("dy").numel());
    p.dy = at("dy").as<int32_t>();
    p.dx = at("dx").as<int32_t>();
    p.wk = f<T>("wk");
    p.bias = f<T>("bias");
    std::vector<T> y = output<T>("res", x.numel());
    p.y = y.data();
    if (in_place_) p.res = y.data();
    run_shift(s_, p, Chunks());
    return y;
  }

  template <typename T>
  std::vector<T> stem() const {
    const Array& x = at("x");
    StemParams<T> p{};
    p.x = x.as<T>();
    p.n = x.dims[0];
    p.cin = x.dims[1];
    p.h = x.dims[2];
    p.w = x.dims[3];
    p.cout = at("bias").numel();
    p.wt = f<T>("wt");
    p.bias = f<T>("bias");
    p.gelu = int(meta(0));
    p.pos = meta(1) ? f<T>("pos") : nullptr;
    std::vector<T> y(static_cast<size_t>(p.n * (p.h / 4) * (p.w / 4) * p.cout));
    p.y = y.data();
    run_stem(s_, p, Chunks());
    return y;
  }

  template <typename T>
  std::vector<T> tokens() const {
    const Array& x = at("x");
    const int64_t s = meta(0);
    TokensParams<T> p{};
    static_cast<WindowGrid&>(p) =
        WindowGrid{x.dims[0], x.dims[1], x.dims[2], x.dims[3], s,
                   (x.dims[1] + s - 1) / s, (x.dims[2] + s - 1) / s};
    p.x = x.as<T>();
    p.scale = f<T>("scale");
    p.bias = f<T>("bias");
    p.mix = f<T>("mix");
    p.rest = f<T>("rest");
    const int64_t cells = p.cells();
    std::vector<T> tok(static_cast<size_t>(p.n * cells * (s * s + cells) * p.c));
    p.tokens = tok.data();
    run_tokens(s_, p, Chunks());
    return tok;
  }

  template <typename T>
  std::vector<T> untokens() const {
    const Array& a = at("a");
    const int64_t n = meta(0), h = meta(1), w = meta(2), s = meta(3);
    UntokensParams<T> p{};
    static_cast<WindowGrid&>(p) =
        WindowGrid{n, h, w, a.dims[2], s, (h + s - 1) / s, (w + s - 1) / s};
    p.a = a.as<T>();
    p.mix = f<T>("mix");
    p.rest = f<T>("rest");
    std::vector<T> out(static_cast<size_t>(n * h * w * p.c));
    p.out = out.data();
    run_untokens(s_, p, Chunks());
    return out;
  }

  template <typename T>
  std::vector<T> conv() const {
    ConvParams<T> p{};
    spatial(p);
    p.k = int(meta(1));
    p.shortcut = int(meta(2));
    p.post_scale = f<T>("post_scale");
    std::vector<T> y(static_cast<size_t>(p.n * p.h * p.w * p.cout));
    p.y = y.data();
    run_conv(s_, p, f<T>("thr"), Chunks());
    return y;
  }

  template <typename T>
  std::vector<T> sign_product() const {
    const Array& x = at("x");
    SignProductParams<T> p{};
    p.x = x.as<T>();
    p.n = x.dims[0];
    p.cin = x.dims[1];
    p.pixels = x.dims[2] * x.dims[3];
    p.cout = meta(0);
    p.bias = has("bias") ? f<T>("bias") : nullptr;
    std::vector<T> y(static_cast<size_t>(p.n * p.cout * p.pixels));
    p.y = y.data();
    if (!run_sign_product(s_, p, f<T>("w"), Chunks()))
      throw std::string("sign_product declined inputs that are all signs");
    return y;
  }

  // the output buffer: zeros, or (in place) the residual's values
  template <typename T>
  std::vector<T> output(const char* residual, int64_t n) const {
    if (!in_place_) return std::vector<T>(static_cast<size_t>(n));
    const T* r = f<T>(residual);
    return std::vector<T>(r, r + n);
  }

  const KernelSet& s_;
  const Case& c_;
  bool in_place_;
};

// "" if got equals the expected array exactly, else a description.
template <typename T>
std::string compare(const std::vector<T>& got, const Array& want) {
  if (static_cast<int64_t>(got.size()) != want.numel())
    return "size " + std::to_string(got.size()) + " != " +
           std::to_string(want.numel());
  const T* e = want.as<T>();
  int64_t bad = 0, first = -1;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == e[i])) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
      const double d = std::fabs(double(got[i]) - double(e[i]));
      worst = d > worst ? d : worst;
    }
  }
  if (bad == 0) return "";
  std::ostringstream os;
  os << bad << " of " << got.size() << " values differ (first at " << first
     << ": " << double(got[first]) << " vs " << double(e[first])
     << ", max abs diff " << worst << ")";
  return os.str();
}

template <typename T>
std::string check(const KernelSet& s, const Case& c) {
  static const char* const names[2] = {"out", "out_hn"};
  for (bool in_place : {false, true}) {
    const Runner runner(s, c, in_place);
    if (in_place && !runner.takes_in_place()) break;
    std::vector<std::vector<T>> outs = runner.run<T>();
    for (size_t i = 0; i < outs.size() && i < 2; ++i) {
      std::string r = compare(outs[i], c.at(names[i]));
      if (!r.empty())
        return std::string(names[i]) + (in_place ? " (in place)" : "") +
               ": " + r;
    }
  }
  return "";
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = MMBHVIT_GOLDENS_DIR;
  std::vector<std::string> sets(kSetNames, kSetNames + kNumSets);
  bool named = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--goldens") == 0 && i + 1 < argc) {
      dir = argv[++i];
    } else if (std::strcmp(argv[i], "--sets") == 0 && i + 1 < argc) {
      sets = split(argv[++i], ',');
      named = true;
    } else {
      std::fprintf(stderr, "usage: %s [--goldens DIR] [--sets a,b,...]\n",
                   argv[0]);
      return 64;
    }
  }
  std::ifstream manifest(dir + "/MANIFEST");
  if (!manifest) {
    std::fprintf(stderr, "no %s/MANIFEST (write it with "
                 "tools/deployment/write_kernel_goldens.py)\n", dir.c_str());
    return 64;
  }
  std::vector<std::pair<std::string, Case>> cases;
  for (std::string line; std::getline(manifest, line);) {
    if (line.empty()) continue;
    Case c;
    std::string err;
    if (!read_case(dir + "/" + line, c, err)) {
      std::fprintf(stderr, "%s\n", err.c_str());
      return 64;
    }
    cases.emplace_back(line, std::move(c));
  }
  int status = 0;
  for (const std::string& name : sets) {
    const char* why = nullptr;
    const KernelSet* s = find_kernel_set(name.c_str(), &why);
    if (s == nullptr) {
      std::printf("skipped: %s (%s)\n", name.c_str(), why);
      if (named && status == 0) status = 2;
      continue;
    }
    auto run = [&](const std::pair<std::string, Case>& nc) {
      std::string r;
      try {
        const bool f64 = nc.first.find("_f64") != std::string::npos;
        r = f64 ? check<double>(*s, nc.second) : check<float>(*s, nc.second);
      } catch (const std::string& e) {
        r = e;
      }
      // every scratch block of the kernels given back
      if (r.empty() && scratch_stack().in_use() != 0)
        r = "scratch memory not given back: " +
            std::to_string(scratch_stack().in_use()) + " bytes";
      return r;
    };
    int failed = 0;
    for (const auto& nc : cases) {
      const std::string r = run(nc);
      if (!r.empty()) {
        std::printf("FAIL: %s %s: %s\n", name.c_str(), nc.first.c_str(),
                    r.c_str());
        ++failed;
      }
    }
    // once the stack has grown, the same calls take no memory from the heap
    const std::size_t heap = scratch_stack().heap_blocks();
    for (const auto& nc : cases) run(nc);
    const bool heap_ok = scratch_stack().heap_blocks() == heap;
    if (!heap_ok) {
      status = 1;
      std::printf("FAIL: %s: a second pass over the cases took %zu scratch "
                  "blocks from the heap\n", name.c_str(),
                  scratch_stack().heap_blocks() - heap);
    }
    if (failed) {
      status = 1;
      std::printf("FAIL: %s (%d of %zu cases)\n", name.c_str(), failed,
                  cases.size());
    } else if (heap_ok) {
      std::printf("pass: %s (%zu cases)\n", name.c_str(), cases.size());
    }
  }
  return status;
}
