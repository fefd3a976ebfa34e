// CPU kernels of the randomized low-rank ops: sft::lowrank, sft::randomized_svd,
// sft::lowrank_quantize and sft::lowrank_dequantize.
//
// The algorithm is the one specified in sft_kernels/reference.py (module
// docstring and `_core`): a Halko-Martinsson-Tropp range finder with a Philox
// Rademacher sketch generated here (never passed in), shifted CholeskyQR3
// orthonormalisation, and either `power_iters` >= 0 power iterations or the
// single-pass sketch of Tropp et al. (2017) for power_iters = -1. All four ops
// share one range finder (`lowrank_core`). The products with X (N x H times a
// skinny k-column matrix) run in register-tiled kernels that stream X without
// the packing copies a general BLAS GEMM makes (MKL for k > 64); contiguous
// fp32 input is never copied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

// Vector helpers below are always inlined into target clones; no ABI crosses an ISA boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

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

// ceil(cols * bits / 8) and ceil(cols / block), without overflow for any
// cols >= 0, bits in {2, 4, 8} and block >= 1.
int64_t packed_cols(int64_t cols, int64_t bits) { return cols / 8 * bits + (cols % 8 * bits + 7) / 8; }
int64_t num_blocks(int64_t cols, int64_t block) { return cols == 0 ? 0 : (cols - 1) / block + 1; }

// Sketch width k = min(rank + oversample, N, H) for 1 <= rank <= min(N, H),
// without overflow for any oversample >= 0.
int64_t sketch_width(int64_t rank, int64_t oversample, int64_t n, int64_t h) {
  const int64_t m = std::min(n, h);
  return oversample >= m - rank ? m : rank + oversample;
}

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
// is 0, else -1. It is written into `out` (unit column stride), which is
// rows x cols, or cols x rows (the transpose) when `transposed`.
void rademacher_into(at::Tensor& out, int64_t rows, int64_t cols, bool transposed, uint64_t seed, uint32_t stream) {
  TORCH_INTERNAL_ASSERT(out.size(0) == (transposed ? cols : rows) && out.size(1) == (transposed ? rows : cols));
  const int64_t ld = out.stride(0);
  float* p = out.data_ptr<float>();
  const int64_t n = rows * cols;
  at::parallel_for(0, (n + 3) / 4, 1024, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const Philox4 w = philox_group(seed, static_cast<uint64_t>(g), stream);
      const int64_t e0 = 4 * g, cnt = std::min<int64_t>(4, n - e0);
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t i = (e0 + t) / cols, j = (e0 + t) % cols;
        p[transposed ? j * ld + i : i * ld + j] = (w.v[t] >> 31) ? -1.0f : 1.0f;
      }
    }
  });
}

// ----------------------------------------------------------------------------- tall matrices
//
// The sketches and range bases are tall-skinny m x k fp32 matrices (k << m).
// They are held row-major with a row stride padded to a multiple of 8 floats
// (the kernels' column panels are 16 or 8 wide); the pad columns are zero, and
// the m x k view of the buffer is what gets passed around. Inside `orth` they
// are transposed (k x m) so that its kernel handles 8 consecutive rows per
// SIMD vector.

// Widest k handled by the skinny GEMM and fused CholeskyQR kernels (their
// per-chunk scratch grows as k^2); wider sketches use MKL (at::mm / trsm).
constexpr int64_t kSkinnyMaxK = 64;
// Column panel width of the skinny GEMM kernels (one 16-float vector; the
// last panel of a row may be 8 wide).
constexpr int64_t kPanel = 16;

int64_t tall_ld(int64_t k) { return k <= kSkinnyMaxK ? (k + 7) / 8 * 8 : k; }

// A zero m x k tall matrix (view of a zero-padded m x tall_ld(k) buffer).
at::Tensor tall_zeros(int64_t m, int64_t k) {
  return at::zeros({m, tall_ld(k)}, at::TensorOptions().dtype(at::kFloat)).narrow(1, 0, k);
}

// Whether t is an m x k tall matrix in the padded layout the kernels expect.
bool is_padded_tall(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.stride(1) == 1 && t.stride(0) == tall_ld(t.size(1));
}

// A small fp32 matrix (k x r) copied into the padded tall layout, as the W
// operand of `skinny_mm`.
at::Tensor tall_from(const at::Tensor& small) {
  at::Tensor t = tall_zeros(small.size(0), small.size(1));
  t.copy_(small);
  return t;
}

// The transpose of an m x r fp32 matrix (a tall matrix or vb, any strides) as
// a contiguous r x m tensor: the row layout `quantize` takes for P^T and Q^T.
at::Tensor transpose_tall(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat);
  const int64_t m = t.size(0), r = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  at::Tensor out = at::empty({r, m}, t.options());
  const float* src = t.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, m, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t c = 0; c < r; ++c)
      for (int64_t i = i0; i < i1; ++i) dst[c * m + i] = src[i * s0 + c * s1];
  });
  return out;
}

// ----------------------------------------------------------------------------- orthonormalisation

// Multiversioned hot loops: AVX-512, AVX2 and the portable baseline. The code
// is the same in every clone (GCC vector extensions, -ffp-contract=off), so
// results do not depend on which one runs.
#define SFT_LR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SFT_LR_INLINE inline __attribute__((always_inline))

// The CholeskyQR kernel works on panels of kPanelVecs vectors of 8 rows.
constexpr int kPanelVecs = 4;
constexpr int64_t kPanelRows = 8 * kPanelVecs;

// 8-lane vectors of the Gram dtype T and of fp32. They are declared with
// element alignment: the natural alignment of a vector type differs between the
// baseline and the AVX clones, and heap buffers are only 16-byte aligned.
template <typename T>
struct Lanes;
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(64), aligned(8)));
};
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(32), aligned(4)));
};
typedef float V8f __attribute__((vector_size(32), aligned(4)));

// Rows [i0, i0 + n) (n <= 8) of one column of a transposed tall matrix, zero-padded.
SFT_LR_INLINE V8f load_rows(const float* col, int64_t i0, int64_t n) {
  V8f v = {};
  if (n >= 8) {
    std::memcpy(&v, col + i0, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) v[l] = col[i0 + l];
  }
  return v;
}

SFT_LR_INLINE void store_rows(float* col, int64_t i0, int64_t n, V8f v) {
  if (n >= 8) {
    std::memcpy(col + i0, &v, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) col[i0 + l] = v[l];
  }
}

// Where a CholeskyQR pass reads or writes an m x k fp32 matrix: row-major with
// row stride ld, or transposed (k x m, column j at data + j * ld).
struct TallRef {
  float* data;
  bool row_major;
  int64_t ld;
};

// One CholeskyQR pass over rows [c0, c1) of the m x k fp32 matrix `src`.
// With r != nullptr every row y is replaced by q solving q R = y (R upper k x k
// row-major in T; inv_diag[j] = 1 / R[j][j], a multiply within an ulp of the
// division), computed in T and rounded to fp32; with dst.data != nullptr the (solved or copied) rows are stored there.
// With acc != nullptr the Gram matrix of the (rounded) rows is accumulated in T
// into acc: kp x kp vectors of 8 lane partial sums, kp = k rounded up to 4
// (only the upper 4 x 4 blocks are written). t is scratch for one panel:
// kp * kPanelVecs vectors, lane l of vector (j, v) holding row 8 v + l, column j.
template <typename T>
SFT_LR_INLINE void cholqr_rows(TallRef src, TallRef dst, int64_t k, int64_t c0, int64_t c1, const T* r,
                               const T* inv_diag, typename Lanes<T>::V* acc, typename Lanes<T>::V* t) {
  using V = typename Lanes<T>::V;
  constexpr int NV = kPanelVecs;
  const int64_t kp = (k + 3) & ~int64_t{3};
  T* ts = reinterpret_cast<T*>(t);
  for (int64_t i0 = c0; i0 < c1; i0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, c1 - i0);
    if (src.row_major) {
      // Transpose the panel through memory: scalar stores, then vector reads.
      for (int64_t e = 0; e < kp * NV; ++e) t[e] = V{};
      for (int64_t l = 0; l < rows; ++l) {
        const float* y = src.data + (i0 + l) * src.ld;
        for (int64_t j = 0; j < k; ++j) ts[j * NV * 8 + l] = static_cast<T>(y[j]);
      }
    } else {
      for (int64_t j = 0; j < kp; ++j)
        for (int v = 0; v < NV; ++v)
          t[j * NV + v] =
              j < k ? __builtin_convertvector(load_rows(src.data + j * src.ld, i0 + 8 * v, rows - 8 * v), V) : V{};
    }
    if (r != nullptr) {
      // Left-looking forward substitution on the panel, all NV vectors at once.
      for (int64_t j = 0; j < k; ++j) {
        V s[NV];
        for (int v = 0; v < NV; ++v) s[v] = t[j * NV + v];
        for (int64_t i = 0; i < j; ++i) {
          const T rij = r[i * k + j];
          for (int v = 0; v < NV; ++v) s[v] -= rij * t[i * NV + v];
        }
        for (int v = 0; v < NV; ++v) t[j * NV + v] = s[v] * inv_diag[j];
      }
      // Round to the fp32 result; the next Gram is taken of the rounded rows.
      for (int64_t e = 0; e < k * NV; ++e) t[e] = __builtin_convertvector(__builtin_convertvector(t[e], V8f), V);
    }
    if (dst.data != nullptr) {
      if (dst.row_major) {
        for (int64_t l = 0; l < rows; ++l) {
          float* q = dst.data + (i0 + l) * dst.ld;
          for (int64_t j = 0; j < k; ++j) q[j] = static_cast<float>(ts[j * NV * 8 + l]);
        }
      } else {
        for (int64_t j = 0; j < k; ++j)
          for (int v = 0; v < NV; ++v)
            store_rows(dst.data + j * dst.ld, i0 + 8 * v, rows - 8 * v, __builtin_convertvector(t[j * NV + v], V8f));
      }
    }
    if (acc != nullptr) {
      // Upper 4 x 4 blocks of the panel's Gram matrix, 16 accumulators each.
      for (int64_t p = 0; p < kp; p += 4)
        for (int64_t c = p; c < kp; c += 4) {
          V a[4][4] = {};
          for (int v = 0; v < NV; ++v) {
            const V tp[4] = {t[p * NV + v], t[(p + 1) * NV + v], t[(p + 2) * NV + v], t[(p + 3) * NV + v]};
            const V tc[4] = {t[c * NV + v], t[(c + 1) * NV + v], t[(c + 2) * NV + v], t[(c + 3) * NV + v]};
            for (int x = 0; x < 4; ++x)
              for (int z = 0; z < 4; ++z) a[x][z] += tp[x] * tc[z];
          }
          for (int x = 0; x < 4; ++x)
            for (int z = 0; z < 4; ++z) acc[(p + x) * kp + c + z] += a[x][z];
        }
    }
  }
}

SFT_LR_CLONES void cholqr_rows_f64(TallRef src, TallRef dst, int64_t k, int64_t c0, int64_t c1, const double* r,
                                   const double* inv_diag, Lanes<double>::V* acc, Lanes<double>::V* t) {
  cholqr_rows<double>(src, dst, k, c0, c1, r, inv_diag, acc, t);
}
SFT_LR_CLONES void cholqr_rows_f32(TallRef src, TallRef dst, int64_t k, int64_t c0, int64_t c1, const float* r,
                                   const float* inv_diag, Lanes<float>::V* acc, Lanes<float>::V* t) {
  cholqr_rows<float>(src, dst, k, c0, c1, r, inv_diag, acc, t);
}
SFT_LR_INLINE void cholqr_rows_any(TallRef src, TallRef dst, int64_t k, int64_t c0, int64_t c1, const double* r,
                                   const double* inv_diag, Lanes<double>::V* acc, Lanes<double>::V* t) {
  cholqr_rows_f64(src, dst, k, c0, c1, r, inv_diag, acc, t);
}
SFT_LR_INLINE void cholqr_rows_any(TallRef src, TallRef dst, int64_t k, int64_t c0, int64_t c1, const float* r,
                                   const float* inv_diag, Lanes<float>::V* acc, Lanes<float>::V* t) {
  cholqr_rows_f32(src, dst, k, c0, c1, r, inv_diag, acc, t);
}

// Deterministic row partition of the fused kernel: the chunks depend only on
// m, never on the thread count, and per-chunk partial Gram matrices are summed
// in chunk order, so results are reproducible bit for bit.
struct RowChunks {
  int64_t count, size;
};
RowChunks orth_chunks(int64_t m) {
  const int64_t count = std::clamp<int64_t>((m + 511) / 512, 1, 16);
  const int64_t size = ((m + count - 1) / count + kPanelRows - 1) / kPanelRows * kPanelRows;
  return {(m + size - 1) / size, size};
}

// Fused CholeskyQR pass over the m x k matrix `src`: with r defined the rows
// are solved against R; with dst.data set the result is stored there. Returns
// the k x k Gram matrix (in T) of the result if want_gram, else undefined.
template <typename T>
at::Tensor cholqr_pass(TallRef src, TallRef dst, int64_t m, int64_t k, const at::Tensor& r, bool want_gram) {
  using V = typename Lanes<T>::V;
  const int64_t kp = (k + 3) & ~int64_t{3};
  const RowChunks ch = orth_chunks(m);
  // Vector buffers are held as arrays of T (8 per vector): V has element alignment.
  std::vector<T> acc_buf(want_gram ? static_cast<size_t>(ch.count * kp * kp * 8) : 0, T(0));
  V* acc = reinterpret_cast<V*>(acc_buf.data());
  std::vector<T> inv_diag(static_cast<size_t>(k));
  const T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
  if (rp != nullptr)
    for (int64_t j = 0; j < k; ++j) inv_diag[j] = T(1) / rp[j * k + j];
  at::parallel_for(0, ch.count, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> t(static_cast<size_t>(kp * kPanelVecs * 8));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * ch.size, c1 = std::min(m, c0 + ch.size);
      cholqr_rows_any(src, dst, k, c0, c1, rp, inv_diag.data(), want_gram ? acc + b * kp * kp : nullptr,
                      reinterpret_cast<V*>(t.data()));
    }
  });
  if (!want_gram) return at::Tensor();
  at::Tensor g = at::empty({k, k}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* gp = g.data_ptr<T>();
  for (int64_t p = 0; p < k; ++p)
    for (int64_t c = p; c < k; ++c) {
      T sum = 0;
      for (int64_t b = 0; b < ch.count; ++b) {
        const V& a = acc[b * kp * kp + p * kp + c];
        for (int l = 0; l < 8; ++l) sum += a[l];
      }
      gp[p * k + c] = sum;
      gp[c * k + p] = sum;
    }
  return g;
}

// Shift of pass `pass` of shifted CholeskyQR3 for an m x k matrix with Gram g,
// u the unit roundoff of the Gram dtype (see reference._orth):
//   pass 0:  s = 11 (m k + k (k+1)) u tr(g) + tiny   (Fukaya et al.: Cholesky cannot fail)
//   pass 1+: s = k u tr(g) + tiny  (Q is near-orthonormal; a small floor keeps
//            exactly rank-deficient columns from breaking Cholesky without
//            shrinking Q, which the first-pass shift would do by 1/(1+s))
template <typename T>
double cholqr_shift(const at::Tensor& g, int64_t m, int pass) {
  const int64_t k = g.size(0);
  const T* gp = g.data_ptr<T>();
  T trace = 0;
  for (int64_t j = 0; j < k; ++j) trace += gp[j * g.stride(0) + j * g.stride(1)];
  const double u = static_cast<double>(std::numeric_limits<T>::epsilon()) / 2;
  const double tiny = static_cast<double>(std::numeric_limits<T>::min()) * 1e4;
  const double rel = pass == 0 ? 11.0 * static_cast<double>(m * k + k * (k + 1)) : static_cast<double>(k);
  return rel * u * static_cast<double>(trace) + tiny;
}

// Upper Cholesky factor of g + shift I (row-major contiguous). linalg_cholesky_ex
// never throws; the shift keeps the matrix positive definite for finite input.
at::Tensor shifted_cholesky(at::Tensor g, double shift) {
  g.diagonal().add_(shift);
  return std::get<0>(at::linalg_cholesky_ex(g, /*upper=*/true, /*check_errors=*/false)).contiguous();
}

// Fused shifted CholeskyQR3 of the row-major m x k matrix y (k <= kSkinnyMaxK).
template <typename T>
at::Tensor orth_fused(const at::Tensor& y, bool* finite) {
  const int64_t m = y.size(0), k = y.size(1);
  at::Tensor bufs[2] = {at::empty({k, m}, y.options()), at::empty({k, m}, y.options())};
  at::Tensor q = tall_zeros(m, k);
  const TallRef in{y.data_ptr<float>(), true, y.stride(0)};
  const TallRef buf0{bufs[0].data_ptr<float>(), false, m}, buf1{bufs[1].data_ptr<float>(), false, m};
  const TallRef out{q.data_ptr<float>(), true, q.stride(0)};
  // Pass 0 takes the Gram matrix of Y and stores Y transposed for the solves;
  // the passes then ping-pong between the two buffers, the last one writing Q.
  at::Tensor g = cholqr_pass<T>(in, buf0, m, k, at::Tensor(), /*want_gram=*/true);
  for (int pass = 0; pass < 3; ++pass) {
    const double shift = cholqr_shift<T>(g, m, pass);
    if (pass == 0 && finite != nullptr) *finite = std::isfinite(shift);
    const at::Tensor r = shifted_cholesky(g, shift);
    const TallRef src = pass % 2 == 0 ? buf0 : buf1;
    const TallRef dst = pass == 2 ? out : (pass % 2 == 0 ? buf1 : buf0);
    g = cholqr_pass<T>(src, dst, m, k, r, /*want_gram=*/pass < 2);
  }
  return q;
}

// Shifted CholeskyQR3 (reference `_orth`) of the tall m x k fp32 matrix Y (any
// row stride, unit column stride): three passes of  G = Y^T Y + s I,
// R = chol(G),  Y <- Y R^{-1},  with the shift of `cholqr_shift`. The Gram
// matrix, the Cholesky factor and the triangular solve run in `gram` (fp64 for
// fp32 input, fp32 for fp16/bf16); the result is rounded back to fp32 after
// every pass. Rank-deficient or zero Y yields finite output without
// data-dependent branches. Returns Q as a padded tall matrix. If `finite` is
// given it receives whether Y was finite (its Gram trace is), which spares a
// separate scan of Y.
at::Tensor orth(const at::Tensor& y_in, at::ScalarType gram, bool* finite = nullptr) {
  const at::Tensor y = y_in.stride(1) == 1 ? y_in : y_in.contiguous();
  const int64_t m = y.size(0), k = y.size(1);
  if (k <= kSkinnyMaxK) return gram == at::kDouble ? orth_fused<double>(y, finite) : orth_fused<float>(y, finite);
  at::Tensor q = y;
  for (int pass = 0; pass < 3; ++pass) {
    const at::Tensor yg = q.to(gram);
    const at::Tensor g = at::mm(yg.t(), yg);
    const double shift = gram == at::kDouble ? cholqr_shift<double>(g, m, pass) : cholqr_shift<float>(g, m, pass);
    if (pass == 0 && finite != nullptr) *finite = std::isfinite(shift);
    const at::Tensor r = shifted_cholesky(g, shift);
    q = at::linalg_solve_triangular(r, yg, /*upper=*/true, /*left=*/false).to(at::kFloat);
  }
  return q.contiguous();
}

// ----------------------------------------------------------------------------- skinny GEMMs
//
// Y = A W and Z = A^T Q with A = X (N x H, the big operand, read in place) and
// W, Q padded tall matrices of k <= kSkinnyMaxK columns. Register tiles of R
// rows x one column panel (a 16- or 8-float vector) stream A once per panel
// with no packing copy. Every output element is summed over the inner index in
// increasing order by one thread, so results do not depend on the thread
// count. Vector FMA is allowed here (the AVX variants); MKL contracts too.

typedef float V16f __attribute__((vector_size(64), aligned(4)));

// y[r, panel] = sum_h a[r, h] w[h, panel] for the R rows at a; VT is the panel's vector type.
template <int R, typename VT>
SFT_LR_INLINE void nn_tile(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t kdim, float* y,
                           int64_t ldy) {
  VT acc[R];
  for (int r = 0; r < R; ++r) acc[r] = VT{};
  for (int64_t h = 0; h < kdim; ++h) {
    VT wv;
    std::memcpy(&wv, w + h * ldw, sizeof(wv));
    for (int r = 0; r < R; ++r) acc[r] += a[r * lda + h] * wv;
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy, &acc[r], sizeof(VT));
}

// All column panels of R rows of Y = A W: 16-wide, then an 8-wide remainder.
template <int R>
SFT_LR_INLINE void nn_panels(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t kdim, float* y,
                             int64_t ldy) {
  int64_t c = 0;
  for (; c + kPanel <= ldw; c += kPanel) nn_tile<R, V16f>(a, lda, w + c, ldw, kdim, y + c, ldy);
  if (c < ldw) nn_tile<R, V8f>(a, lda, w + c, ldw, kdim, y + c, ldy);
}

// Rows [i0, i1) of Y = A W.
template <int R>
SFT_LR_INLINE void nn_rows(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t kdim, float* y,
                           int64_t ldy, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + R <= i1; i += R) nn_panels<R>(a + i * lda, lda, w, ldw, kdim, y + i * ldy, ldy);
  for (; i < i1; ++i) nn_panels<1>(a + i * lda, lda, w, ldw, kdim, y + i * ldy, ldy);
}

// z[x, panel] += sum_{r in [r0, r1)} a[r, x] q[r, panel] for x < R (a, z offset to the tile).
template <int R, typename VT>
SFT_LR_INLINE void tn_tile(const float* a, int64_t lda, const float* q, int64_t ldq, int64_t r0, int64_t r1,
                           float* z, int64_t ldz) {
  VT acc[R];
  for (int x = 0; x < R; ++x) std::memcpy(&acc[x], z + x * ldz, sizeof(VT));
  for (int64_t r = r0; r < r1; ++r) {
    VT qv;
    std::memcpy(&qv, q + r * ldq, sizeof(qv));
    const float* ar = a + r * lda;
    for (int x = 0; x < R; ++x) acc[x] += ar[x] * qv;
  }
  for (int x = 0; x < R; ++x) std::memcpy(z + x * ldz, &acc[x], sizeof(VT));
}

template <int R>
SFT_LR_INLINE void tn_panels(const float* a, int64_t lda, const float* q, int64_t ldq, int64_t r0, int64_t r1,
                             float* z, int64_t ldz) {
  int64_t c = 0;
  for (; c + kPanel <= ldq; c += kPanel) tn_tile<R, V16f>(a, lda, q + c, ldq, r0, r1, z + c, ldz);
  if (c < ldq) tn_tile<R, V8f>(a, lda, q + c, ldq, r0, r1, z + c, ldz);
}

// Rows [h0, h1) of Z += A^T Q, over row blocks of A that stay in L2.
template <int R>
SFT_LR_INLINE void tn_rows(const float* a, int64_t lda, int64_t m, const float* q, int64_t ldq, float* z,
                           int64_t ldz, int64_t h0, int64_t h1) {
  const int64_t block = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(lda, 1));
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t r1 = std::min(m, r0 + block);
    int64_t h = h0;
    for (; h + R <= h1; h += R) tn_panels<R>(a + h, lda, q, ldq, r0, r1, z + h * ldz, ldz);
    for (; h < h1; ++h) tn_panels<1>(a + h, lda, q, ldq, r0, r1, z + h * ldz, ldz);
  }
}

// Tile heights per ISA: as many accumulators as the vector registers hold.
#define SFT_LR_GEMM_VARIANT(suffix, target_attr, R)                                                              \
  target_attr void nn_##suffix(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t kdim, float* y, \
                               int64_t ldy, int64_t i0, int64_t i1) {                                            \
    nn_rows<R>(a, lda, w, ldw, kdim, y, ldy, i0, i1);                                                            \
  }                                                                                                              \
  target_attr void tn_##suffix(const float* a, int64_t lda, int64_t m, const float* q, int64_t ldq, float* z,    \
                               int64_t ldz, int64_t h0, int64_t h1) {                                            \
    tn_rows<R>(a, lda, m, q, ldq, z, ldz, h0, h1);                                                               \
  }
SFT_LR_GEMM_VARIANT(v4, __attribute__((target("arch=x86-64-v4"), optimize("fp-contract=fast"))), 12)
SFT_LR_GEMM_VARIANT(v3, __attribute__((target("arch=x86-64-v3"), optimize("fp-contract=fast"))), 4)
SFT_LR_GEMM_VARIANT(base, , 2)
#undef SFT_LR_GEMM_VARIANT

struct SkinnyKernels {
  decltype(&nn_base) nn;
  decltype(&tn_base) tn;
  int64_t rows;  // tile height, for work splitting
};

const SkinnyKernels& skinny_kernels() {
  static const SkinnyKernels kernels = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return SkinnyKernels{&nn_v4, &tn_v4, 12};
    if (__builtin_cpu_supports("x86-64-v3")) return SkinnyKernels{&nn_v3, &tn_v3, 4};
    return SkinnyKernels{&nn_base, &tn_base, 2};
  }();
  return kernels;
}

// A as the big operand: fp32 with unit column stride (a copy only otherwise).
at::Tensor big_operand(const at::Tensor& a) { return a.stride(1) == 1 ? a : a.contiguous(); }

// Y = A W into the padded tall matrix y (M x k view); W a padded tall matrix.
void skinny_mm_out(const at::Tensor& a_in, const at::Tensor& w, at::Tensor& y) {
  const at::Tensor a = big_operand(a_in);
  const int64_t m = a.size(0), kdim = a.size(1), k = w.size(1);
  if (k > kSkinnyMaxK) {
    at::mm_out(y, a, w);
    return;
  }
  TORCH_INTERNAL_ASSERT(is_padded_tall(w) && is_padded_tall(y));
  const SkinnyKernels& kern = skinny_kernels();
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t lda = a.stride(0), ldw = w.stride(0), ldy = y.stride(0);
  const int64_t tiles = (m + kern.rows - 1) / kern.rows;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 64 / kern.rows), [&](int64_t t0, int64_t t1) {
    kern.nn(ap, lda, wp, ldw, kdim, yp, ldy, t0 * kern.rows, std::min(m, t1 * kern.rows));
  });
}

at::Tensor skinny_mm(const at::Tensor& a, const at::Tensor& w) {
  at::Tensor y = tall_zeros(a.size(0), w.size(1));
  skinny_mm_out(a, w, y);
  return y;
}

// Z += A^T Q into the padded tall matrix z (H x k view); Q a padded tall
// matrix with A's rows.
void skinny_tmm_acc(const at::Tensor& a_in, const at::Tensor& q, at::Tensor& z) {
  const at::Tensor a = big_operand(a_in);
  const int64_t m = a.size(0), h = a.size(1), k = q.size(1);
  if (k > kSkinnyMaxK) {
    z.addmm_(a.t(), q);
    return;
  }
  TORCH_INTERNAL_ASSERT(is_padded_tall(q) && is_padded_tall(z));
  const SkinnyKernels& kern = skinny_kernels();
  const float* ap = a.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int64_t lda = a.stride(0), ldq = q.stride(0), ldz = z.stride(0);
  const int64_t tiles = (h + kern.rows - 1) / kern.rows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    kern.tn(ap, lda, m, qp, ldq, zp, ldz, t0 * kern.rows, std::min(h, t1 * kern.rows));
  });
}

// Z = A^T Q as a padded tall matrix (H x k).
at::Tensor skinny_tmm(const at::Tensor& a, const at::Tensor& q) {
  at::Tensor z = tall_zeros(a.size(1), q.size(1));
  skinny_tmm_acc(a, q, z);
  return z;
}

// X (N x H fp32) as the big operand of the range finder, used in place when
// either its rows or its columns are contiguous: for a transposed X (e.g. a
// weight passed as w.T) the two kernels swap roles, since X W = (X^T)^T W.
// Any other layout is copied once.
struct BigMatrix {
  bool transposed;
  at::Tensor a;  // X, or X^T when `transposed`; unit column stride

  explicit BigMatrix(const at::Tensor& x)
      : transposed(x.stride(1) != 1 && x.stride(0) == 1),
        a(transposed ? x.t() : big_operand(x)) {}

  at::Tensor times(const at::Tensor& w) const { return transposed ? skinny_tmm(a, w) : skinny_mm(a, w); }
  at::Tensor t_times(const at::Tensor& q) const { return transposed ? skinny_mm(a, q) : skinny_tmm(a, q); }
};

// ----------------------------------------------------------------------------- range finder

// The rank-truncated factors shared by every op, all fp32:
// X ~= q @ ub @ diag(s) @ vb^T with the range basis q (N x k tall matrix),
// ub (k x r), s (r) and vb (H x r) orthonormal.
struct Factors {
  at::Tensor q, ub, s, vb;

  // P = Q Ub diag(S) (N x rank tall matrix), the one formula every op uses.
  at::Tensor p() const;
};

// Raise the spec's RuntimeError for a sketch that is not finite. A NaN/Inf in
// row i of X makes every entry of row i of Y = X Omega non-finite (Omega is
// +-1), and a non-finite Y has a non-finite Gram trace, so `orth` detects it
// for free and only then is X scanned to count the bad values. A finite X
// whose sketch overflows fp32 is reported too rather than returning NaN factors.
[[noreturn]] void raise_non_finite(const at::Tensor& x2, const char* op, const char* name) {
  const int64_t bad = at::isfinite(x2).logical_not().sum().item<int64_t>();
  TORCH_CHECK(bad == 0, op, ": ", name, " has ", bad, " non-finite value(s)");
  TORCH_CHECK(false, op, ": ", name, " is finite but too large: its sketch overflowed; scale ", name, " down");
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

// Truncated SVD of the small k x H matrix B (k <= H), given as its transpose
// bt (H x k, any strides), in `gram` precision (LAPACK, like the reference):
// B^T = U2 S V2^T gives B = V2 S U2^T, i.e. Ub = V2 and Vb = U2, orthonormal
// even when B is exactly rank deficient. Returns (ub k x r, s r, vb H x r), fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> small_svd(const at::Tensor& bt, int64_t rank, at::ScalarType gram) {
  auto [u2, s, v2t] = at::linalg_svd(bt.to(gram), /*full_matrices=*/false);
  return {v2t.narrow(0, 0, rank).t().to(at::kFloat), s.narrow(0, 0, rank).to(at::kFloat),
          u2.narrow(1, 0, rank).to(at::kFloat).contiguous()};
}

// Rows of X per block of the single-pass sketch: about 1 MiB of fp32, so a
// block is read from memory once and stays cache-resident for its two products.
int64_t single_pass_block_rows(int64_t h) {
  return std::max<int64_t>(64, (int64_t{1} << 18) / std::max<int64_t>(h, 1));
}

// The shared range finder of reference `_core`. x2 is the N x H matrix (N >= 1)
// in its input dtype; fp32 input is used in place, fp16/bf16 converted to fp32
// once (or block by block in the single-pass mode, which reads X exactly once).
Factors lowrank_core(const at::Tensor& x2, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed,
                     const char* op, const char* name) {
  const int64_t n = x2.size(0), h = x2.size(1);
  const int64_t k = sketch_width(rank, oversample, n, h);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const at::ScalarType gram = x2.scalar_type() == at::kFloat ? at::kDouble : at::kFloat;
  at::Tensor omega = tall_zeros(h, k);
  rademacher_into(omega, h, k, /*transposed=*/false, useed, kPhiloxStreamSketch);

  if (power_iters < 0) {
    // Single-pass sketch: Y = X Omega and W^T = X^T Psi^T from one read of X,
    // block by block over rows; then Q = orth(Y), B = lstsq(Psi Q, W).
    const int64_t ell = 2 * k + 1;
    at::Tensor psi_t = tall_zeros(n, ell);  // Psi^T, N x l
    rademacher_into(psi_t, ell, n, /*transposed=*/true, useed, kPhiloxStreamSketch2);
    at::Tensor y = tall_zeros(n, k);
    at::Tensor w_t = tall_zeros(h, ell);
    const int64_t bs = single_pass_block_rows(h);
    for (int64_t r0 = 0; r0 < n; r0 += bs) {
      const int64_t len = std::min(bs, n - r0);
      const at::Tensor xb = big_operand(x2.narrow(0, r0, len).to(at::kFloat));
      at::Tensor yb = y.narrow(0, r0, len);
      skinny_mm_out(xb, omega, yb);
      skinny_tmm_acc(xb, psi_t.narrow(0, r0, len), w_t);
    }
    const at::Tensor q = orth_sketch(y, gram, x2, op, name);
    const at::Tensor psi_q = at::mm(psi_t.t(), q);  // l x k
    // Q is fp32, so singular values of Psi Q below k fp32 ulps of the largest
    // are rounding noise (an exactly rank-deficient X leaves ~0 columns in Q):
    // lstsq treats them as zero and returns the minimum-norm B, instead of
    // amplifying the noise by the default fp64 cutoff.
    const double rcond = static_cast<double>(k) * std::numeric_limits<float>::epsilon();
    const at::Tensor b = std::get<0>(at::linalg_lstsq(psi_q.to(gram), w_t.t().to(gram), rcond));
    auto [ub, s, vb] = small_svd(b.t(), rank, gram);
    return {q, ub, s, vb};
  }

  const BigMatrix xm(x2.to(at::kFloat));  // no copy for fp32 input with contiguous rows or columns
  at::Tensor q = orth_sketch(xm.times(omega), gram, x2, op, name);  // Q = orth(X Omega)
  for (int64_t it = 0; it < power_iters; ++it) {
    const at::Tensor z = orth(xm.t_times(q), gram);  // Z = orth(X^T Q)
    q = orth(xm.times(z), gram);                       // Q = orth(X Z)
  }
  auto [ub, s, vb] = small_svd(xm.t_times(q), rank, gram);  // B^T = X^T Q
  return {q, ub, s, vb};
}

at::Tensor Factors::p() const { return skinny_mm(q, tall_from(ub * s)); }

// Validates x and the low-rank arguments, views x as N x H (reported in n, h)
// and runs the range finder; the factors are left undefined when N = 0.
Factors lowrank_of(const at::Tensor& x, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed,
                   const char* op, int64_t& n, int64_t& h) {
  check_float_input(x, op, "x");
  const at::Tensor x2 = as_matrix(x);
  n = x2.size(0);
  h = x2.size(1);
  check_lowrank_args(op, rank, oversample, power_iters, n, h);
  if (n == 0) return {};
  return lowrank_core(x2, rank, oversample, power_iters, seed, op, "x");
}

// ----------------------------------------------------------------------------- ops
// Outputs are fresh contiguous tensors in the input dtype (never aliasing it).
// Each op computes in its own precision: autocast is switched off for the ATen
// calls inside (otherwise an enclosing torch.autocast would turn the fp32 GEMMs
// into bf16 ones).

using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

std::tuple<at::Tensor, at::Tensor> lowrank_cpu(const at::Tensor& x, int64_t rank, int64_t oversample,
                                               int64_t power_iters, int64_t seed) {
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  int64_t n = 0, h = 0;
  const Factors f = lowrank_of(x, rank, oversample, power_iters, seed, "sft::lowrank", n, h);
  if (n == 0) return {at::zeros({0, rank}, x.options()), at::zeros({h, rank}, x.options())};
  const auto dt = x.scalar_type();
  return {f.p().to(dt).contiguous(), f.vb.to(dt).contiguous()};  // P, Qout = Vb
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cpu(const at::Tensor& w, int64_t rank,
                                                                  int64_t oversample, int64_t power_iters,
                                                                  int64_t seed) {
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "sft::randomized_svd";
  check_float_input(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be 2-D (N x H), got shape ", w.sizes());
  const int64_t n = w.size(0), h = w.size(1);
  check_lowrank_args(op, rank, oversample, power_iters, n, h);
  const auto opts = w.options();
  if (n == 0) return {at::zeros({0, rank}, opts), at::zeros({rank}, opts), at::zeros({h, rank}, opts)};
  const Factors f = lowrank_core(w, rank, oversample, power_iters, seed, op, "w");
  const auto dt = w.scalar_type();
  const at::Tensor u = skinny_mm(f.q, tall_from(f.ub));  // U = Q Ub
  return {u.to(dt).contiguous(), f.s.to(dt), f.vb.to(dt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_quantize_cpu(
    const at::Tensor& x, int64_t rank, int64_t oversample, int64_t power_iters, int64_t bits, int64_t block,
    bool stochastic, int64_t seed) {
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "sft::lowrank_quantize";
  check_bits_block(op, bits, block);
  int64_t n = 0, h = 0;
  const Factors f = lowrank_of(x, rank, oversample, power_iters, seed, op, n, h);
  // Exactly the factors `lowrank` returns (rounded to x's dtype), transposed:
  // P^T (rank x N) and Q^T = Vb^T (rank x H).
  const auto dt = x.scalar_type();
  const at::Tensor p_t = n == 0 ? at::zeros({rank, 0}, x.options()) : transpose_tall(f.p()).to(dt);
  const at::Tensor q_t = n == 0 ? at::zeros({rank, h}, x.options()) : transpose_tall(f.vb).to(dt);
  // P^T uses `seed`, Q^T uses seed + 1 (mod 2^64) for stochastic rounding.
  const int64_t seed_q = static_cast<int64_t>(static_cast<uint64_t>(seed) + 1u);
  auto [pc, ps] = quantize(p_t, bits, block, stochastic, seed);
  auto [qc, qs] = quantize(q_t, bits, block, stochastic, seed_q);
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
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
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
