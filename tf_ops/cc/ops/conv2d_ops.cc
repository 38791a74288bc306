// Registers KerasDfp>Conv2D, KerasDfp>Conv2DBackpropInput and
// KerasDfp>Conv2DBackpropFilter with shape functions that apply the same
// checks as the kernels wherever the dimensions are known statically.

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf_ops/cc/conv2d_geometry.h"
#include "tf_ops/cc/reduction_guard.h"

namespace keras_dfp {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

constexpr char kConvAttrDoc[] = R"doc(
strides: [1, stride_h, stride_w, 1], as in tf.nn.conv2d (NHWC).
padding: 'SAME' or 'VALID', with TensorFlow's rule: SAME puts the extra padded
  row/column at the bottom/right.
dilations: [1, dilation_h, dilation_w, 1].
)doc";

// Requires `a` and `b` to be equal when both are known, with a message that
// names both dimensions.
absl::Status CheckSameDim(InferenceContext* c, DimensionHandle a,
                          const char* a_name, DimensionHandle b,
                          const char* b_name) {
  if (c->ValueKnown(a) && c->ValueKnown(b) && c->Value(a) != c->Value(b)) {
    return tensorflow::errors::InvalidArgument(
        "Expected ", a_name, " to equal ", b_name, ". Received: ", a_name, "=",
        c->Value(a), ", ", b_name, "=", c->Value(b));
  }
  return absl::OkStatus();
}

// Computes the output spatial dimension from input and filter dimensions, or
// an unknown dimension if either is unknown.
absl::Status OutputSpatialDim(InferenceContext* c, DimensionHandle input,
                              DimensionHandle filter, int64_t dilation,
                              int64_t stride, bool same, const char* axis,
                              DimensionHandle* output) {
  if (!c->ValueKnown(input) || !c->ValueKnown(filter)) {
    *output = c->UnknownDim();
    return absl::OkStatus();
  }
  WindowedSize size;
  TF_RETURN_IF_ERROR(ComputeWindowedSize(c->Value(input), c->Value(filter),
                                         dilation, stride, same, axis, &size));
  *output = c->MakeDim(size.output);
  return absl::OkStatus();
}

// Checks the reduction length when all factors are known.
absl::Status CheckKnownReduction(InferenceContext* c,
                                 std::initializer_list<DimensionHandle> dims,
                                 const char* what) {
  std::vector<int64_t> values;
  for (DimensionHandle dim : dims) {
    if (!c->ValueKnown(dim)) return absl::OkStatus();
    values.push_back(c->Value(dim));
  }
  int64_t length = 1;
  for (int64_t value : values) {
    length = SaturatingProduct({length, value});
  }
  return CheckReductionLength(length, what);
}

// Computes [N, OH, OW, O] from an NHWC input shape and an HWIO filter shape,
// checking that the channel counts agree.
absl::Status ConvOutputShape(InferenceContext* c, ShapeHandle input,
                             ShapeHandle filter, const Conv2DAttrs& attrs,
                             ShapeHandle* output) {
  TF_RETURN_IF_ERROR(CheckSameDim(c, c->Dim(input, 3), "input channels",
                                  c->Dim(filter, 2), "filter in_channels"));
  DimensionHandle out_h;
  DimensionHandle out_w;
  TF_RETURN_IF_ERROR(OutputSpatialDim(c, c->Dim(input, 1), c->Dim(filter, 0),
                                      attrs.dilation_h, attrs.stride_h,
                                      attrs.same_padding, "height", &out_h));
  TF_RETURN_IF_ERROR(OutputSpatialDim(c, c->Dim(input, 2), c->Dim(filter, 1),
                                      attrs.dilation_w, attrs.stride_w,
                                      attrs.same_padding, "width", &out_w));
  *output = c->MakeShape({c->Dim(input, 0), out_h, out_w, c->Dim(filter, 3)});
  return absl::OkStatus();
}

// Reads a length-4 int32 shape input (input_sizes or filter_sizes).
absl::Status ShapeFromSizesInput(InferenceContext* c, int index,
                                 ShapeHandle* shape) {
  ShapeHandle sizes;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(index), 1, &sizes));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(sizes, 0), 4, &unused));
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(index, shape));
  return c->WithRank(*shape, 4, shape);
}

absl::Status Conv2DShape(InferenceContext* c) {
  Conv2DAttrs attrs;
  TF_RETURN_IF_ERROR(GetConv2DAttrs(c, &attrs));
  ShapeHandle input;
  ShapeHandle filter;
  ShapeHandle scalar;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &scalar));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &filter));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scalar));
  TF_RETURN_IF_ERROR(CheckKnownReduction(
      c, {c->Dim(filter, 0), c->Dim(filter, 1), c->Dim(filter, 2)},
      "filter_height * filter_width * in_channels"));
  ShapeHandle output;
  TF_RETURN_IF_ERROR(ConvOutputShape(c, input, filter, attrs, &output));
  c->set_output(0, output);
  return absl::OkStatus();
}

// Checks out_backprop against the forward output shape implied by the input
// and filter shapes.
absl::Status CheckOutBackprop(InferenceContext* c, ShapeHandle input,
                              ShapeHandle filter, ShapeHandle out_backprop,
                              const Conv2DAttrs& attrs) {
  ShapeHandle expected;
  TF_RETURN_IF_ERROR(ConvOutputShape(c, input, filter, attrs, &expected));
  static constexpr const char* kNames[4] = {
      "out_backprop batch", "out_backprop height", "out_backprop width",
      "out_backprop channels"};
  static constexpr const char* kExpectedNames[4] = {
      "input batch", "forward output height", "forward output width",
      "filter out_channels"};
  for (int i = 0; i < 4; ++i) {
    TF_RETURN_IF_ERROR(CheckSameDim(c, c->Dim(out_backprop, i), kNames[i],
                                    c->Dim(expected, i), kExpectedNames[i]));
  }
  return absl::OkStatus();
}

absl::Status Conv2DBackpropInputShape(InferenceContext* c) {
  Conv2DAttrs attrs;
  TF_RETURN_IF_ERROR(GetConv2DAttrs(c, &attrs));
  ShapeHandle input;
  ShapeHandle filter;
  ShapeHandle out_backprop;
  ShapeHandle scalar;
  TF_RETURN_IF_ERROR(ShapeFromSizesInput(c, 0, &input));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &filter));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &scalar));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 4, &out_backprop));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &scalar));
  TF_RETURN_IF_ERROR(CheckKnownReduction(
      c, {c->Dim(filter, 0), c->Dim(filter, 1), c->Dim(filter, 3)},
      "filter_height * filter_width * out_channels"));
  TF_RETURN_IF_ERROR(CheckOutBackprop(c, input, filter, out_backprop, attrs));
  c->set_output(0, input);
  return absl::OkStatus();
}

absl::Status Conv2DBackpropFilterShape(InferenceContext* c) {
  Conv2DAttrs attrs;
  TF_RETURN_IF_ERROR(GetConv2DAttrs(c, &attrs));
  ShapeHandle input;
  ShapeHandle filter;
  ShapeHandle out_backprop;
  ShapeHandle scalar;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &scalar));
  TF_RETURN_IF_ERROR(ShapeFromSizesInput(c, 2, &filter));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 4, &out_backprop));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &scalar));
  TF_RETURN_IF_ERROR(CheckKnownReduction(
      c,
      {c->Dim(out_backprop, 0), c->Dim(out_backprop, 1),
       c->Dim(out_backprop, 2)},
      "batch * output_height * output_width"));
  TF_RETURN_IF_ERROR(CheckOutBackprop(c, input, filter, out_backprop, attrs));
  c->set_output(0, filter);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasDfp>Conv2D")
    .Input("input: int16")
    .Input("input_exponent: int32")
    .Input("filter: int16")
    .Input("filter_exponent: int32")
    .Output("output: float32")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .Attr("dilations: list(int) = [1, 1, 1, 1]")
    .SetShapeFn(Conv2DShape)
    .Doc(absl::StrCat(R"doc(
2-D convolution of DFP16 tensors with exact int64 accumulation.

output = float32(sum(input * filter) * 2^(input_exponent + filter_exponent)),
rounded once. The reduction length filter_height * filter_width * in_channels
must be at most 2^32.

input: NHWC mantissas [batch, height, width, in_channels].
input_exponent: Scalar exponent of input.
filter: HWIO mantissas [filter_height, filter_width, in_channels, out_channels].
filter_exponent: Scalar exponent of filter.
output: [batch, out_height, out_width, out_channels].)doc",
                         kConvAttrDoc));

REGISTER_OP("KerasDfp>Conv2DBackpropInput")
    .Input("input_sizes: int32")
    .Input("filter: int16")
    .Input("filter_exponent: int32")
    .Input("out_backprop: int16")
    .Input("out_backprop_exponent: int32")
    .Output("output: float32")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .Attr("dilations: list(int) = [1, 1, 1, 1]")
    .SetShapeFn(Conv2DBackpropInputShape)
    .Doc(absl::StrCat(R"doc(
Gradient of KerasDfp>Conv2D with respect to its input, exact in int64.

Overlapping contributions are summed in int64 and the sum is rounded to
float32 once. The reduction length filter_height * filter_width * out_channels
must be at most 2^32.

input_sizes: Shape [batch, height, width, in_channels] of the forward input.
filter: HWIO mantissas of the forward filter.
filter_exponent: Scalar exponent of filter.
out_backprop: Mantissas of the output gradient, [batch, out_height, out_width,
  out_channels].
out_backprop_exponent: Scalar exponent of out_backprop.
output: Input gradient with shape input_sizes.)doc",
                         kConvAttrDoc));

REGISTER_OP("KerasDfp>Conv2DBackpropFilter")
    .Input("input: int16")
    .Input("input_exponent: int32")
    .Input("filter_sizes: int32")
    .Input("out_backprop: int16")
    .Input("out_backprop_exponent: int32")
    .Output("output: float32")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .Attr("dilations: list(int) = [1, 1, 1, 1]")
    .SetShapeFn(Conv2DBackpropFilterShape)
    .Doc(absl::StrCat(R"doc(
Gradient of KerasDfp>Conv2D with respect to its filter, exact in int64.

The reduction runs over batch * out_height * out_width positions, which must
be at most 2^32.

input: NHWC mantissas of the forward input.
input_exponent: Scalar exponent of input.
filter_sizes: Shape [filter_height, filter_width, in_channels, out_channels].
out_backprop: Mantissas of the output gradient.
out_backprop_exponent: Scalar exponent of out_backprop.
output: Filter gradient with shape filter_sizes.)doc",
                         kConvAttrDoc));

}  // namespace keras_dfp
