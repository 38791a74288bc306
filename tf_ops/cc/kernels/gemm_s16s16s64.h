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
// NOTE: without target flags GCC emits 128-bit SSE2 code (8 products per
// pmaddwd, two pmaddwd per product because of the split). On a 2-core Zen 4
// the convolutions measured about 3x slower than TensorFlow's float32 oneDNN
// path. Wider vectors would need function multiversioning (target_clones).

#ifndef KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_H_
#define KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_H_

#include <cstdint>
#include <vector>

namespace keras_dfp {

// Maximum number of terms summed in int32 before a flush to int64 (see the
// bound in the file comment).
inline constexpr int64_t kGemmBlockK = 256;

// Columns of C computed together by the micro-kernel. Packed right-hand rows
// are padded with zeros to a multiple of this.
inline constexpr int64_t kGemmTileN = 2;

// Right-hand operand B[n][k] split into high and low bytes, stored row-major
// as [padded_rows][depth] in both high() and low().
class PackedRhsS16 {
 public:
  // Packs B[j][k] = b[j * row_stride + k * k_stride] for j < n, k < k_size.
  void Pack(const int16_t* b, int64_t n, int64_t k_size, int64_t row_stride,
            int64_t k_stride);

  int64_t rows() const { return rows_; }
  int64_t padded_rows() const { return padded_rows_; }
  int64_t depth() const { return depth_; }
  const int16_t* high() const { return high_.data(); }
  const int16_t* low() const { return low_.data(); }

 private:
  int64_t rows_ = 0;
  int64_t padded_rows_ = 0;
  int64_t depth_ = 0;
  std::vector<int16_t> high_;
  std::vector<int16_t> low_;
};

// Computes C[i][j] = sum_k a[i * lda + k] * B[j][k] for i < m and
// j < b.rows(), stored at c[i * ldc + j]; adds to the existing C when
// `accumulate` is true. Runs on the calling thread: callers shard over rows.
void GemmS16S16S64(const int16_t* a, int64_t lda, int64_t m,
                   const PackedRhsS16& b, int64_t* c, int64_t ldc,
                   bool accumulate);

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_H_
