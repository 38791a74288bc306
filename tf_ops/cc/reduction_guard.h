// Reduction-length guard of the integer ops, shared by the op registrations
// (shape functions) and the kernels.

#ifndef KERAS_DFP_TF_OPS_CC_REDUCTION_GUARD_H_
#define KERAS_DFP_TF_OPS_CC_REDUCTION_GUARD_H_

#include <cstdint>
#include <initializer_list>

#include "absl/status/status.h"
#include "tensorflow/core/platform/errors.h"
#include "tf_ops/cc/dfp16_numerics.h"

namespace keras_dfp {

// Returns the product of non-negative factors, saturated at INT64_MAX instead
// of wrapping (shapes with a zero-size dimension may have huge other ones).
inline int64_t SaturatingProduct(std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t factor : factors) {
    if (factor == 0) return 0;
  }
  for (int64_t factor : factors) {
    if (product > INT64_MAX / factor) return INT64_MAX;
    product *= factor;
  }
  return product;
}

// Rejects reductions longer than kMaxReductionLength, beyond which the int64
// accumulator could wrap. `description` names the reduction in the message.
inline absl::Status CheckReductionLength(int64_t length,
                                         const char* description) {
  if (length > kMaxReductionLength) {
    return tensorflow::errors::InvalidArgument(
        "Expected a reduction length of at most 2^32 = ", kMaxReductionLength,
        " so that the int64 accumulator is exact. Received: ", description, "=",
        length, ". Split the operation into smaller parts.");
  }
  return absl::OkStatus();
}

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_REDUCTION_GUARD_H_
