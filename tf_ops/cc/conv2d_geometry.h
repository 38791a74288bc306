// Attribute parsing and output-size rules shared by the Conv2D op
// registrations (shape functions) and the Conv2D kernels.
//
// Padding follows tf.nn.conv2d: VALID gives out = (in - eff + stride) / stride
// with eff = (filter - 1) * dilation + 1; SAME gives out = ceil(in / stride)
// and pads max(0, (out - 1) * stride + eff - in) zeros, the smaller half
// before (top/left) and the extra element after (bottom/right).

#ifndef KERAS_DFP_TF_OPS_CC_CONV2D_GEOMETRY_H_
#define KERAS_DFP_TF_OPS_CC_CONV2D_GEOMETRY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/platform/errors.h"

namespace keras_dfp {

// Validated Conv2D attributes (NHWC input, HWIO filter).
struct Conv2DAttrs {
  int64_t stride_h = 1;
  int64_t stride_w = 1;
  int64_t dilation_h = 1;
  int64_t dilation_w = 1;
  bool same_padding = false;
};

// Spatial size of one output dimension and its leading (top or left) padding.
struct WindowedSize {
  int64_t output = 0;
  int64_t pad_before = 0;
};

// Validates `strides`, `dilations` and `padding` and fills `attrs`.
inline absl::Status ParseConv2DAttrs(const std::vector<int64_t>& strides,
                                     const std::vector<int64_t>& dilations,
                                     const std::string& padding,
                                     Conv2DAttrs* attrs) {
  if (strides.size() != 4 || strides[0] != 1 || strides[3] != 1 ||
      strides[1] < 1 || strides[2] < 1) {
    return tensorflow::errors::InvalidArgument(
        "Expected strides of the form [1, stride_h, stride_w, 1] with "
        "stride_h, stride_w >= 1 (NHWC). Received: strides=[",
        absl::StrJoin(strides, ", "), "]");
  }
  if (dilations.size() != 4 || dilations[0] != 1 || dilations[3] != 1 ||
      dilations[1] < 1 || dilations[2] < 1) {
    return tensorflow::errors::InvalidArgument(
        "Expected dilations of the form [1, dilation_h, dilation_w, 1] with "
        "dilation_h, dilation_w >= 1 (NHWC). Received: dilations=[",
        absl::StrJoin(dilations, ", "), "]");
  }
  if (padding != "SAME" && padding != "VALID") {
    return tensorflow::errors::InvalidArgument(
        "Expected padding 'SAME' or 'VALID'. Received: padding='", padding,
        "'");
  }
  attrs->stride_h = strides[1];
  attrs->stride_w = strides[2];
  attrs->dilation_h = dilations[1];
  attrs->dilation_w = dilations[2];
  attrs->same_padding = padding == "SAME";
  return absl::OkStatus();
}

// Reads and validates the strides, dilations and padding attributes from an
// OpKernelConstruction or a shape InferenceContext.
template <typename AttrContext>
absl::Status GetConv2DAttrs(AttrContext* context, Conv2DAttrs* attrs) {
  std::vector<int64_t> strides;
  std::vector<int64_t> dilations;
  std::string padding;
  TF_RETURN_IF_ERROR(context->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(context->GetAttr("dilations", &dilations));
  TF_RETURN_IF_ERROR(context->GetAttr("padding", &padding));
  return ParseConv2DAttrs(strides, dilations, padding, attrs);
}

// Computes one spatial output size exactly as tf.nn.conv2d does. `axis` names
// the dimension ("height" or "width") in error messages.
inline absl::Status ComputeWindowedSize(int64_t input, int64_t filter,
                                        int64_t dilation, int64_t stride,
                                        bool same_padding, const char* axis,
                                        WindowedSize* size) {
  if (filter < 1) {
    return tensorflow::errors::InvalidArgument(
        "Expected a filter ", axis, " of at least 1. Received: filter ", axis,
        "=", filter, ". Use a filter with a non-empty spatial window.");
  }
  const int64_t effective = (filter - 1) * dilation + 1;
  if (same_padding) {
    size->output = (input + stride - 1) / stride;
    const int64_t needed = (size->output - 1) * stride + effective - input;
    size->pad_before = needed > 0 ? needed / 2 : 0;
    return absl::OkStatus();
  }
  // tf.nn.conv2d's shape function rejects every VALID input smaller than the
  // dilated filter (even where (input - effective + stride) / stride is 0),
  // so the ops do too.
  if (input < effective) {
    return tensorflow::errors::InvalidArgument(
        "Expected the input ", axis, " to be at least the dilated filter ",
        axis, " for VALID padding. Received: input ", axis, "=", input,
        ", filter ", axis, "=", filter, ", dilation=", dilation,
        " (dilated filter ", axis, "=", effective,
        "). Use padding='SAME' or a larger input.");
  }
  size->output = (input - effective + stride) / stride;
  size->pad_before = 0;
  return absl::OkStatus();
}

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_CONV2D_GEOMETRY_H_
