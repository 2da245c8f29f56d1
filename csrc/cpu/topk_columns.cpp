// CPU lifetime top-k: per column of a row-major x (B, H) the k largest (ties to the
// lower row), and the matrix that keeps them and zeros the rest, written row-major
// (column_topk); its gradient keeps the same entries of grad (keep_rows). Reading
// and writing x's layout in place: a column-wise selection on x.t() returns an (H, B)
// result whose transposed copies (and the backward's) cost more than the selection.
//
// x goes by in panels of 64 columns, four tiles of 16: 256 contiguous bytes of each
// float32 row read per step (the rows are pages apart: prefetched a few rows ahead),
// kept per tile as integer keys in the values' order, one vector lane per column,
// with each lane's min, max, sum and sum of squares. 32-bit keys (float32, float16,
// bfloat16) are kept as two 16-bit halves, apart: the count passes read the high
// halves alone (half the bytes; at 1024 rows a tile of them stays in L1). Per tile, 16
// bars in lockstep: first two counts a quarter of a deviation either side of where the
// k-th would be for normal data (a bracket of a few dozen elements, most of the time),
// then steps on the key, one vector count over the tile each (halving a wide bracket,
// interpolating the counts in a narrow one), until each lane keeps k to k + 4 or its
// bracket is one high half wide; the candidates collected (AVX-512: by compress, no
// branch per hit), their whole keys put together, the exact k among them. (Where a
// lane's bracket holds many keys of one high half, the tile's whole keys are put
// together and the steps go on over them.) A bit per kept entry, grouped by 64
// columns, then the output written row by row from x, streamed.
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

template <typename A>
using KeyOf = std::conditional_t<std::is_same_v<A, double>, int64_t, int32_t>;

constexpr int64_t kLanes = 16;
constexpr int64_t kPrefetchRows = 24;  // how far ahead the copies ask for rows
constexpr int64_t kPanel = 4;          // tiles copied side by side: 256 bytes of float32 per row
static_assert(kPanel * kLanes == 64, "a panel is one group of 64 columns of KeptBits");

// A 32-bit key's high half: the same order with neighbours merged (a bfloat16's
// precision). The count passes go over these, half a tile's bytes: at 1024 rows a tile
// of them stays in L1, and a vector holds two rows. The low halves are kept apart, read
// for the cut alone.
using ShortKey = int16_t;
AEFAST_INLINE ShortKey short_key(int32_t key) { return static_cast<ShortKey>(key >> 16); }
AEFAST_INLINE int32_t whole_key(ShortKey high, uint16_t low) {
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(high)) << 16 | low);
}

// Where a panel's keys are: 64-bit keys (float64) whole; 32-bit keys (float32, float16,
// bfloat16) as their two halves. Tiles one after the other, lane l of a tile's row j at
// [j * 16 + l].
template <typename Key>
struct TileKeys {
  Key* whole = nullptr;
  ShortKey* high = nullptr;
  uint16_t* low = nullptr;
  // Tile p of a panel of n rows.
  TileKeys tile(int64_t p, int64_t n) const {
    const int64_t at = p * kLanes * n;
    return {whole ? whole + at : nullptr, high ? high + at : nullptr, low ? low + at : nullptr};
  }
};

// A thread's scratch. A tile's keys are in its row-major layout: lane l of row j at
// [j * kLanes + l].
template <typename Key>
struct TileScratch {
  std::vector<Key> keys;  // a panel's whole keys; for 32-bit keys, a tile's when its halves do not do
  std::vector<ShortKey> high;  // a panel's keys' halves (32-bit keys)
  std::vector<uint16_t> low;
  std::vector<int32_t> rows;  // per lane, the rows of its candidates
  std::vector<uint32_t> entries;  // (row << 4 | lane) of the candidates, in row order
  std::vector<Candidate<Key>> found;
  std::vector<Key> scratch;
};

// Per lane of a tile: the smallest and largest key, the sum and the sum of squares of
// the values (a first guess at where the k-th largest lies).
template <typename Key, typename A>
struct LaneStats {
  Key low[kLanes], high[kLanes];
  A sum[kLanes], squares[kLanes];
};

// counts[l] = how many of the tile's keys in lane l are >= bars[l].
template <typename Key>
AEFAST_INLINE void count_lanes(const Key* keys, int64_t n, const Key* bars, int32_t* counts) {
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j)
    for (int64_t l = 0; l < kLanes; ++l) c[l] += keys[j * kLanes + l] >= bars[l];
  std::copy(c, c + kLanes, counts);
}

// Per lane l, the positions j whose key is above bars[l], and the first ties[l] whose
// key equals it, into rows[l * n ...]; their number into counts.
template <typename Key>
AEFAST_INLINE void collect_lanes(const Key* keys, int64_t n, const Key* bars, const int32_t* ties, int32_t* rows,
                                 int32_t* counts) {
  int32_t c[kLanes] = {}, left[kLanes];
  std::copy(ties, ties + kLanes, left);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t l = 0; l < kLanes; ++l) {
      const Key key = keys[j * kLanes + l];
      const bool tie = key == bars[l] && left[l] > 0;
      left[l] -= tie;
      if (key > bars[l] || tie) rows[l * n + c[l]++] = static_cast<int32_t>(j);
    }
  std::copy(c, c + kLanes, counts);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw"))) void count_lanes_avx512(const int32_t* keys, int64_t n, const int32_t* bars,
                                                                    int32_t* counts) {
  const __m512i bar = _mm512_loadu_si512(bars), one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; ++j)
    c = _mm512_mask_add_epi32(c, _mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + j * kLanes), bar), c, one);
  _mm512_storeu_si512(counts, c);
}

AEFAST_AVX2 void count_lanes_avx2(const int32_t* keys, int64_t n, const int32_t* bars,
                                  int32_t* counts) {
  // a >= b as !(b > a): a compare gives -1 where true, so subtracting it counts.
  const __m256i bar0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars));
  const __m256i bar1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars + 8));
  __m256i below0 = _mm256_setzero_si256(), below1 = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; ++j) {
    const __m256i* row = reinterpret_cast<const __m256i*>(keys + j * kLanes);
    below0 = _mm256_sub_epi32(below0, _mm256_cmpgt_epi32(bar0, _mm256_loadu_si256(row)));
    below1 = _mm256_sub_epi32(below1, _mm256_cmpgt_epi32(bar1, _mm256_loadu_si256(row + 1)));
  }
  alignas(32) int32_t below[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(below), below0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(below + 8), below1);
  for (int64_t l = 0; l < kLanes; ++l) counts[l] = static_cast<int32_t>(n) - below[l];
}

// count_lanes on short keys: two rows a vector, counted in 16-bit lanes that are
// widened every kShortChunk rows (fewer than 2^15 per lane).
constexpr int64_t kShortChunk = 32766;

__attribute__((target("avx512f,avx512bw"))) void count_short_lanes_avx512(const ShortKey* keys, int64_t n,
                                                                          const ShortKey* bars, int32_t* counts) {
  const __m512i bar = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars)));
  const __m512i one = _mm512_set1_epi16(1);
  __m512i total = _mm512_setzero_si512();
  for (int64_t j0 = 0; j0 < n; j0 += kShortChunk) {
    const int64_t j1 = std::min(n, j0 + kShortChunk);
    __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();  // two chains
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      c0 = _mm512_mask_add_epi16(c0, _mm512_cmpge_epi16_mask(_mm512_loadu_si512(keys + j * kLanes), bar), c0, one);
      c1 = _mm512_mask_add_epi16(c1, _mm512_cmpge_epi16_mask(_mm512_loadu_si512(keys + (j + 2) * kLanes), bar), c1, one);
    }
    for (; j < j1; j += 2) {  // one or two rows left, then maybe one
      const __mmask32 rows = j + 1 < j1 ? ~__mmask32(0) : __mmask32(0xFFFF);
      const __m512i key = _mm512_maskz_loadu_epi16(rows, keys + j * kLanes);
      c0 = _mm512_mask_add_epi16(c0, _mm512_mask_cmpge_epi16_mask(rows, key, bar), c0, one);
    }
    const __m512i c = _mm512_add_epi16(c0, c1);  // even rows' counts, then odd rows'
    total = _mm512_add_epi32(total, _mm512_cvtepi16_epi32(_mm512_castsi512_si256(c)));
    total = _mm512_add_epi32(total, _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(c, 1)));
  }
  _mm512_storeu_si512(counts, total);
}

AEFAST_AVX2 void count_short_lanes_avx2(const ShortKey* keys, int64_t n, const ShortKey* bars, int32_t* counts) {
  const __m256i bar = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars));
  __m256i below_low = _mm256_setzero_si256(), below_high = _mm256_setzero_si256();  // lanes 0-7, 8-15
  for (int64_t j0 = 0; j0 < n; j0 += kShortChunk) {
    const int64_t j1 = std::min(n, j0 + kShortChunk);
    __m256i b0 = _mm256_setzero_si256(), b1 = _mm256_setzero_si256();  // as in count_lanes_avx2
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      b0 = _mm256_sub_epi16(b0, _mm256_cmpgt_epi16(bar, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j * kLanes))));
      b1 = _mm256_sub_epi16(b1, _mm256_cmpgt_epi16(bar, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + (j + 1) * kLanes))));
    }
    if (j < j1) b0 = _mm256_sub_epi16(b0, _mm256_cmpgt_epi16(bar, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j * kLanes))));
    const __m256i b = _mm256_add_epi16(b0, b1);
    below_low = _mm256_add_epi32(below_low, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(b)));
    below_high = _mm256_add_epi32(below_high, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(b, 1)));
  }
  alignas(32) int32_t below[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(below), below_low);
  _mm256_store_si256(reinterpret_cast<__m256i*>(below + 8), below_high);
  for (int64_t l = 0; l < kLanes; ++l) counts[l] = static_cast<int32_t>(n) - below[l];
}

// entries, (row << 4 | lane) in row order, dealt out to the lanes: lane l's rows into
// rows[l * n ...], their number into counts.
AEFAST_INLINE void deal_entries(const uint32_t* entries, int64_t size, int64_t n, int32_t* rows, int32_t* counts) {
  int32_t c[kLanes] = {};
  for (int64_t e = 0; e < size; ++e) {
    const uint32_t l = entries[e] & 15u;
    rows[l * n + c[l]++] = static_cast<int32_t>(entries[e] >> 4);
  }
  std::copy(c, c + kLanes, counts);
}

// Each row's hits, (row << 4 | lane) for the lanes at or above their bars, compressed
// into one list in row order (no branch per hit, which mispredicts); then dealt out
// to the lanes in that order. entries: room for 16 n + 16.
__attribute__((target("avx512f,avx512bw"))) void collect_lanes_avx512(const int32_t* keys, int64_t n, const int32_t* bars,
                                                                      const int32_t* ties, int32_t* rows,
                                                                      int32_t* counts, uint32_t* entries) {
  const __m512i bar = _mm512_loadu_si512(bars), one = _mm512_set1_epi32(1);
  const __m512i next_row = _mm512_set1_epi32(1 << 4);
  __m512i entry = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);  // row 0's
  const __m512i left_at_start = _mm512_loadu_si512(ties);
  const bool no_cut = _mm512_cmpeq_epi32_mask(left_at_start, _mm512_set1_epi32(std::numeric_limits<int32_t>::max())) ==
                      0xFFFF;
  int64_t size = 0;
  if (no_cut) {  // every tie at the bar wins (the usual case): a third of the work per row
    for (int64_t j = 0; j < n; ++j, entry = _mm512_add_epi32(entry, next_row)) {
      const __mmask16 hit = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + j * kLanes), bar);
      _mm512_storeu_si512(entries + size, _mm512_maskz_compress_epi32(hit, entry));
      size += __builtin_popcount(hit);
    }
  } else {
    __m512i left = left_at_start;
    for (int64_t j = 0; j < n; ++j, entry = _mm512_add_epi32(entry, next_row)) {
      const __m512i key = _mm512_loadu_si512(keys + j * kLanes);
      const __mmask16 tie = _mm512_mask_cmpeq_epi32_mask(_mm512_cmpgt_epi32_mask(left, _mm512_setzero_si512()), key, bar);
      left = _mm512_mask_sub_epi32(left, tie, left, one);
      const __mmask16 hit = _mm512_cmpgt_epi32_mask(key, bar) | tie;
      _mm512_storeu_si512(entries + size, _mm512_maskz_compress_epi32(hit, entry));
      size += __builtin_popcount(hit);
    }
  }
  deal_entries(entries, size, n, rows, counts);
}

// collect_lanes_avx512 on short keys, every key at or above its bar (no tie limit):
// two rows a compare.
__attribute__((target("avx512f,avx512bw"))) void collect_short_lanes_avx512(const ShortKey* keys, int64_t n,
                                                                            const ShortKey* bars, int32_t* rows,
                                                                            int32_t* counts, uint32_t* entries) {
  const __m512i bar = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars)));
  const __m512i next_row = _mm512_set1_epi32(1 << 4), two_rows = _mm512_set1_epi32(2 << 4);
  __m512i entry = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);  // row 0's
  int64_t size = 0;
  for (int64_t j = 0; j < n; j += 2, entry = _mm512_add_epi32(entry, two_rows)) {
    const __mmask32 rows_here = j + 1 < n ? ~__mmask32(0) : __mmask32(0xFFFF);
    const __mmask32 hit = _mm512_mask_cmpge_epi16_mask(rows_here, _mm512_maskz_loadu_epi16(rows_here, keys + j * kLanes), bar);
    const __mmask16 first = static_cast<__mmask16>(hit), second = static_cast<__mmask16>(hit >> 16);
    _mm512_storeu_si512(entries + size, _mm512_maskz_compress_epi32(first, entry));
    size += __builtin_popcount(first);
    _mm512_storeu_si512(entries + size, _mm512_maskz_compress_epi32(second, _mm512_add_epi32(entry, next_row)));
    size += __builtin_popcount(second);
  }
  deal_entries(entries, size, n, rows, counts);
}

// The same with AVX2: a row a compare, its hits dealt out bit by bit.
AEFAST_AVX2 void collect_short_lanes_avx2(const ShortKey* keys, int64_t n, const ShortKey* bars, int32_t* rows,
                                          int32_t* counts) {
  const __m256i bar = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars));
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    // below: -1 where key < bar; packed to bytes, lanes 0-7 in bits 0-7, lanes 8-15 in 16-23
    const __m256i below = _mm256_cmpgt_epi16(bar, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j * kLanes)));
    const uint32_t bytes = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(below, below)));
    const uint32_t hits = ~((bytes & 0xFFu) | ((bytes >> 8) & 0xFF00u)) & 0xFFFFu;
    for (uint32_t m = hits; m != 0; m &= m - 1) {
      const int l = __builtin_ctz(m);
      rows[l * n + c[l]++] = static_cast<int32_t>(j);
    }
  }
  std::copy(c, c + kLanes, counts);
}

AEFAST_AVX2 void collect_lanes_avx2(const int32_t* keys, int64_t n, const int32_t* bars,
                                    const int32_t* ties, int32_t* rows, int32_t* counts) {
  const __m256i bar[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars + 8))};
  __m256i left[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ties)),
                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ties + 8))};
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    const __m256i* row = reinterpret_cast<const __m256i*>(keys + j * kLanes);
    uint32_t hits = 0;
    for (int h = 0; h < 2; ++h) {  // compares give -1 where true: adding a tie counts it down
      const __m256i key = _mm256_loadu_si256(row + h);
      const __m256i tie = _mm256_and_si256(_mm256_cmpeq_epi32(key, bar[h]), _mm256_cmpgt_epi32(left[h], _mm256_setzero_si256()));
      left[h] = _mm256_add_epi32(left[h], tie);
      const __m256i hit = _mm256_or_si256(_mm256_cmpgt_epi32(key, bar[h]), tie);
      hits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(hit))) << (8 * h);
    }
    for (uint32_t m = hits; m != 0; m &= m - 1) {
      const int l = __builtin_ctz(m);
      rows[l * n + c[l]++] = static_cast<int32_t>(j);
    }
  }
  std::copy(c, c + kLanes, counts);
}

// The keys of +inf and -inf: a NaN's key lies above the one or below the other, so the
// copies find NaNs in their lanes' largest and smallest keys.
constexpr int32_t kKeyOfInfinity = 0x7F800000;
constexpr int32_t kKeyOfMinusInfinity = static_cast<int32_t>(0xFF800000u ^ 0x7FFFFFFFu);

// kTiles full tiles of float32 (or float16, bfloat16) side by side: the keys of X's rows j, columns
// [16 p, 16 p + 16) into tile p of keys, the tile's lane statistics into stats[p].
// Returns false on a NaN. The rows are R apart, a page or more: several tiles per
// row read make the most of each page and each row is prefetched a few rows ahead,
// which no hardware prefetcher does across pages.
template <int kTiles, typename E>
__attribute__((target("avx512f,avx512bw"))) bool copy_tiles_avx512(const E* X, int64_t R, int64_t n,
                                                                   const TileKeys<int32_t>& keys,
                                                                   LaneStats<int32_t, float>* stats) {
  __m512i lo[kTiles], hi[kTiles];
  __m512 sum[kTiles], squares[kTiles];
  for (int p = 0; p < kTiles; ++p) {
    lo[p] = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
    hi[p] = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
    sum[p] = squares[p] = _mm512_setzero_ps();
  }
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t j = 0; j < n; ++j) {
    for (int p = 0; p < kTiles; ++p) __builtin_prefetch(X + std::min(j + kPrefetchRows, n - 1) * R + kLanes * p);
    for (int p = 0; p < kTiles; ++p) {
      const __m512 v = load16_as_float(X + j * R + kLanes * p);
      const __m512i i = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));  // -0.0 -> +0.0
      const __m512i key = _mm512_ternarylogic_epi32(i, _mm512_srai_epi32(i, 31), magnitude, 0x78);  // i ^ (sign & magnitude)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys.high + (p * n + j) * kLanes),
                          _mm512_cvtepi32_epi16(_mm512_srai_epi32(key, 16)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys.low + (p * n + j) * kLanes), _mm512_cvtepi32_epi16(key));
      lo[p] = _mm512_min_epi32(lo[p], key);
      hi[p] = _mm512_max_epi32(hi[p], key);
      sum[p] = _mm512_add_ps(sum[p], v);
      squares[p] = _mm512_add_ps(squares[p], _mm512_mul_ps(v, v));
    }
  }
  for (int p = 0; p < kTiles; ++p) {
    _mm512_storeu_si512(stats[p].low, lo[p]);
    _mm512_storeu_si512(stats[p].high, hi[p]);
    _mm512_storeu_ps(stats[p].sum, sum[p]);
    _mm512_storeu_ps(stats[p].squares, squares[p]);
  }
  __mmask16 nan = 0;
  for (int p = 0; p < kTiles; ++p)
    nan |= _mm512_cmpgt_epi32_mask(hi[p], _mm512_set1_epi32(kKeyOfInfinity)) |
           _mm512_cmplt_epi32_mask(lo[p], _mm512_set1_epi32(kKeyOfMinusInfinity));
  return nan == 0;
}

template <int kTiles, typename E>
AEFAST_AVX2 bool copy_tiles_avx2(const E* X, int64_t R, int64_t n, const TileKeys<int32_t>& keys,
                                 LaneStats<int32_t, float>* stats) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), low_half = _mm256_set1_epi32(0xFFFF);
  __m256i lo[2 * kTiles], hi[2 * kTiles];
  __m256 sum[2 * kTiles], squares[2 * kTiles];
  for (int h = 0; h < 2 * kTiles; ++h) {
    lo[h] = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    hi[h] = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
    sum[h] = squares[h] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int p = 0; p < kTiles; ++p) __builtin_prefetch(X + std::min(j + kPrefetchRows, n - 1) * R + kLanes * p);
    __m256i first_half = _mm256_setzero_si256();
    for (int h = 0; h < 2 * kTiles; ++h) {  // half h % 2 of tile h / 2
      const __m256 v = load8_as_float(X + j * R + 8 * h);
      const __m256i i = _mm256_castps_si256(_mm256_add_ps(v, _mm256_setzero_ps()));
      const __m256i key = _mm256_xor_si256(i, _mm256_and_si256(_mm256_srai_epi32(i, 31), magnitude));
      if (h % 2 == 0) {
        first_half = key;
      } else {  // the row's 16 keys' halves: packing interleaves 64-bit quarters, put back in order
        const __m256i high = _mm256_packs_epi32(_mm256_srai_epi32(first_half, 16), _mm256_srai_epi32(key, 16));
        const __m256i low = _mm256_packus_epi32(_mm256_and_si256(first_half, low_half), _mm256_and_si256(key, low_half));
        const int64_t at = ((h / 2) * n + j) * kLanes;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys.high + at), _mm256_permute4x64_epi64(high, 0xD8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys.low + at), _mm256_permute4x64_epi64(low, 0xD8));
      }
      lo[h] = _mm256_min_epi32(lo[h], key);
      hi[h] = _mm256_max_epi32(hi[h], key);
      sum[h] = _mm256_add_ps(sum[h], v);
      squares[h] = _mm256_add_ps(squares[h], _mm256_mul_ps(v, v));
    }
  }
  for (int h = 0; h < 2 * kTiles; ++h) {
    LaneStats<int32_t, float>& st = stats[h / 2];
    const int half = 8 * (h % 2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(st.low + half), lo[h]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(st.high + half), hi[h]);
    _mm256_storeu_ps(st.sum + half, sum[h]);
    _mm256_storeu_ps(st.squares + half, squares[h]);
  }
  __m256i nan = _mm256_setzero_si256();
  for (int h = 0; h < 2 * kTiles; ++h)
    nan = _mm256_or_si256(nan, _mm256_or_si256(_mm256_cmpgt_epi32(hi[h], _mm256_set1_epi32(kKeyOfInfinity)),
                                               _mm256_cmpgt_epi32(_mm256_set1_epi32(kKeyOfMinusInfinity), lo[h])));
  return _mm256_testz_si256(nan, nan);
}
#endif

// The keys of one tile (lanes past the last column: copies of the last) and its lane
// statistics. Returns false on a NaN.
template <typename T, typename A>
bool copy_tile(const T* X, int64_t R, int64_t n, int64_t lanes, const TileKeys<KeyOf<A>>& keys,
               LaneStats<KeyOf<A>, A>& stats) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<A, float>) {  // float32, float16, bfloat16
    if (lanes == kLanes && simd_level() == Simd::kAvx512) return copy_tiles_avx512<1>(X, R, n, keys, &stats);
    if (lanes == kLanes && simd_level() == Simd::kAvx2) return copy_tiles_avx2<1>(X, R, n, keys, &stats);
  }
#endif
  std::fill(stats.low, stats.low + kLanes, std::numeric_limits<KeyOf<A>>::max());
  std::fill(stats.high, stats.high + kLanes, std::numeric_limits<KeyOf<A>>::min());
  std::fill(stats.sum, stats.sum + kLanes, A(0));
  std::fill(stats.squares, stats.squares + kLanes, A(0));
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const A v = static_cast<A>(X[j * R + (l < lanes ? l : lanes - 1)]);
      bad |= v != v;
      const KeyOf<A> key = order_key(v);
      if constexpr (std::is_same_v<KeyOf<A>, int32_t>) {
        keys.high[j * kLanes + l] = short_key(key);
        keys.low[j * kLanes + l] = static_cast<uint16_t>(key);
      } else {
        keys.whole[j * kLanes + l] = key;
      }
      stats.low[l] = std::min(stats.low[l], key);
      stats.high[l] = std::max(stats.high[l], key);
      stats.sum[l] += v;
      stats.squares[l] += v * v;
    }
  }
  return bad == 0;
}

// The keys of a panel of `columns` <= 16 kPanel columns, tile p's lane statistics in
// stats[p]. Returns false on a NaN.
template <typename T, typename A>
bool copy_panel(const T* X, int64_t R, int64_t n, int64_t columns, const TileKeys<KeyOf<A>>& keys,
                LaneStats<KeyOf<A>, A>* stats) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<A, float>) {  // float32, float16, bfloat16
    if (columns == kPanel * kLanes && simd_level() == Simd::kAvx512) return copy_tiles_avx512<kPanel>(X, R, n, keys, stats);
    if (columns == kPanel * kLanes && simd_level() == Simd::kAvx2) return copy_tiles_avx2<kPanel>(X, R, n, keys, stats);
  }
#endif
  bool ok = true;
  for (int64_t p = 0; p * kLanes < columns; ++p)
    ok &= copy_tile<T, A>(X + p * kLanes, R, n, std::min(kLanes, columns - p * kLanes), keys.tile(p, n), stats[p]);
  return ok;
}

template <typename Key>
void count_tile(const Key* keys, int64_t n, const Key* bars, int32_t* counts) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<Key, int32_t>) {
    if (simd_level() == Simd::kAvx512) return count_lanes_avx512(keys, n, bars, counts);
    if (simd_level() == Simd::kAvx2) return count_lanes_avx2(keys, n, bars, counts);
  }
#endif
  count_lanes(keys, n, bars, counts);
}

// count_tile on short keys, the bars given as 32-bit ints in their range.
void count_short_tile(const ShortKey* keys, int64_t n, const int32_t* wide_bars, int32_t* counts) {
  ShortKey bars[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) bars[l] = static_cast<ShortKey>(wide_bars[l]);
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() == Simd::kAvx512) return count_short_lanes_avx512(keys, n, bars, counts);
  if (simd_level() == Simd::kAvx2) return count_short_lanes_avx2(keys, n, bars, counts);
#endif
  count_lanes(keys, n, bars, counts);
}

// Per lane, the rows whose short key is at or above wide_bars[l] (a short key's range).
void collect_short_tile(const ShortKey* keys, int64_t n, const int32_t* wide_bars, int32_t* rows, int32_t* counts,
                        std::vector<uint32_t>& entries) {
  ShortKey bars[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) bars[l] = static_cast<ShortKey>(wide_bars[l]);
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() == Simd::kAvx512) {
    entries.resize(static_cast<size_t>(kLanes * (n + 2)));
    return collect_short_lanes_avx512(keys, n, bars, rows, counts, entries.data());
  }
  if (simd_level() == Simd::kAvx2) return collect_short_lanes_avx2(keys, n, bars, rows, counts);
#endif
  int32_t no_limit[kLanes];
  std::fill(no_limit, no_limit + kLanes, std::numeric_limits<int32_t>::max());
  collect_lanes(keys, n, bars, no_limit, rows, counts);
}

template <typename Key>
void collect_tile(const Key* keys, int64_t n, const Key* bars, const int32_t* ties, int32_t* rows, int32_t* counts,
                  std::vector<uint32_t>& entries) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<Key, int32_t>) {
    if (simd_level() == Simd::kAvx512) {
      entries.resize(static_cast<size_t>(kLanes * (n + 1)));
      return collect_lanes_avx512(keys, n, bars, ties, rows, counts, entries.data());
    }
    if (simd_level() == Simd::kAvx2) return collect_lanes_avx2(keys, n, bars, ties, rows, counts);
  }
#endif
  collect_lanes(keys, n, bars, ties, rows, counts);
}

// Where a normal distribution's top `share` begins, in standard deviations (clamped to
// +-8): the first guess of each column's bar.
double normal_quantile_above(double share) {
  double low = -8.0, high = 8.0;
  for (int i = 0; i < 60; ++i) {
    const double mid = 0.5 * (low + high);
    (0.5 * std::erfc(mid / std::sqrt(2.0)) > share ? low : high) = mid;
  }
  return 0.5 * (low + high);
}

// Per lane, a bracket [bar, top) around the k-th largest key: count(>= bar) >= k >
// count(>= top), the two counts kept.
template <typename Key>
struct Brackets {
  Key bar[kLanes], top[kLanes];
  int32_t at_bar[kLanes], at_top[kLanes];
  int32_t lowered[kLanes];  // passes in a row that brought top down

  // A key inside (bar, top) whose count came back: the end of the bracket it replaces.
  void narrow(int64_t l, Key key, int32_t count, int64_t k) {
    if (count >= k && key > bar[l]) {
      bar[l] = key;
      at_bar[l] = count;
      lowered[l] = 0;
    } else if (count < k && key < top[l]) {
      top[l] = key;
      at_top[l] = count;
      ++lowered[l];
    }
  }
};

// Count passes over a tile, all lanes in lockstep (count_pass(bars, counts): one), until
// each lane keeps at most `enough` or its bracket is two adjacent keys.
template <typename Key, typename CountPass>
void narrow_brackets(Brackets<Key>& b, int64_t k, int64_t enough, CountPass count_pass) {
  using UKey = std::make_unsigned_t<Key>;
  int32_t counts[kLanes];
  for (;;) {
    Key mid[kLanes];
    bool all_done = true;
    for (int64_t l = 0; l < kLanes; ++l) {
      const UKey gap = static_cast<UKey>(b.top[l]) - static_cast<UKey>(b.bar[l]);
      const bool done = b.at_bar[l] <= enough || gap <= 1;
      all_done = all_done && done;
      // Within a bracket of a few k elements the counts are near linear in the key: aim
      // at k + 2 between the two ends' counts (a quarter of the gap at least from each
      // end); wider, halve it.
      UKey step = gap / 2;
      if (!done && b.at_bar[l] - b.at_top[l] <= 4 * k) {
        const double f = static_cast<double>(b.at_bar[l] - (k + 2)) / static_cast<double>(b.at_bar[l] - b.at_top[l]);
        step = static_cast<UKey>(std::clamp(f, 0.25, 0.75) * static_cast<double>(gap));
        step = std::clamp<UKey>(step, 1, gap - 1);
      } else if (!done && b.lowered[l] >= 2) {
        // A wide bracket whose top came down twice running may hold many elements
        // equal to bar (ReLU's zeros): then the k-th is bar itself, and halving would
        // take some 30 passes to find the next key. One pass at bar + 1 tells.
        step = 1;
      }
      mid[l] = done ? b.bar[l] : static_cast<Key>(static_cast<UKey>(b.bar[l]) + step);  // bar: no change
    }
    if (all_done) return;
    count_pass(mid, counts);
    for (int64_t l = 0; l < kLanes; ++l) b.narrow(l, mid[l], counts[l], k);
  }
}

// One pass per first guess; a guess outside its lane's bracket is replaced by the bar
// (no news).
template <typename Key, typename CountPass>
void try_guesses(Brackets<Key>& b, Key (&guess)[2][kLanes], int64_t k, CountPass count_pass) {
  int32_t counts[kLanes];
  for (int g = 0; g < 2; ++g) {
    for (int64_t l = 0; l < kLanes; ++l)
      if (!(guess[g][l] > b.bar[l] && guess[g][l] < b.top[l])) guess[g][l] = b.bar[l];
    count_pass(guess[g], counts);
    for (int64_t l = 0; l < kLanes; ++l) b.narrow(l, guess[g][l], counts[l], k);
  }
}

// Each lane's first bracket, the whole range of its keys (no NaN, so high + 1 is a
// key), and two first guesses a quarter of a standard deviation either side of where the
// k-th would be for normal data: for most columns a bracket of a few dozen elements
// after their two passes. Data far from normal only spends them. z:
// normal_quantile_above(k / B).
template <typename Key, typename A>
void first_brackets(const LaneStats<Key, A>& stats, int64_t B, double z, Brackets<Key>& b, Key (&guess)[2][kLanes]) {
  constexpr double kWidth = 0.25;
  for (int64_t l = 0; l < kLanes; ++l) {
    b.bar[l] = stats.low[l];
    b.top[l] = static_cast<Key>(stats.high[l] + 1);
    b.at_bar[l] = static_cast<int32_t>(B);
    b.at_top[l] = 0;
    b.lowered[l] = 0;
    const double mean = static_cast<double>(stats.sum[l]) / B;
    const double sd = std::sqrt(std::max(0.0, static_cast<double>(stats.squares[l]) / B - mean * mean));
    for (int g = 0; g < 2; ++g) {
      const A value = static_cast<A>(mean + (z + (g == 0 ? -kWidth : kWidth)) * sd);
      guess[g][l] = std::isfinite(value) ? order_key(value) : b.bar[l];
    }
  }
}

// Lane l's candidates (rows[l * B ...], counts[l] of them, in increasing order, at least
// k) cut to its k best by key_of(l, row), still in row order, into rows_out[l * k ...].
template <typename Key, typename KeyOfRow>
void cut_lanes(int64_t B, int64_t lanes, int64_t k, const int32_t* counts, TileScratch<Key>& s, KeyOfRow key_of,
               int64_t* rows_out) {
  for (int64_t l = 0; l < lanes; ++l) {
    s.found.clear();
    const int32_t* rows = s.rows.data() + l * B;
    for (int32_t i = 0; i < counts[l]; ++i) s.found.push_back({key_of(l, rows[i]), rows[i]});
    keep_best_in_index_order(s.found, k, s.scratch);
    for (int64_t i = 0; i < k; ++i) rows_out[l * k + i] = s.found[i].index;
  }
}

// From brackets b on, over a tile of keys (B, 16 lanes; lanes of them real columns): the
// rows of lane l's k winners, in increasing order, into rows_out[l * k, l * k + k).
template <typename Key>
void finish_on_keys(const Key* keys, int64_t B, int64_t lanes, int64_t k, Brackets<Key>& b, TileScratch<Key>& s,
                    int64_t* rows_out) {
  using UKey = std::make_unsigned_t<Key>;
  narrow_brackets(b, k, k + 4, [&](const Key* bars, int32_t* counts) { count_tile(keys, B, bars, counts); });
  // Where the k-th is bar itself (top = bar + 1), everything above it wins and the
  // first of those equal to it in row order: only they are collected, not all ties.
  int32_t ties[kLanes], counts[kLanes];
  for (int64_t l = 0; l < kLanes; ++l)
    ties[l] = static_cast<UKey>(b.top[l]) - static_cast<UKey>(b.bar[l]) <= 1 ? static_cast<int32_t>(k) - b.at_top[l]
                                                                              : std::numeric_limits<int32_t>::max();
  s.rows.resize(static_cast<size_t>(kLanes * B));
  collect_tile(keys, B, b.bar, ties, s.rows.data(), counts, s.entries);
  cut_lanes(B, lanes, k, counts, s, [&](int64_t l, int32_t row) { return keys[row * kLanes + l]; }, rows_out);
}

// One tile of keys and its lane statistics: lane l's k winners (finish_on_keys).
template <typename Key, typename A>
void select_in_tile(const Key* keys, int64_t B, int64_t lanes, int64_t k, const LaneStats<Key, A>& stats, double z,
                    TileScratch<Key>& s, int64_t* rows_out) {
  Brackets<Key> b;
  Key guess[2][kLanes];
  first_brackets(stats, B, z, b, guess);
  try_guesses(b, guess, k, [&](const Key* bars, int32_t* counts) { count_tile(keys, B, bars, counts); });
  finish_on_keys(keys, B, lanes, k, b, s, rows_out);
}

// The same for 32-bit keys from their halves: the same steps over the high halves, at
// half the bytes a pass, until each lane's bracket is one short key wide or keeps few
// enough. Where every lane then keeps at most a few more than k, its candidates' keys are
// put together for the cut. Where one does not (a short key shared by many: ties, ReLU's
// zeros, values close together), the tile's keys are put together and the steps go on
// over them.
inline void select_in_halves(const TileKeys<int32_t>& keys, int64_t B, int64_t lanes, int64_t k,
                             const LaneStats<int32_t, float>& stats, double z, TileScratch<int32_t>& s,
                             int64_t* rows_out) {
  Brackets<int32_t> b, coarse;
  int32_t guess[2][kLanes];
  first_brackets(stats, B, z, b, guess);
  coarse = b;
  for (int64_t l = 0; l < kLanes; ++l) {
    coarse.bar[l] = short_key(b.bar[l]);
    coarse.top[l] = short_key(stats.high[l]) + 1;  // no NaN: fits a short key
    for (int g = 0; g < 2; ++g) guess[g][l] = short_key(guess[g][l]);
  }
  auto count_high = [&](const int32_t* bars, int32_t* counts) { count_short_tile(keys.high, B, bars, counts); };
  try_guesses(coarse, guess, k, count_high);
  narrow_brackets(coarse, k, k + 4, count_high);
  const int64_t few = k + std::max<int64_t>(16, k / 4);
  if (std::all_of(coarse.at_bar, coarse.at_bar + lanes, [&](int32_t n) { return n <= few; })) {
    int32_t counts[kLanes];
    s.rows.resize(static_cast<size_t>(kLanes * B));
    collect_short_tile(keys.high, B, coarse.bar, s.rows.data(), counts, s.entries);
    cut_lanes(B, lanes, k, counts, s, [&](int64_t l, int32_t row) {
      const int64_t at = row * kLanes + l;
      return whole_key(keys.high[at], keys.low[at]);
    }, rows_out);
    return;
  }
  for (int64_t l = 0; l < kLanes; ++l) {  // count(>= key) = count(>= short key << 16): the counts carry over
    b.bar[l] = static_cast<int32_t>(static_cast<uint32_t>(coarse.bar[l]) << 16);
    if (coarse.top[l] <= short_key(stats.high[l])) b.top[l] = static_cast<int32_t>(static_cast<uint32_t>(coarse.top[l]) << 16);
    b.at_bar[l] = coarse.at_bar[l];
    b.at_top[l] = coarse.at_top[l];
    b.lowered[l] = coarse.lowered[l];
  }
  s.keys.resize(static_cast<size_t>(kLanes * B));
  for (int64_t i = 0; i < kLanes * B; ++i) s.keys[i] = whole_key(keys.high[i], keys.low[i]);
  finish_on_keys(s.keys.data(), B, lanes, k, b, s, rows_out);
}

// Tile t of a panel of B rows.
template <typename Key, typename A>
void select_tile(const TileKeys<Key>& panel, int64_t t, int64_t B, int64_t lanes, int64_t k,
                 const LaneStats<Key, A>& stats, double z, TileScratch<Key>& s, int64_t* rows_out) {
  if constexpr (std::is_same_v<Key, int32_t>)
    select_in_halves(panel.tile(t, B), B, lanes, k, stats, z, s, rows_out);
  else
    select_in_tile(panel.tile(t, B).whole, B, lanes, k, stats, z, s, rows_out);
}

// ------------------------------------------------------------ the kernels

// Which entries of a (B, H) matrix are kept, one bit each: column h of row b at bit
// h % 64 of word (h / 64) * B + b. A group of 64 columns is one run of B words, which
// stays in cache while the group's winners are marked.
struct KeptBits {
  int64_t B, H, W;  // W = ceil(H / 64) groups
  std::vector<uint64_t> words;
  KeptBits(int64_t b, int64_t h) : B(b), H(h), W((h + 63) / 64), words(static_cast<size_t>(b * ((h + 63) / 64)), 0) {}
  uint64_t* group(int64_t w) { return words.data() + w * B; }
};

// Marks the winners of columns [64 w, 64 w + 64): rows (H, k), k per column. Returns
// false if a row is outside [0, B).
bool mark_group(const int64_t* rows, int64_t k, int64_t w, KeptBits& kept) {
  uint64_t* words = kept.group(w);
  bool in_range = true;
  for (int64_t h = w * 64; h < std::min(kept.H, w * 64 + 64); ++h) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = rows[h * k + i];
      if (r < 0 || r >= kept.B) {
        in_range = false;
        continue;
      }
      words[r] |= uint64_t(1) << (h % 64);
    }
  }
  return in_range;
}

bool mark_rows(const int64_t* rows, int64_t k, KeptBits& kept) {
  std::atomic<bool> in_range{true};
  at::parallel_for(0, kept.W, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      if (!mark_group(rows, k, w, kept)) in_range = false;
  });
  return in_range.load();
}

template <typename T>
AEFAST_INLINE void copy_kept_portable(const T* src, uint64_t bits, int64_t n, T* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = ((bits >> c) & 1) ? src[c] : T(0);
}

#if defined(__x86_64__) && defined(__GNUC__)
// 64 columns; kStream: out is 64-byte aligned, written around the caches (no read
// for ownership of lines that are written whole).
template <bool kStream>
__attribute__((target("avx512f"))) void copy_kept_avx512(const float* src, uint64_t bits, float* out) {
  for (int c = 0; c < 64; c += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>(bits >> c), src + c);
    if (kStream) _mm512_stream_ps(out + c, v);
    else _mm512_storeu_ps(out + c, v);
  }
}

template <bool kStream>
AEFAST_AVX2 void copy_kept_avx2(const float* src, uint64_t bits, float* out) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int c = 0; c < 64; c += 8) {
    const __m256i byte = _mm256_set1_epi32(static_cast<int>((bits >> c) & 0xFF));
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(src + c), _mm256_castsi256_ps(keep));
    if (kStream) _mm256_stream_ps(out + c, v);
    else _mm256_storeu_ps(out + c, v);
  }
}
#endif

// Rows [b0, b1) x groups [w0, w1) of out = src where kept, else 0 (+0.0). stream:
// out's float32 rows start on 64-byte lines (stream_rows), written around the caches
// (no read for ownership of lines written whole); the caller fences.
template <typename T>
void copy_kept_block(const T* src, const KeptBits& kept, T* out, int64_t b0, int64_t b1, int64_t w0, int64_t w1,
                     bool stream) {
  const Simd simd = simd_level();
  for (int64_t b = b0; b < b1; ++b) {
    const T* s = src + b * kept.H;
    T* o = out + b * kept.H;
    for (int64_t w = w0; w < w1; ++w) {
      const uint64_t bits = kept.words[w * kept.B + b];
      const int64_t n = std::min<int64_t>(64, kept.H - 64 * w);
#if defined(__x86_64__) && defined(__GNUC__)
      if constexpr (std::is_same_v<T, float>) {
        if (n == 64 && simd == Simd::kAvx512) {
          stream ? copy_kept_avx512<true>(s + 64 * w, bits, o + 64 * w) : copy_kept_avx512<false>(s + 64 * w, bits, o + 64 * w);
          continue;
        }
        if (n == 64 && simd == Simd::kAvx2) {
          stream ? copy_kept_avx2<true>(s + 64 * w, bits, o + 64 * w) : copy_kept_avx2<false>(s + 64 * w, bits, o + 64 * w);
          continue;
        }
      }
#endif
      copy_kept_portable(s + 64 * w, bits, n, o + 64 * w);
    }
  }
}

template <typename T>
bool stream_rows(const T* out, int64_t H) {
  return std::is_same_v<T, float> && reinterpret_cast<uintptr_t>(out) % 64 == 0 && H % 16 == 0;
}

// out = src where kept, else 0 (src and out contiguous (B, H)), whole rows per thread.
void copy_kept(const at::Tensor& src, const KeptBits& kept, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_kept", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool stream = stream_rows(op, kept.H);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(kept.H, 1));
    at::parallel_for(0, kept.B, grain, [&](int64_t b0, int64_t b1) {
      copy_kept_block(sp, kept, op, b0, b1, 0, kept.W, stream);
      fence_streams();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> column_topk(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "aefast: x must be 2-D, got ", x_in.dim(), "-D");
  const int64_t B = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= B, "aefast: k must be in [1, ", B, "], got ", k);
  TORCH_CHECK_VALUE(B < (int64_t(1) << 27), "aefast: x must have fewer than 2^27 rows, got ", B);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = empty_output({B, H}, x.options());
  at::Tensor rows = at::empty({H, k}, x.options().dtype(at::kLong));
  std::atomic<bool> nan{false};
  KeptBits kept(B, H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "column_topk", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int64_t* rp = rows.data_ptr<int64_t>();
    constexpr int64_t width = kPanel * kLanes;
    const double z = normal_quantile_above(static_cast<double>(k) / B);
    at::parallel_for(0, (H + width - 1) / width, 1, [&](int64_t p0, int64_t p1) {
      using Key = KeyOf<A>;
      TileScratch<Key> scratch;
      TileKeys<Key> keys;
      if (std::is_same_v<Key, int32_t>) {  // float32, float16, bfloat16: halves
        scratch.high.resize(static_cast<size_t>(width * B));
        scratch.low.resize(static_cast<size_t>(width * B));
        keys.high = scratch.high.data();
        keys.low = scratch.low.data();
      } else {
        scratch.keys.resize(static_cast<size_t>(width * B));
        keys.whole = scratch.keys.data();
      }
      LaneStats<Key, A> stats[kPanel];
      for (int64_t p = p0; p < p1 && !nan.load(std::memory_order_relaxed); ++p) {
        const int64_t c0 = p * width, columns = std::min(width, H - c0);
        if (!copy_panel<scalar_t, A>(xp + c0, H, B, columns, keys, stats)) {
          nan = true;
          break;
        }
        for (int64_t t = 0; t * kLanes < columns; ++t) {
          const int64_t lanes = std::min(kLanes, columns - t * kLanes);
          int64_t* winners = rp + (c0 + t * kLanes) * k;
          select_tile(keys, t, B, lanes, k, stats[t], z, scratch, winners);
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!nan.load(), "aefast: x contains NaN; top-k of NaN is undefined");
  // Then out row by row: whole rows streamed beat each panel's 256-byte pieces of them
  // written while x's were in cache (4096 x 4096: 16 vs 18 ms on a Xeon).
  TORCH_CHECK(mark_rows(rows.const_data_ptr<int64_t>(), k, kept), "aefast: column selection lost its rows");
  copy_kept(x, kept, out);
  return {out, rows};
}

at::Tensor keep_rows(const at::Tensor& grad_in, const at::Tensor& rows_in) {
  TORCH_CHECK_VALUE(grad_in.dim() == 2, "aefast: grad must be 2-D, got ", grad_in.dim(), "-D");
  const int64_t B = grad_in.size(0), H = grad_in.size(1);
  TORCH_CHECK_VALUE(rows_in.dim() == 2 && rows_in.size(0) == H,
                    "aefast: rows must be (H, k) for grad (B, H) = ", grad_in.sizes(), ", got ", rows_in.sizes());
  TORCH_CHECK_VALUE(rows_in.scalar_type() == at::kLong, "aefast: rows must be int64");
  const at::Tensor grad = grad_in.contiguous(), rows = rows_in.contiguous();
  KeptBits kept(B, H);
  TORCH_CHECK_INDEX(mark_rows(rows.const_data_ptr<int64_t>(), rows.size(1), kept), "aefast: rows must be in [0, ", B, ")");
  at::Tensor out = empty_output({B, H}, grad.options());
  copy_kept(grad, kept, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("column_topk", &column_topk);
  m.impl("keep_rows", &keep_rows);
}

}  // namespace cpu
}  // namespace aefast
