// Argument checks and output geometry of sft::quantize / sft::dequantize,
// shared by the CPU kernels (csrc/cpu/quantize.cpp) and the CUDA glue
// (csrc/cuda/quantize_glue.cpp), so every backend raises the same errors as
// sft_kernels/_checks.py (TORCH_CHECK_VALUE, i.e. ValueError, naming the
// argument and its valid range). Device checks stay with each backend.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sft {

// A float tensor viewed as rows x cols (its last dim; a 0-d tensor is 1 x 1)
// and its packed form: codes (lead..., nbytes) uint8, scales (lead..., nblk) fp32.
struct PackedGeometry {
  std::vector<int64_t> lead;  // leading dims (empty for 0-d and 1-d)
  int64_t rows = 0, cols = 0, nbytes = 0, nblk = 0;

  std::vector<int64_t> codes_shape() const;
  std::vector<int64_t> scales_shape() const;
  std::vector<int64_t> values_shape() const;  // (lead..., cols)
};

// Checks bits in {2, 4, 8} and block >= 1 for `op`.
void check_bits_block(const char* op, int64_t bits, int64_t block);

// Checks sft::quantize's x, bits and block; returns the geometry of x.
PackedGeometry check_quantize_args(const at::Tensor& x, int64_t bits, int64_t block);

// Checks sft::dequantize's arguments (dtypes, matching shapes, output dtype);
// returns the geometry of the decoded tensor.
PackedGeometry check_dequantize_args(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t block,
                                     int64_t cols, at::ScalarType dtype);

}  // namespace sft
