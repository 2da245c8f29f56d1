// The passes over a tile of lifetime_topk's CPU selection (topk_column_tiles.h): the
// copy of a panel of x into keys, counts of the keys at or above a bar per lane, and
// the rows of those keys per lane. Each a portable loop, and AVX2 and AVX-512 versions
// chosen at run time.
#include "topk_column_tiles.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <limits>

#include "topk_candidates.h"


namespace aefast {
namespace cpu {
namespace columns {
namespace {

constexpr int64_t kPrefetchRows = 24;  // how far ahead the copies ask for rows
// With AVX-512, into the L2 and further ahead (likely: the L2 keeps more requests in
// flight than the L1, for rows a page apart coming from the L3). lifetime_topk on the
// Xeon, alternating, 10 rounds: 0.95x the time at 4096 x 4096 and at 1000 x 4096 (k = 70),
// 0.99x at 1024 x 4096.
constexpr int64_t kPrefetchRowsToL2 = 32;

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
AEFAST_AVX512 void count_lanes_avx512(const int32_t* keys, int64_t n, const int32_t* bars,
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

AEFAST_AVX512 void count_short_lanes_avx512(const ShortKey* keys, int64_t n,
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
AEFAST_AVX512 void collect_lanes_avx512(const int32_t* keys, int64_t n, const int32_t* bars,
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
AEFAST_AVX512 void collect_short_lanes_avx512(const ShortKey* keys, int64_t n,
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

// Row j's hits (bit l: lane l) appended to entries[size ...] as (j << 4 | l), in lane
// order, eight lanes at a time by a permute; returns the new size. Room for 8 past it.
AEFAST_AVX2 inline int64_t append_hits_avx2(uint32_t hits, int64_t j, uint32_t* entries, int64_t size) {
  for (int h = 0; h < 2; ++h)  // lane l of this half: entry (j << 4) + 8 h + l
    size += left_pack_offsets8((hits >> (8 * h)) & 0xFFu, static_cast<int32_t>((j << 4) + 8 * h),
                               reinterpret_cast<int32_t*>(entries + size));
  return size;
}

// collect_short_lanes_avx512 with AVX2: a row a compare, its hits appended to the entries
// (append_hits_avx2), then dealt out. (Dealt bit by bit instead, with a branch per hit,
// this was over a quarter of the forward's time.) entries: room for 16 n + 16.
AEFAST_AVX2 void collect_short_lanes_avx2(const ShortKey* keys, int64_t n, const ShortKey* bars, int32_t* rows,
                                          int32_t* counts, uint32_t* entries) {
  const __m256i bar = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars));
  int64_t size = 0;
  for (int64_t j = 0; j < n; ++j) {
    // below: -1 where key < bar; packed to bytes, lanes 0-7 in bits 0-7, lanes 8-15 in 16-23
    const __m256i below = _mm256_cmpgt_epi16(bar, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j * kLanes)));
    const uint32_t bytes = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(below, below)));
    size = append_hits_avx2(~((bytes & 0xFFu) | ((bytes >> 8) & 0xFF00u)) & 0xFFFFu, j, entries, size);
  }
  deal_entries(entries, size, n, rows, counts);
}

// collect_lanes_avx512 with AVX2, the same way. entries: room for 16 n + 16.
AEFAST_AVX2 void collect_lanes_avx2(const int32_t* keys, int64_t n, const int32_t* bars, const int32_t* ties,
                                    int32_t* rows, int32_t* counts, uint32_t* entries) {
  const __m256i bar[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars + 8))};
  __m256i left[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ties)),
                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ties + 8))};
  int64_t size = 0;
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
    size = append_hits_avx2(hits, j, entries, size);
  }
  deal_entries(entries, size, n, rows, counts);
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
AEFAST_AVX512 bool copy_tiles_avx512(const E* X, int64_t R, int64_t n,
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
    for (int p = 0; p < kTiles; ++p) __builtin_prefetch(X + std::min(j + kPrefetchRowsToL2, n - 1) * R + kLanes * p, 0, 2);
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

}  // namespace

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

void count_short_tile(const ShortKey* keys, int64_t n, const int32_t* wide_bars, int32_t* counts) {
  ShortKey bars[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) bars[l] = static_cast<ShortKey>(wide_bars[l]);
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() == Simd::kAvx512) return count_short_lanes_avx512(keys, n, bars, counts);
  if (simd_level() == Simd::kAvx2) return count_short_lanes_avx2(keys, n, bars, counts);
#endif
  count_lanes(keys, n, bars, counts);
}

void collect_short_tile(const ShortKey* keys, int64_t n, const int32_t* wide_bars, int32_t* rows, int32_t* counts,
                        std::vector<uint32_t>& entries) {
  ShortKey bars[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) bars[l] = static_cast<ShortKey>(wide_bars[l]);
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() == Simd::kAvx512) {
    entries.resize(static_cast<size_t>(kLanes * (n + 2)));
    return collect_short_lanes_avx512(keys, n, bars, rows, counts, entries.data());
  }
  if (simd_level() == Simd::kAvx2) {
    entries.resize(static_cast<size_t>(kLanes * (n + 1)));
    return collect_short_lanes_avx2(keys, n, bars, rows, counts, entries.data());
  }
#endif
  int32_t no_limit[kLanes];
  std::fill(no_limit, no_limit + kLanes, std::numeric_limits<int32_t>::max());
  collect_lanes(keys, n, bars, no_limit, rows, counts);
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

constexpr int32_t kDropped = std::numeric_limits<int32_t>::max();  // a NaN's key: no candidate has it

// cut_lane_halves with AVX-512: the candidates' whole keys gathered 16 at a time into
// `keys` (room for n rounded up to 16; the lanes past n kDropped), the worst found by a
// vector min and dropped at its last row, the kept rows compressed out. The scalar cut
// (a key per candidate put together from its halves, then a scan per excess, a
// backward search and a copy, each with a branch per candidate) took a tenth of the
// forward's time.
AEFAST_AVX512 void cut_lane_halves_avx512(const ShortKey* high, const uint16_t* low,
                                                                        int64_t l, const int32_t* rows, int64_t n,
                                                                        int64_t k, int32_t* keys, int64_t* out) {
  const __m512i dropped = _mm512_set1_epi32(kDropped), lane = _mm512_set1_epi32(static_cast<int>(l));
  const int64_t vectors = (n + 15) / 16;
  auto lanes_in = [n](int64_t v) {
    return static_cast<__mmask16>(n - 16 * v >= 16 ? 0xFFFFu : (1u << (n - 16 * v)) - 1u);
  };
  for (int64_t v = 0; v < vectors; ++v) {
    const __mmask16 in = lanes_in(v);
    // Row r's key of lane l is element r * 16 + l of each half: 4 bytes gathered from
    // each element, the element in their low half (the halves carry an element past
    // their end for the last).
    const __m512i at = _mm512_add_epi32(_mm512_slli_epi32(_mm512_maskz_loadu_epi32(in, rows + 16 * v), 4), lane);
    const __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, at, high, 2);
    const __m512i lo = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, at, low, 2);
    const __m512i key = _mm512_or_si512(_mm512_slli_epi32(h, 16), _mm512_and_si512(lo, _mm512_set1_epi32(0xFFFF)));
    _mm512_storeu_si512(keys + 16 * v, _mm512_mask_mov_epi32(dropped, in, key));
  }
  for (int64_t e = 0; e < n - k; ++e) {
    __m512i least = dropped;
    for (int64_t v = 0; v < vectors; ++v) least = _mm512_min_epi32(least, _mm512_loadu_si512(keys + 16 * v));
    const __m512i worst = _mm512_set1_epi32(_mm512_reduce_min_epi32(least));
    for (int64_t v = vectors - 1; v >= 0; --v) {  // among equal keys the later row goes first
      const __mmask16 equal = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(keys + 16 * v), worst);
      if (equal) {
        keys[16 * v + 31 - __builtin_clz(equal)] = kDropped;
        break;
      }
    }
  }
  int64_t kept = 0;
  for (int64_t v = 0; v < vectors; ++v) {
    const __mmask16 keep = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(keys + 16 * v), dropped);
    const __m512i r = _mm512_maskz_compress_epi32(keep, _mm512_maskz_loadu_epi32(keep, rows + 16 * v));  // keep: in n
    const int count = __builtin_popcount(keep);
    _mm512_mask_storeu_epi64(out + kept, static_cast<__mmask8>((1u << std::min(count, 8)) - 1u),
                             _mm512_cvtepi32_epi64(_mm512_castsi512_si256(r)));
    if (count > 8)
      _mm512_mask_storeu_epi64(out + kept + 8, static_cast<__mmask8>((1u << (count - 8)) - 1u),
                               _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(r, 1)));
    kept += count;
  }
}

// The same with AVX2: the keys gathered 8 at a time, the worst by a vector min, the kept
// rows copied out in a scalar loop (no compress; its branch is taken for a few
// candidates only).
AEFAST_AVX2 void cut_lane_halves_avx2(const ShortKey* high, const uint16_t* low, int64_t l, const int32_t* rows,
                                      int64_t n, int64_t k, int32_t* keys, int64_t* out) {
  const __m256i dropped = _mm256_set1_epi32(kDropped), lane = _mm256_set1_epi32(static_cast<int>(l));
  const __m256i slots = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t vectors = (n + 7) / 8;
  for (int64_t v = 0; v < vectors; ++v) {
    const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - 8 * v)), slots);
    const __m256i at = _mm256_add_epi32(_mm256_slli_epi32(_mm256_maskload_epi32(rows + 8 * v, in), 4), lane);
    const __m256i h = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(high), at, in, 2);
    const __m256i lo = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(low), at, in, 2);
    const __m256i key = _mm256_or_si256(_mm256_slli_epi32(h, 16), _mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + 8 * v), _mm256_blendv_epi8(dropped, key, in));
  }
  for (int64_t e = 0; e < n - k; ++e) {
    __m256i least = dropped;
    for (int64_t v = 0; v < vectors; ++v)
      least = _mm256_min_epi32(least, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + 8 * v)));
    least = _mm256_min_epi32(least, _mm256_permute2x128_si256(least, least, 1));
    least = _mm256_min_epi32(least, _mm256_shuffle_epi32(least, 0x4E));
    const __m256i worst = _mm256_min_epi32(least, _mm256_shuffle_epi32(least, 0xB1));  // in every lane
    int64_t last = 0;  // among equal keys the later row goes first
    for (int64_t v = 0; v < vectors; ++v) {
      const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + 8 * v));
      const unsigned equal = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, worst))));
      last = equal ? 8 * v + 31 - __builtin_clz(equal | 1u) : last;
    }
    keys[last] = kDropped;
  }
  for (int64_t i = 0, kept = 0; i < n; ++i)
    if (keys[i] != kDropped) out[kept++] = rows[i];
}

}  // namespace
#endif

bool cut_lane_halves(const TileKeys<int32_t>& tile, int64_t l, const int32_t* rows, int64_t n, int64_t k,
                     std::vector<int32_t>& keys, int64_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() == Simd::kAvx512 && n - k <= kMaxCutExcess) {
    keys.resize(static_cast<size_t>((n + 15) / 16 * 16));
    cut_lane_halves_avx512(tile.high, tile.low, l, rows, n, k, keys.data(), out);
    return true;
  }
  if (simd_level() == Simd::kAvx2 && n - k <= kMaxCutExcess) {
    keys.resize(static_cast<size_t>((n + 7) / 8 * 8));
    cut_lane_halves_avx2(tile.high, tile.low, l, rows, n, k, keys.data(), out);
    return true;
  }
#endif
  return false;
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
    if (simd_level() == Simd::kAvx2) {
      entries.resize(static_cast<size_t>(kLanes * (n + 1)));
      return collect_lanes_avx2(keys, n, bars, ties, rows, counts, entries.data());
    }
  }
#endif
  collect_lanes(keys, n, bars, ties, rows, counts);
}

template bool copy_panel<float, float>(const float*, int64_t, int64_t, int64_t, const TileKeys<int32_t>&,
                                       LaneStats<int32_t, float>*);
template bool copy_panel<at::Half, float>(const at::Half*, int64_t, int64_t, int64_t, const TileKeys<int32_t>&,
                                          LaneStats<int32_t, float>*);
template bool copy_panel<at::BFloat16, float>(const at::BFloat16*, int64_t, int64_t, int64_t, const TileKeys<int32_t>&,
                                              LaneStats<int32_t, float>*);
template bool copy_panel<double, double>(const double*, int64_t, int64_t, int64_t, const TileKeys<int64_t>&,
                                         LaneStats<int64_t, double>*);
template void count_tile<int32_t>(const int32_t*, int64_t, const int32_t*, int32_t*);
template void count_tile<int64_t>(const int64_t*, int64_t, const int64_t*, int32_t*);
template void collect_tile<int32_t>(const int32_t*, int64_t, const int32_t*, const int32_t*, int32_t*, int32_t*,
                                    std::vector<uint32_t>&);
template void collect_tile<int64_t>(const int64_t*, int64_t, const int64_t*, const int32_t*, int32_t*, int32_t*,
                                    std::vector<uint32_t>&);

}  // namespace columns
}  // namespace cpu
}  // namespace aefast
