// avx2 kernel path of GemmS16S16S64: 256-bit vpmaddwd + vpaddd micro-kernel.
//
// Exactness: vpmaddwd returns, per 32-bit lane, the sum of two int16 * int16
// products; it wraps only for (-32768 * -32768) * 2, which cannot occur here
// because the right operand is split as in gemm_s16s16s64.h (high byte in
// [-128, 127], low byte in [0, 255]). vpaddd adds these pair sums to separate
// high and low int32 accumulators that restart at 0 for every K-block of at
// most kGemmBlockK = 256 terms, so every intermediate value is a partial sum
// of at most 256 terms:
//   low:  |sum| <= 256 * 32768 * 255 = 2,139,095,040 < 2^31 - 1
//   high: |sum| <= 256 * 32768 * 128 = 2^30
// After each block the sums are widened to int64, combined as
// 256 * high + low and added to C.
//
// Only this file is compiled with AVX2, through the target attribute on each
// function, so the build flags stay those of tf.sysconfig.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tf_ops/cc/kernels/gemm_s16s16s64.h"
#include "tf_ops/cc/kernels/gemm_s16s16s64_paths.h"

#define KERAS_DFP_TARGET_AVX2 __attribute__((target("avx2")))

namespace keras_dfp {
namespace {

static_assert(kAvx2PanelWidth == 16,
              "The micro-kernel holds a panel in two 256-bit vectors");

// Rows of A per micro-kernel call: 2 rows x 2 vectors x (high, low) = 8
// accumulators, plus 4 vectors of B, 1 broadcast and 1 product of the 16 ymm
// registers. With 3 rows GCC 12 spills accumulators in the inner loop.
constexpr int kTileRows = 2;

// int16 elements of one pair block of a panel: 16 columns x 2 depths, high
// then low.
constexpr int64_t kPairBlock = kAvx2PanelWidth * 4;

inline int32_t LoadPair(const int16_t* values) {
  int32_t pair;
  std::memcpy(&pair, values, sizeof(pair));
  return pair;
}

// Returns the broadcast of the A pair at depths (2q, 2q + 1) of `row`.
KERAS_DFP_TARGET_AVX2 inline __m256i BroadcastPair(const int16_t* row,
                                                   int64_t q) {
  return _mm256_set1_epi32(LoadPair(row + 2 * q));
}

// Returns the broadcast of the single A value at depth 2q of `row`, paired
// with 0: used for an odd block length, where reading the partner would run
// past the row.
KERAS_DFP_TARGET_AVX2 inline __m256i BroadcastLast(const int16_t* row,
                                                   int64_t q) {
  return _mm256_set1_epi32(static_cast<uint16_t>(row[2 * q]));
}

// Adds 256 * high + low of one 8-column vector to the int64 row `target`,
// writing only the lanes that `mask_first` and `mask_second` select.
// |high| <= 2^30, so the shift is exact in int64.
KERAS_DFP_TARGET_AVX2 inline void FlushVector(__m256i high, __m256i low,
                                              int64_t* target,
                                              __m256i mask_first,
                                              __m256i mask_second) {
  const __m256i first = _mm256_add_epi64(
      _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(high)), 8),
      _mm256_cvtepi32_epi64(_mm256_castsi256_si128(low)));
  const __m256i second = _mm256_add_epi64(
      _mm256_slli_epi64(
          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(high, 1)), 8),
      _mm256_cvtepi32_epi64(_mm256_extracti128_si256(low, 1)));
  auto* first_target = reinterpret_cast<long long*>(target);
  auto* second_target = reinterpret_cast<long long*>(target + 4);
  const __m256i old_first = _mm256_maskload_epi64(first_target, mask_first);
  const __m256i old_second = _mm256_maskload_epi64(second_target, mask_second);
  _mm256_maskstore_epi64(first_target, mask_first,
                         _mm256_add_epi64(old_first, first));
  _mm256_maskstore_epi64(second_target, mask_second,
                         _mm256_add_epi64(old_second, second));
}

// Declares the four zeroed accumulators of row R: columns [0, 8) and [8, 16)
// of the panel, for the high and the low bytes of B. Named variables instead
// of arrays let GCC keep all of them in registers.
#define KERAS_DFP_ROW_ACCUMULATORS(R)         \
  __m256i high0_##R = _mm256_setzero_si256(); \
  __m256i high1_##R = _mm256_setzero_si256(); \
  __m256i low0_##R = _mm256_setzero_si256();  \
  __m256i low1_##R = _mm256_setzero_si256()

// Multiplies the broadcast pair x of row R by the four vectors of the pair
// block `block` into the accumulators of row R.
#define KERAS_DFP_ROW_STEP(R, x)                                          \
  do {                                                                    \
    const __m256i x_##R = (x);                                            \
    high0_##R = _mm256_add_epi32(                                         \
        high0_##R, _mm256_madd_epi16(x_##R, _mm256_loadu_si256(block + 0))); \
    high1_##R = _mm256_add_epi32(                                         \
        high1_##R, _mm256_madd_epi16(x_##R, _mm256_loadu_si256(block + 1))); \
    low0_##R = _mm256_add_epi32(                                          \
        low0_##R, _mm256_madd_epi16(x_##R, _mm256_loadu_si256(block + 2))); \
    low1_##R = _mm256_add_epi32(                                          \
        low1_##R, _mm256_madd_epi16(x_##R, _mm256_loadu_si256(block + 3))); \
  } while (false)

// Adds rows [0, rows) of A (rows <= kTileRows) times one panel over one
// K-block of `pairs` depth pairs, plus one single depth when `half_pair`, to
// C. `masks[g]` selects the valid columns of C among columns [4g, 4g + 4) of
// the panel. For rows < kTileRows the missing rows repeat the last row and
// their results are dropped.
KERAS_DFP_TARGET_AVX2 void MicroKernel(const int16_t* a, int64_t lda, int rows,
                                       const int16_t* panel, int64_t pairs,
                                       bool half_pair, int64_t* c, int64_t ldc,
                                       const __m256i (&masks)[4]) {
  static_assert(kTileRows == 2, "MicroKernel is written for 2 rows");
  const int16_t* a0 = a;
  const int16_t* a1 = a + std::min(1, rows - 1) * lda;
  KERAS_DFP_ROW_ACCUMULATORS(0);
  KERAS_DFP_ROW_ACCUMULATORS(1);

  for (int64_t q = 0; q < pairs; ++q) {
    const auto* block = reinterpret_cast<const __m256i*>(panel + q * kPairBlock);
    KERAS_DFP_ROW_STEP(0, BroadcastPair(a0, q));
    KERAS_DFP_ROW_STEP(1, BroadcastPair(a1, q));
  }
  if (half_pair) {
    const auto* block =
        reinterpret_cast<const __m256i*>(panel + pairs * kPairBlock);
    KERAS_DFP_ROW_STEP(0, BroadcastLast(a0, pairs));
    KERAS_DFP_ROW_STEP(1, BroadcastLast(a1, pairs));
  }

  FlushVector(high0_0, low0_0, c, masks[0], masks[1]);
  FlushVector(high1_0, low1_0, c + 8, masks[2], masks[3]);
  if (rows > 1) {
    FlushVector(high0_1, low0_1, c + ldc, masks[0], masks[1]);
    FlushVector(high1_1, low1_1, c + ldc + 8, masks[2], masks[3]);
  }
}

#undef KERAS_DFP_ROW_STEP
#undef KERAS_DFP_ROW_ACCUMULATORS

}  // namespace

KERAS_DFP_TARGET_AVX2 void GemmS16S16S64Avx2(const int16_t* a, int64_t lda,
                                             int64_t m, const PackedRhsS16& b,
                                             int64_t* c, int64_t ldc) {
  const int64_t n = b.rows();
  const int64_t k_size = b.depth();
  const int64_t panel_count = b.padded_rows() / kAvx2PanelWidth;
  const int64_t panel_stride = b.panel_stride();
  const __m256i lane_index = _mm256_setr_epi64x(0, 1, 2, 3);

  // Same loop order as the avx512_vnni path: a K-block of one panel stays in
  // L1 while every row tile uses it.
  for (int64_t k0 = 0; k0 < k_size; k0 += kGemmBlockK) {
    const int64_t length = std::min(kGemmBlockK, k_size - k0);
    const int64_t pairs = length / 2;
    const bool half_pair = (length & 1) != 0;
    for (int64_t p = 0; p < panel_count; ++p) {
      const int16_t* panel = b.panels() + p * panel_stride + (k0 / 2) * kPairBlock;
      const int64_t columns = std::min(kAvx2PanelWidth, n - p * kAvx2PanelWidth);
      __m256i masks[4];
      for (int g = 0; g < 4; ++g) {
        // Lanes with index < columns - 4g are valid (all ones).
        masks[g] = _mm256_cmpgt_epi64(_mm256_set1_epi64x(columns - 4 * g),
                                      lane_index);
      }
      int64_t* c_panel = c + p * kAvx2PanelWidth;
      for (int64_t i = 0; i < m; i += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i));
        MicroKernel(a + i * lda + k0, lda, rows, panel, pairs, half_pair,
                    c_panel + i * ldc, ldc, masks);
      }
    }
  }
}

}  // namespace keras_dfp
