// Launchers of the CUDA kernels in csrc/cuda/*_kernels.cu.
//
// Plain functions over raw device pointers, sizes and a cudaStream_t: no torch
// types, so every *_kernels.cu builds with nvcc alone (`make cuda-check`, also
// on machines without a GPU), and the torch glue (csrc/cuda/*_glue.cpp) is the
// one place that knows tensors, dtypes, devices and the current stream. See
// csrc/cuda/README.md for the layout rule.
//
// Conventions shared by all launchers:
// * Every launcher returns the launch status (cudaGetLastError() after the
//   launch, or cudaErrorInvalidValue for arguments it cannot handle); the glue
//   checks it with C10_CUDA_CHECK. Argument validation with messages lives in
//   the glue (TORCH_CHECK), not here.
// * Sizes are int64_t element counts; a size of 0 launches nothing and
//   returns cudaSuccess.
// * Seeds are the op's seed as an unsigned 64-bit pattern, Philox streams are
//   sft::kPhiloxStream* (common/philox.h); results are bit-identical to the
//   CPU kernels and to sft_kernels/reference.py.
// * Everything runs asynchronously on `stream`; nothing synchronizes.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of a floating-point tensor handed to a launcher.
typedef enum SftDType { SFT_FLOAT32 = 0, SFT_FLOAT16 = 1, SFT_BFLOAT16 = 2 } SftDType;

// Writes Philox4x32-10 words 0..n-1 of Philox stream `philox_stream` under
// `seed` to out[0..n): word i is word i % 4 of group i / 4 (sft::philox_group).
// A test utility: the CUDA tests compare it with the CPU Philox.
cudaError_t sft_philox_fill(uint32_t* out, int64_t n, uint64_t seed, uint32_t philox_stream, cudaStream_t stream);

// sft::quantize of a rows x cols matrix (the op's input viewed as (-1, cols)).
//   x              device input of `dtype`; row r starts at x + r * x_row_stride
//                  elements, the last dim is contiguous (x_row_stride >= cols).
//                  128-bit loads are used where x's rows are 16-byte aligned.
//   bits, block    2, 4 or 8; block >= 1 (any size: block > cols is one block).
//   stochastic     floor(t + u) with u from Philox stream 0 at element index
//                  r * cols + c; round half away from zero otherwise.
//   codes          out, rows x ceil(cols * bits / 8) uint8, contiguous; pad bits 0.
//   scales         out, rows x ceil(cols / block) fp32, contiguous.
// Non-finite input is not detected here (that would need a host sync): a
// block holding inf or NaN gets a non-finite scale (its codes are then
// unspecified), which sft_kernels/codecs.py reports outside graph capture.
// One kernel launch when the blocks fit a CTA's tile (block <= 2048 and
// lcm(block, 8) <= 2048, or cols <= 2048); otherwise a memset and three
// launches, using `scales` as scratch in between.
cudaError_t sft_quantize(const void* x, SftDType dtype, int64_t rows, int64_t cols, int64_t x_row_stride, int bits,
                         int64_t block, bool stochastic, uint64_t seed, uint8_t* codes, float* scales,
                         cudaStream_t stream);

// sft::dequantize: codes (rows x ceil(cols * bits / 8)) and scales
// (rows x ceil(cols / block)), both contiguous, to out, a contiguous
// rows x cols matrix of `dtype` (fp32 decode, then one cast).
cudaError_t sft_dequantize(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols, int bits,
                           int64_t block, void* out, SftDType dtype, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
