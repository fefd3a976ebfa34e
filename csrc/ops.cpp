// The one schema block of the `sft` operator library. Every op's signature
// lives here and nowhere else; kernels register per backend in csrc/cpu and
// csrc/cuda. Rank, bit width and block size are static ints; seeds are passed
// in explicitly so edge, cloud and a recomputed forward draw the same numbers.
#include <torch/library.h>

TORCH_LIBRARY(sft, m) {
  m.def("quantize(Tensor x, int bits, int block, bool stochastic, int seed) -> (Tensor codes, Tensor scales)");
  m.def("dequantize(Tensor codes, Tensor scales, int bits, int block, int cols, ScalarType dtype) -> Tensor");
  m.def("lowrank(Tensor x, int rank, int oversample, int power_iters, int seed) -> (Tensor P, Tensor Q)");
  m.def("randomized_svd(Tensor w, int rank, int oversample, int power_iters, int seed) -> (Tensor U, Tensor S, Tensor V)");
  m.def(
      "lowrank_quantize(Tensor x, int rank, int oversample, int power_iters, int bits, int block, bool stochastic, "
      "int seed) -> (Tensor p_codes, Tensor p_scales, Tensor q_codes, Tensor q_scales)");
  m.def(
      "lowrank_dequantize(Tensor p_codes, Tensor p_scales, Tensor q_codes, Tensor q_scales, int rows, int cols, "
      "int rank, int bits, int block, ScalarType dtype) -> Tensor");
}
