// Run-time CPU dispatch for the hot loops: the compiler emits an AVX-512, an
// AVX2+FMA and a baseline copy of each function marked AEFAST_SIMD_CLONES and the
// loader picks one for the CPU at hand, so a build runs on any x86-64 (never
// -march=native) yet uses the widest vectors there.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AEFAST_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AEFAST_SIMD_CLONES
#endif
