// CPU quantization entry points shared between kernel files (lowrank.cpp calls
// them for the fused ops). The op-facing kernels are registered in quantize.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace sft {
namespace cpu {

// sft::quantize on CPU: x (..., cols) float -> codes (..., ceil(cols*bits/8)) uint8,
// scales (..., ceil(cols/block)) fp32. Raises on non-finite input.
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t bits, int64_t block, bool stochastic,
                                            int64_t seed);

// sft::dequantize on CPU.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t block, int64_t cols,
                      at::ScalarType dtype);

}  // namespace cpu
}  // namespace sft
