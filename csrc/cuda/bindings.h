// What the CUDA registrations (csrc/cuda/<family>_bindings.cpp) share: dtype and
// device checks, the current stream, the device's SM count. Compiled only when torch
// is a CUDA build (setup.py); tests/test_cuda_sources.py compiles it against torch's
// headers on machines without one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "dtype.h"

namespace aefast {
namespace cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "aefast: unsupported dtype ", t.scalar_type());
  return DType::kFloat32;
}

inline at::TensorOptions stat_options(const at::Tensor& t) {
  return t.options().dtype(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// A launch's status as an error; a grid past CUDA's limits (grid_of in common.cuh) reads
// "invalid configuration argument", so that one says which limit.
inline void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "aefast CUDA kernel: ", cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration
                  ? " (the inputs' sizes need a launch grid past CUDA's limits: below 2^31 blocks on x, "
                    "at most 65535 on y and z)"
                  : "");
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of the current device (torch caches the properties: no sync).
inline int multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The CUDA device an op runs on, its first tensor's, made current for the op; every other
// tensor argument must be on it too (a kernel would read another device's pointer), and
// the error names the one that is not.
class OnDevice {
 public:
  OnDevice(const at::Tensor& first, const char* name) : guard_(first.device()), device_(first.device()) {
    TORCH_CHECK_VALUE(first.is_cuda(), "aefast: ", name, " must be a CUDA tensor, got one on ", first.device());
  }
  const OnDevice& also(const at::Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.device() == device_, "aefast: ", name, " is on ", t.device(), " but the op runs on ",
                      device_, ": every tensor argument must be on the same CUDA device");
    return *this;
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  const c10::Device device_;
};

}  // namespace cuda
}  // namespace aefast
