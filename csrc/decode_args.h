// Argument checks of the decode operators, shared by their CPU (csrc/cpu/decode.cpp)
// and CUDA (csrc/cuda/decode_bindings.cpp) registrations. The public op checks the same
// in Python first (aefast/ops/decode.py); these guard direct calls of the kernels.
#pragma once

#include <ATen/ATen.h>

namespace aefast {
namespace decode_args {

inline void check_inputs(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(values.dim() == 2 && indices.sizes() == values.sizes(),
                    "aefast: values and indices must both be (B, k)");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong, "aefast: indices must be int64");
  const bool half_values = values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16;
  TORCH_CHECK_VALUE(weight.dim() == 2 && (weight.scalar_type() == values.scalar_type() ||
                                          (half_values && weight.scalar_type() == at::kFloat)),
                    "aefast: weight must be (L, D) of the values' dtype, or float32 under float16 or bfloat16 "
                    "values, got ", weight.scalar_type(), " weight and ", values.scalar_type(), " values");
}

}  // namespace decode_args
}  // namespace aefast
