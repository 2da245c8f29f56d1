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
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == values.scalar_type(),
                    "aefast: weight must be (L, D) of the values' dtype");
}

}  // namespace decode_args
}  // namespace aefast
