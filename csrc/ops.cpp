// The Python module aefast._C. The operators' schemas are declared once, in Python,
// with their fake and autograd (aefast/ops/<family>.py, `kernel(...)`); the C++
// kernels are registered for them per dispatch key: csrc/cpu/<family>.cpp for CPU,
// csrc/cuda/<family>_bindings.cpp for CUDA.
#include <torch/extension.h>

#include "cpu/common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aefast compiled kernels; the operators live under torch.ops.aefast";
  m.def("cuda_kernels_built", [] {
#ifdef AEFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // The instruction set the hand-written CPU paths run with here: the widest the CPU
  // has, narrowed by AEFAST_SIMD (what a benchmark's figures depend on).
  m.def("cpu_simd", [] {
    switch (aefast::cpu::simd_level()) {
#if defined(AEFAST_EMULATE_AVX512)
      case aefast::cpu::Simd::kAvx512: return "avx512-emulated";  // a test build (avx512_emulation.h)
#else
      case aefast::cpu::Simd::kAvx512: return "avx512";
#endif
      case aefast::cpu::Simd::kAvx2: return "avx2";
      default: return "none";
    }
  });
}
