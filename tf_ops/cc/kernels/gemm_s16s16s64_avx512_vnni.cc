// avx512_vnni kernel path of GemmS16S16S64: 512-bit vpdpwssd micro-kernel.
//
// Exactness: vpdpwssd adds the two int16 * int16 products of each 32-bit
// lane to an int32 accumulator with wraparound. The left operand is used as
// is and the right operand is split as in gemm_s16s16s64.h (high byte in
// [-128, 127], low byte in [0, 255]) into separate high and low accumulators.
// Each accumulator starts at 0 for every K-block of at most kGemmBlockK = 256
// terms, so every intermediate value is a partial sum of at most 256 terms:
//   low:  |sum| <= 256 * 32768 * 255 = 2,139,095,040 < 2^31 - 1
//   high: |sum| <= 256 * 32768 * 128 = 2^30
// and no wraparound can happen. After each block the two int32 sums are
// widened to int64, combined as 256 * high + low and added to C.
//
// Only this file is compiled with these instruction sets, through the target
// attribute on each function, so the build flags stay those of tf.sysconfig.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tf_ops/cc/kernels/gemm_s16s16s64.h"
#include "tf_ops/cc/kernels/gemm_s16s16s64_paths.h"

#define KERAS_DFP_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vnni")))

namespace keras_dfp {
namespace {

static_assert(kAvx512VnniPanelWidth == 32,
              "The micro-kernel holds a panel in two 512-bit vectors");

// Rows of A per micro-kernel call: 6 rows x 2 vectors x (high, low) = 24
// accumulators, plus 4 right-hand vectors and 1 broadcast, fit the 32 zmm
// registers.
constexpr int kTileRows = 6;

// int16 elements of one pair block of a panel: 32 columns x 2 depths, high
// then low.
constexpr int64_t kPairBlock = kAvx512VnniPanelWidth * 4;

// Returns the 32 bits of two adjacent int16 values (unaligned load).
inline int32_t LoadPair(const int16_t* values) {
  int32_t pair;
  std::memcpy(&pair, values, sizeof(pair));
  return pair;
}

// acc += vpdpwssd(x, b). Inline assembly ties the accumulator to one
// register: with the intrinsic, GCC 12 copies and spills the accumulators of
// the 6-row tile on every iteration.
#define KERAS_DFP_DOT_PAIRS_ADD(acc, x, b) \
  __asm__("vpdpwssd %[bv], %[xv], %[av]" : [av] "+v"(acc) : [xv] "v"(x), [bv] "v"(b))

// Multiplies the broadcast pair x of row R by the four vectors of a pair
// block (b_high0, b_high1, b_low0, b_low1) into the accumulators of row R.
#define KERAS_DFP_ROW_STEP(R, x)                     \
  do {                                               \
    const __m512i x_##R = (x);                       \
    KERAS_DFP_DOT_PAIRS_ADD(high0_##R, x_##R, b_high0); \
    KERAS_DFP_DOT_PAIRS_ADD(high1_##R, x_##R, b_high1); \
    KERAS_DFP_DOT_PAIRS_ADD(low0_##R, x_##R, b_low0);   \
    KERAS_DFP_DOT_PAIRS_ADD(low1_##R, x_##R, b_low1);   \
  } while (false)

// Declares the four zeroed accumulators of row R: columns [0, 16) and
// [16, 32) of the panel, for the high and the low bytes of B.
#define KERAS_DFP_ROW_ACCUMULATORS(R)          \
  __m512i high0_##R = _mm512_setzero_si512();  \
  __m512i high1_##R = _mm512_setzero_si512();  \
  __m512i low0_##R = _mm512_setzero_si512();   \
  __m512i low1_##R = _mm512_setzero_si512()

// Returns the broadcast of the A pair at depths (2q, 2q + 1) of `row`.
KERAS_DFP_TARGET_AVX512_VNNI inline __m512i BroadcastPair(const int16_t* row,
                                                          int64_t q) {
  return _mm512_set1_epi32(LoadPair(row + 2 * q));
}

// Returns the broadcast of the single A value at depth 2q of `row`, paired
// with 0: used for an odd block length, where reading the partner would run
// past the row.
KERAS_DFP_TARGET_AVX512_VNNI inline __m512i BroadcastLast(const int16_t* row,
                                                          int64_t q) {
  return _mm512_set1_epi32(static_cast<uint16_t>(row[2 * q]));
}

// Adds 256 * high + low of one 16-column vector to the int64 row `target`
// (16 values, of which `masks` select the valid ones). |high| <= 2^30, so
// the shift is exact in int64.
KERAS_DFP_TARGET_AVX512_VNNI inline void FlushVector(__m512i high,
                                                     __m512i low,
                                                     int64_t* target,
                                                     __mmask8 mask_first,
                                                     __mmask8 mask_second) {
  const __m512i first = _mm512_add_epi64(
      _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(high)), 8),
      _mm512_cvtepi32_epi64(_mm512_castsi512_si256(low)));
  const __m512i second = _mm512_add_epi64(
      _mm512_slli_epi64(
          _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(high, 1)), 8),
      _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(low, 1)));
  const __m512i old_first = _mm512_maskz_loadu_epi64(mask_first, target);
  const __m512i old_second = _mm512_maskz_loadu_epi64(mask_second, target + 8);
  _mm512_mask_storeu_epi64(target, mask_first,
                           _mm512_add_epi64(old_first, first));
  _mm512_mask_storeu_epi64(target + 8, mask_second,
                           _mm512_add_epi64(old_second, second));
}

// Adds rows [0, rows) of A (rows <= kTileRows) times one panel over one
// K-block of `pairs` depth pairs, plus one single depth when `half_pair`, to
// C. `masks[g]` selects the valid columns of C among columns [8g, 8g + 8) of
// the panel. For rows < kTileRows the missing rows repeat the last row and
// their results are dropped, so one register allocation serves every tile:
// 24 accumulators, 4 vectors of B and 1 broadcast of the 32 zmm registers.
KERAS_DFP_TARGET_AVX512_VNNI void MicroKernel(
    const int16_t* a, int64_t lda, int rows, const int16_t* panel,
    int64_t pairs, bool half_pair, int64_t* c, int64_t ldc,
    const __mmask8 (&masks)[4]) {
  static_assert(kTileRows == 6, "MicroKernel is written for 6 rows");
  const int16_t* a0 = a;
  const int16_t* a1 = a + std::min(1, rows - 1) * lda;
  const int16_t* a2 = a + std::min(2, rows - 1) * lda;
  const int16_t* a3 = a + std::min(3, rows - 1) * lda;
  const int16_t* a4 = a + std::min(4, rows - 1) * lda;
  const int16_t* a5 = a + std::min(5, rows - 1) * lda;
  KERAS_DFP_ROW_ACCUMULATORS(0);
  KERAS_DFP_ROW_ACCUMULATORS(1);
  KERAS_DFP_ROW_ACCUMULATORS(2);
  KERAS_DFP_ROW_ACCUMULATORS(3);
  KERAS_DFP_ROW_ACCUMULATORS(4);
  KERAS_DFP_ROW_ACCUMULATORS(5);

  // One extra step for an odd block length uses BroadcastLast.
  const int64_t steps = pairs + (half_pair ? 1 : 0);
  for (int64_t q = 0; q < steps; ++q) {
    const int16_t* block = panel + q * kPairBlock;
    const __m512i b_high0 = _mm512_loadu_si512(block);
    const __m512i b_high1 = _mm512_loadu_si512(block + 32);
    const __m512i b_low0 = _mm512_loadu_si512(block + 64);
    const __m512i b_low1 = _mm512_loadu_si512(block + 96);
    if (q < pairs) {
      KERAS_DFP_ROW_STEP(0, BroadcastPair(a0, q));
      KERAS_DFP_ROW_STEP(1, BroadcastPair(a1, q));
      KERAS_DFP_ROW_STEP(2, BroadcastPair(a2, q));
      KERAS_DFP_ROW_STEP(3, BroadcastPair(a3, q));
      KERAS_DFP_ROW_STEP(4, BroadcastPair(a4, q));
      KERAS_DFP_ROW_STEP(5, BroadcastPair(a5, q));
    } else {
      KERAS_DFP_ROW_STEP(0, BroadcastLast(a0, q));
      KERAS_DFP_ROW_STEP(1, BroadcastLast(a1, q));
      KERAS_DFP_ROW_STEP(2, BroadcastLast(a2, q));
      KERAS_DFP_ROW_STEP(3, BroadcastLast(a3, q));
      KERAS_DFP_ROW_STEP(4, BroadcastLast(a4, q));
      KERAS_DFP_ROW_STEP(5, BroadcastLast(a5, q));
    }
  }

  FlushVector(high0_0, low0_0, c, masks[0], masks[1]);
  FlushVector(high1_0, low1_0, c + 16, masks[2], masks[3]);
  if (rows > 1) {
    FlushVector(high0_1, low0_1, c + ldc, masks[0], masks[1]);
    FlushVector(high1_1, low1_1, c + ldc + 16, masks[2], masks[3]);
  }
  if (rows > 2) {
    FlushVector(high0_2, low0_2, c + 2 * ldc, masks[0], masks[1]);
    FlushVector(high1_2, low1_2, c + 2 * ldc + 16, masks[2], masks[3]);
  }
  if (rows > 3) {
    FlushVector(high0_3, low0_3, c + 3 * ldc, masks[0], masks[1]);
    FlushVector(high1_3, low1_3, c + 3 * ldc + 16, masks[2], masks[3]);
  }
  if (rows > 4) {
    FlushVector(high0_4, low0_4, c + 4 * ldc, masks[0], masks[1]);
    FlushVector(high1_4, low1_4, c + 4 * ldc + 16, masks[2], masks[3]);
  }
  if (rows > 5) {
    FlushVector(high0_5, low0_5, c + 5 * ldc, masks[0], masks[1]);
    FlushVector(high1_5, low1_5, c + 5 * ldc + 16, masks[2], masks[3]);
  }
}

#undef KERAS_DFP_ROW_ACCUMULATORS
#undef KERAS_DFP_ROW_STEP
#undef KERAS_DFP_DOT_PAIRS_ADD

}  // namespace

KERAS_DFP_TARGET_AVX512_VNNI void GemmS16S16S64Avx512Vnni(
    const int16_t* a, int64_t lda, int64_t m, const PackedRhsS16& b,
    int64_t* c, int64_t ldc) {
  const int64_t n = b.rows();
  const int64_t k_size = b.depth();
  const int64_t panel_count = b.padded_rows() / kAvx512VnniPanelWidth;
  const int64_t panel_stride = b.panel_stride();

  // Loop order: one K-block of one panel (at most 32 KiB of packed B) is
  // reused by every row tile while it is in L1, and the 256-term K-block of
  // the A rows is reused by every panel.
  for (int64_t k0 = 0; k0 < k_size; k0 += kGemmBlockK) {
    const int64_t length = std::min(kGemmBlockK, k_size - k0);
    const int64_t pairs = length / 2;
    const bool half_pair = (length & 1) != 0;
    for (int64_t p = 0; p < panel_count; ++p) {
      const int16_t* panel = b.panels() + p * panel_stride + (k0 / 2) * kPairBlock;
      const int64_t columns =
          std::min(kAvx512VnniPanelWidth, n - p * kAvx512VnniPanelWidth);
      __mmask8 masks[4];
      for (int g = 0; g < 4; ++g) {
        const int64_t valid = std::clamp<int64_t>(columns - 8 * g, 0, 8);
        masks[g] = static_cast<__mmask8>((1u << valid) - 1);
      }
      int64_t* c_panel = c + p * kAvx512VnniPanelWidth;
      for (int64_t i = 0; i < m; i += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i));
        MicroKernel(a + i * lda + k0, lda, rows, panel, pairs, half_pair,
                    c_panel + i * ldc, ldc, masks);
      }
    }
  }
}

}  // namespace keras_dfp
