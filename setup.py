"""Builds aefast._C: the C++ CPU kernels always, the CUDA kernels too when torch is
a CUDA build and nvcc is found (set AEFAST_NO_CUDA=1 to skip them)."""

import glob
import os
import pathlib
import re
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _compiler_is_gcc():
    """Whether the C++ compiler the build uses (CXX, else c++) is GCC: -fno-ipa-ra is its flag."""
    try:
        version = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "clang" not in version.lower() and "free software foundation" in version.lower()


def _extension():
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    # -fno-trapping-math lets GCC vectorize the clamps (selects) in the per-element math;
    # it changes no result, only the assumption that FP exceptions are observed;
    # -fno-math-errno lets it use the sqrt instruction (no errno write) in vector loops.
    # -fopenmp: at::parallel_for is a header template whose `omp parallel` is compiled
    # here; without it the CPU kernels run on one thread. torch already loaded
    # libgomp.so.1, so the extension shares torch's OpenMP thread pool.
    # -fno-ipa-ra: with interprocedural register allocation GCC keeps a ymm register live
    # across a call to a function of this library that it knows leaves it alone, so it
    # cannot put the vzeroupper before the call, and the callee's SSE code (the default
    # target) runs with the upper halves dirty: on the AMD EPYC such a call from an AVX2
    # loop took 115 ns instead of 4.5 (see csrc/cpu/common.h at AEFAST_AVX2).
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
    if _compiler_is_gcc():
        cxx_flags.append("-fno-ipa-ra")
    link_flags = ["-fopenmp"]
    if os.environ.get("AEFAST_EMULATE_AVX512", "0") == "1":
        # A test build (tests/test_topk.py): the AVX-512 paths emulated with SIMDe on an
        # AVX2 CPU (csrc/cpu/avx512_emulation.h). Only the sources with AVX-512 paths,
        # hand-written or chosen by simd_level() (the other families' operators have no
        # CPU kernel in it), at -O1 without debug
        # information: 2 minutes of compiling where a full -O3 build took 5 (its speed
        # is of no matter; -O1 changes no result: no fast-math, no contraction in C++20).
        print("aefast: building the C++ CPU kernels with AVX-512 emulated (a test build)")
        with_avx512 = [s for s in sources if s.startswith("csrc/cpu/")
                       and re.search(r"AEFAST_AVX512|Simd::kAvx512", pathlib.Path(ROOT, s).read_text())]
        return CppExtension(
            "aefast._C",
            ["csrc/ops.cpp"] + with_avx512,
            include_dirs=include_dirs,
            define_macros=[("AEFAST_EMULATE_AVX512", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-O1", "-g0", "-mavx2", "-mfma", "-mf16c", "-mpopcnt",
                                                    "-Wno-psabi"]},
            extra_link_args=link_flags,
        )
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("AEFAST_NO_CUDA", "0") != "1"
    )
    if not with_cuda:
        why = (
            "AEFAST_NO_CUDA=1"
            if os.environ.get("AEFAST_NO_CUDA", "0") == "1"
            else "torch is a CPU-only build"
            if torch.version.cuda is None
            else "nvcc (CUDA_HOME) not found"
        )
        print(f"aefast: CUDA kernels skipped ({why}); building the C++ CPU kernels only")
        return CppExtension(
            "aefast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"aefast: building the C++ CPU kernels and the CUDA kernels (CUDA_HOME={CUDA_HOME})")
    return CUDAExtension(
        "aefast._C",
        sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_bindings.cpp"),
        include_dirs=include_dirs,
        define_macros=[("AEFAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
