// Exact int16 x int16 -> int64 matrix product, cache-blocked and written in
// plain C++ that compilers vectorize at -O3 without target flags.
//
// C[i][j] (+)= sum_k A[i][k] * B[j][k], with both operands K-contiguous.
//
// Exactness: the right-hand operand is split per element into a signed high
// byte and an unsigned low byte, b = 256 * hi + lo with hi in [-128, 127] and
// lo in [0, 255]. For every K-block of at most kGemmBlockK = 256 terms the
// kernel accumulates two int32 dot products:
//   sum_k a_k * lo_k : every term has |a * lo| <= 32768 * 255, so any partial
//                      sum over at most 256 terms, in any order or grouping,
//                      satisfies |.| <= 256 * 32768 * 255 = 2,139,095,040,
//                      which is below INT32_MAX = 2,147,483,647.
//   sum_k a_k * hi_k : every term has |a * hi| <= 32768 * 128 = 2^22, so any
//                      partial sum over 256 terms is at most 2^30.
// Each block result 256 * hi_sum + lo_sum is then added in int64. Because the
// bounds hold for every partial sum, vectorized reassociation (for example
// pmaddwd pairing adjacent products) cannot overflow either, and the int64
// total equals the exact product sum for any operand values, -32768 included.
// Callers keep K <= kMaxReductionLength so that the int64 total cannot wrap.
//
// Three implementations compute the same exact result (see kernel_path.h):
// the portable kernel in this file's .cc, plain C++ that GCC vectorizes with
// SSE2 pmaddwd, and the avx2 and avx512_vnni kernels in
// gemm_s16s16s64_avx2.cc and gemm_s16s16s64_avx512_vnni.cc, which use the
// same split and the same 256-term int32 blocks, so the bound above applies
// to them unchanged. Each packed operand records the path it was packed for,
// and GemmS16S16S64 runs that path.

#ifndef KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_H_
#define KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_H_

#include <cstdint>
#include <vector>

#include "tf_ops/cc/kernels/kernel_path.h"

namespace keras_dfp {

// Maximum number of terms summed in int32 before a flush to int64 (see the
// bound in the file comment).
inline constexpr int64_t kGemmBlockK = 256;

// Columns of C computed together by the portable micro-kernel. Packed
// right-hand rows are padded with zeros to a multiple of the panel width.
inline constexpr int64_t kGemmTileN = 2;

// Columns of C per panel of the vector paths: two 512-bit vectors of int32
// lanes for avx512_vnni, two 256-bit vectors for avx2.
inline constexpr int64_t kAvx512VnniPanelWidth = 32;
inline constexpr int64_t kAvx2PanelWidth = 16;

// Right-hand operand B[n][k] split into high and low bytes, in the layout of
// the kernel path it was packed for:
// - portable: row-major [padded_rows][depth] in both high() and low().
// - avx512_vnni and avx2: panels of panel_width() columns. Panel p stores,
//   for every pair index q < ceil(depth / 2), panel_width * 2 high values
//   followed by panel_width * 2 low values; the value of column j and depth
//   k = 2q + t sits at offset 2j + t of its half. Depth padding (odd depth)
//   and column padding are zeros. This matches vpdpwssd/vpmaddwd, which
//   multiply adjacent int16 pairs of a 32-bit lane.
class PackedRhsS16 {
 public:
  explicit PackedRhsS16(KernelPath path) : path_(path) {}

  // Packs B[j][k] = b[j * row_stride + k * k_stride] for j < n, k < k_size.
  void Pack(const int16_t* b, int64_t n, int64_t k_size, int64_t row_stride,
            int64_t k_stride);

  KernelPath path() const { return path_; }
  int64_t rows() const { return rows_; }
  int64_t padded_rows() const { return padded_rows_; }
  int64_t depth() const { return depth_; }
  int64_t panel_width() const { return panel_width_; }
  // int16 elements per panel of the vector layouts.
  int64_t panel_stride() const { return (depth_ + 1) / 2 * panel_width_ * 4; }
  const int16_t* high() const { return high_.data(); }
  const int16_t* low() const { return low_.data(); }
  const int16_t* panels() const { return high_.data(); }

 private:
  KernelPath path_;
  int64_t rows_ = 0;
  int64_t padded_rows_ = 0;
  int64_t depth_ = 0;
  int64_t panel_width_ = kGemmTileN;
  // Portable layout: high bytes. Vector layouts: all panels.
  std::vector<int16_t> high_;
  // Portable layout: low bytes. Empty for the vector layouts.
  std::vector<int16_t> low_;
};

// Computes C[i][j] = sum_k a[i * lda + k] * B[j][k] for i < m and
// j < b.rows(), stored at c[i * ldc + j]; adds to the existing C when
// `accumulate` is true. Runs the kernel path `b` was packed for, on the
// calling thread: callers shard over rows.
void GemmS16S16S64(const int16_t* a, int64_t lda, int64_t m,
                   const PackedRhsS16& b, int64_t* c, int64_t ldc,
                   bool accumulate);

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_H_
