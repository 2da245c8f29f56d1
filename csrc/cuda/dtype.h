// The element types the CUDA launchers take (no torch headers in csrc/cuda/*.cu).
#pragma once

namespace aefast {
namespace cuda {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace cuda
}  // namespace aefast
