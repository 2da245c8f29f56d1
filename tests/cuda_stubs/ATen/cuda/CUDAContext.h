// Stand-in for torch's CUDA header, absent from CPU builds of torch: just enough
// for a syntax check of csrc/cuda/<family>_bindings.cpp (tests/test_cuda_sources.py).
#pragma once
#include <cuda_runtime_api.h>
namespace at {
namespace cuda {
struct CUDAStreamStub {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStreamStub getCurrentCUDAStream() { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp properties{};
  return &properties;
}
}  // namespace cuda
}  // namespace at
