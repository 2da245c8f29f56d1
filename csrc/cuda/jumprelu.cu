// CUDA kernels of the JumpReLU family.
//
// Forward: a block per row walks its columns, writes z where z > threshold (else 0)
// and counts those entries; the block's count is an integer sum (exact in any order).
// Backward: blocks over (32 columns, a split of the rows) write z's gradient and
// partial sums of the threshold's, K (threshold * grad_out + grad_l0) with K = 1 where
// |z - threshold| < bandwidth / 2; one thread per column then adds the splits in
// order and scales by -1 / bandwidth: the same bits on every run.

#include "common.cuh"
#include "jumprelu.h"

namespace aefast {
namespace cuda {
namespace {

constexpr int kWarp = kColumnWarp;
constexpr int kRowThreads = 256;  // forward: threads of a row's block
constexpr int kRowLanes = 8;      // backward: blocks of kWarp columns x kRowLanes rows
constexpr int kFinishThreads = 256;

template <typename T>
__global__ void jumprelu_rows_kernel(const T* __restrict__ z, const T* __restrict__ threshold, T* __restrict__ out,
                                     acc_t<T>* __restrict__ l0, int64_t L) {
  __shared__ int warp_counts[kRowThreads / kWarp];
  const int64_t row = blockIdx.x;
  const T* zr = z + row * L;
  T* outr = out + row * L;
  int count = 0;
  for (int64_t j = threadIdx.x; j < L; j += kRowThreads) {
    const bool on = to_acc(zr[j]) > to_acc(threshold[j]);
    outr[j] = on ? zr[j] : from_acc<T>(0);
    count += on;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) count += __shfl_down_sync(0xffffffffu, count, offset);
  if (threadIdx.x % kWarp == 0) warp_counts[threadIdx.x / kWarp] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kRowThreads / kWarp; ++w) total += warp_counts[w];
    l0[row] = static_cast<acc_t<T>>(total);
  }
}

template <typename T>
__global__ void jumprelu_grad_kernel(const T* __restrict__ grad_out, const acc_t<T>* __restrict__ grad_l0,
                                     const T* __restrict__ z, const T* __restrict__ threshold,
                                     T* __restrict__ grad_z, acc_t<T>* __restrict__ partial, int64_t B, int64_t L,
                                     int64_t rows_per_split, acc_t<T> half_width) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t last = min(B, first + rows_per_split);
  A acc = 0;
  if (col < L) {
    const A t = to_acc(threshold[col]);
    for (int64_t r = first + threadIdx.y; r < last; r += kRowLanes) {
      const int64_t at = r * L + col;
      const A zv = to_acc(z[at]);
      grad_z[at] = zv > t ? grad_out[at] : from_acc<T>(0);
      const A gap = zv - t;
      if (gap < half_width && gap > -half_width) acc += t * to_acc(grad_out[at]) + grad_l0[r];
    }
  }
  const A total = sum_over_lanes<kRowLanes>(acc);
  if (threadIdx.y == 0 && col < L) partial[static_cast<int64_t>(blockIdx.y) * L + col] = total;
}

template <typename T>
__global__ void threshold_grad_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ grad_threshold,
                                      int64_t splits, int64_t L, double scale) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kFinishThreads + threadIdx.x;
  if (col >= L) return;
  acc_t<T> s = 0;
  for (int64_t k = 0; k < splits; ++k) s += partial[k * L + col];
  grad_threshold[col] = from_acc<T>(static_cast<acc_t<T>>(s * scale));
}

}  // namespace

int64_t jumprelu_splits(int64_t B, int64_t L, int sms) { return column_sum_splits(B, L, sms); }

cudaError_t jumprelu_forward(const void* z, const void* threshold, void* out, void* l0, DType dtype, int64_t B,
                             int64_t L, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    jumprelu_rows_kernel<T><<<grid_of(B), kRowThreads, 0, stream>>>(
        static_cast<const T*>(z), static_cast<const T*>(threshold), static_cast<T*>(out),
        static_cast<acc_t<T>*>(l0), L);
  });
}

cudaError_t jumprelu_backward(const void* grad_out, const void* grad_l0, const void* z, const void* threshold,
                              void* grad_z, void* partial, void* grad_threshold, DType dtype, int64_t B, int64_t L,
                              double bandwidth, int64_t splits, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const dim3 block(kWarp, kRowLanes);
    jumprelu_grad_kernel<T><<<grid_of(ceil_div(L, kWarp), splits), block, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const A*>(grad_l0), static_cast<const T*>(z),
        static_cast<const T*>(threshold), static_cast<T*>(grad_z), static_cast<A*>(partial), B, L,
        rows_per_split(B, splits), static_cast<A>(bandwidth / 2));
    threshold_grad_kernel<T><<<grid_of(ceil_div(L, kFinishThreads)), kFinishThreads, 0, stream>>>(
        static_cast<const A*>(partial), static_cast<T*>(grad_threshold), splits, L, -1.0 / bandwidth);
  });
}

}  // namespace cuda
}  // namespace aefast
