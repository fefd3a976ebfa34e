// Philox4x32-10 (Salmon et al., SC'11), shared by CPU and CUDA kernels.
// Header-only, no torch or CUDA runtime includes, usable from host and device.
// Contract (see sft_kernels/reference.py): key = (seed lo, seed hi);
// counter = (index/4 lo, index/4 hi, stream, 0); word index%4 is the draw.
#pragma once
#include <stdint.h>

#include "common/hd.h"

namespace sft {

constexpr uint32_t kPhiloxStreamRounding = 0;
constexpr uint32_t kPhiloxStreamSketch = 1;
constexpr uint32_t kPhiloxStreamSketch2 = 2;

struct Philox4 {
  uint32_t v[4];
};

// The 32-bit state words are held in 64-bit variables: the 32x32->64-bit
// products then need no lane-width conversions, so a loop over groups
// vectorises well on the CPU (2x faster stochastic rounding with AVX-512 than
// 32-bit state words); the words produced are the standard Philox4x32-10 ones.
SFT_HD Philox4 philox4x32_10(uint32_t c0_, uint32_t c1_, uint32_t c2_, uint32_t c3_, uint32_t k0_, uint32_t k1_) {
  const uint64_t kLo = 0xffffffffu;
  uint64_t c0 = c0_, c1 = c1_, c2 = c2_, c3 = c3_, k0 = k0_, k1 = k1_;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 = (k0 + 0x9E3779B9u) & kLo;
      k1 = (k1 + 0xBB67AE85u) & kLo;
    }
    const uint64_t p0 = c0 * 0xD2511F53u, p1 = c2 * 0xCD9E8D57u;
    c0 = (p1 >> 32) ^ c1 ^ k0;
    c1 = p1 & kLo;
    c2 = (p0 >> 32) ^ c3 ^ k1;
    c3 = p0 & kLo;
  }
  Philox4 out;
  out.v[0] = (uint32_t)c0;
  out.v[1] = (uint32_t)c1;
  out.v[2] = (uint32_t)c2;
  out.v[3] = (uint32_t)c3;
  return out;
}

// The four draws for indices 4*group .. 4*group+3 of `stream` under `seed`.
SFT_HD Philox4 philox_group(uint64_t seed, uint64_t group, uint32_t stream) {
  return philox4x32_10((uint32_t)group, (uint32_t)(group >> 32), stream, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// u = (r >> 8) * 2^-24, exactly representable in fp32, in [0, 1).
SFT_HD float philox_u01(uint32_t r) { return (float)(r >> 8) * 5.9604644775390625e-08f; }

}  // namespace sft
