// The grid of the kernels that sum an (M, N) float32 quantity over rows, per column, without atomics
// (layer_norm_bwd_affine_kernel's dweight and dbias, linear_gelu's bias gradient): block (x, y) covers columns
// [kColsPerBlock x, kColsPerBlock (x + 1)) and rows [y rows_per_block, (y + 1) rows_per_block); each of its kRowWarps
// warps walks every kRowWarps-th row, then the warps' sums are added in a fixed order into row y of a
// (grid.y, N) float32 buffer of partial sums, summed afterwards: deterministic.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef FASTGPT_PTX_EMULATION
#include "emulator.h"
#endif

namespace fastgpt {

constexpr int kColsPerBlock = 32, kRowWarps = 8;

struct ColumnSumsLaunch {
  dim3 grid;  // (column blocks, partial rows)
  int64_t rows_per_block;
};

// About 4 blocks per SM in all; every block covers a whole number of kRowWarps-row steps. With no rows, one partial
// row that nothing writes: callers launch nothing then and return zeros.
inline ColumnSumsLaunch column_sums_launch(int64_t rows, int64_t cols, int sms) {
  const int64_t col_blocks = std::max<int64_t>(1, (cols + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, 4 * sms / col_blocks + 1));
  const int64_t rows_per_block = ((rows + row_blocks - 1) / row_blocks + kRowWarps - 1) / kRowWarps * kRowWarps;
  const int64_t partial_rows = rows_per_block > 0 ? (rows + rows_per_block - 1) / rows_per_block : 1;
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(partial_rows)), rows_per_block};
}

}  // namespace fastgpt
