// C++ test driver of the sft operator library, run by ctest (see CMakeLists.txt;
// `make test-cpp` builds it with ASan/UBSan). It calls every op through the
// dispatcher, as Python does, on edge shapes and bad arguments: results must
// match the spec in sft_kernels/reference.py, bad arguments must raise
// c10::Error (TORCH_CHECK), and nothing may crash or trip a sanitizer.
//
// Usage: sft_driver [--require-all] [-v]
//   --require-all  an op without a CPU kernel fails the run instead of skipping its group
//   -v             also print every passing case and the message of every expected error
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <c10/util/accumulate.h>

#include "common/philox.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <dlfcn.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace {

using at::Tensor;
using T2 = std::tuple<Tensor, Tensor>;
using T3 = std::tuple<Tensor, Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();

// ============================================================================ bookkeeping

struct Tally {
  int passed = 0, failed = 0, skipped_groups = 0;
  bool verbose = false;
  std::string current_case;  // named in the report when a sanitizer aborts the run
} tally;

void record(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) {
    ++tally.passed;
    if (tally.verbose) std::printf("  ok    %s%s%s\n", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  } else {
    ++tally.failed;
    std::printf("  FAIL  %s%s%s\n", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  }
}

// The message of an exception, without the C++ backtrace c10 appends.
std::string message_of(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  return c10_error ? c10_error->what_without_backtrace() : e.what();
}

// One assertion inside the current case; a failure is reported under the case's name.
void check(bool ok, const std::string& detail) {
  if (!ok) record(false, tally.current_case, detail);
}

// A case: runs `body`, whose checks record failures; an exception escaping it
// is a failure too. A case that made no failing check counts as one pass.
void run_case(const std::string& name, const std::function<void()>& body) {
  const int failed_before = tally.failed;
  tally.current_case = name;
  try {
    body();
  } catch (const std::exception& e) {
    record(false, name, "unexpected exception: " + message_of(e));
    return;
  }
  if (tally.failed == failed_before) record(true, name);
}

// A case that must raise c10::Error (what TORCH_CHECK throws). A missing throw,
// another exception type, or NotImplementedError (no kernel for the call, which
// says nothing about argument checking) is a failure.
void expect_throw(const std::string& name, const std::function<void()>& body) {
  tally.current_case = name;
  try {
    body();
  } catch (const c10::NotImplementedError& e) {
    record(false, name, "NotImplementedError instead of an argument check: " + message_of(e));
    return;
  } catch (const c10::Error& e) {
    const std::string msg = message_of(e);
    record(true, "throws: " + name, msg.substr(0, msg.find('\n')));
    return;
  } catch (const std::exception& e) {
    record(false, name, "threw a non-c10::Error: " + message_of(e));
    return;
  }
  record(false, name, "expected c10::Error, nothing was thrown");
}

#if defined(__SANITIZE_ADDRESS__)
// Names the running case when a sanitizer ends the run. Under gcc, ASan and
// UBSan are separate run-time libraries, each with its own death callback;
// the plain call reaches ASan's, UBSan's is looked up in libubsan.
void name_case_on_sanitizer_abort() {
  void (*callback)() = [] {
    std::fprintf(stderr, "sft_driver: sanitizer abort in case: %s\n", tally.current_case.c_str());
  };
  __sanitizer_set_death_callback(callback);
  if (void* ubsan = dlopen("libubsan.so.1", RTLD_NOW | RTLD_NOLOAD)) {
    using SetCallback = void (*)(void (*)());
    if (auto set = reinterpret_cast<SetCallback>(dlsym(ubsan, "__sanitizer_set_death_callback"))) set(callback);
  }
}
#endif

// ============================================================================ the ops

// Typed dispatcher handles of the sft ops. Signatures mirror csrc/ops.cpp:
// int -> int64_t, SymInt -> c10::SymInt (the seeds; kernels bind them as
// int64_t), ScalarType -> c10::ScalarType. typed<>() verifies them.
namespace op {

c10::OperatorHandle handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

T2 quantize(const Tensor& x, int64_t bits, int64_t block, bool stochastic = false, int64_t seed = 0) {
  static const auto h = handle("sft::quantize").typed<T2(const Tensor&, int64_t, int64_t, bool, c10::SymInt)>();
  return h.call(x, bits, block, stochastic, seed);
}

Tensor dequantize(const Tensor& codes, const Tensor& scales, int64_t bits, int64_t block, int64_t cols,
                  c10::ScalarType dtype = at::kFloat) {
  static const auto h = handle("sft::dequantize")
                            .typed<Tensor(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, c10::ScalarType)>();
  return h.call(codes, scales, bits, block, cols, dtype);
}

T2 lowrank(const Tensor& x, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed) {
  static const auto h = handle("sft::lowrank").typed<T2(const Tensor&, int64_t, int64_t, int64_t, c10::SymInt)>();
  return h.call(x, rank, oversample, power_iters, seed);
}

T3 randomized_svd(const Tensor& w, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed) {
  static const auto h =
      handle("sft::randomized_svd").typed<T3(const Tensor&, int64_t, int64_t, int64_t, c10::SymInt)>();
  return h.call(w, rank, oversample, power_iters, seed);
}

T4 lowrank_quantize(const Tensor& x, int64_t rank, int64_t oversample, int64_t power_iters, int64_t bits,
                    int64_t block, bool stochastic, int64_t seed) {
  static const auto h = handle("sft::lowrank_quantize")
                            .typed<T4(const Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t, bool, c10::SymInt)>();
  return h.call(x, rank, oversample, power_iters, bits, block, stochastic, seed);
}

Tensor lowrank_dequantize(const Tensor& pc, const Tensor& ps, const Tensor& qc, const Tensor& qs, int64_t rows,
                          int64_t cols, int64_t rank, int64_t bits, int64_t block,
                          c10::ScalarType dtype = at::kFloat) {
  static const auto h =
      handle("sft::lowrank_dequantize")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                        int64_t, int64_t, c10::ScalarType)>();
  return h.call(pc, ps, qc, qs, rows, cols, rank, bits, block, dtype);
}

// Whether `name` has a CPU kernel (registered directly or through an alias key).
bool has_cpu_kernel(const char* name) {
  const auto h = c10::Dispatcher::singleton().findOp({name, ""});
  return h && h->hasComputedKernelForDispatchKey(c10::DispatchKey::CPU);
}

}  // namespace op

// ============================================================================ helpers

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // no overflow for huge b
int64_t qmax_of(int64_t bits) { return (int64_t{1} << (bits - 1)) - 1; }

std::vector<int64_t> with_last(std::vector<int64_t> lead, int64_t last) {
  lead.push_back(last);
  return lead;
}

// quantize's view of x: lead dims and cols; a 0-d tensor is one row of one element.
std::vector<int64_t> lead_of(const Tensor& x) {
  return x.dim() ? std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1) : std::vector<int64_t>{};
}
int64_t cols_of(const Tensor& x) { return x.dim() ? x.size(-1) : 1; }

bool same_shape(const Tensor& t, const std::vector<int64_t>& shape) { return t.sizes().vec() == shape; }

std::string shape_str(c10::IntArrayRef s) { return c10::str(s); }

double max_abs(const Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }
bool all_finite(const Tensor& t) { return at::isfinite(t).all().item<bool>(); }

// Unit roundoff of a floating dtype.
double unit_roundoff(c10::ScalarType dt) {
  switch (dt) {
    case at::kHalf: return std::ldexp(1.0, -11);
    case at::kBFloat16: return std::ldexp(1.0, -8);
    default: return std::ldexp(1.0, -24);
  }
}

// Relative accuracy expected of the low-rank ops for an input of dtype `dt`.
double lowrank_tol(c10::ScalarType dt) { return std::max(1e-4, 16.0 * unit_roundoff(dt)); }

// rank x rank identity check: max |A^T A - I| <= tol.
bool orthonormal_columns(const Tensor& a, double tol) {
  const Tensor af = a.to(at::kFloat);
  return max_abs(at::matmul(af.t(), af) - at::eye(a.size(1))) <= tol;
}

// ||a - b||_F / ||b||_F (absolute when b is 0), in double.
double rel_err(const Tensor& a, const Tensor& b) {
  const double diff = (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>();
  const double ref = b.to(at::kDouble).norm().item<double>();
  return ref > 0 ? diff / ref : diff;
}

// Relative Frobenius error of the best rank-`rank` approximation of x2 (Eckart-Young).
double optimal_err(const Tensor& x2, int64_t rank) {
  const Tensor s = at::linalg_svdvals(x2.to(at::kDouble));
  const double total = s.pow(2).sum().item<double>();
  return total > 0 ? std::sqrt(s.slice(0, rank).pow(2).sum().item<double>() / total) : 0.0;
}

// How close to optimal a rank-r approximation must be: the single-pass sketch
// (power_iters = -1) is the least accurate, power iterations approach optimal.
double lowrank_slack(int64_t power_iters) { return power_iters < 0 ? 2.5 : power_iters == 0 ? 1.5 : 1.1; }

// Test matrices (from the global ATen generator, seeded in main).
Tensor low_rank_plus_noise(int64_t n, int64_t h, int64_t r, double noise) {
  return at::matmul(at::randn({n, r}), at::randn({r, h})) + noise * at::randn({n, h});
}

// ============================================================================ quantize / dequantize

// The spec's stochastic-rounding uniforms of elements 0..n-1 (common/philox.h):
// element i takes word i % 4 of Philox group i / 4, stream 0, keyed by the
// seed's unsigned 64-bit pattern.
Tensor philox_uniforms(int64_t n, int64_t seed) {
  Tensor u = at::empty({n});
  float* p = u.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const sft::Philox4 g = sft::philox_group(static_cast<uint64_t>(seed), static_cast<uint64_t>(i) / 4,
                                             sft::kPhiloxStreamRounding);
    p[i] = sft::philox_u01(g.v[i % 4]);
  }
  return u;
}

// The spec's integer levels q of the rows x cols fp32 input xf, whose element
// scales are `step`: t = x / scale in fp32, then round half away from zero or
// floor(t + u), clamped to +-qmax; q = 0 where the scale is 0.
Tensor spec_levels(const Tensor& xf, const Tensor& step, int64_t bits, bool stochastic, int64_t seed) {
  const Tensor zero = step.eq(0);
  const Tensor t = xf / at::where(zero, at::ones_like(step), step);
  Tensor q;
  if (stochastic) {
    q = at::floor(t + philox_uniforms(t.numel(), seed).view_as(t));
  } else {
    const Tensor a = t.abs(), f = at::floor(a);
    q = at::sign(t) * (f + (a - f).ge(0.5).to(at::kFloat));
  }
  const double qmax = static_cast<double>(qmax_of(bits));
  return at::where(zero, at::zeros_like(q), q.clamp(-qmax, qmax));
}

// Quantizes x and checks the result against the spec: shapes and dtypes,
// scales exactly fp32(absmax)/qmax, zero pad bits, and decoded values exactly
// q * scale with q from spec_levels; decoding into x's dtype is the cast of
// the fp32 decode.
void check_quantize(const Tensor& x, int64_t bits, int64_t block, bool stochastic, int64_t seed) {
  const auto [codes, scales] = op::quantize(x, bits, block, stochastic, seed);
  const auto lead = lead_of(x);
  const int64_t cols = cols_of(x), rows = c10::multiply_integers(lead);
  const int64_t nbytes = ceil_div(cols * bits, 8), nblk = ceil_div(cols, block);
  check(codes.scalar_type() == at::kByte && same_shape(codes, with_last(lead, nbytes)),
        c10::str("codes ", codes.scalar_type(), shape_str(codes.sizes()), ", want Byte",
                 shape_str(with_last(lead, nbytes))));
  check(scales.scalar_type() == at::kFloat && same_shape(scales, with_last(lead, nblk)),
        c10::str("scales ", scales.scalar_type(), shape_str(scales.sizes()), ", want Float",
                 shape_str(with_last(lead, nblk))));
  const Tensor deq = op::dequantize(codes, scales, bits, block, cols);
  check(deq.scalar_type() == at::kFloat && same_shape(deq, with_last(lead, cols)),
        c10::str("dequantize gave ", deq.scalar_type(), shape_str(deq.sizes())));
  if (rows * cols == 0 || !same_shape(scales, with_last(lead, nblk)) || !same_shape(deq, with_last(lead, cols))) return;

  // A block never spans rows, so a block wider than the row acts as one block of `cols`.
  const int64_t span = std::min(block, cols);
  const Tensor xf = x.reshape({rows, cols}).to(at::kFloat);
  const Tensor absmax = at::constant_pad_nd(xf, {0, nblk * span - cols}).reshape({rows, nblk, span}).abs().amax(-1);
  const Tensor s2 = scales.reshape({rows, nblk});
  check(at::equal(s2, absmax / at::full_like(absmax, static_cast<double>(qmax_of(bits)))),
        "scales differ from fp32(absmax)/qmax");

  const int64_t tail_bits = (cols * bits) % 8;  // used bits of each row's last byte
  if (tail_bits) {
    const Tensor last = codes.reshape({rows, nbytes}).select(1, nbytes - 1).to(at::kInt);
    check(last.lt(1 << tail_bits).all().item<bool>(), "pad bits of the last byte are not zero");
  }

  const Tensor step = s2.repeat_interleave(span, 1).narrow(1, 0, cols);
  const Tensor want = spec_levels(xf, step, bits, stochastic, seed) * step;
  const int64_t wrong = deq.reshape({rows, cols}).ne(want).sum().item<int64_t>();
  check(wrong == 0, c10::str(wrong, " of ", rows * cols, " decoded values differ from the spec's q * scale"));

  if (x.scalar_type() != at::kFloat) {
    const Tensor out = op::dequantize(codes, scales, bits, block, cols, x.scalar_type());
    check(out.scalar_type() == x.scalar_type() && at::equal(out, deq.to(x.scalar_type())),
          "dequantize to the input dtype is not the cast of the fp32 decode");
  }
}

// quantize(a) must equal quantize(b) bit for bit (same logical values).
void check_same_quantization(const Tensor& a, const Tensor& b, int64_t bits, int64_t block, bool stochastic) {
  const auto [ca, sa] = op::quantize(a, bits, block, stochastic, 99);
  const auto [cb, sb] = op::quantize(b, bits, block, stochastic, 99);
  check(at::equal(ca.reshape(-1), cb.reshape(-1)) && at::equal(sa.reshape(-1), sb.reshape(-1)),
        "codes/scales differ from the contiguous input's");
}

struct QuantShape {
  std::vector<int64_t> shape;
  int64_t block;
  const char* name;
};

void test_quantize() {
  const std::vector<QuantShape> shapes = {
      {{0, 16}, 8, "N=0"},
      {{1, 16}, 8, "N=1"},
      {{5, 1}, 4, "H=1"},
      {{3, 7}, 4, "H=7"},
      {{4, 37}, 8, "cols not a multiple of block"},
      {{4, 19}, 1, "block=1"},
      {{4, 10}, 64, "block > cols"},
      {{3, 37}, int64_t{1} << 20, "block=2^20"},
      {{2, 37}, kI64Max, "block=INT64_MAX"},
      {{2, 3, 37}, 8, "3-D"},
      {{}, 4, "0-d"},
      {{3, 0}, 8, "cols=0"},
  };
  for (const int64_t bits : {2, 4, 8}) {
    for (const auto& s : shapes) {
      for (const bool stochastic : {false, true}) {
        run_case(c10::str("quantize bits=", bits, " ", s.name, " ", shape_str(s.shape), " block=", s.block,
                          stochastic ? " stochastic" : ""),
                 [&] { check_quantize(at::randn(s.shape) * 3, bits, s.block, stochastic, 1234); });
      }
    }
    for (const auto dt : {at::kHalf, at::kBFloat16}) {
      for (const bool stochastic : {false, true}) {
        run_case(c10::str("quantize bits=", bits, " ", dt, " [4, 37] block=16", stochastic ? " stochastic" : ""),
                 [&] { check_quantize(at::randn({4, 37}).to(dt), bits, 16, stochastic, 7); });
      }
    }
    run_case(c10::str("quantize bits=", bits, " all-zero block and all-zero row"), [&] {
      Tensor x = at::randn({3, 32});
      x.narrow(1, 0, 8).zero_();
      x[2].zero_();
      check_quantize(x, bits, 8, false, 0);
    });
  }

  // Bit-exact format: scale 1, round half away from zero, little-endian packing.
  struct Exact {
    int64_t bits;
    std::vector<float> x, q;
    std::vector<uint8_t> codes;
  };
  const std::vector<Exact> exact = {
      {8, {127, 2.5f, -2.5f, 0.5f, -0.5f, 1.49f, -126.5f, 0}, {127, 3, -3, 1, -1, 1, -127, 0},
       {255, 131, 125, 129, 127, 129, 1, 128}},
      {4, {7, -7, 1, 0, 3.5f, -3.5f}, {7, -7, 1, 0, 4, -4}, {0x1F, 0x89, 0x4C}},
      {2, {1, -1, 0, 0.5f, -0.5f, 0.49f}, {1, -1, 0, 1, -1, 0}, {231, 9}},
  };
  for (const auto& e : exact) {
    run_case(c10::str("quantize bits=", e.bits, " exact codes"), [&] {
      const int64_t n = static_cast<int64_t>(e.x.size());
      const auto [codes, scales] = op::quantize(at::tensor(e.x).reshape({1, n}), e.bits, n, false, 0);
      check(at::equal(codes.reshape(-1), at::tensor(std::vector<uint8_t>(e.codes))), "packed codes");
      check(at::equal(scales, at::ones({1, 1})), "scale is 1");
      check(at::equal(op::dequantize(codes, scales, e.bits, n, n).reshape(-1), at::tensor(e.q)), "decoded q");
    });
  }

  // Strided inputs quantize like their contiguous copies; 3-D like its 2-D view.
  for (const bool stochastic : {false, true}) {
    const char* mode = stochastic ? " stochastic" : "";
    run_case(c10::str("quantize transposed input", mode), [&] {
      const Tensor x = at::randn({37, 6}).t();
      check_same_quantization(x, x.contiguous(), 4, 8, stochastic);
    });
    run_case(c10::str("quantize strided-slice input", mode), [&] {
      const Tensor x = at::randn({5, 74}).slice(1, 0, 74, 2);
      check_same_quantization(x, x.contiguous(), 2, 5, stochastic);
    });
    run_case(c10::str("quantize expanded (stride 0) input", mode), [&] {
      const Tensor x = at::randn({1, 21}).expand({4, 21});
      check_same_quantization(x, x.contiguous(), 8, 4, stochastic);
    });
    run_case(c10::str("quantize 3-D equals its 2-D view", mode), [&] {
      const Tensor x = at::randn({2, 3, 37});
      check_same_quantization(x, x.reshape({6, 37}), 4, 8, stochastic);
    });
  }
  run_case("dequantize non-contiguous codes and scales", [&] {
    const auto [codes, scales] = op::quantize(at::randn({6, 37}), 4, 8, false, 0);
    const Tensor want = op::dequantize(codes, scales, 4, 8, 37);
    const Tensor got = op::dequantize(codes.t().contiguous().t(), scales.t().contiguous().t(), 4, 8, 37);
    check(at::equal(got, want), "differs from contiguous codes/scales");
  });

  // Stochastic rounding: a function of the seed (any 64-bit pattern) and nothing else.
  run_case("stochastic: same seed same codes, other seed other codes", [&] {
    const Tensor x = at::randn({8, 512});
    const auto [c1, s1] = op::quantize(x, 4, 32, true, 5);
    const auto [c2, s2] = op::quantize(x, 4, 32, true, 5);
    const auto [c3, s3] = op::quantize(x, 4, 32, true, 6);
    check(at::equal(c1, c2) && at::equal(s1, s2), "same seed gave different codes");
    check(!at::equal(c1, c3), "seeds 5 and 6 gave identical codes");
  });
  for (const int64_t seed : {int64_t{-1}, kI64Min, kI64Max}) {
    run_case(c10::str("stochastic seed=", seed), [&] { check_quantize(at::randn({3, 45}), 2, 16, true, seed); });
  }

  // Bad arguments.
  const Tensor x = at::randn({4, 37});
  for (const int64_t bits : {3, 0, 1, 16, -8}) {
    expect_throw(c10::str("quantize bits=", bits), [&] { op::quantize(x, bits, 8); });
  }
  for (const int64_t block : {0, -5}) {
    expect_throw(c10::str("quantize block=", block), [&] { op::quantize(x, 4, block); });
  }
  for (const auto dt : {at::kInt, at::kLong, at::kByte, at::kBool, at::kDouble}) {
    expect_throw(c10::str("quantize ", dt, " input"), [&] { op::quantize(x.to(dt), 4, 8); });
  }
  for (const double bad : {NAN, INFINITY, -INFINITY}) {
    for (const auto dt : {at::kFloat, at::kHalf}) {
      expect_throw(c10::str("quantize ", dt, " input with ", bad), [&] {
        Tensor y = x.to(dt, /*non_blocking=*/false, /*copy=*/true);
        y[2][30] = bad;
        op::quantize(y, 8, 8);
      });
    }
  }
  expect_throw("quantize stochastic NaN input", [&] { op::quantize(at::full({2, 3}, NAN), 4, 8, true, 1); });

  const auto [codes, scales] = op::quantize(x, 4, 8);  // codes [4, 19], scales [4, 5]
  const std::vector<std::pair<std::string, std::function<void()>>> bad_dequant = {
      {"bits=3", [&] { op::dequantize(codes, scales, 3, 8, 37); }},
      {"block=0", [&] { op::dequantize(codes, scales, 4, 0, 37); }},
      {"block=-5", [&] { op::dequantize(codes, scales, 4, -5, 37); }},
      {"cols=-1", [&] { op::dequantize(codes, scales, 4, 8, -1); }},
      {"codes one byte short", [&] { op::dequantize(codes.narrow(1, 0, 18), scales, 4, 8, 37); }},
      {"codes one byte long", [&] { op::dequantize(at::constant_pad_nd(codes, {0, 1}), scales, 4, 8, 37); }},
      {"scales one block short", [&] { op::dequantize(codes, scales.narrow(1, 0, 4), 4, 8, 37); }},
      {"scales one block long", [&] { op::dequantize(codes, at::constant_pad_nd(scales, {0, 1}), 4, 8, 37); }},
      {"codes/scales leading dims differ", [&] { op::dequantize(codes.narrow(0, 0, 3), scales, 4, 8, 37); }},
      {"codes for a different cols", [&] { op::dequantize(codes, scales, 4, 8, 80); }},
      {"0-d codes", [&] { op::dequantize(codes[0][0], scales, 4, 8, 37); }},
      {"int8 codes", [&] { op::dequantize(codes.to(at::kChar), scales, 4, 8, 37); }},
      {"fp16 scales", [&] { op::dequantize(codes, scales.to(at::kHalf), 4, 8, 37); }},
      {"fp64 scales", [&] { op::dequantize(codes, scales.to(at::kDouble), 4, 8, 37); }},
  };
  for (const auto& [name, call] : bad_dequant) expect_throw("dequantize " + name, call);
}

// ============================================================================ lowrank / randomized_svd

// Calls sft::lowrank and checks: shapes and dtype, finite output, Q with
// orthonormal columns, P Q^T within lowrank_slack of the best rank-`rank`
// approximation, and the same output on a second call.
void check_lowrank(const Tensor& x, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed) {
  const auto [P, Q] = op::lowrank(x, rank, oversample, power_iters, seed);
  const int64_t h = cols_of(x), n = c10::multiply_integers(lead_of(x));
  check(same_shape(P, {n, rank}) && same_shape(Q, {h, rank}) && P.scalar_type() == x.scalar_type() &&
            Q.scalar_type() == x.scalar_type(),
        c10::str("P ", P.scalar_type(), shape_str(P.sizes()), " Q ", Q.scalar_type(), shape_str(Q.sizes()),
                 ", want ", x.scalar_type(), " [", n, ", ", rank, "] and [", h, ", ", rank, "]"));
  if (!same_shape(P, {n, rank}) || !same_shape(Q, {h, rank})) return;
  check(all_finite(P) && all_finite(Q), "non-finite output");
  if (n == 0) return;

  const Tensor x2 = x.reshape({n, h}).to(at::kFloat);
  const Tensor approx = at::matmul(P.to(at::kFloat), Q.to(at::kFloat).t());
  const double tol = lowrank_tol(x.scalar_type());
  if (max_abs(x2) == 0) {
    check(max_abs(approx) == 0, "P Q^T of a zero matrix is not zero");
  } else {
    check(orthonormal_columns(Q, tol), "Q columns are not orthonormal");
    const double err = rel_err(approx, x2), opt = optimal_err(x2, rank);
    check(err <= lowrank_slack(power_iters) * opt + tol,
          c10::str("relative error ", err, " vs optimal ", opt));
  }
  const auto [P2, Q2] = op::lowrank(x, rank, oversample, power_iters, seed);
  check(at::equal(P, P2) && at::equal(Q, Q2), "second call gave a different result");
}

// Calls sft::randomized_svd and checks: shapes and dtype, finite output, S
// non-negative and descending, U and V orthonormal, U S V^T near optimal, and
// S within the residual of the true singular values (Weyl).
void check_rsvd(const Tensor& w, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed) {
  const auto [U, S, V] = op::randomized_svd(w, rank, oversample, power_iters, seed);
  const int64_t n = w.size(0), h = w.size(1);
  const bool shapes_ok = same_shape(U, {n, rank}) && same_shape(S, {rank}) && same_shape(V, {h, rank});
  check(shapes_ok && U.scalar_type() == w.scalar_type() && S.scalar_type() == w.scalar_type() &&
            V.scalar_type() == w.scalar_type(),
        c10::str("U ", shape_str(U.sizes()), " S ", shape_str(S.sizes()), " V ", shape_str(V.sizes()),
                 " ", U.scalar_type()));
  if (!shapes_ok) return;
  check(all_finite(U) && all_finite(S) && all_finite(V), "non-finite output");
  if (n == 0) return;

  const Tensor wf = w.to(at::kFloat), Sf = S.to(at::kFloat);
  const double tol = lowrank_tol(w.scalar_type());
  check(Sf.ge(0).all().item<bool>() && Sf.slice(0, 1).le(Sf.slice(0, 0, rank - 1)).all().item<bool>(),
        "S is not non-negative and descending");
  if (max_abs(wf) == 0) {
    check(max_abs(Sf) == 0, "S of a zero matrix is not zero");
    return;
  }
  check(orthonormal_columns(U, tol) && orthonormal_columns(V, tol), "U or V not orthonormal");
  const Tensor approx = at::matmul(U.to(at::kFloat) * Sf, V.to(at::kFloat).t());
  const double err = rel_err(approx, wf), opt = optimal_err(wf, rank);
  check(err <= lowrank_slack(power_iters) * opt + tol, c10::str("relative error ", err, " vs optimal ", opt));
  const Tensor sv = at::linalg_svdvals(wf.to(at::kDouble)).slice(0, 0, rank);
  const double residual = (approx.to(at::kDouble) - wf.to(at::kDouble)).norm().item<double>();
  check(max_abs(Sf.to(at::kDouble) - sv) <= residual + tol * sv[0].item<double>(),
        c10::str("S is off the true singular values by ", max_abs(Sf.to(at::kDouble) - sv)));
}

// Input families shared by the lowrank and randomized_svd tests.
struct LowrankCase {
  std::string name;
  std::function<Tensor()> make;
  int64_t rank;
  int64_t seed;
};

std::vector<LowrankCase> lowrank_cases() {
  return {
      {"N=1 [1, 16] rank 1", [] { return at::randn({1, 16}); }, 1, 0},
      {"H=1 [12, 1] rank 1", [] { return at::randn({12, 1}); }, 1, 0},
      // rank = min(N, H) reconstructs exactly only if the square Rademacher
      // sketch is non-singular; seed 3's is (checked with the reference).
      {"rank=min(N,H) [20, 12] rank 12", [] { return at::randn({20, 12}); }, 12, 3},
      {"rank=min(N,H) [9, 30] rank 9", [] { return at::randn({9, 30}); }, 9, 3},
      {"rank-5 + noise [64, 48] rank 5", [] { return low_rank_plus_noise(64, 48, 5, 1e-2); }, 5, 7},
      {"gaussian [40, 30] rank 6", [] { return at::randn({40, 30}); }, 6, 7},
      {"rank-1 matrix [15, 10] rank 3", [] { return low_rank_plus_noise(15, 10, 1, 0); }, 3, 7},
      {"zero matrix [10, 6] rank 2", [] { return at::zeros({10, 6}); }, 2, 7},
  };
}

// Bad arguments shared by sft::lowrank, sft::randomized_svd and sft::lowrank_quantize,
// each given as (x, rank, oversample, power_iters).
void expect_lowrank_arg_errors(const std::string& op_name,
                               const std::function<void(const Tensor&, int64_t, int64_t, int64_t)>& call) {
  const Tensor x = at::randn({20, 12});
  expect_throw(op_name + " rank > min(N, H)", [&] { call(x, 13, 4, 1); });
  expect_throw(op_name + " rank > H with N=0", [&] { call(at::randn({0, 8}), 9, 4, 1); });
  expect_throw(op_name + " rank=0", [&] { call(x, 0, 4, 1); });
  expect_throw(op_name + " rank=-1", [&] { call(x, -1, 4, 1); });
  expect_throw(op_name + " oversample=-1", [&] { call(x, 2, -1, 1); });
  expect_throw(op_name + " power_iters=-2", [&] { call(x, 2, 4, -2); });
  for (const double bad : {NAN, INFINITY}) {
    expect_throw(c10::str(op_name, " input with ", bad), [&] {
      Tensor y = x.clone();
      y[3][5] = bad;
      call(y, 2, 4, 1);
    });
  }
  expect_throw(op_name + " int input", [&] { call(x.to(at::kInt), 2, 4, 1); });
  expect_throw(op_name + " fp64 input", [&] { call(x.to(at::kDouble), 2, 4, 1); });
}

void test_lowrank() {
  for (const auto& c : lowrank_cases()) {
    for (const int64_t pi : {-1, 0, 2}) {
      run_case(c10::str("lowrank ", c.name, " power_iters=", pi),
               [&] { check_lowrank(c.make(), c.rank, 8, pi, c.seed); });
    }
  }
  for (const auto dt : {at::kHalf, at::kBFloat16}) {
    run_case(c10::str("lowrank ", dt, " rank-5 + noise [64, 48]"),
             [&] { check_lowrank(low_rank_plus_noise(64, 48, 5, 1e-2).to(dt), 5, 8, 1, 7); });
  }
  run_case("lowrank N=0 [0, 8] rank 3", [] { check_lowrank(at::randn({0, 8}), 3, 8, 1, 0); });
  run_case("lowrank oversample=0", [] { check_lowrank(low_rank_plus_noise(30, 20, 4, 0), 4, 0, 1, 1); });
  run_case("lowrank oversample=INT64_MAX", [] { check_lowrank(at::randn({30, 20}), 4, kI64Max, 1, 1); });
  run_case("lowrank seed=-1", [] { check_lowrank(at::randn({30, 20}), 4, 8, 1, -1); });
  run_case("lowrank 3-D input equals its 2-D view", [] {
    const Tensor x = low_rank_plus_noise(10, 8, 2, 1e-3).reshape({2, 5, 8});
    check_lowrank(x, 2, 8, 1, 3);
    const auto [P, Q] = op::lowrank(x, 2, 8, 1, 3);
    const auto [P2, Q2] = op::lowrank(x.reshape({10, 8}), 2, 8, 1, 3);
    check(at::equal(P, P2) && at::equal(Q, Q2), "3-D result differs from the 2-D one");
  });
  run_case("lowrank non-contiguous input", [] {
    const Tensor x = low_rank_plus_noise(24, 16, 3, 1e-3).t();  // [16, 24], transposed strides
    const auto [P, Q] = op::lowrank(x, 3, 8, 1, 3);
    const auto [P2, Q2] = op::lowrank(x.contiguous(), 3, 8, 1, 3);
    check(at::allclose(P, P2, 1e-5, 1e-6) && at::allclose(Q, Q2, 1e-5, 1e-6), "differs from contiguous input");
  });
  expect_lowrank_arg_errors("lowrank", [](const Tensor& x, int64_t r, int64_t os, int64_t pi) {
    op::lowrank(x, r, os, pi, 0);
  });
}

void test_randomized_svd() {
  for (const auto& c : lowrank_cases()) {
    for (const int64_t pi : {-1, 0, 2}) {
      run_case(c10::str("randomized_svd ", c.name, " power_iters=", pi),
               [&] { check_rsvd(c.make(), c.rank, 8, pi, c.seed); });
    }
  }
  for (const auto dt : {at::kHalf, at::kBFloat16}) {
    run_case(c10::str("randomized_svd ", dt, " rank-5 + noise [64, 48]"),
             [&] { check_rsvd(low_rank_plus_noise(64, 48, 5, 1e-2).to(dt), 5, 8, 2, 7); });
  }
  run_case("randomized_svd N=0 [0, 8] rank 3", [] { check_rsvd(at::randn({0, 8}), 3, 8, 1, 0); });
  run_case("randomized_svd non-contiguous input", [] {
    const Tensor w = low_rank_plus_noise(24, 16, 3, 1e-3).t();
    check_rsvd(w, 3, 8, 2, 5);
  });
  expect_throw("randomized_svd 3-D input", [] { op::randomized_svd(at::randn({2, 5, 8}), 2, 4, 1, 0); });
  expect_throw("randomized_svd 1-D input", [] { op::randomized_svd(at::randn({8}), 1, 4, 1, 0); });
  expect_lowrank_arg_errors("randomized_svd", [](const Tensor& w, int64_t r, int64_t os, int64_t pi) {
    op::randomized_svd(w, r, os, pi, 0);
  });
}

// ============================================================================ lowrank_quantize / lowrank_dequantize

// sft::lowrank_quantize must be sft::lowrank followed by quantize of P^T with
// `seed` and of Q^T with seed + 1 (mod 2^64), bit for bit; lowrank_dequantize
// must be dequant(P^T)^T @ dequant(Q^T) and reconstruct x.
void check_lowrank_quantize(const Tensor& x, int64_t rank, int64_t power_iters, int64_t bits, int64_t block,
                            bool stochastic, int64_t seed) {
  const auto [pc, ps, qc, qs] = op::lowrank_quantize(x, rank, 8, power_iters, bits, block, stochastic, seed);
  const int64_t h = cols_of(x), n = c10::multiply_integers(lead_of(x));
  const bool shapes_ok = same_shape(pc, {rank, ceil_div(n * bits, 8)}) && same_shape(ps, {rank, ceil_div(n, block)}) &&
                         same_shape(qc, {rank, ceil_div(h * bits, 8)}) && same_shape(qs, {rank, ceil_div(h, block)});
  check(shapes_ok && pc.scalar_type() == at::kByte && qc.scalar_type() == at::kByte &&
            ps.scalar_type() == at::kFloat && qs.scalar_type() == at::kFloat,
        c10::str("shapes ", shape_str(pc.sizes()), shape_str(ps.sizes()), shape_str(qc.sizes()),
                 shape_str(qs.sizes())));
  if (!shapes_ok) return;

  const auto [P, Q] = op::lowrank(x, rank, 8, power_iters, seed);
  const int64_t q_seed = static_cast<int64_t>(static_cast<uint64_t>(seed) + 1);
  const auto [pc2, ps2] = op::quantize(P.t().contiguous(), bits, block, stochastic, seed);
  const auto [qc2, qs2] = op::quantize(Q.t().contiguous(), bits, block, stochastic, q_seed);
  check(at::equal(pc, pc2) && at::equal(ps, ps2), "P codes differ from quantize(lowrank(x).P^T)");
  check(at::equal(qc, qc2) && at::equal(qs, qs2), "Q codes differ from quantize(lowrank(x).Q^T, seed + 1)");

  for (const auto dt : {at::kFloat, x.scalar_type()}) {
    const Tensor y = op::lowrank_dequantize(pc, ps, qc, qs, n, h, rank, bits, block, dt);
    check(same_shape(y, {n, h}) && y.scalar_type() == dt,
          c10::str("lowrank_dequantize gave ", y.scalar_type(), shape_str(y.sizes())));
    if (!same_shape(y, {n, h}) || n == 0) continue;
    const Tensor want = at::matmul(op::dequantize(pc, ps, bits, block, n).t(), op::dequantize(qc, qs, bits, block, h));
    check(at::allclose(y.to(at::kFloat), want, std::max(1e-5, 16 * unit_roundoff(dt)), 1e-5),
          "lowrank_dequantize differs from dequant(P^T)^T @ dequant(Q^T)");
  }
  if (n > 0 && bits == 8) {  // 8-bit codes: reconstruction close to the factors' own
    const Tensor y = op::lowrank_dequantize(pc, ps, qc, qs, n, h, rank, bits, block);
    const Tensor x2 = x.reshape({n, h}).to(at::kFloat);
    const double err = rel_err(y, x2), opt = optimal_err(x2, rank);
    check(err <= lowrank_slack(power_iters) * opt + 0.03, c10::str("relative error ", err, " vs optimal ", opt));
  }
}

void test_lowrank_quantize() {
  for (const int64_t bits : {2, 4, 8}) {
    for (const int64_t pi : {-1, 0, 2}) {
      for (const bool stochastic : {false, true}) {
        run_case(c10::str("lowrank_quantize [40, 24] rank 4 bits=", bits, " power_iters=", pi,
                          stochastic ? " stochastic" : ""),
                 [&] {
                   check_lowrank_quantize(low_rank_plus_noise(40, 24, 4, 1e-2), 4, pi, bits, 16, stochastic, 21);
                 });
      }
    }
  }
  const std::vector<std::tuple<std::string, std::function<Tensor()>, int64_t, int64_t>> shapes = {
      {"N=0 [0, 8] rank 2", [] { return at::randn({0, 8}); }, 2, 4},
      {"N=1 [1, 16] rank 1", [] { return at::randn({1, 16}); }, 1, 4},
      {"H=1 [12, 1] rank 1", [] { return at::randn({12, 1}); }, 1, 4},
      {"rank=min(N,H) [9, 30] rank 9", [] { return at::randn({9, 30}); }, 9, 7},
      {"zero matrix [10, 6] rank 2", [] { return at::zeros({10, 6}); }, 2, 3},
      {"rank-1 matrix [15, 10] rank 3", [] { return low_rank_plus_noise(15, 10, 1, 0); }, 3, 1},
      {"3-D [2, 5, 8] rank 2", [] { return low_rank_plus_noise(10, 8, 2, 1e-3).reshape({2, 5, 8}); }, 2, 3},
      {"bf16 [32, 16] rank 4", [] { return low_rank_plus_noise(32, 16, 4, 1e-2).to(at::kBFloat16); }, 4, 8},
      {"block=1", [] { return at::randn({12, 9}); }, 3, 1},
      {"block=2^20", [] { return at::randn({12, 9}); }, 3, int64_t{1} << 20},
  };
  for (const auto& [name, make, rank, block] : shapes) {
    for (const int64_t bits : {2, 8}) {
      run_case(c10::str("lowrank_quantize ", name, " bits=", bits),
               [&] { check_lowrank_quantize(make(), rank, 1, bits, block, true, 5); });
    }
  }
  for (const int64_t seed : {int64_t{-1}, kI64Max}) {  // Q's seed + 1 wraps around 2^64 / crosses 2^63
    run_case(c10::str("lowrank_quantize stochastic seed=", seed),
             [&] { check_lowrank_quantize(at::randn({20, 12}), 3, 1, 4, 8, true, seed); });
  }

  expect_lowrank_arg_errors("lowrank_quantize", [](const Tensor& x, int64_t r, int64_t os, int64_t pi) {
    op::lowrank_quantize(x, r, os, pi, 8, 16, false, 0);
  });
  const Tensor x = at::randn({20, 12});
  expect_throw("lowrank_quantize bits=3", [&] { op::lowrank_quantize(x, 2, 4, 1, 3, 16, false, 0); });
  expect_throw("lowrank_quantize block=0", [&] { op::lowrank_quantize(x, 2, 4, 1, 8, 0, false, 0); });
  expect_throw("lowrank_quantize block=-5", [&] { op::lowrank_quantize(x, 2, 4, 1, 8, -5, false, 0); });

  // lowrank_dequantize argument checks, on valid rank-3 codes of a 20 x 12 input.
  const auto [pc, ps, qc, qs] = op::lowrank_quantize(x, 3, 4, 1, 4, 8, false, 0);
  const std::vector<std::pair<std::string, std::function<void()>>> bad = {
      {"rank=2 with 3-row codes", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 20, 12, 2, 4, 8); }},
      {"rank=0", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 20, 12, 0, 4, 8); }},
      {"rows=-1", [&] { op::lowrank_dequantize(pc, ps, qc, qs, -1, 12, 3, 4, 8); }},
      {"cols=-1", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 20, -1, 3, 4, 8); }},
      {"rows not matching p_codes", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 40, 12, 3, 4, 8); }},
      {"cols not matching q_codes", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 20, 30, 3, 4, 8); }},
      {"bits=3", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 20, 12, 3, 3, 8); }},
      {"block=0", [&] { op::lowrank_dequantize(pc, ps, qc, qs, 20, 12, 3, 4, 0); }},
      {"p/q codes with different ranks",
       [&] { op::lowrank_dequantize(pc, ps, qc.narrow(0, 0, 2), qs.narrow(0, 0, 2), 20, 12, 3, 4, 8); }},
      {"3-D p codes", [&] { op::lowrank_dequantize(pc.unsqueeze(0), ps.unsqueeze(0), qc, qs, 20, 12, 3, 4, 8); }},
      {"p_scales one block short", [&] { op::lowrank_dequantize(pc, ps.narrow(1, 0, 2), qc, qs, 20, 12, 3, 4, 8); }},
      {"int8 q codes", [&] { op::lowrank_dequantize(pc, ps, qc.to(at::kChar), qs, 20, 12, 3, 4, 8); }},
      {"fp16 q scales", [&] { op::lowrank_dequantize(pc, ps, qc, qs.to(at::kHalf), 20, 12, 3, 4, 8); }},
  };
  for (const auto& [name, call] : bad) expect_throw("lowrank_dequantize " + name, call);
}

// ============================================================================ driver

struct Group {
  const char* name;
  std::vector<const char*> ops;  // every op the group calls
  void (*run)();
};

}  // namespace

int main(int argc, char** argv) {
  bool require_all = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--require-all")) {
      require_all = true;
    } else if (!std::strcmp(argv[i], "-v")) {
      tally.verbose = true;
    } else {
      std::fprintf(stderr, "usage: %s [--require-all] [-v]\n", argv[0]);
      return 2;
    }
  }
  // The schemas come from csrc/ops.cpp's static TORCH_LIBRARY block: if they
  // are missing, the op library was not linked in (see CMakeLists.txt).
  if (!c10::Dispatcher::singleton().findOp({"sft::quantize", ""})) {
    std::fprintf(stderr, "sft_driver: no sft:: schemas registered; the op library was not loaded\n");
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // keep our lines in order with sanitizer reports
#if defined(__SANITIZE_ADDRESS__)
  name_case_on_sanitizer_abort();
#endif
  at::manual_seed(0);

  const std::vector<Group> groups = {
      {"quantize/dequantize", {"sft::quantize", "sft::dequantize"}, test_quantize},
      {"lowrank", {"sft::lowrank"}, test_lowrank},
      {"randomized_svd", {"sft::randomized_svd"}, test_randomized_svd},
      {"lowrank_quantize/lowrank_dequantize",
       {"sft::lowrank_quantize", "sft::lowrank_dequantize", "sft::lowrank", "sft::quantize", "sft::dequantize"},
       test_lowrank_quantize},
  };
  for (const auto& g : groups) {
    std::string missing;
    for (const char* name : g.ops) {
      if (!op::has_cpu_kernel(name)) missing += c10::str(missing.empty() ? "" : ", ", name);
    }
    if (!missing.empty()) {
      ++tally.skipped_groups;
      std::printf("%s group %s: no CPU kernel for %s\n", require_all ? "FAIL" : "SKIP", g.name, missing.c_str());
      continue;
    }
    const int passed = tally.passed, failed = tally.failed;
    std::printf("group %s\n", g.name);
    try {
      g.run();
    } catch (const std::exception& e) {  // from set-up code between cases
      record(false, c10::str("group ", g.name), "aborted by an exception outside its cases: " + message_of(e));
    }
    std::printf("  %d passed, %d failed\n", tally.passed - passed, tally.failed - failed);
  }
  std::printf("sft_driver: %d passed, %d failed, %d group(s) skipped\n", tally.passed, tally.failed,
              tally.skipped_groups);
  return tally.failed > 0 || (require_all && tally.skipped_groups > 0) ? 1 : 0;
}
