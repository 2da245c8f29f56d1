// Argument checks of the noise-injection operators, shared by their CPU
// (csrc/cpu/noise.cpp) and CUDA (csrc/cuda/noise_bindings.cpp) registrations.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "aefast/philox.h"

namespace aefast {
namespace noise_args {

inline int parse_kind(c10::string_view kind) {
  const char* names[] = {"gaussian", "masking", "salt_pepper", "dropout"};
  for (int k = 0; k < 4; ++k)
    if (kind == names[k]) return k;
  TORCH_CHECK_VALUE(false, "kind must be one of gaussian, masking, salt_pepper, dropout; got '",
                    std::string(kind), "'");
  return -1;
}

inline void check_level(int kind, double level) {
  if (kind == noise::kGaussian) {
    TORCH_CHECK_VALUE(level >= 0.0, "level (the noise scale) must be >= 0, got ", level);
  } else {
    TORCH_CHECK_VALUE(level >= 0.0 && level <= 1.0, "level (a fraction) must be in [0, 1], got ", level);
    TORCH_CHECK_VALUE(kind != noise::kDropout || level < 1.0, "dropout level must be < 1, got ", level);
  }
}

// 1 / (1 - level) for dropout's survivors, 1 otherwise.
inline double survivor_scale(int kind, double level) {
  return kind == noise::kDropout ? 1.0 / (1.0 - level) : 1.0;
}

inline void check_seed(const at::Tensor& seed, const at::Tensor& like) {
  TORCH_CHECK_VALUE(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device() == like.device(),
                    "seed must be a 0-dim int64 tensor on ", like.device(), ", got ", seed.scalar_type(),
                    " of shape ", seed.sizes(), " on ", seed.device());
}

inline void check_gaussian_params(const at::Tensor& mu, const at::Tensor& logvar) {
  TORCH_CHECK_VALUE(mu.dim() == 2, "mu must be 2-D (B, Z), got ", mu.dim(), "-D");
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar must have mu's shape ", mu.sizes(), ", got ",
                    logvar.sizes());
  TORCH_CHECK_VALUE(logvar.scalar_type() == mu.scalar_type(), "logvar must have mu's dtype");
}

}  // namespace noise_args
}  // namespace aefast
