// Launchers of the CUDA kernels of the JumpReLU family. No torch headers: raw
// pointers, sizes and a stream, so the .cu compiles with plain nvcc. z is contiguous
// (B, L) row-major, the threshold (L,) in z's dtype; the L0 counts, the partial sums
// and grad_l0 are float32 (float64 for float64 z). Every launcher returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace aefast {
namespace cuda {

// Row splits of the threshold gradient's column sums on a GPU of `sms` multiprocessors:
// the partial buffer holds splits * L sums. A pure function (planning is tested at
// users' sizes without a GPU).
int64_t jumprelu_splits(int64_t B, int64_t L, int sms);

cudaError_t jumprelu_forward(const void* z, const void* threshold, void* out, void* l0, DType dtype, int64_t B,
                             int64_t L, cudaStream_t stream);

cudaError_t jumprelu_backward(const void* grad_out, const void* grad_l0, const void* z, const void* threshold,
                              void* grad_z, void* partial, void* grad_threshold, DType dtype, int64_t B, int64_t L,
                              double bandwidth, int64_t splits, cudaStream_t stream);

}  // namespace cuda
}  // namespace aefast
