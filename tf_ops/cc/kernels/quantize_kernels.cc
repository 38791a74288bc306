// CPU kernels of KerasDfp>Quantize and KerasDfp>Dequantize.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf_ops/cc/dfp16_numerics.h"
#include "tf_ops/cc/kernels/kernel_utils.h"

namespace keras_dfp {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// Approximate cycles per element, used only to size shards.
constexpr int64_t kScanCost = 4;
constexpr int64_t kRoundCost = 20;

// Result of scanning a tensor for its max magnitude and first non-finite
// element.
struct ScanResult {
  float max_abs = 0.0f;
  int64_t first_non_finite = std::numeric_limits<int64_t>::max();
};

ScanResult ScanValues(OpKernelContext* ctx, const float* values,
                      int64_t count) {
  ScanResult result;
  std::mutex mutex;
  ParallelFor(ctx, count, kScanCost, [&](int64_t begin, int64_t end) {
    float local_max = 0.0f;
    int64_t local_bad = std::numeric_limits<int64_t>::max();
    for (int64_t i = begin; i < end; ++i) {
      const float magnitude = std::fabs(values[i]);
      if (!std::isfinite(magnitude)) {
        local_bad = i;
        break;
      }
      local_max = std::max(local_max, magnitude);
    }
    std::lock_guard<std::mutex> lock(mutex);
    result.max_abs = std::max(result.max_abs, local_max);
    result.first_non_finite = std::min(result.first_non_finite, local_bad);
  });
  return result;
}

const char* DescribeNonFinite(float value) {
  if (std::isnan(value)) return "NaN";
  return value > 0 ? "+Inf" : "-Inf";
}

class QuantizeOp : public OpKernel {
 public:
  explicit QuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string rounding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rounding", &rounding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tensor_name", &tensor_name_));
    OP_REQUIRES(ctx, rounding == "nearest_even" || rounding == "stochastic",
                tensorflow::errors::InvalidArgument(
                    "Expected rounding 'nearest_even' or 'stochastic'. "
                    "Received: rounding='",
                    rounding, "'"));
    stochastic_ = rounding == "stochastic";
  }

  void Compute(OpKernelContext* ctx) override {
    GradualUnderflowScope gradual_underflow;
    const Tensor& x = ctx->input(0);
    const Tensor& seed = ctx->input(1);
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(seed.shape()),
                tensorflow::errors::InvalidArgument(
                    "Expected seed to be a scalar int64. Received: "
                    "seed.shape=",
                    seed.shape().DebugString()));
    Tensor* mantissa = nullptr;
    Tensor* exponent = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &mantissa));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {}, &exponent));

    const int64_t count = x.NumElements();
    const float* values = x.flat<float>().data();
    const ScanResult scan = ScanValues(ctx, values, count);
    if (scan.first_non_finite != std::numeric_limits<int64_t>::max()) {
      const int64_t index = scan.first_non_finite;
      ctx->CtxFailure(tensorflow::errors::InvalidArgument(
          "Expected finite values in tensor '",
          tensor_name_.empty() ? "<unnamed>" : tensor_name_,
          "' for DFP16 quantization. Received: ",
          DescribeNonFinite(values[index]), " at flat index ", index,
          " of a tensor with shape ", x.shape().DebugString(),
          ". DFP16 has no NaN or infinity; find where the value arises "
          "(for example a too high learning rate, a log of 0 or a division "
          "by 0) or replace it before quantizing, for example with "
          "tf.where(tf.math.is_finite(x), x, 0)."));
      return;
    }

    const int32_t shared_exponent = ExponentForMaxAbs(scan.max_abs);
    exponent->scalar<int32_t>()() = shared_exponent;
    int16_t* out = mantissa->flat<int16_t>().data();
    const bool stochastic = stochastic_;
    const uint64_t key = StochasticKey(seed.scalar<int64_t>()());
    const double scale = MantissaScale(shared_exponent);
    ParallelFor(ctx, count, kRoundCost, [&](int64_t begin, int64_t end) {
      if (stochastic) {
        for (int64_t i = begin; i < end; ++i) {
          const double uniform =
              StochasticUniform(key, static_cast<uint64_t>(i));
          out[i] = RoundStochastic(ScaleToMantissaDomain(values[i], scale),
                                   uniform);
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          out[i] = RoundNearestEven(ScaleToMantissaDomain(values[i], scale));
        }
      }
    });
  }

 private:
  bool stochastic_ = false;
  std::string tensor_name_;
};

class DequantizeOp : public OpKernel {
 public:
  explicit DequantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    GradualUnderflowScope gradual_underflow;
    const Tensor& mantissa = ctx->input(0);
    int32_t exponent = 0;
    OP_REQUIRES_OK(ctx, ReadExponent(ctx, 1, "exponent", &exponent));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, mantissa.shape(), &output));
    const int16_t* in = mantissa.flat<int16_t>().data();
    float* out = output->flat<float>().data();
    const ScaledInt64Converter convert(exponent);
    ParallelFor(ctx, mantissa.NumElements(), kRoundCost,
                [&](int64_t begin, int64_t end) {
                  for (int64_t i = begin; i < end; ++i) out[i] = convert(in[i]);
                });
  }
};

REGISTER_KERNEL_BUILDER(Name("KerasDfp>Quantize").Device(tensorflow::DEVICE_CPU),
                        QuantizeOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDfp>Dequantize").Device(tensorflow::DEVICE_CPU), DequantizeOp);

}  // namespace
}  // namespace keras_dfp
