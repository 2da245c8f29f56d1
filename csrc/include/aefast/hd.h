// What the CPU and CUDA code share: the macros that compile a function both as plain
// C++ on a host compiler and as __host__ __device__ code under nvcc, the
// accumulation type, and float <-> bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __CUDACC__
#define AEFAST_HD __host__ __device__ __forceinline__
#else
#define AEFAST_HD inline __attribute__((always_inline))
#endif

namespace aefast {

// The accumulation type of a kernel on T: float64 for float64, float32 for float32
// and the half types (the dtype of the per-unit statistics a forward returns).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace math {

AEFAST_HD float bits_to_float(int32_t bits) {
#ifdef __CUDA_ARCH__
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

AEFAST_HD int32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

}  // namespace math
}  // namespace aefast
