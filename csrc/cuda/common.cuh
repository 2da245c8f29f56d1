// Device-side helpers every CUDA family uses: conversions between storage and
// accumulation types (acc_t, in aefast/hd.h), and the dtype dispatch of a launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "aefast/hd.h"  // acc_t
#include "dtype.h"

namespace aefast {
namespace cuda {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A launch grid from int64 block counts, within CUDA's limits (x < 2^31, y and z <= 65535)
// or else all zeros, which the launch refuses (cudaErrorInvalidConfiguration) where a
// cast to unsigned would silently launch too few blocks.
inline dim3 grid_of(int64_t x, int64_t y = 1, int64_t z = 1) {
  const bool fits = x >= 1 && x <= 0x7FFFFFFF && y >= 1 && y <= 65535 && z >= 1 && z <= 65535;
  return fits ? dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z)) : dim3(0, 0, 0);
}

// Calls fn(T{}) with T the element type of `dtype`; returns the launch status.
template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace aefast
