// CUDA kernels of the sparse-KL family. Column statistics are taken in two
// deterministic stages: blocks over (32 columns, a split of the rows) write partial
// sums, then one block adds the splits in order and forms the penalty. The
// per-element math is csrc/include/aefast/kl_math.h, shared with the CPU kernels.
#include <algorithm>

#include "aefast/kl_math.h"
#include "common.cuh"
#include "kl.h"

namespace aefast {
namespace cuda {
namespace {

namespace m = aefast::math;

constexpr int kWarp = kColumnWarp;
constexpr int kRowLanes = 8;       // column-sum blocks are kWarp columns x kRowLanes rows
constexpr int kFinishThreads = 256;
constexpr int kColumnThreads = 256;  // elementwise kernels: one thread per column, rows looped

enum class Sum { kX, kSigmoid, kContractive };

// partial[split, j] = sum over the split's rows of f(x[i, j]); kSigmoid also writes h.
template <typename T, Sum WHAT>
__global__ void column_partial_sums_kernel(const T* __restrict__ x, T* __restrict__ h,
                                           acc_t<T>* __restrict__ partial, int64_t B, int64_t H,
                                           int64_t rows_per_split) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t last = min(B, first + rows_per_split);
  A acc = 0;
  if (col < H) {
    for (int64_t r = first + threadIdx.y; r < last; r += kRowLanes) {
      const int64_t at = r * H + col;
      A v = to_acc(x[at]);
      if (WHAT == Sum::kSigmoid) {
        const T hv = from_acc<T>(m::sigmoid(v));
        h[at] = hv;
        v = to_acc(hv);  // rho_hat is the mean of the h returned
      } else if (WHAT == Sum::kContractive) {
        v = m::contractive_term(v);
      }
      acc += v;
    }
  }
  const A total = sum_over_lanes<kRowLanes>(acc);
  if (threadIdx.y == 0 && col < H) partial[static_cast<int64_t>(blockIdx.y) * H + col] = total;
}

template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kFinishThreads / kWarp];
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = v;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kFinishThreads / kWarp; ++w) total += warp_sums[w];
  return total;  // valid in thread 0
}

// One block: rho_hat = (sum of the splits) / B, penalty = beta * sum_j KL(rho || clamp(rho_hat_j)).
template <typename T>
__global__ void kl_penalty_kernel(const acc_t<T>* __restrict__ partial, int64_t splits, int64_t B,
                                  int64_t H, acc_t<T> rho, acc_t<T> beta, acc_t<T> eps,
                                  acc_t<T>* __restrict__ rho_hat, T* __restrict__ penalty) {
  using A = acc_t<T>;
  A kl = 0;
  for (int64_t j = threadIdx.x; j < H; j += kFinishThreads) {
    A s = 0;
    for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * H + j];
    const A mean = s / static_cast<A>(B);
    rho_hat[j] = mean;
    kl += m::kl_bernoulli(rho, m::clamp_rho_hat(mean, eps));
  }
  const A total = block_sum(kl);
  if (threadIdx.x == 0) *penalty = from_acc<T>(beta * total);
}

// One block: s2 and w2 from their partial sums, penalty = sum_j s2_j w2_j.
template <typename T>
__global__ void contractive_penalty_kernel(const acc_t<T>* __restrict__ s2_partial, int64_t splits,
                                           const acc_t<T>* __restrict__ w2_rows, int64_t H,
                                           acc_t<T>* __restrict__ s2, acc_t<T>* __restrict__ w2,
                                           T* __restrict__ penalty) {
  using A = acc_t<T>;
  A dot = 0;
  for (int64_t j = threadIdx.x; j < H; j += kFinishThreads) {
    A s = 0;
    for (int64_t sp = 0; sp < splits; ++sp) s += s2_partial[sp * H + j];
    s2[j] = s;
    w2[j] = w2_rows[j];
    dot += s * w2_rows[j];
  }
  const A total = block_sum(dot);
  if (threadIdx.x == 0) *penalty = from_acc<T>(total);
}

// w2[j] = sum_d W[j, d]^2: one warp per row of the weight.
template <typename T>
__global__ void row_square_sums_kernel(const T* __restrict__ w, int64_t H, int64_t D,
                                       acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (row >= H) return;
  const int lane = threadIdx.x % kWarp;
  A s = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const A v = to_acc(w[row * D + d]);
    s += v * v;
  }
  for (int o = kWarp / 2; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  if (lane == 0) out[row] = s;
}

// Elementwise kernels: a thread owns a column and walks a stride of rows, so the
// per-column factor is computed once.
template <typename T>
__global__ void kl_grad_broadcast_kernel(const T* __restrict__ grad_penalty,
                                         const acc_t<T>* __restrict__ rho_hat, T* __restrict__ out,
                                         int64_t B, int64_t H, acc_t<T> rho, acc_t<T> beta_over_b,
                                         acc_t<T> eps) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (col >= H) return;
  const T c = from_acc<T>(to_acc(*grad_penalty) * beta_over_b * m::kl_bernoulli_grad(rho, rho_hat[col], eps));
  for (int64_t r = blockIdx.y; r < B; r += gridDim.y) out[r * H + col] = c;
}

template <typename T>
__global__ void sigmoid_kl_grad_kernel(const T* __restrict__ grad_h, const T* __restrict__ h,
                                       const T* __restrict__ grad_penalty,
                                       const acc_t<T>* __restrict__ rho_hat, T* __restrict__ grad_z,
                                       int64_t B, int64_t H, acc_t<T> rho, acc_t<T> beta_over_b,
                                       acc_t<T> eps) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (col >= H) return;
  const A c = to_acc(*grad_penalty) * beta_over_b * m::kl_bernoulli_grad(rho, rho_hat[col], eps);
  for (int64_t r = blockIdx.y; r < B; r += gridDim.y) {
    const int64_t at = r * H + col;
    grad_z[at] = from_acc<T>((to_acc(grad_h[at]) + c) * m::sigmoid_grad(to_acc(h[at])));
  }
}

template <typename T>
__global__ void contractive_grad_h_kernel(const T* __restrict__ h, const T* __restrict__ grad_penalty,
                                          const acc_t<T>* __restrict__ w2, T* __restrict__ grad_h,
                                          int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (col >= H) return;
  const A v = to_acc(*grad_penalty) * w2[col];
  for (int64_t r = blockIdx.y; r < B; r += gridDim.y) {
    const int64_t at = r * H + col;
    grad_h[at] = from_acc<T>(m::contractive_term_grad(to_acc(h[at])) * v);
  }
}

// grad_W[j, d] = 2 g s2_j W[j, d]: a thread owns a column d of the weight.
template <typename T>
__global__ void contractive_grad_weight_kernel(const T* __restrict__ w,
                                               const T* __restrict__ grad_penalty,
                                               const acc_t<T>* __restrict__ s2,
                                               T* __restrict__ grad_w, int64_t H, int64_t D) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (col >= D) return;
  const A g2 = A(2) * to_acc(*grad_penalty);
  for (int64_t r = blockIdx.y; r < H; r += gridDim.y) {
    const int64_t at = r * D + col;
    grad_w[at] = from_acc<T>(to_acc(w[at]) * g2 * s2[r]);
  }
}

dim3 column_grid(int64_t rows, int64_t cols) {
  return grid_of(ceil_div(cols, kColumnThreads), std::min<int64_t>(std::max<int64_t>(rows, 1), 4096));
}

}  // namespace

int64_t column_splits(int64_t B, int64_t H, int sms) { return column_sum_splits(B, H, sms); }

cudaError_t kl_sparsity_forward(const void* a, DType dtype, int64_t B, int64_t H, double rho,
                                double beta, double eps, int64_t splits, void* partial, void* rho_hat,
                                void* penalty, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const dim3 grid = grid_of(ceil_div(H, kWarp), splits);
    column_partial_sums_kernel<T, Sum::kX><<<grid, dim3(kWarp, kRowLanes), 0, stream>>>(
        static_cast<const T*>(a), nullptr, static_cast<A*>(partial), B, H, rows_per_split(B, splits));
    kl_penalty_kernel<T><<<1, kFinishThreads, 0, stream>>>(
        static_cast<const A*>(partial), splits, B, H, A(rho), A(beta), A(eps), static_cast<A*>(rho_hat),
        static_cast<T*>(penalty));
  });
}

cudaError_t kl_sparsity_backward(const void* grad_penalty, const void* rho_hat, void* grad_a,
                                 DType dtype, int64_t B, int64_t H, double rho, double beta,
                                 double eps, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    kl_grad_broadcast_kernel<T><<<column_grid(B, H), kColumnThreads, 0, stream>>>(
        static_cast<const T*>(grad_penalty), static_cast<const A*>(rho_hat), static_cast<T*>(grad_a),
        B, H, A(rho), A(beta / static_cast<double>(B)), A(eps));
  });
}

cudaError_t sigmoid_kl_sparsity_forward(const void* z, void* h, DType dtype, int64_t B, int64_t H,
                                        double rho, double beta, double eps, int64_t splits, void* partial,
                                        void* rho_hat, void* penalty, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const dim3 grid = grid_of(ceil_div(H, kWarp), splits);
    column_partial_sums_kernel<T, Sum::kSigmoid><<<grid, dim3(kWarp, kRowLanes), 0, stream>>>(
        static_cast<const T*>(z), static_cast<T*>(h), static_cast<A*>(partial), B, H,
        rows_per_split(B, splits));
    kl_penalty_kernel<T><<<1, kFinishThreads, 0, stream>>>(
        static_cast<const A*>(partial), splits, B, H, A(rho), A(beta), A(eps), static_cast<A*>(rho_hat),
        static_cast<T*>(penalty));
  });
}

cudaError_t sigmoid_kl_sparsity_backward(const void* grad_h, const void* grad_penalty,
                                         const void* h, const void* rho_hat, void* grad_z,
                                         DType dtype, int64_t B, int64_t H, double rho,
                                         double beta, double eps, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    sigmoid_kl_grad_kernel<T><<<column_grid(B, H), kColumnThreads, 0, stream>>>(
        static_cast<const T*>(grad_h), static_cast<const T*>(h), static_cast<const T*>(grad_penalty),
        static_cast<const A*>(rho_hat), static_cast<T*>(grad_z), B, H, A(rho),
        A(beta / static_cast<double>(B)), A(eps));
  });
}

cudaError_t contractive_penalty_forward(const void* h, const void* weight, DType dtype, int64_t B,
                                        int64_t H, int64_t D, int64_t h_splits, void* partial,
                                        void* s2, void* w2, void* penalty, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* s2_partial = static_cast<A*>(partial);
    A* w2_rows = s2_partial + h_splits * H;
    const dim3 grid = grid_of(ceil_div(H, kWarp), h_splits);
    column_partial_sums_kernel<T, Sum::kContractive><<<grid, dim3(kWarp, kRowLanes), 0, stream>>>(
        static_cast<const T*>(h), nullptr, s2_partial, B, H, rows_per_split(B, h_splits));
    constexpr int kRowsPerBlock = 8;
    row_square_sums_kernel<T><<<grid_of(ceil_div(H, kRowsPerBlock)), kRowsPerBlock * kWarp, 0,
                                stream>>>(static_cast<const T*>(weight), H, D, w2_rows);
    contractive_penalty_kernel<T><<<1, kFinishThreads, 0, stream>>>(
        s2_partial, h_splits, w2_rows, H, static_cast<A*>(s2), static_cast<A*>(w2),
        static_cast<T*>(penalty));
  });
}

cudaError_t contractive_penalty_backward(const void* grad_penalty, const void* h,
                                         const void* weight, const void* s2, const void* w2,
                                         void* grad_h, void* grad_weight, DType dtype, int64_t B,
                                         int64_t H, int64_t D, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* g = static_cast<const T*>(grad_penalty);
    contractive_grad_h_kernel<T><<<column_grid(B, H), kColumnThreads, 0, stream>>>(
        static_cast<const T*>(h), g, static_cast<const A*>(w2), static_cast<T*>(grad_h), B, H);
    contractive_grad_weight_kernel<T><<<column_grid(H, D), kColumnThreads, 0, stream>>>(
        static_cast<const T*>(weight), g, static_cast<const A*>(s2), static_cast<T*>(grad_weight), H,
        D);
  });
}

}  // namespace cuda
}  // namespace aefast
