// CPU kernels of the randomized low-rank ops: sft::lowrank, sft::randomized_svd,
// sft::lowrank_quantize and sft::lowrank_dequantize.
//
// The algorithm is the one specified in sft_kernels/reference.py (module
// docstring and `_core`): a Halko-Martinsson-Tropp range finder with a Philox
// Rademacher sketch generated here (never passed in), shifted CholeskyQR3
// orthonormalisation, and either `power_iters` >= 0 power iterations or the
// single-pass sketch of Tropp et al. (2017) for power_iters = -1. All four ops
// share one range finder (`lowrank_core`); the big products are BLAS GEMMs on
// the fp32 view of X (no copy for contiguous fp32 input).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/philox.h"
#include "cpu/quantize.h"

namespace sft {
namespace cpu {
namespace {

// ----------------------------------------------------------------------------- argument checks

// The same ranges as sft_kernels/_checks.py, raised as ValueError so direct
// torch.ops.sft calls fail exactly like the Python wrappers.
void check_float_input(const at::Tensor& x, const char* op, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", t);
}

void check_lowrank_args(const char* op, int64_t rank, int64_t oversample, int64_t power_iters, int64_t n,
                        int64_t h) {
  TORCH_CHECK_VALUE(rank >= 1, op, ": rank must be >= 1, got ", rank);
  if (n > 0) {
    TORCH_CHECK_VALUE(rank <= std::min(n, h), op, ": rank must be <= min(N, H) = min(", n, ", ", h,
                      ") = ", std::min(n, h), ", got ", rank);
  } else {
    TORCH_CHECK_VALUE(rank <= h, op, ": rank must be <= H = ", h, ", got ", rank);
  }
  TORCH_CHECK_VALUE(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(power_iters >= -1, op,
                    ": power_iters must be >= -1 (-1 selects the single-pass sketch), got ", power_iters);
}

void check_bits_block(const char* op, int64_t bits, int64_t block) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, op, ": bits must be one of (2, 4, 8), got ", bits);
  TORCH_CHECK_VALUE(block >= 1, op, ": block must be >= 1, got ", block);
}

int64_t packed_cols(int64_t cols, int64_t bits) { return (cols * bits + 7) / 8; }
int64_t num_blocks(int64_t cols, int64_t block) { return (cols + block - 1) / block; }

// x viewed as the N x H matrix of the spec: leading dims flattened, a 0-dim
// tensor is 1 x 1. Returns a view where possible (reshape copies only when the
// strides do not allow a view).
at::Tensor as_matrix(const at::Tensor& x) {
  if (x.dim() == 0) return x.reshape({1, 1});
  return x.reshape({-1, x.size(-1)});
}

// ----------------------------------------------------------------------------- random sketches

// The rows x cols Rademacher test matrix of the spec, fp32: entry (i, j) has
// index e = i*cols + j and is +1 when the top bit of Philox word e of `stream`
// is 0, else -1.
at::Tensor rademacher(int64_t rows, int64_t cols, uint64_t seed, uint32_t stream) {
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  float* p = out.data_ptr<float>();
  const int64_t n = rows * cols;
  at::parallel_for(0, (n + 3) / 4, 1024, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const Philox4 w = philox_group(seed, static_cast<uint64_t>(g), stream);
      const int64_t e0 = 4 * g, cnt = std::min<int64_t>(4, n - e0);
      for (int64_t t = 0; t < cnt; ++t) p[e0 + t] = (w.v[t] >> 31) ? -1.0f : 1.0f;
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- orthonormalisation

// Multiversioned hot loops: AVX-512, AVX2 and the portable baseline. The code
// is the same in every clone (-ffp-contract=off), so results do not depend on
// which one runs.
#define SFT_LR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// Widest sketch handled by the fused CholeskyQR kernel below; wider ones use
// BLAS (at::mm / trsm), which wins once the k x k work per row dominates.
constexpr int64_t kFusedOrthMaxK = 64;
// Rows per tile of the fused kernel: the tile is held transposed (k x kLanes)
// so every operation is a vector op across rows.
constexpr int64_t kLanes = 8;

// Deterministic row partition for the fused kernel: the chunking depends only
// on m, never on the thread count, and per-chunk partial Gram matrices are
// summed in chunk order, so results are reproducible bit for bit.
int64_t orth_chunks(int64_t m) { return std::clamp<int64_t>((m + 255) / 256, 1, 16); }

// One CholeskyQR pass over rows [r0, r1) of the m x k fp32 matrix y. With
// r != nullptr each row is replaced by q solving q R = y (R upper k x k, in T),
// computed in T and rounded to fp32 into out. With acc != nullptr the outer
// products of the (rounded) rows are accumulated in T into acc, laid out as
// k(k+1)/2 upper-triangle entries of kLanes partial sums each.
template <typename T>
inline __attribute__((always_inline)) void cholqr_rows(const float* y, float* out, int64_t r0, int64_t r1,
                                                        int64_t k, const T* r, T* acc) {
  T t[kFusedOrthMaxK][kLanes];
  for (int64_t i0 = r0; i0 < r1; i0 += kLanes) {
    const int64_t rows = std::min<int64_t>(kLanes, r1 - i0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t l = 0; l < kLanes; ++l) t[j][l] = l < rows ? static_cast<T>(y[(i0 + l) * k + j]) : T(0);
    if (r != nullptr) {
      // Column-oriented forward substitution on the transposed tile.
      for (int64_t j = 0; j < k; ++j) {
        const T d = r[j * k + j];
        for (int64_t l = 0; l < kLanes; ++l) t[j][l] /= d;
        for (int64_t c = j + 1; c < k; ++c) {
          const T rjc = r[j * k + c];
          for (int64_t l = 0; l < kLanes; ++l) t[c][l] -= rjc * t[j][l];
        }
        // Round to the fp32 result; the next Gram is taken of the rounded rows.
        for (int64_t l = 0; l < kLanes; ++l) t[j][l] = static_cast<T>(static_cast<float>(t[j][l]));
      }
      for (int64_t l = 0; l < rows; ++l)
        for (int64_t j = 0; j < k; ++j) out[(i0 + l) * k + j] = static_cast<float>(t[j][l]);
    }
    if (acc != nullptr) {
      T* a = acc;
      for (int64_t p = 0; p < k; ++p)
        for (int64_t c = p; c < k; ++c, a += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) a[l] += t[p][l] * t[c][l];
    }
  }
}

SFT_LR_CLONES void cholqr_rows_f64(const float* y, float* out, int64_t r0, int64_t r1, int64_t k, const double* r,
                                   double* acc) {
  cholqr_rows<double>(y, out, r0, r1, k, r, acc);
}
SFT_LR_CLONES void cholqr_rows_f32(const float* y, float* out, int64_t r0, int64_t r1, int64_t k, const float* r,
                                   float* acc) {
  cholqr_rows<float>(y, out, r0, r1, k, r, acc);
}

template <typename T>
void cholqr_rows_any(const float* y, float* out, int64_t r0, int64_t r1, int64_t k, const T* r, T* acc) {
  if constexpr (std::is_same_v<T, double>) {
    cholqr_rows_f64(y, out, r0, r1, k, r, acc);
  } else {
    cholqr_rows_f32(y, out, r0, r1, k, r, acc);
  }
}

// Fused CholeskyQR pass over all m rows (parallel over deterministic chunks):
// out = y R^{-1} when r is given, and returns the k x k Gram matrix of the
// result (of y itself when r is null) when want_gram, else an undefined tensor.
template <typename T>
at::Tensor cholqr_pass(const at::Tensor& y, at::Tensor* out, const at::Tensor& r, bool want_gram) {
  const int64_t m = y.size(0), k = y.size(1);
  const int64_t nchunk = orth_chunks(m), chunk = (m + nchunk - 1) / nchunk;
  const int64_t tri = k * (k + 1) / 2 * kLanes;
  std::vector<T> acc(want_gram ? static_cast<size_t>(nchunk * tri) : 0, T(0));
  const float* yp = y.data_ptr<float>();
  float* op = out != nullptr ? out->data_ptr<float>() : nullptr;
  const T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
  at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = std::min(m, c * chunk), r1 = std::min(m, r0 + chunk);
      cholqr_rows_any<T>(yp, op, r0, r1, k, rp, want_gram ? acc.data() + c * tri : nullptr);
    }
  });
  if (!want_gram) return at::Tensor();
  at::Tensor g = at::empty({k, k}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* gp = g.data_ptr<T>();
  int64_t e = 0;
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t c = p; c < k; ++c, ++e) {
      T sum = 0;
      for (int64_t ch = 0; ch < nchunk; ++ch)
        for (int64_t l = 0; l < kLanes; ++l) sum += acc[ch * tri + e * kLanes + l];
      gp[p * k + c] = sum;
      gp[c * k + p] = sum;
    }
  }
  return g;
}

// Shift of shifted CholeskyQR for an m x k matrix with Gram g:
// s = 11 (m k + k (k+1)) u tr(g) + tiny, u the unit roundoff of the Gram dtype.
double cholqr_shift(const at::Tensor& g, int64_t m) {
  const int64_t k = g.size(0);
  const bool f64 = g.scalar_type() == at::kDouble;
  const double u = (f64 ? std::numeric_limits<double>::epsilon() : double{std::numeric_limits<float>::epsilon()}) / 2;
  const double tiny = (f64 ? std::numeric_limits<double>::min() : double{std::numeric_limits<float>::min()}) * 1e4;
  return 11.0 * static_cast<double>(m * k + k * (k + 1)) * u * g.trace().item<double>() + tiny;
}

// Upper Cholesky factor of g + shift I (row-major contiguous). linalg_cholesky_ex
// never throws; the shift keeps the matrix positive definite for finite input.
at::Tensor shifted_cholesky(at::Tensor g, double shift) {
  g.diagonal().add_(shift);
  return std::get<0>(at::linalg_cholesky_ex(g, /*upper=*/true, /*check_errors=*/false)).contiguous();
}

template <typename T>
at::Tensor orth_fused(const at::Tensor& y, bool* finite) {
  const int64_t m = y.size(0), k = y.size(1);
  at::Tensor g = cholqr_pass<T>(y, nullptr, at::Tensor(), /*want_gram=*/true);
  const double shift0 = cholqr_shift(g, m);
  if (finite != nullptr) *finite = std::isfinite(shift0);
  at::Tensor q = y;
  for (int pass = 0; pass < 3; ++pass) {
    const at::Tensor r = shifted_cholesky(g, pass == 0 ? shift0 : cholqr_shift(g, m));
    at::Tensor next = at::empty({m, k}, y.options());
    g = cholqr_pass<T>(q, &next, r, /*want_gram=*/pass < 2);
    q = next;
  }
  return q;
}

// Shifted CholeskyQR3 of a tall m x k fp32 matrix (reference `_orth`): three
// passes of  G = Y^T Y + s I,  R = chol(G),  Y <- Y R^{-1},  with the shift of
// `cholqr_shift`. The Gram matrix, the Cholesky factor and the triangular solve
// run in `gram` (fp64 for fp32 input, fp32 for fp16/bf16); the result is rounded
// back to fp32 after every pass. Rank-deficient or zero Y yields finite output
// without data-dependent branches. If `finite` is given it receives whether Y
// was finite (its Gram trace is), which spares a separate scan of Y.
at::Tensor orth(const at::Tensor& y_in, at::ScalarType gram, bool* finite = nullptr) {
  const at::Tensor y = y_in.contiguous();
  const int64_t m = y.size(0), k = y.size(1);
  if (k <= kFusedOrthMaxK) return gram == at::kDouble ? orth_fused<double>(y, finite) : orth_fused<float>(y, finite);
  at::Tensor q = y;
  for (int pass = 0; pass < 3; ++pass) {
    const at::Tensor yg = q.to(gram);
    const at::Tensor g = at::mm(yg.t(), yg);
    const double shift = cholqr_shift(g, m);
    if (pass == 0 && finite != nullptr) *finite = std::isfinite(shift);
    const at::Tensor r = shifted_cholesky(g, shift);
    q = at::linalg_solve_triangular(r, yg, /*upper=*/true, /*left=*/false).to(at::kFloat);
  }
  return q;
}

// ----------------------------------------------------------------------------- range finder

// The rank-truncated factors shared by every op, all fp32:
// X ~= q @ ub @ diag(s) @ vb^T with q (N x k) and vb (H x r) orthonormal.
struct Factors {
  at::Tensor q, ub, s, vb;
};

// Raise the spec's RuntimeError for a sketch that is not finite. A NaN/Inf in
// row i of X makes every entry of row i of Y = X Omega non-finite (Omega is
// +-1), and a non-finite Y has a non-finite Gram trace, so `orth` detects it
// for free and only then is X scanned to count the bad values. A finite X whose
// sketch overflows fp32 is reported too rather than returning NaN factors.
[[noreturn]] void raise_non_finite(const at::Tensor& x2, const char* op, const char* name) {
  const int64_t bad = at::isfinite(x2).logical_not().sum().item<int64_t>();
  TORCH_CHECK(bad == 0, op, ": ", name, " has ", bad, " non-finite value(s)");
  TORCH_CHECK(false, op, ": ", name, " is finite but its sketch overflowed float32; scale ", name, " down");
  __builtin_unreachable();
}

// Q = orth(Y) for the first sketch Y of x2, raising on non-finite input.
at::Tensor orth_sketch(const at::Tensor& y, at::ScalarType gram, const at::Tensor& x2, const char* op,
                       const char* name) {
  bool finite = true;
  at::Tensor q = orth(y, gram, &finite);
  if (!finite) raise_non_finite(x2, op, name);
  return q;
}

// Truncated SVD of the small k x H matrix B, given as its transpose bt (H x k,
// k <= H), in `gram` precision: B^T = Qb Rb (Householder QR, backward stable)
// and Rb = U' S V'^T give B = V' S (Qb U')^T, i.e. Ub = V', Vb = Qb U'. This is
// cheaper than an SVD of the wide B. Returns (ub k x r, s r, vb H x r), fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> small_svd_t(const at::Tensor& bt, int64_t rank, at::ScalarType gram) {
  auto [qb, rb] = at::linalg_qr(bt.to(gram), "reduced");
  auto [u1, s, v1t] = at::linalg_svd(rb, /*full_matrices=*/false);
  return {v1t.narrow(0, 0, rank).t().to(at::kFloat), s.narrow(0, 0, rank).to(at::kFloat),
          at::mm(qb, u1.narrow(1, 0, rank)).to(at::kFloat)};
}

// Rows of X per block of the single-pass sketch: about 256 KiB of fp32 so a
// block stays cache-resident for both of its products.
int64_t single_pass_block_rows(int64_t h) {
  return std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(h, 1));
}

// The shared range finder of reference `_core`. x2 is the N x H matrix (N >= 1)
// in its input dtype; fp32 input is used in place, fp16/bf16 converted to fp32
// once (or block by block in the single-pass mode, which reads X exactly once).
Factors lowrank_core(const at::Tensor& x2, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed,
                     const char* op, const char* name) {
  const int64_t n = x2.size(0), h = x2.size(1);
  const int64_t k = std::min({rank + oversample, n, h});
  const uint64_t useed = static_cast<uint64_t>(seed);
  const at::ScalarType gram = x2.scalar_type() == at::kFloat ? at::kDouble : at::kFloat;
  const at::Tensor omega = rademacher(h, k, useed, kPhiloxStreamSketch);

  if (power_iters < 0) {
    // Single-pass sketch: Y = X Omega and W = Psi X from one read of X, block
    // by block over rows; then Q = orth(Y), B = lstsq(Psi Q, W).
    const int64_t ell = 2 * k + 1;
    const at::Tensor psi = rademacher(ell, n, useed, kPhiloxStreamSketch2);
    at::Tensor y = at::empty({n, k}, omega.options());
    at::Tensor w = at::zeros({ell, h}, omega.options());
    const int64_t bs = single_pass_block_rows(h);
    for (int64_t r0 = 0; r0 < n; r0 += bs) {
      const int64_t len = std::min(bs, n - r0);
      const at::Tensor xb = x2.narrow(0, r0, len).to(at::kFloat);
      at::Tensor yb = y.narrow(0, r0, len);
      at::mm_out(yb, xb, omega);
      w.addmm_(psi.narrow(1, r0, len), xb);
    }
    const at::Tensor q = orth_sketch(y, gram, x2, op, name);
    const at::Tensor b = std::get<0>(at::linalg_lstsq(at::mm(psi, q).to(gram), w.to(gram)));
    auto [ub, s, vb] = small_svd_t(b.t(), rank, gram);
    return {q, ub, s, vb};
  }

  const at::Tensor xf = x2.to(at::kFloat);  // no copy for fp32 input
  at::Tensor q = orth_sketch(at::mm(xf, omega), gram, xf, op, name);
  for (int64_t it = 0; it < power_iters; ++it) {
    const at::Tensor z = orth(at::mm(xf.t(), q), gram);
    q = orth(at::mm(xf, z), gram);
  }
  // B^T = X^T Q: the same GEMM shape as the power iterations, faster than Q^T X.
  auto [ub, s, vb] = small_svd_t(at::mm(xf.t(), q), rank, gram);
  return {q, ub, s, vb};
}

// P = Q Ub diag(S) (N x rank) and Qout = Vb (H x rank) in `dtype`, contiguous.
std::tuple<at::Tensor, at::Tensor> lowrank_factors(const at::Tensor& x, int64_t rank, int64_t oversample,
                                                   int64_t power_iters, int64_t seed, const char* op) {
  check_float_input(x, op, "x");
  const at::Tensor x2 = as_matrix(x);
  const int64_t n = x2.size(0), h = x2.size(1);
  check_lowrank_args(op, rank, oversample, power_iters, n, h);
  if (n == 0) return {at::zeros({0, rank}, x.options()), at::zeros({h, rank}, x.options())};
  const Factors f = lowrank_core(x2, rank, oversample, power_iters, seed, op, "x");
  at::Tensor p = at::mm(f.q, f.ub * f.s);
  return {p.to(x.scalar_type()).contiguous(), f.vb.to(x.scalar_type()).contiguous()};
}

// ----------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> lowrank_cpu(const at::Tensor& x, int64_t rank, int64_t oversample,
                                               int64_t power_iters, int64_t seed) {
  return lowrank_factors(x, rank, oversample, power_iters, seed, "sft::lowrank");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cpu(const at::Tensor& w, int64_t rank,
                                                                  int64_t oversample, int64_t power_iters,
                                                                  int64_t seed) {
  const char* op = "sft::randomized_svd";
  check_float_input(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be 2-D (N x H), got shape ", w.sizes());
  const int64_t n = w.size(0), h = w.size(1);
  check_lowrank_args(op, rank, oversample, power_iters, n, h);
  const auto opts = w.options();
  if (n == 0) return {at::zeros({0, rank}, opts), at::zeros({rank}, opts), at::zeros({h, rank}, opts)};
  const Factors f = lowrank_core(w, rank, oversample, power_iters, seed, op, "w");
  const auto dt = w.scalar_type();
  return {at::mm(f.q, f.ub).to(dt).contiguous(), f.s.to(dt).contiguous(), f.vb.to(dt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_quantize_cpu(
    const at::Tensor& x, int64_t rank, int64_t oversample, int64_t power_iters, int64_t bits, int64_t block,
    bool stochastic, int64_t seed) {
  const char* op = "sft::lowrank_quantize";
  check_bits_block(op, bits, block);
  auto [p, q] = lowrank_factors(x, rank, oversample, power_iters, seed, op);
  // P^T (rank x N) uses `seed`, Q^T (rank x H) uses seed + 1 (mod 2^64).
  const int64_t seed_q = static_cast<int64_t>(static_cast<uint64_t>(seed) + 1u);
  auto [pc, ps] = quantize(p.t().contiguous(), bits, block, stochastic, seed);
  auto [qc, qs] = quantize(q.t().contiguous(), bits, block, stochastic, seed_q);
  return {pc, ps, qc, qs};
}

void check_packed(const char* op, const char* cname, const at::Tensor& codes, const char* sname,
                  const at::Tensor& scales, int64_t rank, int64_t cols, const char* cols_name, int64_t bits,
                  int64_t block) {
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte, op, ": ", cname, " must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat, op, ": ", sname, " must be float32, got ",
                    scales.scalar_type());
  const int64_t want_c = packed_cols(cols, bits), want_s = num_blocks(cols, block);
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(0) == rank && codes.size(1) == want_c, op, ": ", cname,
                    " must have shape (rank, ceil(", cols_name, "*bits/8)) = (", rank, ", ", want_c, ") for ",
                    cols_name, "=", cols, ", rank=", rank, ", bits=", bits, "; got ", codes.sizes());
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == rank && scales.size(1) == want_s, op, ": ", sname,
                    " must have shape (rank, ceil(", cols_name, "/block)) = (", rank, ", ", want_s, ") for ",
                    cols_name, "=", cols, ", rank=", rank, ", block=", block, "; got ", scales.sizes());
}

at::Tensor lowrank_dequantize_cpu(const at::Tensor& p_codes, const at::Tensor& p_scales, const at::Tensor& q_codes,
                                  const at::Tensor& q_scales, int64_t rows, int64_t cols, int64_t rank, int64_t bits,
                                  int64_t block, at::ScalarType dtype) {
  const char* op = "sft::lowrank_dequantize";
  check_bits_block(op, bits, block);
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got rows=", rows, ", cols=", cols);
  TORCH_CHECK_VALUE(rank >= 1, op, ": rank must be >= 1, got ", rank);
  check_packed(op, "p_codes", p_codes, "p_scales", p_scales, rank, rows, "rows", bits, block);
  check_packed(op, "q_codes", q_codes, "q_scales", q_scales, rank, cols, "cols", bits, block);
  const at::Tensor pt = dequantize(p_codes, p_scales, bits, block, rows, at::kFloat);  // rank x rows
  const at::Tensor qt = dequantize(q_codes, q_scales, bits, block, cols, at::kFloat);  // rank x cols
  return at::mm(pt.t(), qt).to(dtype).contiguous();
}

}  // namespace
}  // namespace cpu
}  // namespace sft

TORCH_LIBRARY_IMPL(sft, CPU, m) {
  m.impl("lowrank", &sft::cpu::lowrank_cpu);
  m.impl("randomized_svd", &sft::cpu::randomized_svd_cpu);
  m.impl("lowrank_quantize", &sft::cpu::lowrank_quantize_cpu);
  m.impl("lowrank_dequantize", &sft::cpu::lowrank_dequantize_cpu);
}
