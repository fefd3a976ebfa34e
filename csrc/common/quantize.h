// Per-block arithmetic of sft::quantize / sft::dequantize, shared by the CPU
// kernels (csrc/cpu/quantize.cpp) and the CUDA kernels
// (csrc/cuda/quantize_kernels.cu), so both run the same code and the CPU test
// suite exercises it. The format is specified bit for bit in
// sft_kernels/reference.py; every step here is one IEEE fp32 operation (no
// reciprocal; builds pass -ffp-contract=off / --fmad=false so nothing is
// contracted into an FMA) or exact integer arithmetic.
//
// Header-only, no torch or CUDA runtime includes, usable from host and device.
#pragma once
#include <math.h>
#include <stdint.h>

#if !defined(__CUDACC__)
#include <algorithm>
#include <cmath>
#endif

#include "common/hd.h"
#include "common/philox.h"

namespace sft {

// Constants of a bit width: codes are q + kOffset in [0, 2^BITS), q in [-kQmax, kQmax].
template <int BITS>
struct QuantFormat {
  static_assert(BITS == 2 || BITS == 4 || BITS == 8, "bits must be 2, 4 or 8");
  static constexpr int kPerByte = 8 / BITS;
  static constexpr int kOffset = 1 << (BITS - 1);
  static constexpr int kMask = (1 << BITS) - 1;
  static constexpr int kQmax = kOffset - 1;
};

// scale = absmax / qmax (fp32 division). absmax is the block's max |x| in fp32.
template <int BITS>
SFT_HD float block_scale(float absmax) {
  return absmax / float(QuantFormat<BITS>::kQmax);
}

// What the codes of a block divide by: its scale, or +inf for a zero scale (an
// all-zero block, or one whose absmax / qmax underflows), which must give
// q = 0: t = x / inf = +-0, so q = 0 in both rounding modes (u < 1).
SFT_HD float code_divisor(float scale) { return scale == 0.0f ? INFINITY : scale; }

// Clamps q to [-qmax, qmax] and adds the offset (ternaries, so CPU loops vectorise as min/max).
template <int BITS>
SFT_HD uint8_t clamp_code(int q) {
  constexpr int kQmax = QuantFormat<BITS>::kQmax;
#if defined(__CUDA_ARCH__)
  q = ::min(::max(q, -kQmax), kQmax);
#else
  q = std::min(std::max(q, -kQmax), kQmax);  // the form GCC vectorises best (vpmaxsd / vpminsd)
#endif
  return uint8_t(q + QuantFormat<BITS>::kOffset);
}

// Rounding uses float -> int conversion (truncation) rather than floor/round,
// which GCC does not vectorise. It is exact because |t| < 2^31 always: |x| <=
// absmax and a nonzero scale is >= 2^-149, so |t| <= absmax * 2^149 < 127 * 2^23
// when absmax / qmax is subnormal, and |t| <= qmax * (1 + 2^-23) otherwise.

// Deterministic code of x (divisor from code_divisor): round half away from
// zero. For |t| < 2^31, trunc(|t| + h) with h = 0.5 - 2^-25 (the float just
// below 0.5) is exactly round-half-away(|t|) (checked exhaustively over all
// such floats; h = 0.5 itself fails for t = 0.49999997, where |t| + 0.5 rounds
// up to 1), and both steps are odd functions of t.
template <int BITS>
SFT_HD uint8_t code_nearest(float x, float divisor) {
  constexpr float kJustBelowHalf = 0.5f - 0x1p-25f;
  const float t = x / divisor;
#if defined(__CUDA_ARCH__)
  return clamp_code<BITS>(int(t + copysignf(kJustBelowHalf, t)));
#else
  return clamp_code<BITS>(int(t + std::copysign(kJustBelowHalf, t)));  // GCC: vandps/vorps, no blend
#endif
}

// Stochastic code of x: floor(t + u), u from the element's Philox word r.
template <int BITS>
SFT_HD uint8_t code_stochastic(float x, float divisor, uint32_t r) {
  const float v = x / divisor + philox_u01(r);
  return clamp_code<BITS>(int(v) - int(float(int(v)) > v));  // truncation -> floor
}

// The value of code c in a block of scale `scale`: fp32(c - offset) * scale.
template <int BITS>
SFT_HD float decode_code(int c, float scale) {
  return float(c - QuantFormat<BITS>::kOffset) * scale;
}

// ----------------------------------------------------------------------------- packing
// The kPerByte codes of one packed byte are handled as one little-endian word,
// a CodeWord: code s sits in byte s of the word (bit 8s) and belongs at bit
// s*BITS of the packed byte (element j of a row is in byte j*BITS/8 at bit
// (j*BITS) % 8). Moving them is a few shifts in registers, with no per-code
// loop, so the CPU word -> byte loops vectorise without shuffles and a CUDA
// thread packs its codes without shared memory. 8-bit codes are the bytes.

template <int BITS>
struct CodeWordOf;
template <>
struct CodeWordOf<2> {
  using type = uint32_t;
};
template <>
struct CodeWordOf<4> {
  using type = uint16_t;
};
template <>
struct CodeWordOf<8> {
  using type = uint8_t;
};
template <int BITS>
using CodeWord = typename CodeWordOf<BITS>::type;

// The packed byte of the kPerByte codes (each < 2^BITS) in the bytes of w.
template <int BITS>
SFT_HD uint8_t pack_word(CodeWord<BITS> w) {
  using W = CodeWord<BITS>;
  W b = 0;
  for (int s = 0; s < QuantFormat<BITS>::kPerByte; ++s) b = W(b | (w >> (s * (8 - BITS))));
  return uint8_t(b);
}

// Inverse of pack_word: the codes of packed byte v, one per byte of the word.
template <int BITS>
SFT_HD CodeWord<BITS> unpack_word(uint8_t v) {
  using W = CodeWord<BITS>;
  constexpr W kLowBits = W(W(~W(0)) / 0xFF * QuantFormat<BITS>::kMask);  // kMask in every byte
  W spread = 0;
  for (int s = 0; s < QuantFormat<BITS>::kPerByte; ++s) spread = W(spread | (W(v) << (s * (8 - BITS))));
  return W(spread & kLowBits);
}

}  // namespace sft
