// Launchers of the CUDA sparse decoder: out[b] = bias + sum_k values[b, k] *
// weight[indices[b, k]], weight (L, D). No torch headers; tensors contiguous.
// Every launcher returns the launch status. Indices are not checked on the host (that
// would stall it every call): an index out of [0, L) reads nothing and makes its
// outputs NaN (the forward row, the values gradient), and is in no latent's run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace aefast {
namespace cuda {

// bias may be null. dtype: the values', bias's and output's element type; weight_dtype:
// the weight's (and its gradient's), dtype or float32 beside float16 or bfloat16 values.
cudaError_t sparse_decode_forward(const void* values, const int64_t* indices, const void* weight,
                                  const void* bias, void* out, DType dtype, DType weight_dtype, int64_t B,
                                  int64_t K, int64_t L, int64_t D, cudaStream_t stream);

// order: the B * K (row, slot) positions sorted by latent, stably; starts: L + 1
// offsets of each latent's run in order. The weight gradient of latent l is the
// sum over its run, in that order: deterministic, no atomics. grad_values may be null:
// the values gradient is then not computed (the fused encoder's weight gradient).
cudaError_t sparse_decode_backward(const void* grad_out, const void* values, const int64_t* indices,
                                   const void* weight, const int64_t* order, const int64_t* starts,
                                   void* grad_values, void* grad_weight, DType dtype, DType weight_dtype,
                                   int64_t B, int64_t K, int64_t L, int64_t D, cudaStream_t stream);

}  // namespace cuda
}  // namespace aefast
