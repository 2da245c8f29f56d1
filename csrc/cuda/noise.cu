// CUDA kernels of the noise-injection family. The generator and the per-element
// corruption are csrc/include/aefast/philox.h, shared with the CPU kernels; the
// element's logical index keys its random numbers, so results do not depend on
// the launch configuration. The KL sum of reparameterize is reduced in two fixed
// stages (per block, then the blocks in order): deterministic.
#include <algorithm>

#include "aefast/philox.h"
#include "common.cuh"
#include "noise.h"

namespace aefast {
namespace cuda {
namespace {

namespace nz = aefast::noise;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops beyond

// One thread per Philox counter: four consecutive elements.
constexpr int kPer = nz::kDrawsPerCounter;

int64_t blocks_for(int64_t n) {
  return std::min<int64_t>(std::max<int64_t>(ceil_div(ceil_div(n, kPer), kThreads), 1), kMaxBlocks);
}

// Grid-stride loop over the Philox counters of n elements: fn(i, draw) for every
// element i below n, with its draw (a normal when kNormal, else a uniform).
template <bool kNormal, typename Fn>
__device__ __forceinline__ void for_each_draw(uint64_t seed, int64_t n, Fn&& fn) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < ceil_div(n, kPer);
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    float d[kPer];
    nz::draws<kNormal>(seed, static_cast<uint64_t>(c), d);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t i = c * kPer + j;
      if (i < n) fn(i, d[j]);
    }
  }
}

template <typename T, int KIND>
__global__ void corrupt_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n, float level,
                               acc_t<T> scale, acc_t<T> low, acc_t<T> high, const int64_t* __restrict__ seed_ptr) {
  for_each_draw<KIND == nz::kGaussian>(static_cast<uint64_t>(*seed_ptr), n, [&](int64_t i, float draw) {
    out[i] = from_acc<T>(nz::corrupt_element<KIND, acc_t<T>>(to_acc(x[i]), draw, level, scale, low, high));
  });
}

// Block sum in a fixed tree order.
template <typename A>
__device__ A block_sum(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

template <typename T>
__global__ void reparameterize_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, T* __restrict__ z,
                                      acc_t<T>* __restrict__ partial, int64_t n,
                                      const int64_t* __restrict__ seed_ptr) {
  using A = acc_t<T>;
  __shared__ A shared[kThreads];
  A terms = 0;
  for_each_draw<true>(static_cast<uint64_t>(*seed_ptr), n, [&](int64_t i, float eps) {
    const A m = to_acc(mu[i]), lv = to_acc(logvar[i]);
    const A sd = nz::std_from_logvar(lv);
    z[i] = from_acc<T>(m + static_cast<A>(eps) * sd);
    terms += A(1) + lv - m * m - sd * sd;
  });
  const A total = block_sum(terms, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <typename T>
__global__ void kl_finish_kernel(const acc_t<T>* __restrict__ partial, int64_t blocks, int64_t batch,
                                 T* __restrict__ kl) {
  using A = acc_t<T>;
  __shared__ A shared[kThreads];
  A v = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) v += partial[b];
  const A total = block_sum(v, shared);
  if (threadIdx.x == 0) *kl = from_acc<T>(A(-0.5) * total / static_cast<A>(batch));
}

template <typename T>
__global__ void reparameterize_backward_kernel(const T* __restrict__ grad_z, const T* __restrict__ grad_kl,
                                               const T* __restrict__ mu, const T* __restrict__ logvar,
                                               T* __restrict__ grad_mu, T* __restrict__ grad_logvar, int64_t batch,
                                               int64_t n, const int64_t* __restrict__ seed_ptr) {
  using A = acc_t<T>;
  const A gkl = to_acc(*grad_kl) / static_cast<A>(batch);
  for_each_draw<true>(static_cast<uint64_t>(*seed_ptr), n, [&](int64_t i, float eps) {
    const A g = to_acc(grad_z[i]), lv = to_acc(logvar[i]);
    const A sd = nz::std_from_logvar(lv);
    grad_mu[i] = from_acc<T>(g + gkl * to_acc(mu[i]));
    grad_logvar[i] = from_acc<T>(A(0.5) * (g * static_cast<A>(eps) * sd + gkl * (sd * sd - A(1))));
  });
}

}  // namespace

cudaError_t corrupt(const void* x, void* out, DType dtype, int64_t n, int kind, float level, double scale,
                    double low, double high, const int64_t* seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto launch = [&](auto kernel) {
      kernel<<<grid_of(blocks_for(n)), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<T*>(out), n, level, A(scale), A(low), A(high), seed);
    };
    switch (kind) {
      case nz::kGaussian: launch(corrupt_kernel<T, nz::kGaussian>); break;
      case nz::kMasking: launch(corrupt_kernel<T, nz::kMasking>); break;
      case nz::kSaltPepper: launch(corrupt_kernel<T, nz::kSaltPepper>); break;
      default: launch(corrupt_kernel<T, nz::kDropout>); break;
    }
  });
}

int64_t reparameterize_blocks(int64_t n) { return blocks_for(n); }

cudaError_t reparameterize_forward(const void* mu, const void* logvar, void* z, void* partial, void* kl,
                                   DType dtype, int64_t batch, int64_t n, const int64_t* seed,
                                   cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t blocks = blocks_for(n);
    reparameterize_kernel<T><<<grid_of(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(mu), static_cast<const T*>(logvar), static_cast<T*>(z), static_cast<A*>(partial), n,
        seed);
    kl_finish_kernel<T><<<1, kThreads, 0, stream>>>(static_cast<const A*>(partial), blocks, batch,
                                                    static_cast<T*>(kl));
  });
}

cudaError_t reparameterize_backward(const void* grad_z, const void* grad_kl, const void* mu, const void* logvar,
                                    void* grad_mu, void* grad_logvar, DType dtype, int64_t batch, int64_t n,
                                    const int64_t* seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    reparameterize_backward_kernel<T><<<grid_of(blocks_for(n)), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_z), static_cast<const T*>(grad_kl), static_cast<const T*>(mu),
        static_cast<const T*>(logvar), static_cast<T*>(grad_mu), static_cast<T*>(grad_logvar), batch, n, seed);
  });
}

}  // namespace cuda
}  // namespace aefast
