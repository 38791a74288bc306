// Registers KerasDfp>Quantize and KerasDfp>Dequantize.

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_dfp {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("KerasDfp>Quantize")
    .Input("x: float32")
    .Input("seed: int64")
    .Output("mantissa: int16")
    .Output("exponent: int32")
    .Attr("rounding: {'nearest_even', 'stochastic'} = 'nearest_even'")
    .Attr("tensor_name: string = ''")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &unused));
      c->set_output(0, c->input(0));
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Quantizes a float32 tensor to DFP16: int16 mantissas and one int32 exponent.

The exponent is e = ilogb(max|x|) - 14 (0 for an empty or all-zero tensor), so
x is represented as mantissa * 2^e with |mantissa| <= 32767. NaN or +-Inf in x
raises InvalidArgument.

x: Tensor to quantize, any shape.
seed: Scalar seed of the stochastic rounding; ignored for nearest_even.
mantissa: Rounded and saturated mantissas, same shape as x.
exponent: Scalar shared exponent.
rounding: 'nearest_even' rounds half to even; 'stochastic' rounds up with
  probability equal to the fraction, using SplitMix64(SplitMix64(seed) ^ i)
  for flat index i, so results do not depend on the thread count.
tensor_name: Name of the tensor used in error messages.
)doc");

REGISTER_OP("KerasDfp>Dequantize")
    .Input("mantissa: int16")
    .Input("exponent: int32")
    .Output("y: float32")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &unused));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Converts DFP16 mantissas and their exponent to float32 mantissa * 2^exponent,
rounded once (IEEE round half to even, overflow to +-inf, gradual underflow).
)doc");

}  // namespace keras_dfp
