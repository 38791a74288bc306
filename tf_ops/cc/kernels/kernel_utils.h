// Helpers shared by the DFP16 kernels: intra-op sharding with gradual
// underflow, exponent inputs, the int64 -> float32 output conversion and a
// cache-blocked int16 transpose.

#ifndef KERAS_DFP_TF_OPS_CC_KERNELS_KERNEL_UTILS_H_
#define KERAS_DFP_TF_OPS_CC_KERNELS_KERNEL_UTILS_H_

#include <algorithm>
#include <cstdint>
#include <functional>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/denormal.h"
#include "tensorflow/core/util/work_sharder.h"
#include "tf_ops/cc/dfp16_numerics.h"

namespace keras_dfp {

// Disables flush-to-zero and denormals-are-zero for the current scope.
// TensorFlow sets both on its executor and intra-op threads, which would turn
// subnormal inputs into 0 (breaking Quantize's exponent) and flush subnormal
// float32 results to 0; the DFP16 numerics require IEEE gradual underflow.
// The mode is per thread, so every kernel entry point and every shard sets it.
using GradualUnderflowScope = tensorflow::port::ScopedDontFlushDenormal;

// Runs fn(begin, end) over [0, total) on TensorFlow's intra-op thread pool,
// with gradual underflow enabled in every shard. `cost_per_unit` is a rough
// cycle count per unit that sets the shard size.
inline void ParallelFor(tensorflow::OpKernelContext* ctx, int64_t total,
                        int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, total,
                    cost_per_unit, [&fn](int64_t begin, int64_t end) {
                      GradualUnderflowScope gradual_underflow;
                      fn(begin, end);
                    });
}

// Returns the number of worker threads of the intra-op pool.
inline int NumWorkerThreads(tensorflow::OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
}

// Reads the scalar int32 exponent input `index`, named `name` in errors.
inline absl::Status ReadExponent(tensorflow::OpKernelContext* ctx, int index,
                                 const char* name, int32_t* exponent) {
  const tensorflow::Tensor& tensor = ctx->input(index);
  if (!tensorflow::TensorShapeUtils::IsScalar(tensor.shape())) {
    return tensorflow::errors::InvalidArgument(
        "Expected ", name, " to be a scalar int32 exponent. Received: ", name,
        ".shape=", tensor.shape().DebugString());
  }
  *exponent = tensor.scalar<int32_t>()();
  return absl::OkStatus();
}

// Converts `count` exact sums to float32 with the combined exponent.
inline void ConvertSumsToFloat(const int64_t* sums, int64_t count,
                               int64_t exponent, float* output) {
  const ScaledInt64Converter convert(exponent);
  for (int64_t i = 0; i < count; ++i) output[i] = convert(sums[i]);
}

// Writes the transpose of the row-major [rows][columns] matrix `source` to
// `target` ([columns][rows]), in square tiles that stay in L1.
inline void TransposeBlocked(const int16_t* source, int64_t rows,
                             int64_t columns, int16_t* target) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < columns; c0 += kTile) {
      const int64_t c1 = std::min(columns, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          target[c * rows + r] = source[r * columns + c];
        }
      }
    }
  }
}

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_KERNELS_KERNEL_UTILS_H_
