// The CPU top-k's way for rows with many winners (k a sizeable share of the row, where
// topk.cpp's block selection reads again most of the row and its heap sifts at every
// element): a radix select on the values' order keys (long rows narrowed first by a
// sampled bar), and a radix sort of the winners.
#pragma once

#include <cstdint>
#include <vector>

#include "topk_candidates.h"

namespace aefast {
namespace cpu {

struct RadixScratch {
  std::vector<float> candidates;         // a long row's elements above a sampled bar
  std::vector<int32_t> candidate_offsets;  // and their offsets in the row
  std::vector<uint32_t> keys;              // the order keys, then the digits' survivors
  std::vector<float> values;               // the winners' values, compressed (AVX-512)
  std::vector<int32_t> offsets;            // and their offsets among the keys
  std::vector<uint64_t> order, spare;      // radix_rank: (key, position) pairs
  std::vector<Candidate<float>> ranked;
};

// The k best of x[0, n) (float32, n >= k >= 1; indices offset by `first`) into
// out[0, k), in index order: every element above the k-th largest value and the first
// ones equal to it. Returns false if x holds a NaN.
bool radix_select(const float* x, int64_t n, int64_t first, int64_t k, Candidate<float>* out, RadixScratch& s);

// c[0, n) (distinct indices) into rank order: value descending, then index ascending.
void radix_rank(Candidate<float>* c, int64_t n, RadixScratch& s);

}  // namespace cpu
}  // namespace aefast
