// The one schema block of the `sft` operator library. Every op's signature
// lives here and nowhere else; kernels register per backend in csrc/cpu and
// csrc/cuda. Rank, bit width and block size are static ints; seeds are passed
// in explicitly so edge, cloud and a recomputed forward draw the same numbers.
// Seeds are `SymInt` so that torch.compile keeps a per-step seed symbolic
// (an `int` argument is specialised, recompiling every step); kernels still
// bind them as plain int64_t, read as the seed's unsigned 64-bit pattern.
#include <torch/library.h>

TORCH_LIBRARY(sft, m) {
  m.def("quantize(Tensor x, int bits, int block, bool stochastic, SymInt seed) -> (Tensor codes, Tensor scales)");
  m.def("dequantize(Tensor codes, Tensor scales, int bits, int block, int cols, ScalarType dtype) -> Tensor");
  m.def("lowrank(Tensor x, int rank, int oversample, int power_iters, SymInt seed) -> (Tensor P, Tensor Q)");
  m.def("randomized_svd(Tensor w, int rank, int oversample, int power_iters, SymInt seed) -> (Tensor U, Tensor S, Tensor V)");
  m.def(
      "lowrank_quantize(Tensor x, int rank, int oversample, int power_iters, int bits, int block, bool stochastic, "
      "SymInt seed) -> (Tensor p_codes, Tensor p_scales, Tensor q_codes, Tensor q_scales)");
  m.def(
      "lowrank_dequantize(Tensor p_codes, Tensor p_scales, Tensor q_codes, Tensor q_scales, int rows, int cols, "
      "int rank, int bits, int block, ScalarType dtype) -> Tensor");
  // CRC32C (Castagnoli) of a contiguous uint8 CPU tensor, continuing from `init`
  // (0 for a fresh CRC); the channel's payload checksum (docs/protocol.md).
  m.def("crc32c(Tensor data, int init=0) -> int");
}
