// Philox4x32-10 (Salmon et al., SC'11), shared by CPU and CUDA kernels.
// Header-only, no torch or CUDA runtime includes, usable from host and device.
// Contract (see sft_kernels/reference.py): key = (seed lo, seed hi);
// counter = (index/4 lo, index/4 hi, stream, 0); word index%4 is the draw.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define SFT_HD __host__ __device__ __forceinline__
#else
#define SFT_HD inline
#endif

namespace sft {

constexpr uint32_t kPhiloxStreamRounding = 0;
constexpr uint32_t kPhiloxStreamSketch = 1;
constexpr uint32_t kPhiloxStreamSketch2 = 2;

struct Philox4 {
  uint32_t v[4];
};

SFT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler does not know the pragma
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += W0;
      k1 += W1;
    }
    const uint64_t p0 = (uint64_t)M0 * c0;
    const uint64_t p1 = (uint64_t)M1 * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// The four draws for indices 4*group .. 4*group+3 of `stream` under `seed`.
SFT_HD Philox4 philox_group(uint64_t seed, uint64_t group, uint32_t stream) {
  return philox4x32_10((uint32_t)group, (uint32_t)(group >> 32), stream, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// u = (r >> 8) * 2^-24, exactly representable in fp32, in [0, 1).
SFT_HD float philox_u01(uint32_t r) { return (float)(r >> 8) * 5.9604644775390625e-08f; }

}  // namespace sft
