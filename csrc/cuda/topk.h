// Launchers of the CUDA top-k selection: per row of x (B, H) the k largest, ties to
// the lower index. No torch headers; x contiguous row-major. The launcher selects
// the k winners of every row and writes them in an arbitrary order with a sort key;
// the caller sorts the keys (one int64 sort per row, two for wide keys) to get the
// final order, value descending then index ascending, and gathers the values from x.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace aefast {
namespace cuda {

// How many chunks each row is split into, each taken by one block per pass, on a GPU
// of `sms` multiprocessors: 1 (a block per row) when the rows alone fill the GPU, more
// for few long rows (batch_topk selects from a single row). A pure function.
int64_t topk_row_chunks(int64_t B, int64_t H, int sms);

// Bytes of device scratch topk_select needs for B rows in `chunks` chunks (0 for one chunk).
int64_t topk_workspace_bytes(int64_t B, int64_t chunks);

// Whether a winner's sort key and index pack into one int64: ((~key) << 31) | index,
// with key the 16- or 32-bit order-preserving key of the value. True for every
// dtype but float64 when H <= 2^31.
bool topk_packs_keys(DType dtype, int64_t H);

// Whether topk_select may take rows of H with `chunks` == 1 in one pass (filter): a bar
// from a sample of each row, then one read of the row, for packed keys, rows of 16384 to
// about 131072 columns and k small beside them (csrc/cuda/topk.cu). A pure function.
bool topk_filters_rows(DType dtype, int64_t H, int64_t k, int64_t chunks);

// Selects the k (1 <= k <= H) largest of each row of x; -0.0 and +0.0 compare equal,
// -inf is a value like any other. Writes, per row, the k winners in an arbitrary order:
// - packed (topk_packs_keys): keys[b, j] = ((~key) << 31) | index. Ascending keys are
//   the final order; index = key & (2^31 - 1). `indices` is not used (may be null).
// - otherwise: keys[b, j] = the value's 64-bit order-preserving key, complemented and
//   with the sign bit flipped (ascending signed keys = descending values), and
//   indices[b, j] its column. Sorted by index, then stably by key: the final order.
// Sets *nan_flag (an int zeroed by the caller) to 1 if x holds a NaN (the result is
// then meaningless). filter: one pass per row as topk_filters_rows allows (it must; the
// same winners either way); fallbacks, where not null (an int zeroed by the caller),
// gets how many rows the one pass left to the radix passes. workspace:
// topk_workspace_bytes(B, chunks) bytes, any content. Returns the launch status.
cudaError_t topk_select(const void* x, DType dtype, int64_t B, int64_t H, int64_t k, int64_t chunks,
                        bool packed, bool filter, void* workspace, int* nan_flag, int* fallbacks, int64_t* keys,
                        int64_t* indices, cudaStream_t stream);

}  // namespace cuda
}  // namespace aefast
