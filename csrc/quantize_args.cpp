#include "quantize_args.h"

namespace sft {
namespace {

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// ceil(a / b) for a >= 0, b >= 1, without overflow for any b.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

std::vector<int64_t> with_last(const std::vector<int64_t>& lead, int64_t last) {
  std::vector<int64_t> shape(lead);
  shape.push_back(last);
  return shape;
}

}  // namespace

std::vector<int64_t> PackedGeometry::codes_shape() const { return with_last(lead, nbytes); }
std::vector<int64_t> PackedGeometry::scales_shape() const { return with_last(lead, nblk); }
std::vector<int64_t> PackedGeometry::values_shape() const { return with_last(lead, cols); }

void check_bits_block(const char* op, int64_t bits, int64_t block) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, op, ": bits must be one of (2, 4, 8), got ", bits);
  TORCH_CHECK_VALUE(block >= 1, op, ": block must be >= 1, got ", block);
}

PackedGeometry check_quantize_args(const at::Tensor& x, int64_t bits, int64_t block) {
  constexpr const char* op = "sft::quantize";
  check_bits_block(op, bits, block);
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  PackedGeometry g;
  if (x.dim()) g.lead.assign(x.sizes().begin(), x.sizes().end() - 1);
  g.cols = x.dim() ? x.size(-1) : 1;
  g.rows = c10::multiply_integers(g.lead);
  g.nbytes = ceil_div(g.cols * bits, 8);
  g.nblk = ceil_div(g.cols, block);
  return g;
}

PackedGeometry check_dequantize_args(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t block,
                                     int64_t cols, at::ScalarType dtype) {
  constexpr const char* op = "sft::dequantize";
  check_bits_block(op, bits, block);
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(cols >= 0, op, ": cols must be >= 0, got ", cols);
  TORCH_CHECK_VALUE(codes.dim() >= 1 && scales.dim() >= 1, op, ": codes and scales must have at least 1 dimension");
  TORCH_CHECK_VALUE(is_supported_float(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  PackedGeometry g;
  g.cols = cols;
  g.nbytes = ceil_div(cols * bits, 8);
  g.nblk = ceil_div(cols, block);
  TORCH_CHECK_VALUE(codes.size(-1) == g.nbytes, op, ": codes last dim must be ceil(cols*bits/8) = ", g.nbytes,
                    " for cols=", cols, ", bits=", bits, "; got ", codes.size(-1));
  TORCH_CHECK_VALUE(scales.size(-1) == g.nblk, op, ": scales last dim must be ceil(cols/block) = ", g.nblk,
                    " for cols=", cols, ", block=", block, "; got ", scales.size(-1));
  const at::IntArrayRef lead = codes.sizes().slice(0, codes.dim() - 1);
  TORCH_CHECK_VALUE(lead == scales.sizes().slice(0, scales.dim() - 1), op,
                    ": codes and scales leading shapes must match, got ", codes.sizes(), " and ", scales.sizes());
  g.lead.assign(lead.begin(), lead.end());
  g.rows = c10::multiply_integers(g.lead);
  return g;
}

}  // namespace sft
