// Device Philox4x32-10 words, from the same header as the CPU kernels
// (common/philox.h), so the CUDA tests can check that host and device draw
// identical random numbers. Launcher declared in cuda/kernels.h.
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/philox.h"
#include "cuda/kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loop beyond this

// One Philox group (four words) per thread and step; the last group may be partial.
__global__ void philox_fill_kernel(uint32_t* __restrict__ out, int64_t n, uint64_t seed, uint32_t philox_stream) {
  const int64_t groups = n / 4 + (n % 4 != 0);
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups; g += (int64_t)gridDim.x * blockDim.x) {
    const sft::Philox4 w = sft::philox_group(seed, (uint64_t)g, philox_stream);
    const int64_t base = 4 * g;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (base + j < n) out[base + j] = w.v[j];
    }
  }
}

}  // namespace

extern "C" cudaError_t sft_philox_fill(uint32_t* out, int64_t n, uint64_t seed, uint32_t philox_stream,
                                       cudaStream_t stream) {
  if (n < 0 || (n > 0 && out == nullptr)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t groups = n / 4 + (n % 4 != 0);
  const int64_t blocks = groups / kThreads + (groups % kThreads != 0);
  philox_fill_kernel<<<(unsigned)(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(out, n, seed,
                                                                                                     philox_stream);
  return cudaGetLastError();
}
