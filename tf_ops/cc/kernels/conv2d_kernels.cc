// CPU kernels of KerasDfp>Conv2D, KerasDfp>Conv2DBackpropInput and
// KerasDfp>Conv2DBackpropFilter.
//
// All three are lowered to the exact int16 GEMM of gemm_s16s16s64.h, with the
// patch matrix P[position][(kh, kw, c)] of the input (im2col, zero padding):
//   forward:         Y[p][o]      = sum_(kh,kw,c) P[p][kh,kw,c] * F[kh,kw,c][o]
//   backprop input:  cols[p][khkwc] = sum_o dY[p][o] * F[khkwc][o], then the
//                    columns are scattered back to the input positions they
//                    came from (col2im) and added in int64
//   backprop filter: dF[khkwc][o] = sum_p P[p][khkwc] * dY[p][o], with the
//                    reduction over batch * out_height * out_width positions
// Every sum is exact in int64 and converted to float32 once.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf_ops/cc/conv2d_geometry.h"
#include "tf_ops/cc/reduction_guard.h"
#include "tf_ops/cc/dfp16_numerics.h"
#include "tf_ops/cc/kernels/gemm_s16s16s64.h"
#include "tf_ops/cc/kernels/kernel_path.h"
#include "tf_ops/cc/kernels/kernel_utils.h"

namespace keras_dfp {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// Output positions per GEMM task in the forward and backprop input kernels.
constexpr int64_t kPositionsPerChunk = 64;

// Positions per reduction chunk of the backprop filter kernel: at most
// kMaxFilterChunkPositions, fewer for large patches so that the two int16
// patch buffers of a thread stay near kFilterChunkBytes.
constexpr int64_t kMaxFilterChunkPositions = 1024;
constexpr int64_t kMinFilterChunkPositions = 64;
constexpr int64_t kFilterChunkBytes = 4 << 20;

int64_t FilterChunkPositions(int64_t patch_size) {
  const int64_t fitting = kFilterChunkBytes / (4 * patch_size);
  return std::clamp(fitting, kMinFilterChunkPositions,
                    kMaxFilterChunkPositions);
}

// Geometry of one convolution after validation.
struct ConvProblem {
  int64_t batch = 0;
  int64_t in_h = 0;
  int64_t in_w = 0;
  int64_t in_c = 0;
  int64_t filter_h = 0;
  int64_t filter_w = 0;
  int64_t out_c = 0;
  int64_t out_h = 0;
  int64_t out_w = 0;
  int64_t pad_top = 0;
  int64_t pad_left = 0;
  Conv2DAttrs attrs;

  int64_t patch_size() const { return filter_h * filter_w * in_c; }
  int64_t positions_per_image() const { return out_h * out_w; }
  int64_t positions() const { return batch * out_h * out_w; }
  TensorShape output_shape() const {
    return TensorShape({batch, out_h, out_w, out_c});
  }
};

absl::Status MakeConvProblem(const TensorShape& input,
                             const TensorShape& filter,
                             const Conv2DAttrs& attrs, ConvProblem* problem) {
  if (input.dims() != 4) {
    return tensorflow::errors::InvalidArgument(
        "Expected an NHWC input of rank 4. Received: input shape ",
        input.DebugString());
  }
  if (filter.dims() != 4) {
    return tensorflow::errors::InvalidArgument(
        "Expected an HWIO filter of rank 4. Received: filter shape ",
        filter.DebugString());
  }
  if (input.dim_size(3) != filter.dim_size(2)) {
    return tensorflow::errors::InvalidArgument(
        "Expected input channels (dimension 3 of the input) to equal filter "
        "in_channels (dimension 2 of the filter). Received: input shape ",
        input.DebugString(), ", filter shape ", filter.DebugString());
  }
  problem->batch = input.dim_size(0);
  problem->in_h = input.dim_size(1);
  problem->in_w = input.dim_size(2);
  problem->in_c = input.dim_size(3);
  problem->filter_h = filter.dim_size(0);
  problem->filter_w = filter.dim_size(1);
  problem->out_c = filter.dim_size(3);
  problem->attrs = attrs;
  WindowedSize height;
  WindowedSize width;
  TF_RETURN_IF_ERROR(ComputeWindowedSize(
      problem->in_h, problem->filter_h, attrs.dilation_h, attrs.stride_h,
      attrs.same_padding, "height", &height));
  TF_RETURN_IF_ERROR(ComputeWindowedSize(
      problem->in_w, problem->filter_w, attrs.dilation_w, attrs.stride_w,
      attrs.same_padding, "width", &width));
  problem->out_h = height.output;
  problem->out_w = width.output;
  problem->pad_top = height.pad_before;
  problem->pad_left = width.pad_before;
  return absl::OkStatus();
}

// Reads a length-4 int32 shape input (input_sizes or filter_sizes).
absl::Status ReadSizes(const Tensor& sizes, const char* name,
                       TensorShape* shape) {
  if (sizes.dims() != 1 || sizes.NumElements() != 4) {
    return tensorflow::errors::InvalidArgument(
        "Expected ", name, " to be an int32 vector of length 4. Received: ",
        name, ".shape=", sizes.shape().DebugString());
  }
  const auto values = sizes.vec<int32_t>();
  for (int i = 0; i < 4; ++i) {
    if (values(i) < 0) {
      return tensorflow::errors::InvalidArgument(
          "Expected non-negative ", name, ". Received: ", name, "=[",
          values(0), ", ", values(1), ", ", values(2), ", ", values(3), "]");
    }
  }
  return TensorShape::BuildTensorShape(
      {values(0), values(1), values(2), values(3)}, shape);
}

absl::Status CheckOutBackpropShape(const ConvProblem& problem,
                                   const TensorShape& out_backprop) {
  const TensorShape expected = problem.output_shape();
  if (out_backprop != expected) {
    return tensorflow::errors::InvalidArgument(
        "Expected out_backprop to have the forward output shape ",
        expected.DebugString(), ". Received: out_backprop shape ",
        out_backprop.DebugString());
  }
  return absl::OkStatus();
}

// Writes the patch row of output position `position` (flat over batch,
// out_h, out_w): patch_size values ordered (kh, kw, c), zero where the window
// reads padding.
void BuildPatchRow(const ConvProblem& p, const int16_t* input,
                   int64_t position, int16_t* row) {
  const int64_t per_image = p.positions_per_image();
  const int64_t n = position / per_image;
  const int64_t oh = (position % per_image) / p.out_w;
  const int64_t ow = position % p.out_w;
  const int16_t* image = input + n * p.in_h * p.in_w * p.in_c;
  const size_t channel_bytes = p.in_c * sizeof(int16_t);
  for (int64_t kh = 0; kh < p.filter_h; ++kh) {
    const int64_t ih = oh * p.attrs.stride_h - p.pad_top + kh * p.attrs.dilation_h;
    const bool row_inside = ih >= 0 && ih < p.in_h;
    for (int64_t kw = 0; kw < p.filter_w; ++kw) {
      const int64_t iw =
          ow * p.attrs.stride_w - p.pad_left + kw * p.attrs.dilation_w;
      int16_t* dst = row + (kh * p.filter_w + kw) * p.in_c;
      if (row_inside && iw >= 0 && iw < p.in_w) {
        std::memcpy(dst, image + (ih * p.in_w + iw) * p.in_c, channel_bytes);
      } else {
        std::memset(dst, 0, channel_bytes);
      }
    }
  }
}

// Adds the column row of output position (oh, ow) of one image to the int64
// input-gradient accumulator of that image (col2im).
void ScatterColumnRow(const ConvProblem& p, int64_t oh, int64_t ow,
                      const int64_t* columns, int64_t* image_sums) {
  for (int64_t kh = 0; kh < p.filter_h; ++kh) {
    const int64_t ih = oh * p.attrs.stride_h - p.pad_top + kh * p.attrs.dilation_h;
    if (ih < 0 || ih >= p.in_h) continue;
    for (int64_t kw = 0; kw < p.filter_w; ++kw) {
      const int64_t iw =
          ow * p.attrs.stride_w - p.pad_left + kw * p.attrs.dilation_w;
      if (iw < 0 || iw >= p.in_w) continue;
      const int64_t* src = columns + (kh * p.filter_w + kw) * p.in_c;
      int64_t* dst = image_sums + (ih * p.in_w + iw) * p.in_c;
      for (int64_t c = 0; c < p.in_c; ++c) dst[c] += src[c];
    }
  }
}

// Computes a forward convolution through im2col and the GEMM, sharded over
// chunks of output positions: out[position][o] = float32 of
// sum_q patch[position][q] * filter[o][q] times 2^exponent.
void RunForwardConv(OpKernelContext* ctx, const ConvProblem& p,
                    const int16_t* input, const PackedRhsS16& packed_filter,
                    int64_t exponent, float* out) {
  const int64_t positions = p.positions();
  const int64_t patch_size = p.patch_size();
  const int64_t chunks =
      (positions + kPositionsPerChunk - 1) / kPositionsPerChunk;
  const int64_t cost =
      SaturatingProduct({kPositionsPerChunk, patch_size, p.out_c});
  ParallelFor(ctx, chunks, cost, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> patches(kPositionsPerChunk * patch_size);
    std::vector<int64_t> sums(kPositionsPerChunk * p.out_c);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kPositionsPerChunk;
      const int64_t rows = std::min(kPositionsPerChunk, positions - first);
      for (int64_t r = 0; r < rows; ++r) {
        BuildPatchRow(p, input, first + r, patches.data() + r * patch_size);
      }
      GemmS16S16S64(patches.data(), patch_size, rows, packed_filter,
                    sums.data(), p.out_c, /*accumulate=*/false);
      ConvertSumsToFloat(sums.data(), rows * p.out_c, exponent,
                         out + first * p.out_c);
    }
  });
}

// Describes the input gradient of a stride-1 convolution as a forward
// convolution of out_backprop with the spatially flipped filter, whose in and
// out channels swap. Input row ih receives out_backprop row
// oh = ih + pad_top - kh * dilation_h. With kh' = filter_h - 1 - kh this is
// oh = ih - pad' + kh' * dilation_h, where
// pad' = (filter_h - 1) * dilation_h - pad_top (the same holds for columns).
// Each sum has the same integer terms as col2im, so the result is identical.
ConvProblem TransposedStrideOneProblem(const ConvProblem& p) {
  ConvProblem t;
  t.batch = p.batch;
  t.in_h = p.out_h;
  t.in_w = p.out_w;
  t.in_c = p.out_c;
  t.filter_h = p.filter_h;
  t.filter_w = p.filter_w;
  t.out_c = p.in_c;
  t.out_h = p.in_h;
  t.out_w = p.in_w;
  t.pad_top = (p.filter_h - 1) * p.attrs.dilation_h - p.pad_top;
  t.pad_left = (p.filter_w - 1) * p.attrs.dilation_w - p.pad_left;
  t.attrs = p.attrs;
  return t;
}

// Packs the flipped filter of TransposedStrideOneProblem: row c, element
// (kh', kw', o) is filter[filter_h - 1 - kh'][filter_w - 1 - kw'][c][o].
void PackFlippedFilter(const ConvProblem& p, const int16_t* filter,
                       PackedRhsS16* packed) {
  const int64_t taps = p.filter_h * p.filter_w;
  const int64_t row_size = taps * p.out_c;
  std::vector<int16_t> flipped(p.in_c * row_size);
  for (int64_t tap = 0; tap < taps; ++tap) {
    const int64_t flipped_tap = taps - 1 - tap;
    for (int64_t c = 0; c < p.in_c; ++c) {
      const int16_t* src = filter + (tap * p.in_c + c) * p.out_c;
      int16_t* dst = flipped.data() + c * row_size + flipped_tap * p.out_c;
      std::memcpy(dst, src, p.out_c * sizeof(int16_t));
    }
  }
  packed->Pack(flipped.data(), p.in_c, row_size, /*row_stride=*/row_size,
               /*k_stride=*/1);
}

class ConvOpBase : public OpKernel {
 public:
  explicit ConvOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetConv2DAttrs(ctx, &attrs_));
  }

 protected:
  Conv2DAttrs attrs_;
};

class Conv2DOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    GradualUnderflowScope gradual_underflow;
    KernelPath path = KernelPath::kPortable;
    OP_REQUIRES_OK(ctx, GetActiveKernelPath(&path));
    const Tensor& input = ctx->input(0);
    const Tensor& filter = ctx->input(2);
    int32_t input_exponent = 0;
    int32_t filter_exponent = 0;
    OP_REQUIRES_OK(ctx, ReadExponent(ctx, 1, "input_exponent", &input_exponent));
    OP_REQUIRES_OK(ctx,
                   ReadExponent(ctx, 3, "filter_exponent", &filter_exponent));
    ConvProblem p;
    OP_REQUIRES_OK(ctx,
                   MakeConvProblem(input.shape(), filter.shape(), attrs_, &p));
    OP_REQUIRES_OK(ctx, CheckReductionLength(
                            SaturatingProduct({p.filter_h, p.filter_w, p.in_c}),
                            "filter_height * filter_width * in_channels"));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, p.output_shape(), &output));
    float* out = output->flat<float>().data();
    const int64_t out_count = output->NumElements();
    if (out_count == 0) return;
    if (p.patch_size() == 0) {
      std::fill(out, out + out_count, 0.0f);
      return;
    }

    // The filter, viewed as [patch_size][out_c], is the transposed right-hand
    // operand: row o contains F[.][o] with stride out_c.
    PackedRhsS16 packed_filter(path);
    packed_filter.Pack(filter.flat<int16_t>().data(), p.out_c, p.patch_size(),
                       /*row_stride=*/1, /*k_stride=*/p.out_c);
    RunForwardConv(ctx, p, input.flat<int16_t>().data(), packed_filter,
                   int64_t{input_exponent} + filter_exponent, out);
  }
};

class Conv2DBackpropInputOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    GradualUnderflowScope gradual_underflow;
    KernelPath path = KernelPath::kPortable;
    OP_REQUIRES_OK(ctx, GetActiveKernelPath(&path));
    const Tensor& filter = ctx->input(1);
    const Tensor& out_backprop = ctx->input(3);
    TensorShape input_shape;
    OP_REQUIRES_OK(ctx, ReadSizes(ctx->input(0), "input_sizes", &input_shape));
    int32_t filter_exponent = 0;
    int32_t grad_exponent = 0;
    OP_REQUIRES_OK(ctx,
                   ReadExponent(ctx, 2, "filter_exponent", &filter_exponent));
    OP_REQUIRES_OK(
        ctx, ReadExponent(ctx, 4, "out_backprop_exponent", &grad_exponent));
    ConvProblem p;
    OP_REQUIRES_OK(ctx,
                   MakeConvProblem(input_shape, filter.shape(), attrs_, &p));
    OP_REQUIRES_OK(ctx, CheckOutBackpropShape(p, out_backprop.shape()));
    // Each input-gradient element sums at most filter_h * filter_w * out_c
    // products: one column entry per (kh, kw), each a sum over out_c.
    OP_REQUIRES_OK(ctx, CheckReductionLength(
                            SaturatingProduct({p.filter_h, p.filter_w, p.out_c}),
                            "filter_height * filter_width * out_channels"));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input_shape, &output));
    float* out = output->flat<float>().data();
    const int64_t out_count = output->NumElements();
    if (out_count == 0) return;
    if (p.positions() == 0 || p.out_c == 0) {
      std::fill(out, out + out_count, 0.0f);
      return;
    }

    const int16_t* grad = out_backprop.flat<int16_t>().data();
    const int64_t exponent = int64_t{filter_exponent} + grad_exponent;
    if (p.attrs.stride_h == 1 && p.attrs.stride_w == 1) {
      const ConvProblem transposed = TransposedStrideOneProblem(p);
      PackedRhsS16 flipped_filter(path);
      PackFlippedFilter(p, filter.flat<int16_t>().data(), &flipped_filter);
      RunForwardConv(ctx, transposed, grad, flipped_filter, exponent, out);
      return;
    }

    // Strided case: GEMM into columns, then col2im. The filter viewed as
    // [patch_size][out_c] is already K-contiguous.
    PackedRhsS16 packed_filter(path);
    packed_filter.Pack(filter.flat<int16_t>().data(), p.patch_size(), p.out_c,
                       /*row_stride=*/p.out_c, /*k_stride=*/1);

    const int64_t image_size = p.in_h * p.in_w * p.in_c;
    const int64_t per_image = p.positions_per_image();
    const int64_t cost =
        SaturatingProduct({per_image, p.patch_size(), p.out_c});
    // NOTE: the strided path shards over images only, so a batch smaller
    // than the thread count leaves threads idle. Splitting an image would
    // need the halo of output rows that overlap two input-row bands.
    ParallelFor(ctx, p.batch, cost, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> image_sums(image_size);
      std::vector<int64_t> columns(kPositionsPerChunk * p.patch_size());
      for (int64_t n = begin; n < end; ++n) {
        std::fill(image_sums.begin(), image_sums.end(), 0);
        for (int64_t first = 0; first < per_image; first += kPositionsPerChunk) {
          const int64_t rows = std::min(kPositionsPerChunk, per_image - first);
          GemmS16S16S64(grad + (n * per_image + first) * p.out_c, p.out_c, rows,
                        packed_filter, columns.data(), p.patch_size(),
                        /*accumulate=*/false);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t position = first + r;
            ScatterColumnRow(p, position / p.out_w, position % p.out_w,
                             columns.data() + r * p.patch_size(),
                             image_sums.data());
          }
        }
        ConvertSumsToFloat(image_sums.data(), image_size, exponent,
                           out + n * image_size);
      }
    });
  }
};

class Conv2DBackpropFilterOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    GradualUnderflowScope gradual_underflow;
    KernelPath path = KernelPath::kPortable;
    OP_REQUIRES_OK(ctx, GetActiveKernelPath(&path));
    const Tensor& input = ctx->input(0);
    const Tensor& out_backprop = ctx->input(3);
    TensorShape filter_shape;
    OP_REQUIRES_OK(ctx,
                   ReadSizes(ctx->input(2), "filter_sizes", &filter_shape));
    int32_t input_exponent = 0;
    int32_t grad_exponent = 0;
    OP_REQUIRES_OK(ctx, ReadExponent(ctx, 1, "input_exponent", &input_exponent));
    OP_REQUIRES_OK(
        ctx, ReadExponent(ctx, 4, "out_backprop_exponent", &grad_exponent));
    ConvProblem p;
    OP_REQUIRES_OK(ctx,
                   MakeConvProblem(input.shape(), filter_shape, attrs_, &p));
    OP_REQUIRES_OK(ctx, CheckOutBackpropShape(p, out_backprop.shape()));
    OP_REQUIRES_OK(ctx, CheckReductionLength(
                            SaturatingProduct({p.batch, p.out_h, p.out_w}),
                            "batch * output_height * output_width"));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, filter_shape, &output));
    float* out = output->flat<float>().data();
    const int64_t out_count = output->NumElements();
    if (out_count == 0) return;
    const int64_t positions = p.positions();
    if (positions == 0) {
      std::fill(out, out + out_count, 0.0f);
      return;
    }

    // The reduction over positions is split into `parts` contiguous ranges,
    // each summed into its own int64 partial result. Integer addition is
    // associative, so the total does not depend on the number of parts.
    const int64_t patch_size = p.patch_size();
    const int64_t chunk_positions = FilterChunkPositions(patch_size);
    const int64_t chunks = (positions + chunk_positions - 1) / chunk_positions;
    const int64_t parts = std::min<int64_t>(NumWorkerThreads(ctx), chunks);
    const int64_t chunks_per_part = (chunks + parts - 1) / parts;
    std::vector<std::vector<int64_t>> partials(parts);
    const int16_t* in = input.flat<int16_t>().data();
    const int16_t* grad = out_backprop.flat<int16_t>().data();
    const int64_t cost = SaturatingProduct(
        {chunks_per_part, chunk_positions, patch_size, p.out_c});
    ParallelFor(ctx, parts, cost, [&](int64_t begin, int64_t end) {
      std::vector<int16_t> patch_rows(chunk_positions * patch_size);
      std::vector<int16_t> patch_columns(chunk_positions * patch_size);
      PackedRhsS16 packed_grad(path);
      for (int64_t part = begin; part < end; ++part) {
        std::vector<int64_t>& sums = partials[part];
        sums.assign(out_count, 0);
        const int64_t part_first = part * chunks_per_part * chunk_positions;
        const int64_t part_end = std::min(
            positions, part_first + chunks_per_part * chunk_positions);
        for (int64_t first = part_first; first < part_end;
             first += chunk_positions) {
          const int64_t count = std::min(chunk_positions, part_end - first);
          for (int64_t r = 0; r < count; ++r) {
            BuildPatchRow(p, in, first + r, patch_rows.data() + r * patch_size);
          }
          // The GEMM reduces over K-contiguous rows, here positions.
          TransposeBlocked(patch_rows.data(), count, patch_size,
                           patch_columns.data());
          packed_grad.Pack(grad + first * p.out_c, p.out_c, count,
                           /*row_stride=*/1, /*k_stride=*/p.out_c);
          GemmS16S16S64(patch_columns.data(), count, patch_size, packed_grad,
                        sums.data(), p.out_c, /*accumulate=*/true);
        }
      }
    });

    std::vector<int64_t>& total = partials[0];
    for (int64_t part = 1; part < parts; ++part) {
      for (int64_t i = 0; i < out_count; ++i) total[i] += partials[part][i];
    }
    ConvertSumsToFloat(total.data(), out_count,
                       int64_t{input_exponent} + grad_exponent, out);
  }
};

REGISTER_KERNEL_BUILDER(Name("KerasDfp>Conv2D").Device(tensorflow::DEVICE_CPU),
                        Conv2DOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDfp>Conv2DBackpropInput").Device(tensorflow::DEVICE_CPU),
    Conv2DBackpropInputOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasDfp>Conv2DBackpropFilter").Device(tensorflow::DEVICE_CPU),
    Conv2DBackpropFilterOp);

}  // namespace
}  // namespace keras_dfp
