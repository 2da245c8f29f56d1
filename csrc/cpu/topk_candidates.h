// What the CPU top-k kernels (topk.cpp, topk_index_order.cpp, topk_columns.cpp,
// topk_column_tiles.cpp, topk_radix.cpp) share: a candidate winner, the one order every
// backend selects by, the cut of candidates in index order to the k best, when a dense
// output is written around the caches, and AVX2's left-pack (it has no compress).
#pragma once

#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace aefast {
namespace cpu {

template <typename A>
struct Candidate {
  A value;
  int64_t index;
};

// Integer keys in the values' order: -0.0 takes +0.0's key (the two tie); not for NaN.
inline int32_t order_key(float v) {
  v += 0.0f;  // -0.0 + 0.0 is +0.0
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return i ^ ((i >> 31) & 0x7FFFFFFF);
}

inline int64_t order_key(double v) {
  v += 0.0;
  int64_t i;
  std::memcpy(&i, &v, sizeof i);
  return i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF);
}

// a is better than b: larger value, then lower index.
template <typename A>
inline bool better(const Candidate<A>& a, const Candidate<A>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Per row of x the k largest, in value order (descending, ties to the lower index):
// the CPU kernel of aefast::topk_forward (topk.cpp).
std::tuple<at::Tensor, at::Tensor> topk_forward(const at::Tensor& x, int64_t k, bool relu);

// A selection's dense output is mostly zeros: nothing to compute while its lines are
// read for ownership, unlike the noise family's (kStreamedOutputBytes), so it is written
// around the caches from 8 MiB on. On the Xeon, 16 MiB outputs, alternating: topk_mask
// forward 1.57 -> 1.23 ms and with its backward 3.44 -> 2.77, batch_topk 1.93 -> 1.64 and
// 3.62 -> 3.17, topk_sparse's backward 1.25 -> 0.83, spatial_wta 1.53 -> 1.33 and
// 2.79 -> 2.25. At 8 MiB the same or better but spatial_wta's forward (0.85 -> 0.92,
// its one pass given up); at 4 MiB even; at 1 MiB slower (the L2 keeps it).
constexpr int64_t kStreamedSelectionBytes = int64_t(8) << 20;

// Whether a dense output is written around the caches: float32 of kStreamedSelectionBytes
// or more, on a 32-byte boundary, on a CPU with AVX2 (stream_floats).
inline bool streamed_output(const at::Tensor& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  return out.scalar_type() == at::kFloat && simd_level() >= Simd::kAvx2 && out.nbytes() >= kStreamedSelectionBytes &&
         reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 == 0;
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
// Per 8-bit mask, the positions of its set bits in increasing order, a byte each: AVX2
// has no compress, and a permute by these does one.
inline constexpr auto kSetBits8 = [] {
  std::array<std::array<uint8_t, 8>, 256> positions{};
  for (int m = 0; m < 256; ++m)
    for (int b = 0, c = 0; b < 8; ++b)
      if ((m >> b) & 1) positions[m][c++] = static_cast<uint8_t>(b);
  return positions;
}();

// The permute of 8 lanes that packs those set in `mask` (8 bits) to the front, in order.
AEFAST_AVX2 inline __m256i left_pack_order8(uint32_t mask) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kSetBits8[mask].data())));
}

// The numbers of the lanes set in `mask` (8 bits), + at, into offsets[0, popcount) in
// order; returns how many. Writes all 8 (room needed).
AEFAST_AVX2 inline int64_t left_pack_offsets8(uint32_t mask, int32_t at, int32_t* offsets) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets), _mm256_add_epi32(left_pack_order8(mask), _mm256_set1_epi32(at)));
  return _mm_popcnt_u32(mask);
}

// The same, with v's lanes set in `mask` into values[0, popcount) alongside.
AEFAST_AVX2 inline int64_t left_pack8(__m256 v, uint32_t mask, int32_t at, float* values, int32_t* offsets) {
  _mm256_storeu_ps(values, _mm256_permutevar8x32_ps(v, left_pack_order8(mask)));
  return left_pack_offsets8(mask, at, offsets);
}
#endif

// `found` (candidates in index order, at least k) cut to its k best, still in index order.
template <typename A>
void keep_best_in_index_order(std::vector<Candidate<A>>& found, int64_t k, std::vector<A>& scratch) {
  const int64_t excess = static_cast<int64_t>(found.size()) - k;
  if (excess <= 0) return;
  if (excess <= 8) {  // a few too many: drop the worst, one scan each
    for (int64_t e = 0; e < excess; ++e) {
      auto worst = found.begin();
      for (auto c = found.begin() + 1; c != found.end(); ++c)
        if (!better(*c, *worst)) worst = c;  // (value, index) pairs are distinct
      found.erase(worst);
    }
    return;
  }
  // The k-th largest value by nth_element on the bare values, then, in index order,
  // everything above it and the first of those equal to it.
  scratch.resize(found.size());
  std::transform(found.begin(), found.end(), scratch.begin(), [](const Candidate<A>& c) { return c.value; });
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<A>());
  const A kth = scratch[k - 1];
  int64_t above = 0;
  for (const auto& c : found) above += c.value > kth;
  int64_t ties = k - above;
  size_t kept = 0;
  for (const auto& c : found) {  // in index order: the first ties at kth win
    if (c.value > kth || (c.value == kth && ties-- > 0)) found[kept++] = c;
  }
  found.resize(kept);
}

}  // namespace cpu
}  // namespace aefast
