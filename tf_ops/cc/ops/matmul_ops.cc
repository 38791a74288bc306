// Registers KerasDfp>MatMul.

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf_ops/cc/reduction_guard.h"

namespace keras_dfp {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

absl::Status MatMulShape(InferenceContext* c) {
  bool transpose_a = false;
  bool transpose_b = false;
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_a", &transpose_a));
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_b", &transpose_b));
  ShapeHandle a;
  ShapeHandle b;
  ShapeHandle scalar;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &scalar));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &b));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scalar));
  DimensionHandle a_inner = c->Dim(a, transpose_a ? 0 : 1);
  DimensionHandle b_inner = c->Dim(b, transpose_b ? 1 : 0);
  if (c->ValueKnown(a_inner) && c->ValueKnown(b_inner) &&
      c->Value(a_inner) != c->Value(b_inner)) {
    return tensorflow::errors::InvalidArgument(
        "Expected the inner dimensions of a and b to match. Received: a.shape=",
        c->DebugString(a), ", b.shape=", c->DebugString(b),
        ", transpose_a=", transpose_a, ", transpose_b=", transpose_b);
  }
  if (c->ValueKnown(a_inner)) {
    TF_RETURN_IF_ERROR(
        CheckReductionLength(c->Value(a_inner), "inner dimension of a"));
  }
  c->set_output(0, c->Matrix(c->Dim(a, transpose_a ? 1 : 0),
                             c->Dim(b, transpose_b ? 0 : 1)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasDfp>MatMul")
    .Input("a: int16")
    .Input("a_exponent: int32")
    .Input("b: int16")
    .Input("b_exponent: int32")
    .Output("product: float32")
    .Attr("transpose_a: bool = false")
    .Attr("transpose_b: bool = false")
    .SetShapeFn(MatMulShape)
    .Doc(R"doc(
Matrix product of DFP16 matrices with exact int64 accumulation.

product = float32(op(a) @ op(b) * 2^(a_exponent + b_exponent)), rounded once,
where op transposes its argument when the matching attribute is true. The
inner dimension must be at most 2^32.

a: Mantissas [M, K], or [K, M] with transpose_a.
a_exponent: Scalar exponent of a.
b: Mantissas [K, N], or [N, K] with transpose_b.
b_exponent: Scalar exponent of b.
product: [M, N].
)doc");

}  // namespace keras_dfp
