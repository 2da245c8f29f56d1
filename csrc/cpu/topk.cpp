// CPU top-k per row; torch.topk instead copies every (value, int64 index) pair of the
// row and partially sorts them. Three ways, by row length and winners (many_winners):
// - rows of 16 blocks of 16 or more, with many elements per winner: block selection,
//   which reads the row once at memory speed and looks again at only the cache lines
//   that can hold a winner (block_scan below);
// - float32 (and float16, bfloat16) rows with winners a sizeable share of the row, or
//   too short for blocks: radix select (topk_radix.cpp), counts of the keys' digits;
// - otherwise (fewer than 8 winners of a short row; float64 rows without blocks) a
//   k-entry heap of the best values seen, behind a vectorized filter that skips blocks of the row with
//   nothing above the heap's worst value.
// All keep the order every backend has: value descending, ties to the lower index.
#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "topk_candidates.h"
#include "topk_radix.h"

namespace aefast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 16;

// heap[0] is the worst of the k candidates (every node is no better than its
// children); put `c` in its place and sift it down: one pass, no pop + push.
template <typename A>
inline void replace_worst(Candidate<A>* heap, int64_t k, Candidate<A> c) {
  int64_t i = 0;
  for (;;) {
    int64_t child = 2 * i + 1;
    if (child >= k) break;
    if (child + 1 < k && better(heap[child], heap[child + 1])) ++child;  // the worse child
    if (!better(c, heap[child])) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = c;
}

// Top `k` of x[0, n) (global indices offset by `first`) into `heap` (size k, n >= k).
// Returns false if x holds a NaN. The heap's front is its worst candidate.
template <typename T, typename A>
inline __attribute__((always_inline)) bool topk_scan(const T* x, int64_t n, int64_t first, int64_t k,
                                                     Candidate<A>* heap) {
  auto worse_first = [](const Candidate<A>& a, const Candidate<A>& b) { return better(a, b); };
  bool nan = false;
  for (int64_t j = 0; j < k; ++j) {
    const A v = static_cast<A>(x[j]);
    nan |= v != v;
    heap[j] = {v, first + j};
  }
  std::make_heap(heap, heap + k, worse_first);
  A threshold = heap[0].value;
  int64_t j = k;
  for (; j + kBlock <= n; j += kBlock) {
    // Later elements equal to the threshold lose the tie (higher index): strict >.
    // !(v <= threshold) also catches NaN; an int OR-reduction is what GCC vectorizes.
    int any = 0;
    for (int64_t t = 0; t < kBlock; ++t) any |= !(static_cast<A>(x[j + t]) <= threshold);
    if (!any) continue;
    for (int64_t t = 0; t < kBlock; ++t) {
      const A v = static_cast<A>(x[j + t]);
      nan |= v != v;
      if (v > threshold) {
        replace_worst(heap, k, {v, first + j + t});
        threshold = heap[0].value;
      }
    }
  }
  for (; j < n; ++j) {
    const A v = static_cast<A>(x[j]);
    nan |= v != v;
    if (v > threshold) {
      replace_worst(heap, k, {v, first + j});
      threshold = heap[0].value;
    }
  }
  return !nan;
}

AEFAST_SIMD_CLONES bool topk_scan_f32(const float* x, int64_t n, int64_t first, int64_t k,
                                      Candidate<float>* heap) {
  return topk_scan<float, float>(x, n, first, k, heap);
}

// Block selection for long rows with few winners. A pass over the row keeps only
// the maximum of each block of 16 elements (one cache line of float32): contiguous
// reads at memory speed. Any t0 with at least k block maxima >= t0 bounds the
// answer from below (k blocks each hold an element >= t0), so every winner lies in
// a block whose maximum is >= t0; only those blocks (k or a few more) are read
// again, from cache, and their elements >= t0 collected. The row goes by in tiles of
// 16 x G elements, G >= 8k blocks where the row allows (>= k always): t0 comes from
// the first tile's maxima, and between tiles the candidates are cut back to the k
// best, whose worst value is the bar for the later tiles. No heap and no scalar pass
// over the row.
constexpr int64_t kBlockLen = 16;

// Blocks per tile for a row of n with k winners, or 0 for the plain scan.
inline int64_t tile_blocks(int64_t n, int64_t k) {
  // G >= 8k keeps the blocks read again a small share of each tile (with fewer, up to
  // all of a short row's blocks are read again, from L1); G <= 16384 keeps
  // a tile (1 MB of float32 at most) in L2; a row shorter than a tile is one tile
  // (the first tile must be whole: G blocks of 16). G >= k makes the bar exact (k
  // blocks reach it); with as few as k blocks the selection still ran 2-4x faster
  // than the heap (rows of 256 to 4096, k = 16 to 256).
  int64_t blocks = std::max<int64_t>(1024, 8 * k);
  if (blocks > 16384) return 0;
  blocks = std::min(blocks, n / kBlockLen);
  return blocks >= k && blocks >= 16 ? blocks : 0;
}

// What a pass over a tile found: whether it holds a NaN, and the range of its block maxima.
template <typename A>
struct TileMaxima {
  bool nan = false;
  A low = std::numeric_limits<A>::infinity(), high = -std::numeric_limits<A>::infinity();
  void add(A m) {
    low = m < low ? m : low;
    high = m > high ? m : high;
  }
};

// maxima[b] = max of x[16b, 16b + 16) for the ceil(n / 16) blocks of x[0, n).
template <typename T, typename A>
inline TileMaxima<A> block_maxima(const T* x, int64_t n, A* maxima) {
  TileMaxima<A> found;
  int bad = 0;
  const int64_t whole = n / kBlockLen;
  for (int64_t b = 0; b < whole; ++b) {
    A m = static_cast<A>(x[b * kBlockLen]);
    for (int64_t t = 0; t < kBlockLen; ++t) {
      const A v = static_cast<A>(x[b * kBlockLen + t]);
      m = v > m ? v : m;
      bad |= !(v == v);
    }
    maxima[b] = m;
    found.add(m);
  }
  if (whole * kBlockLen < n) {
    A m = -std::numeric_limits<A>::infinity();
    for (int64_t j = whole * kBlockLen; j < n; ++j) {
      const A v = static_cast<A>(x[j]);
      m = v > m ? v : m;
      bad |= !(v == v);
    }
    maxima[whole] = m;
    found.add(m);
  }
  found.nan = bad != 0;
  return found;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AEFAST_BLOCK_MAXIMA_AVX2 1
// float32 with AVX2: 8 blocks at a time, their 8 x 16 values reduced to 8 maxima by
// max-of-shuffles (what a horizontal max of each would cost 8 times over). Each line is
// asked for a page ahead: the hardware's streams stop at page boundaries, and a row of
// 4096 is four pages. topk_forward, k = 32, in one process alternating with a copy of x,
// torch.topk and (at 1024 rows) the eager reference, on the Xeon: 1024 x 4096 1.81 ->
// 1.48 ms, 4096 x 4096 7.6 -> 6.9 ms (2 or 4 pages ahead: 1.70-1.79, 7.0).
constexpr int64_t kMaximaAhead = 1024;  // floats
AEFAST_AVX2 TileMaxima<float> block_maxima_avx2(const float* x, int64_t n, float* maxima) {
  const int64_t whole = n / kBlockLen;
  __m256 unordered = _mm256_setzero_ps();
  __m256 low = _mm256_set1_ps(std::numeric_limits<float>::infinity()), high = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t b = 0;
  for (; b + 8 <= whole; b += 8) {
    const float* p = x + b * kBlockLen;
    for (int i = 0; i < 8; ++i) __builtin_prefetch(p + kMaximaAhead + i * kBlockLen);
    __m256 a[8];
    for (int i = 0; i < 8; ++i) {
      const __m256 lo = _mm256_loadu_ps(p + i * kBlockLen), hi = _mm256_loadu_ps(p + i * kBlockLen + 8);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(lo, hi, _CMP_UNORD_Q));
      a[i] = _mm256_max_ps(lo, hi);  // a[i]: 8 partial maxima of block b + i
    }
    __m256 pairs[4];  // blocks 2i, 2i+1 interleaved, each 128-bit half reduced 2x
    for (int i = 0; i < 4; ++i)
      pairs[i] = _mm256_max_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    __m256 quads[2];  // per 128-bit half: one value per block of four
    for (int i = 0; i < 2; ++i)
      quads[i] = _mm256_max_ps(_mm256_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm256_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 halves = _mm256_max_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                                        _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
    _mm256_storeu_ps(maxima + b, halves);
    low = _mm256_min_ps(low, halves);
    high = _mm256_max_ps(high, halves);
  }
  // The last whole blocks one at a time, still in vectors: a row of a few hundred (AuxK's
  // gathered dead latents) left up to 7 blocks to the scalar loop, a tenth of its time.
  for (; b < whole; ++b) {
    const __m256 lo = _mm256_loadu_ps(x + b * kBlockLen), hi = _mm256_loadu_ps(x + b * kBlockLen + 8);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(lo, hi, _CMP_UNORD_Q));
    __m256 m = _mm256_max_ps(lo, hi);
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));  // the block's maximum in every lane
    maxima[b] = _mm256_cvtss_f32(m);
    low = _mm256_min_ps(low, m);
    high = _mm256_max_ps(high, m);
  }
  // The scalar loop (SSE code) for a last, partial block only.
  TileMaxima<float> found;
  if (b * kBlockLen < n) found = block_maxima<float, float>(x + b * kBlockLen, n - b * kBlockLen, maxima + b);
  found.nan |= _mm256_movemask_ps(unordered) != 0;
  alignas(32) float lows[8], highs[8];
  _mm256_store_ps(lows, low);
  _mm256_store_ps(highs, high);
  for (int i = 0; i < 8; ++i) {
    found.add(lows[i]);
    found.add(highs[i]);
  }
  return found;
}
#endif

// The bar t0: at least k of the maxima are >= t0, and t0 is close to the k-th
// largest (bisection on the value, each step one vectorized count).
template <typename A>
inline __attribute__((always_inline)) A maxima_bar(const A* maxima, int64_t blocks, int64_t k, A lo, A hi) {
  auto count_at_least = [&](A t) {
    int32_t c = 0;  // 32-bit: a wider vector of counts (blocks <= 16384)
    for (int64_t b = 0; b < blocks; ++b) c += maxima[b] >= t;
    return static_cast<int64_t>(c);
  };
  if (count_at_least(hi) >= k) return hi;
  if (!std::isfinite(lo) || !std::isfinite(hi)) {
    // Infinities (an all -inf block of masked logits, a +inf): bisect between the
    // smallest and largest finite maxima instead, or stop where no finite bar can do.
    A finite_lo = std::numeric_limits<A>::infinity(), finite_hi = -finite_lo;
    for (int64_t b = 0; b < blocks; ++b) {
      if (!std::isfinite(maxima[b])) continue;
      finite_lo = std::min(finite_lo, maxima[b]);
      finite_hi = std::max(finite_hi, maxima[b]);
    }
    if (finite_lo > finite_hi) return lo;  // no finite maximum
    if (hi > finite_hi) {
      if (count_at_least(finite_hi) >= k) return finite_hi;
      hi = finite_hi;
    }
    if (lo < finite_lo) {
      if (count_at_least(finite_lo) < k) return lo;
      lo = finite_lo;
    }
  }
  int lowered = 0;  // steps in a row that brought hi down
  for (int step = 0; step < 64; ++step) {  // invariant: count(lo) >= k > count(hi)
    // hi came down twice running: many maxima may equal lo (a row of ReLU zeros with
    // fewer than k above them), where halving toward lo would take every remaining
    // step (down through the denormals). One count just above lo tells.
    const A mid = lowered >= 2 ? std::nextafter(lo, hi) : lo / 2 + hi / 2;  // no overflow across the whole range
    if (mid <= lo || mid >= hi) break;
    const int64_t c = count_at_least(mid);
    if (c < k) {
      hi = mid;
      ++lowered;
    } else {
      lo = mid;
      lowered = 0;
      if (c <= k + k / 4 + 8) break;  // close enough: a few extra blocks to read again
    }
  }
  return lo;
}

// Where collect_qualifying_avx2 left-packs: the numbers of the blocks that qualify, then
// their elements' values and offsets in the tile. Each grows to what a call needs (and
// the 8 lanes a left-pack writes past it), never shrinks.
struct PackScratch {
  std::vector<int32_t> blocks, offsets;
  std::vector<float> values;
  template <typename V>
  static void grow(V& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  }
  void room_for_blocks(int64_t count) { grow(blocks, count + 8); }
  void room_for_elements(int64_t count) {
    grow(offsets, count + 8);
    grow(values, count + 8);
  }
};

template <typename A>
struct ScanScratch {
  std::vector<A> maxima;
  std::vector<Candidate<A>> found, kept;
  std::vector<A> values;
  std::vector<float> widened;  // a float16 / bfloat16 tile as float32
  RadixScratch radix;
  PackScratch packed;
};

// The k best of c[0, n) (distinct indices) into out[0, k), in rank order (value
// descending, then index ascending): each one's rank is the number of better ones.
// The n^2 value compares vectorize; only equal values look at the index. (Choosing
// and sorting 32 of ~48 candidates by nth_element and std::sort took ~1.5 us a row,
// mostly mispredicted branches: a third of topk_sparse at 1024 x 4096.) `values`:
// room for n + 15.
template <typename A>
AEFAST_INLINE void rank_select_loop(const Candidate<A>* c, int64_t n, int64_t k, A* values, Candidate<A>* out) {
  for (int64_t i = 0; i < n; ++i) values[i] = c[i].value;
  for (int64_t i = 0; i < n; ++i) {
    const A v = values[i];
    int32_t above = 0, equal = 0;
    for (int64_t j = 0; j < n; ++j) {
      above += values[j] > v;
      equal += values[j] == v;
    }
    if (equal > 1)  // ties: the lower index ranks first
      for (int64_t j = 0; j < n; ++j) above += values[j] == v && c[j].index < c[i].index;
    if (above < k) out[above] = c[i];
  }
}

template <typename A>
void rank_select(const Candidate<A>* c, int64_t n, int64_t k, A* values, Candidate<A>* out) {
  rank_select_loop<A>(c, n, k, values, out);
}

// Up to this many candidates the rank count's n^2 compares cost less than sorting.
constexpr int64_t kRankSelectMax = 128;
// With AVX-512, up to this many winners are ranked that way too (16 at a time), rather
// than by radix_rank, whose passes each cost a few hundred cycles whatever their size:
// 0.69-0.96x the time for 160 to 256 winners of rows of 1024 to 8192 (one process,
// alternating, 8M elements a call, on the Xeon with a CI run beside it).
constexpr int64_t kRankCountMax = 256;

#if defined(__x86_64__) && defined(__GNUC__)
AEFAST_SIMD_CLONES void rank_select_clones(const Candidate<float>* c, int64_t n, int64_t k, float* values,
                                           Candidate<float>* out) {
  rank_select_loop<float>(c, n, k, values, out);
}

// float32 with AVX-512, 16 candidates' ranks at once: each value broadcast against a
// vector of 16 others, a masked add where it is larger. Without ties the ranks are a
// permutation of [0, n); a rank met twice means ties, and a second pass counts equal
// values of lower index as better too (the scalar index loop above had been a fifth of
// topk_forward on rows of ReLU zeros).
// (The loop above spent most of its time in scalar tails of 40-odd candidates: a
// sixth of topk_sparse at 1024 x 4096 on a Xeon.)
AEFAST_AVX512 void rank_select_avx512(const Candidate<float>* c, int64_t n, int64_t k, float* values,
                                                           Candidate<float>* out) {
  const int64_t padded = (n + 15) / 16 * 16;
  for (int64_t i = 0; i < n; ++i) values[i] = c[i].value;
  for (int64_t i = n; i < padded; ++i) values[i] = std::numeric_limits<float>::quiet_NaN();  // compares false
  alignas(64) int32_t ranks[kRankCountMax + 16];
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < padded; i += 16) {
    const __m512 them = _mm512_loadu_ps(values + i);
    __m512i above = _mm512_setzero_si512();
    for (int64_t j = 0; j < n; ++j)
      above = _mm512_mask_add_epi32(above, _mm512_cmp_ps_mask(_mm512_set1_ps(values[j]), them, _CMP_GT_OQ), above, one);
    _mm512_store_si512(ranks + i, above);
  }
  bool taken[kRankCountMax] = {};
  bool ties = false;
  for (int64_t i = 0; i < n && !ties; ++i) {
    ties = taken[ranks[i]];
    taken[ranks[i]] = true;
  }
  if (ties) {  // again, equal values ranked by index (ReLU's zeros: most of the candidates)
    alignas(64) int64_t index[kRankCountMax + 16];
    for (int64_t i = 0; i < n; ++i) index[i] = c[i].index;
    for (int64_t i = n; i < padded; ++i) index[i] = 0;  // NaN values: never equal
    for (int64_t i = 0; i < padded; i += 16) {
      const __m512 them = _mm512_loadu_ps(values + i);
      const __m512i index_lo = _mm512_load_si512(index + i), index_hi = _mm512_load_si512(index + i + 8);
      __m512i above = _mm512_setzero_si512();
      for (int64_t j = 0; j < n; ++j) {
        const __m512 v = _mm512_set1_ps(values[j]);
        const __m512i at = _mm512_set1_epi64(index[j]);
        const __mmask16 lower = static_cast<__mmask16>(_mm512_cmpgt_epi64_mask(index_lo, at) |
                                                       _mm512_cmpgt_epi64_mask(index_hi, at) << 8);
        const __mmask16 better = _mm512_cmp_ps_mask(v, them, _CMP_GT_OQ) |
                                 (_mm512_cmp_ps_mask(v, them, _CMP_EQ_OQ) & lower);
        above = _mm512_mask_add_epi32(above, better, above, one);
      }
      _mm512_store_si512(ranks + i, above);
    }
  }
  Candidate<float> ranked[kRankCountMax];  // all n, then the first k: no branch on rank < k, which mispredicts
  for (int64_t i = 0; i < n; ++i) ranked[ranks[i]] = c[i];
  std::copy(ranked, ranked + k, out);
}

// The same with AVX2, 8 candidates at a time (a compare gives -1 where true:
// subtracting it counts). ranks[i] = how many of values[0, n) are better than value i:
// larger, or with `index`, equal and of a lower index (offsets from the lowest, 32-bit:
// 64-bit indices took two compares and two shuffles per 8, and rows of float16 precision
// tie often; topk_forward of those, 256 x 4096, k = 32: 0.94x the time on the AMD EPYC).
// values and index padded to a multiple of 8 (NaN: compares false).
AEFAST_AVX2 void count_better_avx2(const float* values, const int32_t* index, int64_t n, int32_t* ranks) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 them = _mm256_loadu_ps(values + i);
    const __m256i their_index = index ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index + i)) : __m256i{};
    __m256i above = _mm256_setzero_si256();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v = _mm256_set1_ps(values[j]);
      __m256 better = _mm256_cmp_ps(v, them, _CMP_GT_OQ);
      if (index) {
        const __m256 lower = _mm256_castsi256_ps(_mm256_cmpgt_epi32(their_index, _mm256_set1_epi32(index[j])));
        better = _mm256_or_ps(better, _mm256_and_ps(_mm256_cmp_ps(v, them, _CMP_EQ_OQ), lower));
      }
      above = _mm256_sub_epi32(above, _mm256_castps_si256(better));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ranks + i), above);
  }
}

void rank_select_avx2(const Candidate<float>* c, int64_t n, int64_t k, float* values, Candidate<float>* out) {
  const int64_t padded = (n + 7) / 8 * 8;
  for (int64_t i = 0; i < n; ++i) values[i] = c[i].value;
  for (int64_t i = n; i < padded; ++i) values[i] = std::numeric_limits<float>::quiet_NaN();
  int32_t ranks[kRankSelectMax + 8];
  count_better_avx2(values, nullptr, n, ranks);
  bool taken[kRankSelectMax] = {};
  bool ties = false;
  for (int64_t i = 0; i < n && !ties; ++i) {
    ties = taken[ranks[i]];
    taken[ranks[i]] = true;
  }
  if (ties) {  // again, equal values ranked by index
    const auto [lowest, highest] =
        std::minmax_element(c, c + n, [](const auto& a, const auto& b) { return a.index < b.index; });
    const int64_t low = lowest->index;
    if (highest->index - low > std::numeric_limits<int32_t>::max()) return rank_select_clones(c, n, k, values, out);
    int32_t index[kRankSelectMax + 8] = {};
    for (int64_t i = 0; i < n; ++i) index[i] = static_cast<int32_t>(c[i].index - low);
    count_better_avx2(values, index, n, ranks);
  }
  Candidate<float> ranked[kRankSelectMax];
  for (int64_t i = 0; i < n; ++i) ranked[ranks[i]] = c[i];
  std::copy(ranked, ranked + k, out);
}

template <>
void rank_select<float>(const Candidate<float>* c, int64_t n, int64_t k, float* values, Candidate<float>* out) {
  if (simd_level() == Simd::kAvx512 && n <= kRankCountMax) return rank_select_avx512(c, n, k, values, out);
  if (simd_level() == Simd::kAvx2 && n <= kRankSelectMax) return rank_select_avx2(c, n, k, values, out);
  rank_select_clones(c, n, k, values, out);
}
#endif

// Whether rank_select ranks n candidates rather than a sort: up to kRankSelectMax, and
// float32 up to kRankCountMax where it counts with AVX-512.
template <typename A>
bool ranked_by_count(int64_t n) {
  if (std::is_same_v<A, float> && simd_level() == Simd::kAvx512 && n <= kRankCountMax) return true;
  return n <= kRankSelectMax;
}

// Cuts `found` back to its k best (in rank order when ranked); returns the worst of them.
template <typename A>
inline A keep_best(std::vector<Candidate<A>>& found, int64_t k, std::vector<A>& values,
                   std::vector<Candidate<A>>& kept) {
  const int64_t n = static_cast<int64_t>(found.size());
  if (n <= kRankSelectMax) {
    values.resize(static_cast<size_t>(n + 16));
    kept.resize(static_cast<size_t>(k));
    rank_select(found.data(), n, k, values.data(), kept.data());
    found.swap(kept);
    return found[k - 1].value;
  }
  keep_best_in_index_order(found, k, values);  // in index order still: radix_rank's way later
  A worst = found[0].value;
  for (const auto& c : found) worst = c.value < worst ? c.value : worst;
  return worst;
}

// The elements of blocks [b0, b1) of tile[0, len) above `bar`, and the first `ties`
// equal to it (ties: the lower index wins, so no later one can), in index order, into
// `found` (indices offset by `base`); a block is read only if its maximum qualifies.
// `ties` counts down. (Every element equal to the bar collected made a row of k = 32
// over 8192 all -inf, AuxK's block without a dead latent, or of ReLU zeros, a sort of
// all 8192: 10x the time of a row of distinct values.)
template <typename T, typename A>
AEFAST_INLINE void collect_blocks(const T* tile, int64_t len, const A* maxima, int64_t b0, int64_t b1, A bar,
                                  int64_t& ties, int64_t base, std::vector<Candidate<A>>& found) {
  for (int64_t b = b0; b < b1; ++b) {
    if (!(maxima[b] > bar || (ties > 0 && maxima[b] == bar))) continue;
    for (int64_t j = b * kBlockLen; j < std::min(len, (b + 1) * kBlockLen); ++j) {
      const A v = static_cast<A>(tile[j]);
      if (v > bar) {
        found.push_back({v, base + j});
      } else if (v == bar && ties > 0) {
        --ties;
        found.push_back({v, base + j});
      }
    }
  }
}

// The same, skipping runs of 16 blocks none of whose maxima reach the bar by one
// vectorized test each (most runs hold no block to read again).
template <typename T, typename A>
AEFAST_INLINE void collect_qualifying_portable(const T* tile, int64_t len, const A* maxima, int64_t b0, int64_t b1,
                                               A bar, int64_t& ties, int64_t base,
                                               std::vector<Candidate<A>>& found) {
  int64_t b = b0;
  for (; b + kBlock <= b1; b += kBlock) {
    int any = 0;
    for (int64_t t = b; t < b + kBlock; ++t) any |= maxima[t] >= bar;
    if (any) collect_blocks(tile, len, maxima, b, b + kBlock, bar, ties, base, found);
  }
  collect_blocks(tile, len, maxima, b, b1, bar, ties, base, found);
}

#if defined(__x86_64__) && defined(__GNUC__)
// take(bit) for the set bits of `qualifying`, those also in `equal` (ties with the bar)
// only while `ties` lasts (counting it down).
template <typename Take>
AEFAST_INLINE void for_each_qualifying(uint32_t qualifying, uint32_t equal, int64_t& ties, const Take& take) {
  for (uint32_t m = qualifying; m != 0; m &= m - 1) {
    const int bit = __builtin_ctz(m);
    if (equal >> bit & 1) {
      if (ties == 0) continue;
      --ties;
    }
    take(bit);
  }
}

// A left-packing collect's block that ties with the bar (bits `equal`): its qualifying
// elements into values and offsets (n counts them), ties only while `ties` lasts.
// True where the ties ran out: the blocks listed for a maximum equal to the bar then
// hold nothing more, and the caller lists the rest again without them (a row of ReLU
// zeros lists every block).
inline bool take_ties(uint32_t qualifying, uint32_t equal, const float* tile, int32_t at, int64_t& ties,
                      float* values, int32_t* offsets, int64_t& n) {
  for_each_qualifying(qualifying, equal, ties, [&](int bit) {
    values[n] = tile[at + bit];
    offsets[n++] = at + bit;
  });
  return ties == 0;
}

// A bit per element of p[0, 16) above the bar (or equal to it, when inclusive).
AEFAST_AVX512 inline uint32_t qualifying_bits(const float* p, __m512 bars, bool inclusive) {
  const __m512 v = _mm512_loadu_ps(p);
  return inclusive ? _mm512_cmp_ps_mask(v, bars, _CMP_GE_OQ) : _mm512_cmp_ps_mask(v, bars, _CMP_GT_OQ);
}

// The numbers of blocks [from, to) whose maximum is above the bar (or equal to it, when
// inclusive) into list, in order, 16 maxima a compress; returns how many. Room for 16
// past them.
AEFAST_AVX512 inline int64_t list_qualifying_blocks_avx512(const float* maxima, int64_t from, int64_t to, float bar,
                                                           bool inclusive, int32_t* list) {
  const __m512 bars = _mm512_set1_ps(bar);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t listed = 0, b = from;
  for (; b + 16 <= to; b += 16) {
    const __mmask16 hit = static_cast<__mmask16>(qualifying_bits(maxima + b, bars, inclusive));
    const __m512i numbers = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(b)));
    _mm512_storeu_si512(list + listed, _mm512_maskz_compress_epi32(hit, numbers));
    listed += __builtin_popcount(hit);
  }
  for (; b < to; ++b)
    if (maxima[b] > bar || (inclusive && maxima[b] == bar)) list[listed++] = static_cast<int32_t>(b);
  return listed;
}

// collect_qualifying with AVX-512, as collect_qualifying_avx2 below: the qualifying
// blocks' numbers compressed into a list, then each listed block's elements above the
// bar compressed into values and tile offsets. (It looped over the set bits of each
// 16 blocks' mask and of each block's, slower than the AVX2 one on an AMD Zen 5: one
// thread, 4096 x 4096, k = 32, topk_sparse forward 5.21 ms, now 3.80, the AVX2 one 5.38.)
AEFAST_AVX512 void collect_qualifying_avx512(const float* tile, int64_t len, const float* maxima,
                                             int64_t b0, int64_t b1, float bar, int64_t& ties,
                                             int64_t base, std::vector<Candidate<float>>& found, PackScratch& packed) {
  const __m512 bars = _mm512_set1_ps(bar);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t whole = std::max(b0, std::min(b1, len / kBlockLen));
  packed.room_for_blocks(whole - b0 + 16);
  int32_t* blocks = packed.blocks.data();
  int64_t listed = list_qualifying_blocks_avx512(maxima, b0, whole, bar, ties > 0, blocks);
  packed.room_for_elements(listed * kBlockLen + 16);
  float* values = packed.values.data();
  int32_t* offsets = packed.offsets.data();
  int64_t n = 0;
  for (int64_t i = 0; i < listed; ++i) {
    const int32_t at = blocks[i] * static_cast<int32_t>(kBlockLen);
    const __m512 v = _mm512_loadu_ps(tile + at);
    if (ties > 0) {
      const uint32_t equal = _mm512_cmp_ps_mask(v, bars, _CMP_EQ_OQ);
      if (equal != 0) {
        if (take_ties(_mm512_cmp_ps_mask(v, bars, _CMP_GE_OQ), equal, tile, at, ties, values, offsets, n))
          listed = i + 1 + list_qualifying_blocks_avx512(maxima, blocks[i] + 1, whole, bar, false, blocks + i + 1);
        continue;
      }
    }
    const __mmask16 above = _mm512_cmp_ps_mask(v, bars, _CMP_GT_OQ);
    _mm512_storeu_ps(values + n, _mm512_maskz_compress_ps(above, v));
    _mm512_storeu_si512(offsets + n, _mm512_maskz_compress_epi32(above, _mm512_add_epi32(lanes, _mm512_set1_epi32(at))));
    n += __builtin_popcount(above);
  }
  const size_t old = found.size();
  found.resize(old + static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) found[old + i] = {values[i], base + offsets[i]};
  collect_blocks<float, float>(tile, len, maxima, whole, b1, bar, ties, base, found);  // a last, partial block
}

// The same with AVX2: 16 values as two compares of 8 and their movemasks.
template <int kPredicate>
AEFAST_AVX2 inline uint32_t compare_bits_avx2(const float* p, __m256 bars) {
  const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), bars, kPredicate)));
  const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), bars, kPredicate)));
  return lo | hi << 8;
}

AEFAST_AVX2 inline uint32_t qualifying_bits_avx2(const float* p, __m256 bars, bool inclusive) {
  return inclusive ? compare_bits_avx2<_CMP_GE_OQ>(p, bars) : compare_bits_avx2<_CMP_GT_OQ>(p, bars);
}

// The numbers of blocks [from, to) whose maximum is above the bar (or equal to it, when
// inclusive) into list, in order; returns how many. Room for 8 past them.
AEFAST_AVX2 inline int64_t list_qualifying_blocks(const float* maxima, int64_t from, int64_t to, float bar,
                                                  bool inclusive, int32_t* list) {
  const __m256 bars = _mm256_set1_ps(bar);
  int64_t listed = 0, b = from;
  for (; b + 8 <= to; b += 8) {
    const __m256 m = _mm256_loadu_ps(maxima + b);
    const __m256 hit = inclusive ? _mm256_cmp_ps(m, bars, _CMP_GE_OQ) : _mm256_cmp_ps(m, bars, _CMP_GT_OQ);
    listed += left_pack_offsets8(static_cast<uint32_t>(_mm256_movemask_ps(hit)), static_cast<int32_t>(b), list + listed);
  }
  for (; b < to; ++b)
    if (maxima[b] > bar || (inclusive && maxima[b] == bar)) list[listed++] = static_cast<int32_t>(b);
  return listed;
}

// collect_qualifying with AVX2, without a loop over set bits: the qualifying blocks'
// numbers are left-packed first, 8 maxima at a time, then each of those blocks' elements
// above the bar, 8 at a time, into values and tile offsets, made candidates at the end.
// Only a block holding ties with the bar while `ties` lasts takes the bit loop. (The
// loops over set bits, per block and per element, had been a quarter of topk_forward's
// time on an AVX2-only AMD EPYC; this way, one process alternating, 2 threads, k = 32:
// 1024 x 4096 0.96x the time, 4096 x 4096 0.95x, 1024 x 16384 (k = 64) 0.90x.)
AEFAST_AVX2 void collect_qualifying_avx2(const float* tile, int64_t len, const float* maxima,
                                         int64_t b0, int64_t b1, float bar, int64_t& ties,
                                         int64_t base, std::vector<Candidate<float>>& found, PackScratch& packed) {
  const __m256 bars = _mm256_set1_ps(bar);
  const int64_t whole = std::max(b0, std::min(b1, len / kBlockLen));
  packed.room_for_blocks(whole - b0);
  int32_t* blocks = packed.blocks.data();
  int64_t listed = list_qualifying_blocks(maxima, b0, whole, bar, ties > 0, blocks);
  packed.room_for_elements(listed * kBlockLen);
  float* values = packed.values.data();
  int32_t* offsets = packed.offsets.data();
  int64_t n = 0;
  for (int64_t i = 0; i < listed; ++i) {
    const int32_t at = blocks[i] * static_cast<int32_t>(kBlockLen);
    const __m256 lo = _mm256_loadu_ps(tile + at), hi = _mm256_loadu_ps(tile + at + 8);
    if (ties > 0) {
      const uint32_t equal = compare_bits_avx2<_CMP_EQ_OQ>(tile + at, bars);
      if (equal != 0) {
        if (take_ties(qualifying_bits_avx2(tile + at, bars, true), equal, tile, at, ties, values, offsets, n))
          listed = i + 1 + list_qualifying_blocks(maxima, blocks[i] + 1, whole, bar, false, blocks + i + 1);
        continue;
      }
    }
    n += left_pack8(lo, static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lo, bars, _CMP_GT_OQ))), at,
                    values + n, offsets + n);
    n += left_pack8(hi, static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(hi, bars, _CMP_GT_OQ))), at + 8,
                    values + n, offsets + n);
  }
  const size_t old = found.size();
  found.resize(old + static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) found[old + i] = {values[i], base + offsets[i]};
  collect_blocks<float, float>(tile, len, maxima, whole, b1, bar, ties, base, found);  // a last, partial block
}
#endif

template <typename T, typename A>
AEFAST_INLINE void collect_qualifying(const T* tile, int64_t len, const A* maxima, int64_t b0, int64_t b1, A bar,
                                      int64_t ties, int64_t base, std::vector<Candidate<A>>& found,
                                      PackScratch& packed) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_level() >= Simd::kAvx512)
      return collect_qualifying_avx512(tile, len, maxima, b0, b1, bar, ties, base, found, packed);
    if (simd_level() == Simd::kAvx2)
      return collect_qualifying_avx2(tile, len, maxima, b0, b1, bar, ties, base, found, packed);
  }
#endif
  collect_qualifying_portable<T, A>(tile, len, maxima, b0, b1, bar, ties, base, found);
}

// The k best of x[0, n) into `out`, reading again only blocks that can hold a winner.
// x[0, n) as float32 into out: exact for float16 and bfloat16.
template <typename T>
AEFAST_INLINE void widen(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}
AEFAST_SIMD_CLONES void widen_tile(const at::BFloat16* x, int64_t n, float* out) { widen(x, n, out); }
AEFAST_SIMD_CLONES void widen_tile(const at::Half* x, int64_t n, float* out) { widen(x, n, out); }

template <typename T, typename A>
inline __attribute__((always_inline)) bool block_scan(const T* x, int64_t n, int64_t first, int64_t k, int64_t blocks, Candidate<A>* out,
                ScanScratch<A>& scratch) {
  scratch.maxima.resize(blocks);
  A* maxima = scratch.maxima.data();
  auto& found = scratch.found;
  found.clear();
  const int64_t tile_len = blocks * kBlockLen;
  // float16 and bfloat16 tiles are widened to float32 first (in cache, exactly) and
  // take the float32 paths: their own element loops ran 3-6x slower than float32's.
  using U = std::conditional_t<std::is_same_v<A, float>, float, T>;
  A bar = A(0);
  for (int64_t start = 0; start < n; start += tile_len) {
    const int64_t len = std::min(tile_len, n - start), tile_blocks = (len + kBlockLen - 1) / kBlockLen;
    const U* tile;
    if constexpr (std::is_same_v<U, T>) {
      tile = x + start;
    } else {
      scratch.widened.resize(static_cast<size_t>(tile_len));
      widen_tile(x + start, len, scratch.widened.data());
      tile = scratch.widened.data();
    }
    TileMaxima<A> range;
#ifdef AEFAST_BLOCK_MAXIMA_AVX2
    if constexpr (std::is_same_v<U, float>) {
      range = simd_level() >= Simd::kAvx2 ? block_maxima_avx2(tile, len, maxima) : block_maxima<U, A>(tile, len, maxima);
    } else {
      range = block_maxima<U, A>(tile, len, maxima);
    }
#else
    range = block_maxima<U, A>(tile, len, maxima);
#endif
    if (range.nan) return false;
    // The first tile is whole: elements above its t0 qualify, and the first k equal to
    // it. Later tiles come after all kept candidates, so an element equal to the bar
    // loses its tie: strictly above.
    const bool first_tile = start == 0;
    if (first_tile) bar = maxima_bar(maxima, blocks, k, range.low, range.high);
    collect_qualifying<U, A>(tile, len, maxima, 0, tile_blocks, bar, first_tile ? k : 0, first + start, found,
                             scratch.packed);
    if (static_cast<int64_t>(found.size()) > k) bar = keep_best(found, k, scratch.values, scratch.kept);
  }
  std::copy(found.begin(), found.end(), out);
  return true;
}

AEFAST_SIMD_CLONES bool block_scan_f32(const float* x, int64_t n, int64_t first, int64_t k, int64_t blocks,
                                       Candidate<float>* out, ScanScratch<float>& scratch) {
  return block_scan<float, float>(x, n, first, k, blocks, out, scratch);
}

// Whether a row of n with k winners takes radix_select (float32 keys): where the block
// selection would read again most of the row's blocks, or the heap would sift at most
// elements. On the Xeon, one process alternating, 8M elements a call: radix from 16 k
// >= n on took 0.23-0.91x the time (rows of 64 to 16384); with its sampled bar (rows
// of 1024 on), at 32 k = n on rows of 4096 to 16384 0.59-0.63x and at 64 k = n on rows
// of 8192 0.86x; below that the blocks were faster (32 k = n on rows of 1024 and 2048:
// 1.39x and 1.03x; 64 k = n on rows of 4096: 1.38x). The heap stays for fewer than 8
// winners of a row too short for blocks.
inline bool many_winners(int64_t n, int64_t k, int64_t blocks) {
  if (n >= (int64_t(1) << 31)) return false;  // radix_select's offsets are 32-bit
  return k >= 8 && (blocks == 0 || 16 * k >= n || (n >= 4096 && 32 * k >= n) || (n >= 8192 && 64 * k >= n));
}

// The k best of x[0, n) into `heap`: block selection when the row is long enough.
template <typename T, typename A>
bool scan(const T* x, int64_t n, int64_t first, int64_t k, Candidate<A>* heap, ScanScratch<A>& scratch) {
  const int64_t blocks = tile_blocks(n, k);
  if constexpr (std::is_same_v<A, float>) {
    if (many_winners(n, k, blocks)) {
      if constexpr (std::is_same_v<T, float>) {
        return radix_select(x, n, first, k, heap, scratch.radix);
      } else {
        scratch.widened.resize(static_cast<size_t>(n));
        widen_tile(x, n, scratch.widened.data());
        return radix_select(scratch.widened.data(), n, first, k, heap, scratch.radix);
      }
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    return blocks > 0 ? block_scan_f32(x, n, first, k, blocks, heap, scratch) : topk_scan_f32(x, n, first, k, heap);
  } else {
    return blocks > 0 ? block_scan<T, A>(x, n, first, k, blocks, heap, scratch) : topk_scan<T, A>(x, n, first, k, heap);
  }
}

// A row's k winners, `found` (from scan, or merged from its chunks' scans), ranked
// (value descending, then index ascending) into values/indices; ReLU after selection.
template <typename T, typename A>
void write_winners(std::vector<Candidate<A>>& found, int64_t k, bool relu, bool merged_chunks, std::vector<A>& scratch,
                   std::vector<Candidate<A>>& ranked, RadixScratch& radix, T* values, int64_t* indices) {
  // A lambda, not &better: the comparisons inline (sorting 32 took 3 us through a pointer).
  const auto by_rank = [](const Candidate<A>& a, const Candidate<A>& b) { return better(a, b); };
  const Candidate<A>* best = found.data();
  // Chunks of many winners come in index order (radix select; the block selection's
  // cut): radix again, not a partial sort of chunks * k candidates (one row of 4M,
  // k = 50000 in 4 chunks, 2 threads: 30 -> 16 ms).
  bool in_order = false;  // found's first k are the winners in rank order
  if constexpr (std::is_same_v<A, float>) {
    if (merged_chunks && k > kRankSelectMax &&
        std::is_sorted(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.index < b.index; })) {
      radix_keep_best(found, k, radix);
      radix_rank(found.data(), k, radix);
      in_order = true;
    }
  }
  if (merged_chunks && !in_order) {
    std::partial_sort(found.begin(), found.begin() + k, found.end(), by_rank);
    in_order = true;
  }
  if (!in_order && !std::is_sorted(found.begin(), found.begin() + k, by_rank)) {  // block_scan's cut ranks them
    if (ranked_by_count<A>(k)) {
      ranked.resize(static_cast<size_t>(k));
      scratch.resize(static_cast<size_t>(k + 16));
      rank_select(found.data(), k, k, scratch.data(), ranked.data());
      best = ranked.data();
    } else if constexpr (std::is_same_v<A, float>) {
      radix_rank(found.data(), k, radix);
    } else {
      std::sort(found.begin(), found.begin() + k, by_rank);
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    A v = best[j].value;
    if (relu && v < A(0)) v = A(0);
    values[j] = static_cast<T>(v);
    indices[j] = best[j].index;
  }
}

// out[indices[j]] = values[j] for the indices in [0, width); false if one is outside.
template <typename T>
bool place_row(const T* values, const int64_t* indices, int64_t k, int64_t width, T* out) {
  bool in_range = true;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t c = indices[j];
    if (c < 0 || c >= width) {
      in_range = false;
      continue;
    }
    out[c] = values[j];
  }
  return in_range;
}

// out[0, width) = 0 but out[indices[j]] = values[j]; false if an index is outside [0, width).
template <typename T>
bool write_dense_row(const T* values, const int64_t* indices, int64_t k, int64_t width, T* out) {
  std::memset(static_cast<void*>(out), 0, static_cast<size_t>(width) * sizeof(T));  // 0.0: all bits 0
  return place_row(values, indices, k, width, out);
}

// A buffer of n zeros on a 32-byte boundary, in `storage`: where a streamed row or range
// is built (and left zeroed again).
float* zeroed_floats(std::vector<float>& storage, int64_t n) {
  storage.assign(static_cast<size_t>(n + 8), 0.0f);
  return storage.data() + (8 - reinterpret_cast<uintptr_t>(storage.data()) / sizeof(float) % 8) % 8;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same for float32 rows on 32-byte boundaries (width a multiple of 8), built in
// `row`, a zeroed buffer (left zeroed), then written around the caches. The caller
// checks the indices and fences.
AEFAST_AVX2 void stream_dense_row(const float* values, const int64_t* indices, int64_t k,
                                  int64_t width, float* row, float* out) {
  for (int64_t j = 0; j < k; ++j) row[indices[j]] = values[j];
  stream_floats(row, out, width);
  for (int64_t j = 0; j < k; ++j) row[indices[j]] = 0.0f;
}
#endif

// Whether rows of `width` into `out` are streamed: a streamed output whose rows all
// start on 32-byte boundaries.
bool streamed_rows(const at::Tensor& out, int64_t width) { return width % 8 == 0 && streamed_output(out); }

// A thread's writer of dense rows into `out` (rows of `width`): streamed where allowed
// and streamed_rows says so, else write_dense_row. write() returns false if an index
// is outside [0, width).
template <typename T>
class RowStreamer {
 public:
  RowStreamer(const at::Tensor& out, int64_t width, bool allowed = true) : width_(width) {
#if defined(__x86_64__) && defined(__GNUC__)
    stream_ = allowed && std::is_same_v<T, float> && streamed_rows(out, width);
    if (stream_) row_ = zeroed_floats(zeroed_, width);
#endif
  }
  bool write(const T* values, const int64_t* indices, int64_t k, T* out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (stream_) {
      for (int64_t j = 0; j < k; ++j)
        if (indices[j] < 0 || indices[j] >= width_) return write_dense_row(values, indices, k, width_, out);
      stream_dense_row(reinterpret_cast<const float*>(values), indices, k, width_, row_, reinterpret_cast<float*>(out));
      return true;
    }
#endif
    return write_dense_row(values, indices, k, width_, out);
  }

 private:
  int64_t width_;
  bool stream_ = false;
  std::vector<float> zeroed_;
  float* row_ = nullptr;
};

void scatter_rows_into(const at::Tensor& values_in, const at::Tensor& indices_in, int64_t width, at::Tensor& out);

// Per row of x its k winners into values/indices, and with `dense` the row of x with
// all but them zeroed into dense (topk_mask's output), written as soon as the row is
// selected (with fewer rows than threads, scanned in chunks: afterwards, by
// scatter_rows_into). A row that holds NaN is reported, never ranked.
void select_rows(const at::Tensor& x, int64_t k, bool relu, at::Tensor& values, at::Tensor& indices,
                 at::Tensor* dense) {
  const int64_t B = x.size(0), H = x.size(1);
  if (B == 0) return;
  std::atomic<bool> has_nan{false};
  // Few long rows (batch_topk flattens the batch into one): split each row into
  // chunks scanned in parallel, then merge their candidates. Exact either way.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks =
      B >= threads ? 1 : std::max<int64_t>(1, std::min(2 * threads / B, H / std::max<int64_t>(8 * k, 4096)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    scalar_t* dp = dense ? dense->data_ptr<scalar_t>() : nullptr;
    if (chunks == 1) {
      at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
        ScanScratch<A> scratch;
        std::vector<Candidate<A>> found(static_cast<size_t>(k)), ranked;
        std::vector<A> values_scratch;
        for (int64_t row = r0; row < r1; ++row) {
          if (!scan(xp + row * H, H, 0, k, found.data(), scratch)) {
            has_nan = true;  // NaN has no rank: sorting it is undefined
            continue;
          }
          write_winners<scalar_t, A>(found, k, relu, false, values_scratch, ranked, scratch.radix, vp + row * k,
                                     ip + row * k);
          if (dp) write_dense_row(vp + row * k, ip + row * k, k, H, dp + row * H);
        }
      });
      return;
    }
    const int64_t chunk_len = (H + chunks - 1) / chunks;
    std::vector<Candidate<A>> cand(static_cast<size_t>(B * chunks * k));
    std::vector<int64_t> cand_count(static_cast<size_t>(B * chunks), 0);
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      ScanScratch<A> scratch;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t / chunks, c = t % chunks;
        const int64_t first = c * chunk_len, n = std::min(H, first + chunk_len) - first;
        if (n <= 0) continue;
        const int64_t kk = std::min(k, n);
        if (!scan(xp + row * H + first, n, first, kk, cand.data() + t * k, scratch)) has_nan = true;
        cand_count[t] = kk;
      }
    });
    if (has_nan.load()) return;  // reported below, before any ranking
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      std::vector<Candidate<A>> merged, ranked;
      std::vector<A> values_scratch;
      RadixScratch radix;
      for (int64_t row = r0; row < r1; ++row) {
        merged.clear();
        for (int64_t c = 0; c < chunks; ++c) {
          const Candidate<A>* p = cand.data() + (row * chunks + c) * k;
          merged.insert(merged.end(), p, p + cand_count[row * chunks + c]);
        }
        write_winners<scalar_t, A>(merged, k, relu, true, values_scratch, ranked, radix, vp + row * k, ip + row * k);
      }
    });
  });
  TORCH_CHECK_VALUE(!has_nan.load(), "aefast: x contains NaN; top-k of NaN is undefined");
  if (dense && chunks > 1) scatter_rows_into(values, indices, H, *dense);
}

void check_topk_args(const at::Tensor& x, int64_t k) {
  TORCH_CHECK_VALUE(x.dim() == 2, "aefast: x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(k >= 1 && k <= x.size(1), "aefast: k must be in [1, ", x.size(1), "], got ", k);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_forward(const at::Tensor& x_in, int64_t k, bool relu) {
  check_topk_args(x_in, k);
  const auto x = x_in.contiguous();
  auto values = at::empty({x.size(0), k}, x.options());
  auto indices = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  select_rows(x, k, relu, values, indices, nullptr);
  return {values, indices};
}

namespace {

// topk_mask's forward in one pass: x with all but each row's k winners zeroed (ReLU
// after selection), and the winners' indices in topk_forward's order.
std::tuple<at::Tensor, at::Tensor> topk_mask_rows(const at::Tensor& x_in, int64_t k, bool relu) {
  check_topk_args(x_in, k);
  const auto x = x_in.contiguous();
  auto values = at::empty({x.size(0), k}, x.options());
  auto indices = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  // Each row written after its selection, while the next rows' reads are in flight:
  // 4096 maps of 1024 float32 (spatial_wta) 1.56 ms on a Xeon, alternating with a clone,
  // against 1.85 for a pass of selection then a pass of writing (1024 rows of 4096: 1.54
  // against 1.70). Streamed stores mixed with those reads were slower than the two passes
  // (4096 rows of 4096: 6.0 against 5.6 ms), so an output that scatter_rows streams is
  // selected first, then streamed.
  at::Tensor dense = empty_output(x.sizes(), x.options());
  if (streamed_rows(dense, x.size(1))) {
    select_rows(x, k, relu, values, indices, nullptr);
    scatter_rows_into(values, indices, x.size(1), dense);
  } else {
    select_rows(x, k, relu, values, indices, &dense);
  }
  return {dense, indices};
}

void check_scatter_args(const at::Tensor& values, const at::Tensor& indices, int64_t width) {
  TORCH_CHECK_VALUE(values.dim() == 2 && indices.sizes() == values.sizes(),
                    "aefast: values and indices must both be (B, k)");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong, "aefast: indices must be int64");
  TORCH_CHECK_VALUE(width >= 0, "aefast: width must be >= 0, got ", width);
}

// One write of each output row (zeros, then its k values), in huge pages (common.h):
// torch's zeros + scatter_ writes the row twice and faults it in 4 KB at a time.
at::Tensor scatter_rows(const at::Tensor& values, const at::Tensor& indices, int64_t width) {
  check_scatter_args(values, indices, width);
  at::Tensor out = empty_output({values.size(0), width}, values.options());
  scatter_rows_into(values, indices, width, out);
  return out;
}

// out: contiguous (B, width) of the values' dtype, every element of which is written.
void scatter_rows_into(const at::Tensor& values_in, const at::Tensor& indices_in, int64_t width, at::Tensor& out) {
  const auto values = values_in.contiguous();
  const auto indices = indices_in.contiguous();
  const int64_t B = values.size(0), K = values.size(1);
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_rows", [&] {
    const scalar_t* vp = values.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Fewer rows than threads (batch_topk's one row of B * H): the zeros written by
    // all threads, column ranges apart (one thread zeroing 16 MB was a fifth of
    // batch_topk's forward at 1024 x 4096). Where a row's indices ascend (batch_topk's
    // winners come in index order) each range of 64K elements gets its values right
    // after its zeros, from cache; one thread writing the 32K values of that forward
    // into 16 MB zeroed before took 0.25 ms, a line fetched back per value.
    const bool split_fill = B < at::get_num_threads();
    bool filled = false;
    if (split_fill) {
      constexpr int64_t kRange = int64_t(1) << 16;
      bool ascending = true;
      for (int64_t r = 0; r < B && ascending; ++r) ascending = std::is_sorted(ip + r * K, ip + r * K + K);
      // Large float32 outputs: each range built in a zeroed buffer and streamed (the
      // buffer left zeroed), as RowStreamer does for whole rows.
      const bool stream = ascending && streamed_output(out);  // float32 only
      const int64_t total = B * width;
      at::parallel_for(0, (total + kRange - 1) / kRange, 1, [&](int64_t q0, int64_t q1) {
        std::vector<float> zeroed;
        scalar_t* buffer = stream ? reinterpret_cast<scalar_t*>(zeroed_floats(zeroed, kRange)) : nullptr;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t s0 = q * kRange, s1 = std::min(total, s0 + kRange);
          scalar_t* range = stream ? buffer : op + s0;
          if (!stream) std::memset(static_cast<void*>(range), 0, static_cast<size_t>(s1 - s0) * sizeof(scalar_t));
          if (!ascending) continue;
          // The values of the rows the range meets, at their places in it.
          auto place = [&](bool zero) {
            for (int64_t r = s0 / width; r * width < s1; ++r) {
              const int64_t* row = ip + r * K;
              const int64_t c0 = std::max(s0 - r * width, int64_t(0)), c1 = std::min(s1 - r * width, width);
              for (int64_t j = std::lower_bound(row, row + K, c0) - row; j < K && row[j] < c1; ++j)
                range[r * width + row[j] - s0] = zero ? scalar_t(0) : vp[r * K + j];
            }
          };
          place(false);
#if defined(__x86_64__) && defined(__GNUC__)
          if (stream) {  // float32 only; a last range's tail past a multiple of 8 plainly
            const int64_t n = s1 - s0, whole = n / 8 * 8;
            stream_floats(reinterpret_cast<const float*>(range), reinterpret_cast<float*>(op + s0), whole);
            std::copy(range + whole, range + n, op + s0 + whole);
            place(true);
          }
#endif
        }
        fence_streams();
      });
      filled = ascending;
      for (int64_t r = 0; r < B && filled && K > 0; ++r)  // ascending: the ends are the extremes
        if (ip[r * K] < 0 || ip[r * K + K - 1] >= width) out_of_range = true;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(width, 1));
    if (!filled) at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
      RowStreamer<scalar_t> streamer(out, width, !split_fill);  // split_fill: zeroed above
      for (int64_t r = r0; r < r1; ++r) {
        const bool in_range = split_fill ? place_row(vp + r * K, ip + r * K, K, width, op + r * width)  // zeroed above
                                         : streamer.write(vp + r * K, ip + r * K, K, op + r * width);
        if (!in_range) out_of_range = true;
      }
      fence_streams();
    });
  });
  TORCH_CHECK_INDEX(!out_of_range.load(), "aefast: indices must be in [0, ", width, ")");
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("topk_forward", &topk_forward);
  m.impl("topk_mask_rows", &topk_mask_rows);
  m.impl("scatter_rows", &scatter_rows);
}

}  // namespace cpu
}  // namespace aefast
