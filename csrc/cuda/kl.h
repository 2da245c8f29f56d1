// Launchers of the CUDA kernels of the sparse-KL family. No torch headers: raw
// pointers, sizes and a stream, so the .cu compiles with plain nvcc. Inputs are
// contiguous row-major; statistics (partial sums, rho_hat, s2, w2) are float32, or
// float64 when the input is float64. Every launcher returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace aefast {
namespace cuda {

// How many row splits the column sums of a (B, H) matrix use on a GPU of `sms`
// multiprocessors: the partial-sum buffers hold splits * H statistics. A pure function
// (launch planning is tested at users' sizes without a GPU).
int64_t column_splits(int64_t B, int64_t H, int sms);

cudaError_t kl_sparsity_forward(const void* a, DType dtype, int64_t B, int64_t H, double rho,
                                double beta, double eps, int64_t splits, void* partial, void* rho_hat,
                                void* penalty, cudaStream_t stream);

cudaError_t kl_sparsity_backward(const void* grad_penalty, const void* rho_hat, void* grad_a,
                                 DType dtype, int64_t B, int64_t H, double rho, double beta,
                                 double eps, cudaStream_t stream);

cudaError_t sigmoid_kl_sparsity_forward(const void* z, void* h, DType dtype, int64_t B, int64_t H,
                                        double rho, double beta, double eps, int64_t splits, void* partial,
                                        void* rho_hat, void* penalty, cudaStream_t stream);

cudaError_t sigmoid_kl_sparsity_backward(const void* grad_h, const void* grad_penalty,
                                         const void* h, const void* rho_hat, void* grad_z,
                                         DType dtype, int64_t B, int64_t H, double rho,
                                         double beta, double eps, cudaStream_t stream);

// partial: (h_splits + 1) * H statistics (the last H hold the weight's row norms);
// the weight is (H, D).
cudaError_t contractive_penalty_forward(const void* h, const void* weight, DType dtype, int64_t B,
                                        int64_t H, int64_t D, int64_t h_splits, void* partial,
                                        void* s2, void* w2, void* penalty, cudaStream_t stream);

cudaError_t contractive_penalty_backward(const void* grad_penalty, const void* h,
                                         const void* weight, const void* s2, const void* w2,
                                         void* grad_h, void* grad_weight, DType dtype, int64_t B,
                                         int64_t H, int64_t D, cudaStream_t stream);

}  // namespace cuda
}  // namespace aefast
