// Scalar DFP16 numerics shared by every kernel.
//
// A DFP16 tensor is a set of int16 mantissas m with one int32 exponent e and
// represents m * 2^e. The functions below are the single C++ definition of
// exponent choice, rounding, saturation and the int64 -> float32 conversion
// of integer dot products. They depend only on the C++ standard library so
// that a test or a benchmark can include them without TensorFlow.
//
// The functions assume the IEEE default floating-point environment: round to
// nearest even and gradual underflow. Callers on threads with flush-to-zero or
// denormals-are-zero enabled (TensorFlow's default) must disable both first.

#ifndef KERAS_DFP_TF_OPS_CC_DFP16_NUMERICS_H_
#define KERAS_DFP_TF_OPS_CC_DFP16_NUMERICS_H_

#include <cmath>
#include <cstdint>

namespace keras_dfp {

// Largest mantissa magnitude that Quantize produces. Ops accept -32768 as an
// input mantissa, but Quantize saturates to this symmetric range.
inline constexpr int32_t kMaxMantissa = 32767;

// Number of fractional bits below the leading bit of the max-abs element: the
// max element ends up with |scaled value| in [2^14, 2^15).
inline constexpr int kMantissaExponentOffset = 14;

// Maximum reduction length the integer ops accept. Every int16 * int16 product has
// |p| <= 32768 * 32768 = 2^30, so a sum of at most 2^32 products satisfies
// |S| <= 2^62 < 2^63 and never wraps in int64.
inline constexpr int64_t kMaxReductionLength = int64_t{1} << 32;

// Returns the DFP16 exponent for a tensor whose largest magnitude is
// `max_abs` (finite, >= 0): ilogb(max_abs) - 14, or 0 when max_abs == 0.
// std::ilogb is exact for subnormals, so the result lies in [-163, 113].
// Example: max_abs = 3.0f has ilogb 1, so e = -13 and 3.0 scales to 24576.
inline int32_t ExponentForMaxAbs(float max_abs) {
  if (max_abs == 0.0f) return 0;
  return static_cast<int32_t>(std::ilogb(max_abs)) - kMantissaExponentOffset;
}

// Returns 2^-exponent, the factor that maps a tensor with this DFP16
// exponent into the mantissa domain. For exponent in [-163, 113], as
// ExponentForMaxAbs produces, the factor is a normal float64.
inline double MantissaScale(int32_t exponent) {
  return std::ldexp(1.0, -exponent);
}

// Returns x * scale in float64, with scale = MantissaScale(e). The product is
// exact: a float32 significand has 24 bits and a power of two in
// [2^-113, 2^163] keeps every float32 value, subnormals included, inside the
// float64 normal range.
inline double ScaleToMantissaDomain(float x, double scale) {
  return static_cast<double>(x) * scale;
}

// Clamps a rounded scaled value to [-32767, 32767]. Only scaled values in
// [32767.5, 32768) and their negative mirror can reach +-32768 after rounding
// (round half to even maps 32767.5 to 32768), and they saturate to +-32767.
inline int16_t SaturateToMantissa(double rounded) {
  if (rounded > kMaxMantissa) return static_cast<int16_t>(kMaxMantissa);
  if (rounded < -kMaxMantissa) return static_cast<int16_t>(-kMaxMantissa);
  return static_cast<int16_t>(rounded);
}

// Rounds a float64 value with |value| < 2^51 to the nearest integer, ties to
// even. Adding and subtracting 1.5 * 2^52 leaves no fraction bits, so the
// addition itself rounds under the IEEE default mode (nearest, ties to even).
// Unlike std::nearbyint, this needs no libm call on an SSE2-only baseline.
// Compilers keep both operations unless -ffast-math-style flags are used.
inline double RoundHalfEven(double value) {
  constexpr double kShifter = 0x1.8p52;
  return (value + kShifter) - kShifter;
}

// Rounds a scaled value half to even and saturates it.
// Example: 2.5 -> 2, 3.5 -> 4, -0.5 -> 0, 32767.5 -> 32768 -> 32767.
inline int16_t RoundNearestEven(double scaled) {
  return SaturateToMantissa(RoundHalfEven(scaled));
}

// Mixes a 64-bit value with the SplitMix64 output function. All arithmetic
// wraps mod 2^64.
inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Returns the per-tensor key that StochasticUniform combines with element
// indices. Computing it once per tensor keeps the hot loop to one SplitMix64.
inline uint64_t StochasticKey(int64_t seed) {
  return SplitMix64(static_cast<uint64_t>(seed));
}

// Returns the uniform variate u in [0, 1) for flat element `index`:
// u = (SplitMix64(key ^ index) >> 11) * 2^-53, with key = StochasticKey(seed).
// It depends only on (seed, index), never on thread count or scheduling.
inline double StochasticUniform(uint64_t key, uint64_t index) {
  const uint64_t h = SplitMix64(key ^ index);
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// Rounds a scaled value stochastically and saturates it:
// r = floor(s) + (u < s - floor(s) ? 1 : 0). The fraction s - floor(s) is
// exact in float64, so P(round up) equals the fraction to within 2^-53.
// Example: s = -2.25 gives floor -3 and fraction 0.75, so r = -2 with
// probability 0.75 and -3 otherwise. Integers never change (fraction 0).
inline int16_t RoundStochastic(double scaled, double uniform) {
  // Computes floor without a libm call: the nearest integer, minus 1 if it
  // is above the scaled value.
  double lower = RoundHalfEven(scaled);
  if (lower > scaled) lower -= 1.0;
  const double fraction = scaled - lower;
  return SaturateToMantissa(lower + (uniform < fraction ? 1.0 : 0.0));
}

// Clamps a combined exponent to a range that keeps std::ldexp well defined
// without changing any float32 result: a 53-bit significand times 2^1200 is
// +-inf and times 2^-1200 is +-0 in float32 either way.
inline int ClampScaleExponent(int64_t exponent) {
  if (exponent > 1200) return 1200;
  if (exponent < -1200) return -1200;
  return static_cast<int>(exponent);
}

// Converts the exact integer sum `sum` times 2^exponent to float32, rounded
// once (half to even) with IEEE overflow to +-inf and gradual underflow.
//
// If |sum| < 2^53 the conversion to float64 is exact. Otherwise |sum| is
// shifted right by k bits so that it fits in 53 bits, and the bits shifted out
// are ORed into the lowest kept bit (round to odd). The float64 value then
// carries 53 >= 24 + 2 significant bits with a sticky bit, and rounding it to
// float32 gives the same result as rounding the exact value directly.
// ldexp by (exponent + k) is exact in float64 unless the result is below
// 2^-1022, where the float32 result is +-0 anyway.
// Example: sum = 2^53 + 3 keeps (2^53 + 3) >> 1 = 2^52 + 1 with the dropped
// bit 1 ORed into bit 0, giving 2^52 + 1 (odd), times 2^1.
inline float ScaledInt64ToFloat(int64_t sum, int64_t exponent) {
  const bool negative = sum < 0;
  uint64_t magnitude = negative ? (~static_cast<uint64_t>(sum) + 1)
                                : static_cast<uint64_t>(sum);
  int shift = 0;
  constexpr uint64_t kExactLimit = uint64_t{1} << 53;
  if (magnitude >= kExactLimit) {
    while ((magnitude >> shift) >= kExactLimit) ++shift;
    const uint64_t dropped = magnitude & ((uint64_t{1} << shift) - 1);
    magnitude = (magnitude >> shift) | (dropped != 0 ? 1 : 0);
  }
  double value = static_cast<double>(magnitude);
  value = std::ldexp(value, ClampScaleExponent(exponent + shift));
  return static_cast<float>(negative ? -value : value);
}

// Converts exact sums that share one exponent to float32, like
// ScaledInt64ToFloat but with a multiply in place of ldexp on the common path.
// When |sum| < 2^53 and 2^exponent is a normal float64, double(sum) * 2^e is
// exact unless it falls below 2^-1022, where the float32 result is +-0 either
// way, so the single rounding happens in the cast to float32.
class ScaledInt64Converter {
 public:
  explicit ScaledInt64Converter(int64_t exponent)
      : exponent_(exponent),
        scale_(std::ldexp(1.0, ClampScaleExponent(exponent))),
        fast_(exponent >= -1022 && exponent <= 1023) {}

  float operator()(int64_t sum) const {
    constexpr int64_t kExactLimit = int64_t{1} << 53;
    if (fast_ && sum > -kExactLimit && sum < kExactLimit) {
      return static_cast<float>(static_cast<double>(sum) * scale_);
    }
    return ScaledInt64ToFloat(sum, exponent_);
  }

 private:
  int64_t exponent_;
  double scale_;
  bool fast_;
};

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_DFP16_NUMERICS_H_
