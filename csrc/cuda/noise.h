// Launchers of the CUDA kernels of the noise-injection family. No torch headers.
// Tensors are contiguous; `seed` points to the int64 seed on the device (read in
// the kernel: no host sync). Every launcher returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace aefast {
namespace cuda {

// kind: aefast::noise::Kind; level compared in float32; scale = 1 / (1 - level)
// for dropout.
cudaError_t corrupt(const void* x, void* out, DType dtype, int64_t n, int kind, float level,
                    double scale, double low, double high, const int64_t* seed, cudaStream_t stream);

// How many partial KL sums reparameterize_forward writes for n elements.
int64_t reparameterize_blocks(int64_t n);

// partial: reparameterize_blocks(n) accumulators (float32; float64 for float64).
cudaError_t reparameterize_forward(const void* mu, const void* logvar, void* z, void* partial,
                                   void* kl, DType dtype, int64_t batch, int64_t n,
                                   const int64_t* seed, cudaStream_t stream);

cudaError_t reparameterize_backward(const void* grad_z, const void* grad_kl, const void* mu,
                                    const void* logvar, void* grad_mu, void* grad_logvar,
                                    DType dtype, int64_t batch, int64_t n, const int64_t* seed,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace aefast
