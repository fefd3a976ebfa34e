// CPU kernels of sft::quantize and sft::dequantize.
//
// The format is specified bit for bit in sft_kernels/reference.py (module
// docstring); reference.quantize / reference.dequantize are the executable
// spec these kernels are tested against.
//
// Structure
//   * The work is split into spans: runs of whole blocks of one row whose first
//     element is also the first element of a packed byte, so two spans never
//     write the same byte and can run on different threads (at::parallel_for).
//   * Within a span, pass 1 computes each block's absmax by an integer max over
//     the raw bits (which also detects inf/NaN) and its scale. Pass 2 walks
//     the span, still in L1/L2, in windows of kWindow elements: it divides and
//     rounds into one uint8 code per element, straight into the output for 8
//     bits, or into a staging window that pack_bytes<BITS> packs in registers
//     for 2/4 bits. Dequantize mirrors pass 2 with unpack_bytes<BITS>.
//   * Blocks of at least kShortBlock elements are encoded block by block with
//     the scale in a register; shorter blocks get a per-element scale array so
//     that each window is still one long vectorised loop.
//   * Everything is templated on the input/output dtype, on bits (so shifts,
//     qmax and packing are compile-time constants) and on the rounding mode.
//   * The per-element arithmetic (scale, rounding, packing a CodeWord, decode)
//     is common/quantize.h, which the CUDA kernels use too; the argument checks
//     are quantize_args.h, which the CUDA glue uses too.
//
// Vectorisation: the hot loops are plain C++ that GCC auto-vectorises, and the
// span kernels carry SFT_CLONES, i.e. GCC function multiversioning
// (target_clones for x86-64-v4 = AVX-512, x86-64-v3 = AVX2, and the baseline),
// resolved once at load time by an ifunc. So the default portable build still
// runs AVX-512/AVX2 code, and an -march=native build behaves the same. We do not
// use at::vec::Vectorized: in an extension built without ATen's CPU_CAPABILITY
// defines it is the scalar fallback, and it has no byte packing operations.
// Bit-exactness does not depend on the clone: every step is an fp32 IEEE
// operation per element (no reciprocal, no FMA; the build passes
// -ffp-contract=off) or exact integer/bit manipulation. (The test suite passes
// with each clone built alone; the hot loops were checked to vectorise in all
// three with -fopt-info-vec, except Philox in the SSE2 baseline.)
#include "cpu/quantize.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "common/philox.h"
#include "common/quantize.h"
#include "quantize_args.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__AVX512BW__)
#define SFT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SFT_CLONES
#endif

// Helpers called from the span kernels must be inlined into each clone: an
// out-of-line helper would be compiled for the baseline ISA only.
#define SFT_INLINE inline __attribute__((always_inline))

namespace sft {
namespace cpu {
namespace {

// Elements per parallel work item (a span is at least one block, so it can be larger).
constexpr int64_t kSpanElems = 16384;
// Elements per window: codes are staged / Philox words drawn for at most this
// many elements at a time (a multiple of 4, so windows start on byte boundaries).
constexpr int64_t kWindow = 2048;

// ----------------------------------------------------------------------------- element types
// Kernels read and write the raw storage bits (uint32/uint16), never the
// tensor's memory as float, and convert in registers.

SFT_INLINE float f32_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

SFT_INLINE uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// fp16 <-> fp32, bit-identical to torch's casts (and to F16C) for every non-NaN
// value; a NaN becomes the canonical quiet NaN. These are c10's portable
// algorithms (c10::detail::fp16_ieee_{to,from}_fp32_value) with the final
// select done by bit masks: c10's ternaries guard fp32 operations, which GCC
// (with -ftrapping-math) will not if-convert without AVX-512 masking, so the
// AVX2 and baseline clones would not vectorise (checked with -fopt-info-vec;
// both functions were checked against F16C over every fp16 / fp32 input).
SFT_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;  // also inf / NaN
  const float subnormal = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;      // also zero
  const uint32_t is_sub = 0u - uint32_t(two_w < (1u << 27));
  return f32_from_bits(sign | (f32_to_bits(subnormal) & is_sub) | (f32_to_bits(normal) & ~is_sub));
}

SFT_INLINE uint16_t float_to_half_bits(float f) {
  const uint32_t w = f32_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  // The fp32 add of a power of two just above |f| rounds |f| to fp16 precision (nearest even).
  const float base = f32_from_bits((bias >> 1) + 0x07800000u) + (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t is_nan = 0u - uint32_t(shl1_w > 0xFF000000u);
  return uint16_t((sign >> 16) | (is_nan & 0x7E00u) | (~is_nan & nonsign));
}

// For each dtype: storage type, |x| bit mask, the smallest non-finite |x| bit
// pattern (for a non-NaN value, |x| bits order like |x|), and conversions
// exactly matching torch's casts.
struct F32 {
  using bits_t = uint32_t;
  static constexpr bits_t kAbsMask = 0x7fffffffu, kInf = 0x7f800000u;
  SFT_INLINE static float to_float(bits_t b) { return f32_from_bits(b); }
  SFT_INLINE static bits_t from_float(float f) { return f32_to_bits(f); }
};

struct F16 {
  using bits_t = uint16_t;
  static constexpr bits_t kAbsMask = 0x7fff, kInf = 0x7c00;
  SFT_INLINE static float to_float(bits_t b) { return half_bits_to_float(b); }
  SFT_INLINE static bits_t from_float(float f) { return float_to_half_bits(f); }
};

struct BF16 {
  using bits_t = uint16_t;
  static constexpr bits_t kAbsMask = 0x7fff, kInf = 0x7f80;
  SFT_INLINE static float to_float(bits_t b) { return f32_from_bits(uint32_t(b) << 16); }
  SFT_INLINE static bits_t from_float(float f) { return c10::detail::round_to_nearest_even(f); }
};

// ceil(a / b) for a >= 0, b >= 1, without overflow for any b.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// ----------------------------------------------------------------------------- packing
// For 2 and 4 bits, codes are first produced one uint8 per element into a
// staging window (that loop vectorises over elements), then packed a CodeWord
// at a time (common/quantize.h): a plain word -> byte loop. Windows start on a
// byte boundary. 8-bit codes are the packed bytes: no staging.

// Packs the n codes held in the bytes of w into the ceil(n*BITS/8) bytes out;
// pad bits of a partial last byte are 0.
template <int BITS>
SFT_INLINE void pack_bytes(const CodeWord<BITS>* __restrict w, int64_t n, uint8_t* __restrict out) {
  constexpr int kPB = QuantFormat<BITS>::kPerByte;
  const int64_t full = n / kPB, rest = n - full * kPB;
  for (int64_t j = 0; j < full; ++j) out[j] = pack_word<BITS>(w[j]);
  if (rest) {  // a partial last byte: only its first `rest` code bytes were written
    const uint8_t* c = reinterpret_cast<const uint8_t*>(w + full);
    unsigned v = 0;
    for (int64_t s = 0; s < rest; ++s) v |= unsigned(c[s]) << (s * BITS);
    out[full] = uint8_t(v);
  }
}

// Inverse of pack_bytes: the codes of the ceil(n*BITS/8) bytes `in`, one per
// byte of w (which must have room for a whole last word).
template <int BITS>
SFT_INLINE void unpack_bytes(const uint8_t* __restrict in, int64_t n, CodeWord<BITS>* __restrict w) {
  const int64_t nwords = ceil_div(n, QuantFormat<BITS>::kPerByte);
  for (int64_t j = 0; j < nwords; ++j) w[j] = unpack_word<BITS>(in[j]);
}

// ----------------------------------------------------------------------------- block helpers

// max |x| over x[0, n) as a bit pattern of In (integer max: vectorises, and
// compares like the float absmax for every non-NaN value).
template <class In>
SFT_INLINE uint32_t absmax_bits(const typename In::bits_t* __restrict x, int64_t n) {
  typename In::bits_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const typename In::bits_t a = x[i] & In::kAbsMask;
    m = a > m ? a : m;
  }
  return m;
}

// Number of inf/NaN values in x[0, n). Only called on a block whose absmax is non-finite.
template <class In>
SFT_INLINE int64_t count_nonfinite(const typename In::bits_t* x, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += (x[i] & In::kAbsMask) >= In::kInf;
  return c;
}

// Fills buf with the stream-0 Philox words of element indices i0 .. i0+n-1
// (n <= kWindow) and returns p with p[k] the word of index i0 + k.
SFT_INLINE const uint32_t* philox_words(uint32_t* __restrict buf, uint64_t seed, uint64_t i0, int64_t n) {
  const uint64_t g0 = i0 / 4;
  const int64_t ngroups = int64_t((i0 + uint64_t(n) + 3) / 4 - g0);
  for (int64_t g = 0; g < ngroups; ++g) {
    const Philox4 w = philox_group(seed, g0 + uint64_t(g), kPhiloxStreamRounding);
    for (int j = 0; j < 4; ++j) buf[4 * g + j] = w.v[j];
  }
  return buf + (i0 - 4 * g0);
}

// Blocks at least this long are encoded / decoded block by block with the
// scale in a register. Shorter blocks would leave those loops too short to
// vectorise, so their windows first get a per-element scale array and then
// run as one loop (which costs one extra store and load per element).
constexpr int64_t kShortBlock = 64;

// Calls fn(k0, k1, scale) for each block's part [w0 + k0, w0 + k1) of the
// window [w0, w1) of a row; b is the block of element w0 and is advanced past
// the window. The scale is passed through map (see for_window_scales).
template <class Map, class Fn>
SFT_INLINE void for_each_segment(const float* __restrict scales, int64_t w0, int64_t w1, int64_t block, int64_t& b,
                                 Map map, Fn fn) {
  for (int64_t e = w0; e < w1;) {
    const int64_t block_end = (b + 1) * block, end = std::min(w1, block_end);
    fn(e - w0, end - w0, map(scales[b]));
    b += end == block_end;
    e = end;
  }
}

// Runs body(k0, k1, scale_of) over the window [w0, w1), where scale_of(k) is
// map(scale) for the block of element w0 + k: per block for long blocks, or
// once over the whole window with a per-element array `sc` of them.
template <class Map, class Body>
SFT_INLINE void for_window_scales(float* __restrict sc, const float* __restrict scales, int64_t w0, int64_t w1,
                                  int64_t block, int64_t& b, Map map, Body body) {
  if (block >= kShortBlock) {
    for_each_segment(scales, w0, w1, block, b, map,
                     [&](int64_t k0, int64_t k1, float s) { body(k0, k1, [s](int64_t) { return s; }); });
  } else {
    for_each_segment(scales, w0, w1, block, b, map, [&](int64_t k0, int64_t k1, float s) {
      for (int64_t k = k0; k < k1; ++k) sc[k] = s;
    });
    body(0, w1 - w0, [sc](int64_t k) { return sc[k]; });
  }
}

// Quantizes blocks [b0, b1) of one row: x, codes and scales point at the row,
// index0 is the row-major index of the row's first element. Returns the number
// of non-finite values seen; if it is not 0 the codes are not written (the
// caller throws).
template <class In, int BITS, bool SR>
SFT_CLONES int64_t quantize_span(const typename In::bits_t* __restrict x, uint8_t* __restrict codes,
                                 float* __restrict scales, int64_t b0, int64_t b1, int64_t cols, int64_t block,
                                 uint64_t index0, uint64_t seed) {
  constexpr bool kStaged = BITS != 8;
  constexpr int kPB = QuantFormat<BITS>::kPerByte;
  // Pass 1: the scales of all blocks of the span (a span is ~kSpanElems
  // elements or one block, so it is still in L1/L2 for pass 2).
  int64_t nonfinite = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t e0 = b * block, n = std::min(cols, e0 + block) - e0;
    const uint32_t amax = absmax_bits<In>(x + e0, n);
    if (amax >= In::kInf) nonfinite += count_nonfinite<In>(x + e0, n);
    scales[b] = block_scale<BITS>(In::to_float(typename In::bits_t(amax)));
  }
  if (nonfinite) return nonfinite;

  // Pass 2: codes, one window at a time; each block divides by code_divisor(scale).
  alignas(64) float sc[kWindow];  // per-element scales, used only for short blocks
  alignas(64) CodeWord<BITS> stage[kStaged ? kWindow / kPB : 1];
  alignas(64) uint32_t words[SR ? kWindow + 8 : 1];
  const int64_t span_end = std::min(cols, b1 * block);
  int64_t b = b0;
  for (int64_t w0 = b0 * block; w0 < span_end; w0 += kWindow) {
    const int64_t w1 = std::min(span_end, w0 + kWindow);
    uint8_t* __restrict dst = kStaged ? reinterpret_cast<uint8_t*>(stage) : codes + w0;
    const typename In::bits_t* __restrict xw = x + w0;
    const uint32_t* __restrict r = SR ? philox_words(words, seed, index0 + uint64_t(w0), w1 - w0) : nullptr;
    const auto divisor = [](float s) { return code_divisor(s); };
    for_window_scales(sc, scales, w0, w1, block, b, divisor, [&](int64_t k0, int64_t k1, auto scale_of) {
      for (int64_t k = k0; k < k1; ++k) {
        if constexpr (SR) {
          dst[k] = code_stochastic<BITS>(In::to_float(xw[k]), scale_of(k), r[k]);
        } else {
          dst[k] = code_nearest<BITS>(In::to_float(xw[k]), scale_of(k));
        }
      }
    });
    if constexpr (kStaged) pack_bytes<BITS>(stage, w1 - w0, codes + w0 / kPB);
  }
  return 0;
}

// Dequantizes blocks [b0, b1) of one row into y (the row of the output).
template <class Out, int BITS>
SFT_CLONES void dequantize_span(const uint8_t* __restrict codes, const float* __restrict scales,
                                typename Out::bits_t* __restrict y, int64_t b0, int64_t b1, int64_t cols,
                                int64_t block) {
  constexpr bool kStaged = BITS != 8;
  constexpr int kPB = QuantFormat<BITS>::kPerByte;
  alignas(64) float sc[kWindow];  // per-element scales, used only for short blocks
  alignas(64) CodeWord<BITS> stage[kStaged ? kWindow / kPB : 1];
  const int64_t span_end = std::min(cols, b1 * block);
  int64_t b = b0;
  for (int64_t w0 = b0 * block; w0 < span_end; w0 += kWindow) {
    const int64_t w1 = std::min(span_end, w0 + kWindow);
    const uint8_t* __restrict c = codes + w0;
    if constexpr (kStaged) {
      unpack_bytes<BITS>(codes + w0 / kPB, w1 - w0, stage);
      c = reinterpret_cast<const uint8_t*>(stage);
    }
    typename Out::bits_t* __restrict yw = y + w0;
    const auto same = [](float s) { return s; };
    for_window_scales(sc, scales, w0, w1, block, b, same, [&](int64_t k0, int64_t k1, auto scale_of) {
      for (int64_t k = k0; k < k1; ++k) yw[k] = Out::from_float(decode_code<BITS>(int(c[k]), scale_of(k)));
    });
  }
}

// ----------------------------------------------------------------------------- parallel driver

// Calls fn(row, b0, b1) for spans of whole blocks that cover every block of
// every row, in parallel. Each span starts at a block boundary that is also a
// byte boundary of the packed row, so concurrent spans never share a byte.
template <class Fn>
void for_each_span(int64_t rows, int64_t cols, int64_t block, int64_t bits, const Fn& fn) {
  const int64_t per_byte = 8 / bits;
  const int64_t blk = std::min(block, cols);  // a larger block only ever has its boundary at 0
  const int64_t nblk = ceil_div(cols, block);
  const int64_t blocks_per_unit = per_byte / std::gcd(blk, per_byte);  // lcm(blk, per_byte) / blk
  const int64_t units = std::max<int64_t>(1, kSpanElems / (blocks_per_unit * blk));
  const int64_t span_blocks = std::min(nblk, units * blocks_per_unit);
  const int64_t spans_per_row = ceil_div(nblk, span_blocks);
  const int64_t span_elems = std::min(cols, span_blocks * blk);
  const int64_t grain = std::max<int64_t>(1, kSpanElems / span_elems);
  at::parallel_for(0, rows * spans_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t row = it / spans_per_row, b0 = (it % spans_per_row) * span_blocks;
      fn(row, b0, std::min(nblk, b0 + span_blocks));
    }
  });
}

template <class In, int BITS, bool SR>
int64_t quantize_rows(const at::Tensor& x, at::Tensor& codes, at::Tensor& scales, int64_t rows, int64_t cols,
                      int64_t block, uint64_t seed) {
  using bits_t = typename In::bits_t;
  const bits_t* xp = static_cast<const bits_t*>(x.const_data_ptr());
  uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
  float* sp = scales.mutable_data_ptr<float>();
  const int64_t nbytes = codes.size(-1), nblk = scales.size(-1);
  std::atomic<int64_t> nonfinite{0};
  for_each_span(rows, cols, block, BITS, [&](int64_t row, int64_t b0, int64_t b1) {
    const int64_t bad = quantize_span<In, BITS, SR>(xp + row * cols, cp + row * nbytes, sp + row * nblk, b0, b1, cols,
                                                    block, uint64_t(row) * uint64_t(cols), seed);
    if (bad) nonfinite += bad;
  });
  return nonfinite.load();
}

template <class Out, int BITS>
void dequantize_rows(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& y, int64_t rows, int64_t cols,
                     int64_t block) {
  using bits_t = typename Out::bits_t;
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  const float* sp = scales.const_data_ptr<float>();
  bits_t* yp = static_cast<bits_t*>(y.mutable_data_ptr());
  const int64_t nbytes = codes.size(-1), nblk = scales.size(-1);
  for_each_span(rows, cols, block, BITS, [&](int64_t row, int64_t b0, int64_t b1) {
    dequantize_span<Out, BITS>(cp + row * nbytes, sp + row * nblk, yp + row * cols, b0, b1, cols, block);
  });
}

// Calls f(std::integral_constant<int, bits>) (the caller has checked bits).
template <class F>
auto dispatch_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Calls f(dtype-tag) for fp32 / fp16 / bf16 (the caller has checked the dtype).
template <class F>
auto dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf: return f(F16{});
    case at::kBFloat16: return f(BF16{});
    default: return f(F32{});
  }
}

}  // namespace

// ----------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t bits, int64_t block, bool stochastic,
                                            int64_t seed) {
  constexpr const char* op = "sft::quantize";
  const PackedGeometry g = check_quantize_args(x, bits, block);
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  at::Tensor codes = at::empty(g.codes_shape(), x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(g.scales_shape(), x.options().dtype(at::kFloat));
  if (g.rows == 0 || g.cols == 0) return {codes, scales};

  const at::Tensor xc = x.contiguous();
  const int64_t nonfinite = dispatch_float(x.scalar_type(), [&](auto in) {
    using In = decltype(in);
    return dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      return stochastic ? quantize_rows<In, B, true>(xc, codes, scales, g.rows, g.cols, block, uint64_t(seed))
                        : quantize_rows<In, B, false>(xc, codes, scales, g.rows, g.cols, block, uint64_t(seed));
    });
  });
  TORCH_CHECK(nonfinite == 0, op, ": x has ", nonfinite,
              " non-finite value(s); only finite input can be quantized");
  return {codes, scales};
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t block, int64_t cols,
                      at::ScalarType dtype) {
  constexpr const char* op = "sft::dequantize";
  const PackedGeometry g = check_dequantize_args(codes, scales, bits, block, cols, dtype);
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), op, ": codes and scales must be CPU tensors");
  at::Tensor y = at::empty(g.values_shape(), codes.options().dtype(dtype));
  if (g.rows == 0 || g.cols == 0) return y;

  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous();
  dispatch_float(dtype, [&](auto out) {
    using Out = decltype(out);
    dispatch_bits(bits, [&](auto b) { dequantize_rows<Out, decltype(b)::value>(cc, sc, y, g.rows, g.cols, block); });
  });
  return y;
}

TORCH_LIBRARY_IMPL(sft, CPU, m) {
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
}

}  // namespace cpu
}  // namespace sft
