// lifetime_topk's CPU selection (topk_columns.cpp), its tiles: the layout of a tile's
// keys and the passes over a tile, each a portable loop and AVX2 and AVX-512 versions
// chosen at run time (topk_column_tiles.cpp). A tile is 16 columns of x, one vector
// lane per column, its rows one after the other.
#pragma once

#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace aefast {
namespace cpu {
namespace columns {

template <typename A>
using KeyOf = std::conditional_t<std::is_same_v<A, double>, int64_t, int32_t>;

constexpr int64_t kLanes = 16;
constexpr int64_t kPanel = 4;  // tiles copied side by side: 256 bytes of float32 per row
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

// Per lane of a tile: the smallest and largest key, the sum and the sum of squares of
// the values (a first guess at where the k-th largest lies).
template <typename Key, typename A>
struct LaneStats {
  Key low[kLanes], high[kLanes];
  A sum[kLanes], squares[kLanes];
};

// The keys of a panel of `columns` <= 16 kPanel columns of X (rows R apart; lanes past
// the last column: copies of the last), tile p's lane statistics in stats[p]. Returns
// false on a NaN.
template <typename T, typename A>
bool copy_panel(const T* X, int64_t R, int64_t n, int64_t columns, const TileKeys<KeyOf<A>>& keys,
                LaneStats<KeyOf<A>, A>* stats);

// counts[l] = how many of the tile's n rows of keys in lane l are >= bars[l].
template <typename Key>
void count_tile(const Key* keys, int64_t n, const Key* bars, int32_t* counts);

// count_tile on short keys, the bars given as 32-bit ints in their range.
void count_short_tile(const ShortKey* keys, int64_t n, const int32_t* wide_bars, int32_t* counts);

// Per lane l, the rows j whose key is above bars[l], and the first ties[l] whose key
// equals it, into rows[l * n ...] in increasing order; their number into counts.
// entries: scratch.
template <typename Key>
void collect_tile(const Key* keys, int64_t n, const Key* bars, const int32_t* ties, int32_t* rows, int32_t* counts,
                  std::vector<uint32_t>& entries);

// Per lane, the rows whose short key is at or above wide_bars[l] (a short key's range).
void collect_short_tile(const ShortKey* keys, int64_t n, const int32_t* wide_bars, int32_t* rows, int32_t* counts,
                        std::vector<uint32_t>& entries);

// The most candidates past k that a cut drops one at a time (more: a partial sort).
constexpr int64_t kMaxCutExcess = 8;
// Lane l's candidates, rows[0, n) of a tile in increasing order (n >= k), cut to its k
// best by whole key (the smallest dropped first, among equal keys the later row), in row
// order, into out. Returns false, having done nothing, where n - k > kMaxCutExcess or
// the CPU has neither AVX-512 nor AVX2. It reads 4 bytes at each key half: tile.high and
// tile.low need one readable element past the tile. keys: scratch.
bool cut_lane_halves(const TileKeys<int32_t>& tile, int64_t l, const int32_t* rows, int64_t n, int64_t k,
                     std::vector<int32_t>& keys, int64_t* out);
}  // namespace columns
}  // namespace cpu
}  // namespace aefast
