// Torch glue of the fused CUDA sft::quantize / sft::dequantize
// (csrc/cuda/quantize_kernels.cu): argument checks (shared with the CPU
// kernels, quantize_args.h), output allocation, launch on the current stream.
//
// The kernels are registered only on request: sft_register_cuda_fused() adds
// them to the dispatcher. sft_kernels calls it through ctypes when
// SFT_CUDA_FUSED=1; otherwise the CUDA path of these ops is the registered
// pure-PyTorch reference. A static TORCH_LIBRARY_IMPL would register them at
// load time, unconditionally.
//
// The stream is c10::cuda::getCurrentCUDAStream(), which at::cuda re-exports
// as at::cuda::getCurrentCUDAStream(); its header, unlike ATen/cuda/CUDAContext.h,
// needs no cuBLAS/cuSPARSE headers, so `make cuda-check` can compile this file
// against a CPU torch and a bare CUDA toolkit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <tuple>

#include "cuda/kernels.h"
#include "quantize_args.h"

namespace sft {
namespace cuda {
namespace {

SftDType sft_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return SFT_FLOAT16;
    case at::kBFloat16: return SFT_BFLOAT16;
    default: return SFT_FLOAT32;  // the checks admit only fp32 besides these
  }
}

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t bits, int64_t block, bool stochastic,
                                            int64_t seed) {
  constexpr const char* op = "sft::quantize";
  const PackedGeometry g = check_quantize_args(x, bits, block);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes = at::empty(g.codes_shape(), x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(g.scales_shape(), x.options().dtype(at::kFloat));
  if (g.rows == 0 || g.cols == 0) return {codes, scales};

  // The launcher takes a row stride with a contiguous last dim; anything else is copied.
  const at::Tensor xv = x.dim() ? x.reshape({g.rows, g.cols}) : x.reshape({1, 1});
  const at::Tensor x2 = xv.stride(1) == 1 ? xv : xv.contiguous();
  C10_CUDA_CHECK(sft_quantize(x2.const_data_ptr(), sft_dtype(x.scalar_type()), g.rows, g.cols,
                              g.rows > 1 ? x2.stride(0) : g.cols, int(bits), block, stochastic, uint64_t(seed),
                              codes.mutable_data_ptr<uint8_t>(), scales.mutable_data_ptr<float>(),
                              c10::cuda::getCurrentCUDAStream()));
  return {codes, scales};
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t block, int64_t cols,
                      at::ScalarType dtype) {
  constexpr const char* op = "sft::dequantize";
  const PackedGeometry g = check_dequantize_args(codes, scales, bits, block, cols, dtype);
  TORCH_CHECK(codes.is_cuda() && scales.is_cuda() && codes.device() == scales.device(), op,
              ": codes and scales must be CUDA tensors on one device, got ", codes.device(), " and ",
              scales.device());
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor y = at::empty(g.values_shape(), codes.options().dtype(dtype));
  if (g.rows == 0 || g.cols == 0) return y;

  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous();
  C10_CUDA_CHECK(sft_dequantize(cc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), g.rows, g.cols, int(bits),
                                block, y.mutable_data_ptr(), sft_dtype(dtype), c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace
}  // namespace cuda
}  // namespace sft

// Registers the fused kernels as the CUDA implementations of sft::quantize and
// sft::dequantize. Returns 0 on success (also on every later call: the
// registration is made once and lives as long as the library), -1 if the
// dispatcher refused it (the error is printed to stderr).
extern "C" __attribute__((visibility("default"))) int sft_register_cuda_fused(void) {
  static std::once_flag once;
  static std::unique_ptr<torch::Library> lib;
  static int status = -1;
  std::call_once(once, [] {
    try {
      lib = std::make_unique<torch::Library>(torch::Library::IMPL, "sft", c10::DispatchKey::CUDA, __FILE__, __LINE__);
      lib->impl("quantize", TORCH_FN(sft::cuda::quantize));
      lib->impl("dequantize", TORCH_FN(sft::cuda::dequantize));
      status = 0;
    } catch (const std::exception& e) {
      fprintf(stderr, "sft_register_cuda_fused: %s\n", e.what());
    }
  });
  return status;
}
