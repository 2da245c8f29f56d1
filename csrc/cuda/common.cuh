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

// Column sums over a (B, H) matrix in two deterministic stages (kl, jumprelu): blocks of
// kWarp columns x kLanes rows write one partial sum per column and split of the rows,
// then the splits are added in order.
constexpr int kColumnWarp = 32;

inline int64_t rows_per_split(int64_t B, int64_t splits) { return ceil_div(B, splits); }

// How many splits: about 8 blocks per multiprocessor in all, at least 64 rows a split,
// within the grid's y limit; a pure function of the sizes (planning is tested without a GPU).
inline int64_t column_sum_splits(int64_t B, int64_t H, int sms) {
  const int64_t col_blocks = ceil_div(H, kColumnWarp);
  const int64_t want = ceil_div(8LL * (sms > 1 ? sms : 1), col_blocks);
  const int64_t most = B > 64 ? ceil_div(B, 64) : 1;
  int64_t splits = want < most ? want : most;
  splits = splits < 65535 ? splits : 65535;
  return ceil_div(B, rows_per_split(B, splits > 1 ? splits : 1));
}

// A block's per-thread values summed over threadIdx.y (its kLanes rows of threads):
// the total of each column, for the threads of row 0 (0 elsewhere).
template <int kLanes, typename A>
__device__ A sum_over_lanes(A value) {
  __shared__ A lanes[kLanes][kColumnWarp + 1];
  lanes[threadIdx.y][threadIdx.x] = value;
  __syncthreads();
  A total = 0;
  if (threadIdx.y == 0) {
    for (int k = 0; k < kLanes; ++k) total += lanes[k][threadIdx.x];
  }
  return total;
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
