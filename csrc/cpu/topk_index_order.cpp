// CPU top-k in index order with its dense output (topk_mask_index_order): per row of x
// the k largest (ties to the lower index), their indices in increasing order, and x
// with all but them zeroed. It serves batch_topk over a whole batch (one row of B*H
// with k*B winners), whose winners are only seen in the dense output. topk.cpp ranks
// its winners by value, work wasted on thousands of winners whose order nobody sees.
// Without the order, a bar and one pass:
// - a long contiguous row: the bar comes from a sample of the row, a little below
//   where the k-th largest must lie, then one parallel pass at memory speed keeps the
//   elements above it (a vector compare, and only the hits looked at) and writes them
//   and zeros as the output; the exact selection is among those (the losers zeroed
//   after), or, when fewer than k are above it, they and the first elements equal to
//   it. If the sample misled (fewer than k at or above the bar, or far more
//   candidates than it predicted), or
// - anything else: topk_forward's exact scan, its winners sorted into index order and
//   scattered.
// (Columns, lifetime_topk's selection, are topk_columns.cpp.)
#include "common.h"  // first: see its note on the intrinsics

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

#include "topk_candidates.h"

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

// The filtering pass writes the dense output as it reads x: each element above the
// bar (relu: negatives 0), else +0.0; the candidates that lose the cut are zeroed
// after it. float32 steps of 16 as one masked vector, streamed where its lines are
// whole and the output large; narrower types as zeros, then their hits one by one
// (take_masked).
template <typename T>
struct DenseOut {
  T* out;  // the chunk's first element
  bool relu = false, stream = false;
  AEFAST_INLINE T at(T v) const { return relu && v < T(0) ? T(0) : v; }
};

// x[0, n)'s elements above `bar` into `out` (at most `cap` of them, else overflow).
template <typename T, typename A>
AEFAST_INLINE void filter_above(const T* x, int64_t n, int64_t first, A bar, size_t cap, ChunkFound<A>& out,
                                const DenseOut<T>& dense) {
  auto scalar = [&](int64_t t) {
    const A v = static_cast<A>(x[t]);
    dense.out[t] = v > bar ? dense.at(x[t]) : T(0);
    if (v > bar) out.greater.push_back({v, first + t});
    out.nan |= v != v;
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    int any = 0;  // !(v <= bar): above the bar, or NaN
    for (int64_t t = 0; t < kLanes; ++t) any |= !(static_cast<A>(x[j + t]) <= bar);
    if (!any) {
      std::fill(dense.out + j, dense.out + j + kLanes, T(0));
      continue;
    }
    for (int64_t t = j; t < j + kLanes; ++t) scalar(t);
    if (out.greater.size() > cap || out.nan) break;
  }
  for (; j < n && !out.nan && out.greater.size() <= cap; ++j) scalar(j);  // not on past an overflow
  out.overflow = !out.nan && out.greater.size() > cap;
}

#if defined(__x86_64__) && defined(__GNUC__)
// float32 (float16 and bfloat16 widened to it as loaded): a compare mask per vector
// (!(v <= bar): above, or NaN), then only its set bits.
template <typename E>
AEFAST_INLINE bool take_masked(const E* x, int64_t j, uint32_t m, int64_t first, ChunkFound<float>& out,
                               const DenseOut<E>& dense) {
  for (; m != 0; m &= m - 1) {
    const int64_t t = j + __builtin_ctz(m);
    const float v = static_cast<float>(x[t]);
    if (v != v) return false;
    out.greater.push_back({v, first + t});
    if constexpr (!std::is_same_v<E, float>) dense.out[t] = dense.at(x[t]);
  }
  return true;
}

// After a vector loop stopped at j: the last n % 16 elements (unless it met a NaN or
// overflowed), then the overflow flag.
template <typename E>
void filter_rest(const E* x, int64_t n, int64_t j, int64_t first, float bar, size_t cap, ChunkFound<float>& out,
                 const DenseOut<E>& dense) {
  ChunkFound<float> rest;
  if (j < n && !out.nan && out.greater.size() <= cap)
    filter_above<E, float>(x + j, n - j, first + j, bar, cap, rest, {dense.out + j, dense.relu});
  out.greater.insert(out.greater.end(), rest.greater.begin(), rest.greater.end());
  out.nan |= rest.nan;
  out.overflow = !out.nan && out.greater.size() > cap;
}

template <typename E>
AEFAST_AVX512 AEFAST_INLINE void write_dense16_avx512(__m512 v, __mmask16 above,
                                                                                   const DenseOut<E>& dense, int64_t j) {
  if constexpr (std::is_same_v<E, float>) {
    const __mmask16 negative = dense.relu ? _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ) : 0;
    const __m512 kept = _mm512_maskz_mov_ps(above & ~negative, v);
    if (dense.stream) _mm512_stream_ps(dense.out + j, kept);
    else _mm512_storeu_ps(dense.out + j, kept);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dense.out + j), _mm256_setzero_si256());
  }
}

template <typename E>
AEFAST_AVX2 AEFAST_INLINE void write_dense8_avx2(__m256 v, __m256 above, const DenseOut<E>& dense, int64_t j) {
  if constexpr (std::is_same_v<E, float>) {
    const __m256 negative = dense.relu ? _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ) : _mm256_setzero_ps();
    const __m256 kept = _mm256_and_ps(_mm256_andnot_ps(negative, above), v);
    if (dense.stream) _mm256_stream_ps(dense.out + j, kept);
    else _mm256_storeu_ps(dense.out + j, kept);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dense.out + j), _mm_setzero_si128());
  }
}

// Each step asks for the elements a page of float32 ahead: the hardware's streams stop
// at page boundaries. batch_topk alternating with a copy of x and torch.topk on the
// Xeon, 1024 x 4096 and 4096 x 4096: in one process 2.39 -> 1.70 and 9.4 -> 7.5 ms (two
// pages ahead: 2.02, 8.1); builds alternating by process, 2.45-2.72 -> 2.29-2.54 and
// 6.5-8.1 -> 6.5-7.2 ms.
constexpr int64_t kFilterAhead = 1024;  // elements

template <typename E>
AEFAST_AVX512 void filter_above_avx512(const E* x, int64_t n, int64_t first, float bar,
                                                                     size_t cap, ChunkFound<float>& out,
                                                                     const DenseOut<E>& dense) {
  const __m512 b = _mm512_set1_ps(bar);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __builtin_prefetch(x + j + kFilterAhead);
    const __m512 v = load16_as_float(x + j);
    const uint32_t m = _mm512_cmp_ps_mask(v, b, _CMP_NLE_UQ);
    write_dense16_avx512(v, static_cast<__mmask16>(m), dense, j);
    if (m == 0) continue;
    out.nan = !take_masked(x, j, m, first, out, dense);
    if (out.nan || out.greater.size() > cap) break;
  }
  filter_rest(x, n, j, first, bar, cap, out, dense);
}

template <typename E>
AEFAST_AVX2 void filter_above_avx2(const E* x, int64_t n, int64_t first, float bar, size_t cap,
                                   ChunkFound<float>& out, const DenseOut<E>& dense) {
  const __m256 b = _mm256_set1_ps(bar);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __builtin_prefetch(x + j + kFilterAhead);
    const __m256 v0 = load8_as_float(x + j), v1 = load8_as_float(x + j + 8);
    const __m256 above0 = _mm256_cmp_ps(v0, b, _CMP_NLE_UQ), above1 = _mm256_cmp_ps(v1, b, _CMP_NLE_UQ);
    write_dense8_avx2(v0, above0, dense, j);
    write_dense8_avx2(v1, above1, dense, j + 8);
    const uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(above0)) |
                       static_cast<uint32_t>(_mm256_movemask_ps(above1)) << 8;
    if (m == 0) continue;
    out.nan = !take_masked(x, j, m, first, out, dense);
    if (out.nan || out.greater.size() > cap) break;
  }
  filter_rest(x, n, j, first, bar, cap, out, dense);
}
#endif

template <typename T, typename A>
void filter_chunk(const T* x, int64_t n, int64_t first, A bar, size_t cap, ChunkFound<A>& out,
                  const DenseOut<T>& dense) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    if (simd_level() == Simd::kAvx512) return filter_above_avx512(x, n, first, bar, cap, out, dense);
    if (simd_level() == Simd::kAvx2) return filter_above_avx2(x, n, first, bar, cap, out, dense);
  }
#endif
  filter_above<T, A>(x, n, first, bar, cap, out, dense);
}

// order_key as an unsigned key in the same order (the sign bit flipped), for the radix passes.
inline uint32_t sortable_key(float v) { return static_cast<uint32_t>(order_key(v)) ^ 0x80000000u; }

// The k best of the chunks' candidates (k <= their number), written in index order:
// the k-th largest key by three radix passes (11, 11 and 10 bits; each chunk's
// histogram on its own thread), then every candidate above it and the first ones
// equal to it, each chunk writing its own at its offset. nth_element over the
// ~1.4 k candidates on one thread, with the other waiting, was a quarter of
// batch_topk's forward at 1024 x 4096 (k = 32768). dense: the row's dense output,
// written by the filtering pass, where the candidates that lose are zeroed.
template <typename T>
void write_best_of_chunks(const std::vector<ChunkFound<float>>& found, int64_t k, bool relu, T* values,
                          int64_t* indices, T* dense) {
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
        } else {
          dense[cand.index] = T(0);
        }
      }
    }
  });
}

// dense: the row's dense output, every element of it written if the outcome is kDone;
// stream: float32 written around the caches where its lines are whole.
template <typename T, typename A>
Outcome select_long_row(const T* x, int64_t n, int64_t k, bool relu, T* values, int64_t* indices, T* dense,
                        bool stream) {
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
  const int64_t chunk_len = ((n + chunks - 1) / chunks + kLanes - 1) / kLanes * kLanes;  // steps of 16 from each start
  // Twice the candidates the sample predicts, and some: more means it misled.
  const size_t cap = static_cast<size_t>(2.0 * rank / kSample * chunk_len) + 4096;
  std::vector<ChunkFound<A>> found(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = c * chunk_len, len = std::min(n, first + chunk_len) - first;
      if (len <= 0) continue;
      found[c].greater.reserve(std::min(cap, static_cast<size_t>(len)) + kLanes);
      const DenseOut<T> out{dense + first, relu, stream && reinterpret_cast<uintptr_t>(dense + first) % 64 == 0};
      filter_chunk<T, A>(x + first, len, first, bar, cap, found[c], out);
    }
    if (stream) fence_streams();  // before other threads zero the losers
  });
  int64_t greater = 0;
  for (const auto& f : found) {
    if (f.nan) return Outcome::kNaN;
    if (f.overflow) return Outcome::kMisled;
    greater += static_cast<int64_t>(f.greater.size());
  }
  if constexpr (std::is_same_v<A, float>) {
    if (greater >= k) {
      write_best_of_chunks(found, k, relu, values, indices, dense);
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
  // The candidates were written as they passed: zeroed, then the winners.
  for (const auto& f : found)
    for (const auto& c : f.greater) dense[c.index] = T(0);
  for (int64_t j = 0; j < k; ++j) dense[indices[j]] = values[j];
  return Outcome::kDone;
}

// ------------------------------------------------------------ the kernel

// Rows long enough, and k large enough, for a sampled bar and a filtering pass. Any
// share of the row may win: with more than an eighth (batch_topk at k > H / 8), the
// other way is one thread's radix select over the whole row, its winners ranked and
// sorted back into index order (1024 x 4096, k = 1024: 218-242 ms, as slow as torch.topk).
bool long_row_selection(const at::Tensor& x, int64_t k) {
  const int64_t n = x.size(1);
  return x.is_contiguous() && n >= 4 * kSample && k >= 256;
}

// Per row of x the k largest (ties to the lower index), their indices in increasing
// order, and the dense matrix of them (x with the rest zeroed; relu: clamped at 0).
// A long row in one pass: the filter writes every element above the bar as it reads
// it, the cut zeroes the candidates that lose. (batch_topk's forward at 1024 x 4096 had
// read x to select, then written its output in scatter_rows, each pass at its own
// memory speed: 2.2 -> 1.7 ms on the Xeon.) Anything else: topk_forward's winners,
// sorted into index order, scattered.
std::tuple<at::Tensor, at::Tensor> topk_mask_index_order(const at::Tensor& x, int64_t k, bool relu) {
  TORCH_CHECK_VALUE(x.dim() == 2, "aefast: x must be 2-D, got ", x.dim(), "-D");
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "aefast: k must be in [1, ", n, "], got ", k);
  auto scattered = [&] {
    auto [values, indices] = topk_forward(x, k, relu);
    auto [sorted, order] = indices.sort(1);
    return std::make_tuple(at::zeros(x.sizes(), x.options()).scatter_(1, sorted, values.gather(1, order)), sorted);
  };
  if (!long_row_selection(x, k)) return scattered();
  at::Tensor out = empty_output(x.sizes(), x.options());
  at::Tensor values = at::empty({R, k}, x.options());
  at::Tensor indices = at::empty({R, k}, x.options().dtype(at::kLong));
  const bool stream = streamed_output(out);
  Outcome outcome = Outcome::kDone;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_mask_index_order", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R && outcome == Outcome::kDone; ++r)
      outcome = select_long_row<scalar_t, A>(xp + r * n, n, k, relu, values.data_ptr<scalar_t>() + r * k,
                                             indices.data_ptr<int64_t>() + r * k, op + r * n, stream);
  });
  TORCH_CHECK_VALUE(outcome != Outcome::kNaN, "aefast: x contains NaN; top-k of NaN is undefined");
  if (outcome == Outcome::kMisled) return scattered();
  return {out, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) { m.impl("topk_mask_index_order", &topk_mask_index_order); }

}  // namespace cpu
}  // namespace aefast
