// CPU top-k in index order: per row of x the k largest (ties to the lower index),
// returned in the order of their indices. It serves batch_topk's selection over a
// whole batch (one row of B*H with k*B winners), whose winners are only scattered
// into a dense output. topk.cpp keeps winners in value order in a heap, log(k) work per
// improvement: with thousands of winners per row that is most of the time. Without
// the order, a bar and one filtering pass:
// - a long contiguous row: the bar comes from a sample of the row, a little below
//   where the k-th largest must lie, then one parallel pass at memory speed keeps the
//   elements above it (a vector compare, and only the hits looked at); the exact
//   selection is among those, or, when fewer than k are above it, they and the first
//   elements equal to it. If the sample misled (fewer than k at or above the bar, or
//   far more candidates than it predicted), or
// - anything else: topk_forward's exact scan, its winners sorted into index order.
// (Columns, lifetime_topk's selection, are topk_columns.cpp.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "topk_candidates.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace aefast {
namespace cpu {
namespace {

template <typename T, typename A>
void write_winners(const std::vector<Candidate<A>>& winners, bool relu, T* values, int64_t* indices) {
  for (size_t j = 0; j < winners.size(); ++j) {
    A v = winners[j].value;
    if (relu && v < A(0)) v = A(0);
    values[j] = static_cast<T>(v);
    indices[j] = winners[j].index;
  }
}

// ------------------------------------------------------------ a long row

enum class Outcome { kDone, kMisled, kNaN };

constexpr int64_t kSample = 16384;
constexpr int64_t kLanes = 16;  // elements per step of the filters

inline uint64_t mix(uint64_t z) {  // splitmix64's finalizer: sample offsets
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// One chunk's share of the filtering pass: its elements above the bar, in index order.
template <typename A>
struct ChunkFound {
  std::vector<Candidate<A>> greater;
  bool nan = false, overflow = false;
};

// x[0, n)'s elements above `bar` into `out` (at most `cap` of them, else overflow).
template <typename T, typename A>
AEFAST_INLINE void filter_above(const T* x, int64_t n, int64_t first, A bar, size_t cap, ChunkFound<A>& out) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    int any = 0;  // !(v <= bar): above the bar, or NaN
    for (int64_t t = 0; t < kLanes; ++t) any |= !(static_cast<A>(x[j + t]) <= bar);
    if (!any) continue;
    for (int64_t t = j; t < j + kLanes; ++t) {
      const A v = static_cast<A>(x[t]);
      if (v > bar) out.greater.push_back({v, first + t});
      out.nan |= v != v;
    }
    if (out.greater.size() > cap || out.nan) break;
  }
  for (; j < n && !out.nan && out.greater.size() <= cap; ++j) {  // not on past an overflow
    const A v = static_cast<A>(x[j]);
    if (v > bar) out.greater.push_back({v, first + j});
    out.nan |= v != v;
  }
  out.overflow = !out.nan && out.greater.size() > cap;
}

#if defined(__x86_64__) && defined(__GNUC__)
// float32 (float16 and bfloat16 widened to it as loaded): a compare mask per vector
// (!(v <= bar): above, or NaN), then only its set bits.
template <typename E>
AEFAST_INLINE bool take_masked(const E* x, int64_t j, uint32_t m, int64_t first, ChunkFound<float>& out) {
  for (; m != 0; m &= m - 1) {
    const int64_t t = j + __builtin_ctz(m);
    const float v = static_cast<float>(x[t]);
    if (v != v) return false;
    out.greater.push_back({v, first + t});
  }
  return true;
}

// After a vector loop stopped at j: the last n % 16 elements (unless it met a NaN or
// overflowed), then the overflow flag.
template <typename E>
void filter_rest(const E* x, int64_t n, int64_t j, int64_t first, float bar, size_t cap, ChunkFound<float>& out) {
  ChunkFound<float> rest;
  if (j < n && !out.nan && out.greater.size() <= cap) filter_above<E, float>(x + j, n - j, first + j, bar, cap, rest);
  out.greater.insert(out.greater.end(), rest.greater.begin(), rest.greater.end());
  out.nan |= rest.nan;
  out.overflow = !out.nan && out.greater.size() > cap;
}

template <typename E>
__attribute__((target("avx512f,avx512bw"))) void filter_above_avx512(const E* x, int64_t n, int64_t first, float bar,
                                                                     size_t cap, ChunkFound<float>& out) {
  const __m512 b = _mm512_set1_ps(bar);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const uint32_t m = _mm512_cmp_ps_mask(load16_as_float(x + j), b, _CMP_NLE_UQ);
    if (m == 0) continue;
    out.nan = !take_masked(x, j, m, first, out);
    if (out.nan || out.greater.size() > cap) break;
  }
  filter_rest(x, n, j, first, bar, cap, out);
}

template <typename E>
AEFAST_AVX2 void filter_above_avx2(const E* x, int64_t n, int64_t first, float bar, size_t cap,
                                   ChunkFound<float>& out) {
  const __m256 b = _mm256_set1_ps(bar);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(load8_as_float(x + j), b, _CMP_NLE_UQ))) |
                       static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(load8_as_float(x + j + 8), b, _CMP_NLE_UQ))) << 8;
    if (m == 0) continue;
    out.nan = !take_masked(x, j, m, first, out);
    if (out.nan || out.greater.size() > cap) break;
  }
  filter_rest(x, n, j, first, bar, cap, out);
}
#endif

template <typename T, typename A>
void filter_chunk(const T* x, int64_t n, int64_t first, A bar, size_t cap, ChunkFound<A>& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    if (simd_level() == Simd::kAvx512) return filter_above_avx512(x, n, first, bar, cap, out);
    if (simd_level() == Simd::kAvx2) return filter_above_avx2(x, n, first, bar, cap, out);
  }
#endif
  filter_above<T, A>(x, n, first, bar, cap, out);
}

// order_key as an unsigned key in the same order (the sign bit flipped), for the radix passes.
inline uint32_t sortable_key(float v) { return static_cast<uint32_t>(order_key(v)) ^ 0x80000000u; }

// The k best of the chunks' candidates (k <= their number), written in index order:
// the k-th largest key by three radix passes (11, 11 and 10 bits; each chunk's
// histogram on its own thread), then every candidate above it and the first ones
// equal to it, each chunk writing its own at its offset. nth_element over the
// ~1.4 k candidates on one thread, with the other waiting, was a quarter of
// batch_topk's forward at 1024 x 4096 (k = 32768).
template <typename T>
void write_best_of_chunks(const std::vector<ChunkFound<float>>& found, int64_t k, bool relu, T* values,
                          int64_t* indices) {
  const int64_t chunks = static_cast<int64_t>(found.size());
  uint32_t key = 0, known = 0;  // the bits of the k-th key found so far, and which
  int64_t rank = k;             // its rank among the candidates that share those bits
  for (const int shift : {21, 10, 0}) {
    const int64_t bins = int64_t(1) << (shift == 0 ? 10 : 11);
    std::vector<int64_t> histograms(static_cast<size_t>(chunks * bins), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = histograms.data() + c * bins;
        for (const auto& cand : found[c].greater) {
          const uint32_t u = sortable_key(cand.value);
          if ((u & known) == key) ++h[(u >> shift) & static_cast<uint32_t>(bins - 1)];
        }
      }
    });
    int64_t bin = bins - 1;
    for (;; --bin) {  // from the top: the bin where the rank-th falls
      int64_t count = 0;
      for (int64_t c = 0; c < chunks; ++c) count += histograms[c * bins + bin];
      if (count >= rank || bin == 0) break;
      rank -= count;
    }
    key |= static_cast<uint32_t>(bin) << shift;
    known |= static_cast<uint32_t>(bins - 1) << shift;
  }
  // `rank` candidates equal to the key win, the first ones in index order.
  std::vector<int64_t> above(static_cast<size_t>(chunks), 0), equal(static_cast<size_t>(chunks), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // Counted in registers: above[c] and equal[c] share cache lines across threads
      // (adding to them in the loop made this pass 1.5 ms of a 2.7 ms selection at
      // 1024 x 4096 on a Xeon).
      int64_t greater = 0, tied = 0;
      for (const auto& cand : found[c].greater) {
        const uint32_t u = sortable_key(cand.value);
        greater += u > key;
        tied += u == key;
      }
      above[c] = greater;
      equal[c] = tied;
    }
  });
  std::vector<int64_t> offset(static_cast<size_t>(chunks), 0), ties(static_cast<size_t>(chunks), 0);
  int64_t written = 0, ties_left = rank;
  for (int64_t c = 0; c < chunks; ++c) {
    ties[c] = std::min(equal[c], ties_left);
    ties_left -= ties[c];
    offset[c] = written;
    written += above[c] + ties[c];
  }
  TORCH_CHECK(written == k && ties_left == 0, "aefast: batch selection lost count of its winners");
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t at = offset[c], tied = ties[c];
      for (const auto& cand : found[c].greater) {
        const uint32_t u = sortable_key(cand.value);
        if (u > key || (u == key && tied-- > 0)) {
          values[at] = static_cast<T>(relu && cand.value < 0.0f ? 0.0f : cand.value);
          indices[at++] = cand.index;
        }
      }
    }
  });
}

template <typename T, typename A>
Outcome select_long_row(const T* x, int64_t n, int64_t k, bool relu, T* values, int64_t* indices) {
  // The bar: the sample's r-th largest, r a few standard deviations above the k * s / n
  // winners the sample holds on average, so that at least k of the row are >= it.
  std::vector<A> sample(kSample);
  const int64_t stratum = n / kSample;
  std::atomic<bool> sampled_nan{false};
  at::parallel_for(0, kSample, 1024, [&](int64_t i0, int64_t i1) {  // reads from all over x: cache misses
    bool nan = false;
    for (int64_t i = i0; i < i1; ++i) {
      sample[i] = static_cast<A>(x[i * stratum + static_cast<int64_t>(mix(i) % static_cast<uint64_t>(stratum))]);
      nan |= sample[i] != sample[i];
    }
    if (nan) sampled_nan = true;
  });
  if (sampled_nan.load()) return Outcome::kNaN;
  const double expected = static_cast<double>(k) * kSample / n;
  const int64_t rank = std::min<int64_t>(kSample, static_cast<int64_t>(std::ceil(expected + 4 * std::sqrt(expected) + 8)));
  std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<A>());
  const A bar = sample[rank - 1];

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), n >> 16));
  const int64_t chunk_len = (n + chunks - 1) / chunks;
  // Twice the candidates the sample predicts, and some: more means it misled.
  const size_t cap = static_cast<size_t>(2.0 * rank / kSample * chunk_len) + 4096;
  std::vector<ChunkFound<A>> found(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = c * chunk_len, len = std::min(n, first + chunk_len) - first;
      if (len <= 0) continue;
      found[c].greater.reserve(std::min(cap, static_cast<size_t>(len)) + kLanes);
      filter_chunk<T, A>(x + first, len, first, bar, cap, found[c]);
    }
  });
  int64_t greater = 0;
  for (const auto& f : found) {
    if (f.nan) return Outcome::kNaN;
    if (f.overflow) return Outcome::kMisled;
    greater += static_cast<int64_t>(f.greater.size());
  }
  if constexpr (std::is_same_v<A, float>) {
    if (greater >= k) {
      write_best_of_chunks(found, k, relu, values, indices);
      return Outcome::kDone;
    }
  }
  std::vector<Candidate<A>> winners;
  winners.reserve(greater);
  for (const auto& f : found) winners.insert(winners.end(), f.greater.begin(), f.greater.end());
  if (greater >= k) {
    std::vector<A> scratch;
    keep_best_in_index_order(winners, k, scratch);
  } else {
    // All above the bar win, and the first k - greater elements equal to it, if so many.
    std::vector<Candidate<A>> ties;
    for (int64_t j = 0; j < n && static_cast<int64_t>(ties.size()) < k - greater; ++j) {
      const A v = static_cast<A>(x[j]);
      if (v == bar) ties.push_back({v, j});
    }
    if (static_cast<int64_t>(ties.size()) < k - greater) return Outcome::kMisled;
    std::vector<Candidate<A>> merged(k);
    std::merge(winners.begin(), winners.end(), ties.begin(), ties.end(), merged.begin(),
               [](const Candidate<A>& a, const Candidate<A>& b) { return a.index < b.index; });
    winners.swap(merged);
  }
  write_winners(winners, relu, values, indices);
  return Outcome::kDone;
}

// ------------------------------------------------------------ the kernel

std::tuple<at::Tensor, at::Tensor> in_index_order(const at::Tensor& values, const at::Tensor& indices) {
  auto [sorted, order] = indices.sort(1);
  return {values.gather(1, order), sorted};
}

std::tuple<at::Tensor, at::Tensor> topk_index_order(const at::Tensor& x, int64_t k, bool relu) {
  TORCH_CHECK_VALUE(x.dim() == 2, "aefast: x must be 2-D, got ", x.dim(), "-D");
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "aefast: k must be in [1, ", n, "], got ", k);
  const bool long_rows = x.is_contiguous() && n >= 4 * kSample && k >= 256 && 8 * k <= n;
  if (!long_rows) {
    auto [values, indices] = topk_forward(x, k, relu);
    return in_index_order(values, indices);
  }
  auto values = at::empty({R, k}, x.options());
  auto indices = at::empty({R, k}, x.options().dtype(at::kLong));
  bool nan = false, misled = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_index_order", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    for (int64_t r = 0; r < R && !nan && !misled; ++r) {
      const Outcome outcome = select_long_row<scalar_t, A>(xp + r * n, n, k, relu, vp + r * k, ip + r * k);
      nan = outcome == Outcome::kNaN;
      misled = outcome == Outcome::kMisled;
    }
  });
  TORCH_CHECK_VALUE(!nan, "aefast: x contains NaN; top-k of NaN is undefined");
  if (misled) {
    auto [v, i] = topk_forward(x, k, relu);
    return in_index_order(v, i);
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) { m.impl("topk_index_order", &topk_index_order); }

}  // namespace cpu
}  // namespace aefast
