// CUDA sparse decoder. Forward: a block per (row, slice of D), each thread one
// output column summing its k terms in slot order. Values gradient: a warp per
// (row, slot), a dot product of grad_out's row and the weight row reduced in a
// fixed shuffle order. Weight gradient: a block per (latent, slice of D) summing
// the latent's (row, slot) pairs in their sorted order. No atomics anywhere: the
// same bits on every run. T: the values' (and output's, output gradient's) type; W:
// the weight's and its gradient's, T itself or float32 under 16-bit values (mixed
// precision: no cast of the whole weight, sums in float32 either way).
#include <algorithm>
#include <limits>

#include "common.cuh"
#include "decode.h"

namespace aefast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kColumns = 4;  // the gradient kernels' columns (or partial sums) per thread

// An index out of [0, L) reads nothing: its outputs are NaN (no host check stalls a call).
__device__ __forceinline__ bool in_range(int64_t latent, int64_t L) { return latent >= 0 && latent < L; }

template <typename A>
__device__ __forceinline__ A nan_of() {
  return std::numeric_limits<A>::quiet_NaN();
}

template <typename T, typename W>
__global__ void decode_forward_kernel(const T* __restrict__ values, const int64_t* __restrict__ indices,
                                      const W* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out,
                                      int64_t K, int64_t L, int64_t D) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (d >= D) return;
  A acc = bias != nullptr ? to_acc(bias[d]) : A(0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = row * K + k;
    const int64_t latent = indices[e];
    const A w = in_range(latent, L) ? to_acc(weight[latent * D + d]) : nan_of<A>();
    acc += to_acc(values[e]) * w;
  }
  out[row * D + d] = from_acc<T>(acc);
}

template <typename T, typename W>
__global__ void decode_values_grad_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ indices,
                                          const W* __restrict__ weight, T* __restrict__ grad_values, int64_t pairs,
                                          int64_t K, int64_t L, int64_t D) {
  using A = acc_t<T>;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (e >= pairs) return;  // whole warps leave together: e is the same across a warp
  const T* g = grad_out + (e / K) * D;
  const int64_t latent = indices[e];
  const bool valid = in_range(latent, L);  // the same across the warp
  const W* w = weight + (valid ? latent : 0) * D;
  // kColumns partial sums per lane: that many loads of each row in flight, not one.
  A part[kColumns] = {};
  int64_t d = lane;
  for (; valid && d + (kColumns - 1) * kWarp < D; d += kColumns * kWarp) {
#pragma unroll
    for (int c = 0; c < kColumns; ++c) part[c] += to_acc(g[d + c * kWarp]) * to_acc(w[d + c * kWarp]);
  }
  for (int c = 0; valid && c < kColumns && d < D; d += kWarp, ++c) part[c] += to_acc(g[d]) * to_acc(w[d]);
  A acc = valid ? A(0) : nan_of<A>();
#pragma unroll
  for (int c = 0; c < kColumns; ++c) acc += part[c];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) grad_values[e] = from_acc<T>(acc);
}

template <typename T, typename W>
__global__ void decode_weight_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ values,
                                          const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                                          W* __restrict__ grad_weight, int64_t K, int64_t D) {
  using A = acc_t<T>;
  const int64_t latent = blockIdx.x;
  // kColumns columns per thread, kThreads apart: each pair's value and row offset are
  // read once for all of them, and that many loads of its row are in flight.
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kThreads * kColumns + threadIdx.x;
  A acc[kColumns] = {};
  for (int64_t i = starts[latent]; i < starts[latent + 1]; ++i) {
    const int64_t e = order[i];
    const A v = to_acc(values[e]);
    const T* g = grad_out + (e / K) * D;
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      const int64_t d = d0 + c * kThreads;
      if (d < D) acc[c] += v * to_acc(g[d]);
    }
  }
#pragma unroll
  for (int c = 0; c < kColumns; ++c) {
    const int64_t d = d0 + c * kThreads;
    if (d < D) grad_weight[latent * D + d] = from_acc<W>(acc[c]);
  }
}

// Calls fn(T{}, W{}): T the values' element type, W the weight's (T, or float32 beside
// 16-bit values); any other pair is refused.
template <typename Fn>
cudaError_t dispatch_with_weight(DType dtype, DType weight_dtype, Fn&& fn) {
  if (weight_dtype == dtype) return dispatch(dtype, [&](auto tag) { fn(tag, tag); });
  if (weight_dtype != DType::kFloat32 || (dtype != DType::kFloat16 && dtype != DType::kBFloat16))
    return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) { fn(tag, float{}); });
}

dim3 rows_by_columns(int64_t rows, int64_t D, int64_t columns_per_thread = 1) {
  return grid_of(rows, ceil_div(D, kThreads * columns_per_thread));
}

}  // namespace

cudaError_t sparse_decode_forward(const void* values, const int64_t* indices, const void* weight, const void* bias,
                                  void* out, DType dtype, DType weight_dtype, int64_t B, int64_t K, int64_t L,
                                  int64_t D, cudaStream_t stream) {
  if (B == 0 || D == 0) return cudaSuccess;
  return dispatch_with_weight(dtype, weight_dtype, [&](auto tag, auto weight_tag) {
    using T = decltype(tag);
    using W = decltype(weight_tag);
    decode_forward_kernel<T, W><<<rows_by_columns(B, D), kThreads, 0, stream>>>(
        static_cast<const T*>(values), indices, static_cast<const W*>(weight), static_cast<const T*>(bias),
        static_cast<T*>(out), K, L, D);
  });
}

cudaError_t sparse_decode_backward(const void* grad_out, const void* values, const int64_t* indices,
                                   const void* weight, const int64_t* order, const int64_t* starts, void* grad_values,
                                   void* grad_weight, DType dtype, DType weight_dtype, int64_t B, int64_t K,
                                   int64_t L, int64_t D, cudaStream_t stream) {
  return dispatch_with_weight(dtype, weight_dtype, [&](auto tag, auto weight_tag) {
    using T = decltype(tag);
    using W = decltype(weight_tag);
    const int64_t pairs = B * K;
    if (pairs > 0 && grad_values != nullptr) {
      const int64_t blocks = ceil_div(pairs * kWarp, kThreads);
      decode_values_grad_kernel<T, W><<<grid_of(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(grad_out), indices, static_cast<const W*>(weight), static_cast<T*>(grad_values), pairs,
          K, L, D);
    }
    if (L > 0 && D > 0) {
      decode_weight_grad_kernel<T, W><<<rows_by_columns(L, D, kColumns), kThreads, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(values), order, starts,
          static_cast<W*>(grad_weight), K, D);
    }
  });
}

}  // namespace cuda
}  // namespace aefast
