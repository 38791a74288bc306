#include "tf_ops/cc/kernels/gemm_s16s16s64.h"

#include <algorithm>
#include <cstring>

#include "tf_ops/cc/kernels/gemm_s16s16s64_paths.h"

namespace keras_dfp {

namespace {

// Returns the panel width of the layout of `path`.
int64_t PanelWidth(KernelPath path) {
  switch (path) {
    case KernelPath::kAvx512Vnni:
      return kAvx512VnniPanelWidth;
    case KernelPath::kAvx2:
      return kAvx2PanelWidth;
    case KernelPath::kPortable:
      break;
  }
  return kGemmTileN;
}

}  // namespace

void PackedRhsS16::Pack(const int16_t* b, int64_t n, int64_t k_size,
                        int64_t row_stride, int64_t k_stride) {
  rows_ = n;
  panel_width_ = PanelWidth(path_);
  padded_rows_ = (n + panel_width_ - 1) / panel_width_ * panel_width_;
  depth_ = k_size;
  if (path_ == KernelPath::kPortable) {
    high_.assign(padded_rows_ * k_size, 0);
    low_.assign(padded_rows_ * k_size, 0);
    for (int64_t j = 0; j < n; ++j) {
      const int16_t* src = b + j * row_stride;
      int16_t* high_row = high_.data() + j * k_size;
      int16_t* low_row = low_.data() + j * k_size;
      for (int64_t k = 0; k < k_size; ++k) {
        const int32_t value = src[k * k_stride];
        // Arithmetic shift: value = 256 * (value >> 8) + (value & 255).
        high_row[k] = static_cast<int16_t>(value >> 8);
        low_row[k] = static_cast<int16_t>(value & 255);
      }
    }
    return;
  }

  // Vector layouts (see the class comment): one pair block holds the high
  // half [panel_width][2] and then the low half [panel_width][2].
  const int64_t half = panel_width_ * 2;
  const int64_t stride = panel_stride();
  high_.assign(padded_rows_ / panel_width_ * stride, 0);
  low_.clear();
  for (int64_t j = 0; j < n; ++j) {
    const int16_t* src = b + j * row_stride;
    int16_t* column = high_.data() + (j / panel_width_) * stride +
                      2 * (j % panel_width_);
    for (int64_t k = 0; k < k_size; ++k) {
      const int32_t value = src[k * k_stride];
      int16_t* pair_block = column + (k / 2) * 2 * half + (k & 1);
      pair_block[0] = static_cast<int16_t>(value >> 8);
      pair_block[half] = static_cast<int16_t>(value & 255);
    }
  }
}

namespace {

// Computes a kRows x kGemmTileN tile of one K-block and adds it to the int64
// output tile. The loop over kk has 4 * kRows independent int32 reductions of
// int16 products, which GCC 12 at -O3 vectorizes with pmaddwd on the plain
// x86-64 baseline. The bound in the header comment covers every partial sum.
template <int kRows>
inline void MicroKernel(const int16_t* __restrict a, int64_t lda,
                        const int16_t* __restrict high,
                        const int16_t* __restrict low, int64_t ldb,
                        int64_t block_length,
                        int64_t (&tile)[kRows][kGemmTileN]) {
  static_assert(kGemmTileN == 2, "MicroKernel is written for two columns");
  static_assert(kRows == 1 || kRows == 2, "MicroKernel handles 1 or 2 rows");
  const int16_t* __restrict a0 = a;
  const int16_t* __restrict a1 = a + (kRows == 2 ? lda : 0);
  const int16_t* __restrict high1 = high + ldb;
  const int16_t* __restrict low1 = low + ldb;
  int32_t h00 = 0, h01 = 0, l00 = 0, l01 = 0;
  int32_t h10 = 0, h11 = 0, l10 = 0, l11 = 0;
  for (int64_t kk = 0; kk < block_length; ++kk) {
    const int32_t x0 = a0[kk];
    h00 += x0 * high[kk];
    h01 += x0 * high1[kk];
    l00 += x0 * low[kk];
    l01 += x0 * low1[kk];
    if (kRows == 2) {
      const int32_t x1 = a1[kk];
      h10 += x1 * high[kk];
      h11 += x1 * high1[kk];
      l10 += x1 * low[kk];
      l11 += x1 * low1[kk];
    }
  }
  tile[0][0] += int64_t{h00} * 256 + l00;
  tile[0][1] += int64_t{h01} * 256 + l01;
  if constexpr (kRows == 2) {
    tile[1][0] += int64_t{h10} * 256 + l10;
    tile[1][1] += int64_t{h11} * 256 + l11;
  }
}

// Rows of A processed per micro-kernel call.
constexpr int kTileM = 2;

// Depth of one cache panel: a multiple of kGemmBlockK.
constexpr int64_t kPanelDepth = 1024;

// Bytes of packed B (high and low) per cache panel, sized to stay in a
// typical 512 KiB to 1 MiB L2 cache next to the A rows being processed.
constexpr int64_t kPanelBytes = 192 * 1024;

// Adds the product of A rows [0, kRows) and B rows [j_begin, j_end) over the
// depth range [k_begin, k_end) to rows [0, kRows) of c.
template <int kRows>
void AccumulateRowTile(const int16_t* a, int64_t lda, const PackedRhsS16& b,
                       int64_t j_begin, int64_t j_end, int64_t k_begin,
                       int64_t k_end, int64_t* c, int64_t ldc) {
  const int64_t k_size = b.depth();
  for (int64_t j = j_begin; j < j_end; j += kGemmTileN) {
    const int16_t* high = b.high() + j * k_size;
    const int16_t* low = b.low() + j * k_size;
    int64_t tile[kRows][kGemmTileN] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kGemmBlockK) {
      MicroKernel<kRows>(a + k0, lda, high + k0, low + k0, k_size,
                         std::min(kGemmBlockK, k_end - k0), tile);
    }
    const int64_t columns = std::min(kGemmTileN, b.rows() - j);
    for (int r = 0; r < kRows; ++r) {
      for (int64_t s = 0; s < columns; ++s) c[r * ldc + j + s] += tile[r][s];
    }
  }
}

}  // namespace

void GemmS16S16S64(const int16_t* a, int64_t lda, int64_t m,
                   const PackedRhsS16& b, int64_t* c, int64_t ldc,
                   bool accumulate) {
  const int64_t n = b.rows();
  const int64_t k_size = b.depth();
  if (!accumulate) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0);
  }
  if (m == 0 || n == 0 || k_size == 0) return;
  switch (b.path()) {
    case KernelPath::kAvx512Vnni:
      GemmS16S16S64Avx512Vnni(a, lda, m, b, c, ldc);
      return;
    case KernelPath::kAvx2:
      GemmS16S16S64Avx2(a, lda, m, b, c, ldc);
      return;
    case KernelPath::kPortable:
      break;
  }

  // Cache blocking: one panel of packed B (depth range x row range) is
  // reused by every row tile of A. Within a panel, each output tile runs
  // over the K-blocks while its A rows stay in L1, and the int32 block sums
  // are flushed into int64 tile accumulators per block.
  const int64_t panel_depth = std::min(k_size, kPanelDepth);
  const int64_t panel_rows = std::max<int64_t>(
      kGemmTileN, kPanelBytes / (4 * panel_depth) / kGemmTileN * kGemmTileN);
  for (int64_t k_begin = 0; k_begin < k_size; k_begin += panel_depth) {
    const int64_t k_end = std::min(k_size, k_begin + panel_depth);
    for (int64_t j_begin = 0; j_begin < n; j_begin += panel_rows) {
      const int64_t j_end = std::min(n, j_begin + panel_rows);
      int64_t i = 0;
      for (; i + kTileM <= m; i += kTileM) {
        AccumulateRowTile<kTileM>(a + i * lda, lda, b, j_begin, j_end, k_begin,
                                  k_end, c + i * ldc, ldc);
      }
      for (; i < m; ++i) {
        AccumulateRowTile<1>(a + i * lda, lda, b, j_begin, j_end, k_begin,
                             k_end, c + i * ldc, ldc);
      }
    }
  }
}

}  // namespace keras_dfp
