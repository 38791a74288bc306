// CPU kernel of KerasDfp>MatMul: op(a) @ op(b) through the exact int16 GEMM.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf_ops/cc/reduction_guard.h"
#include "tf_ops/cc/kernels/gemm_s16s16s64.h"
#include "tf_ops/cc/kernels/kernel_path.h"
#include "tf_ops/cc/kernels/kernel_utils.h"

namespace keras_dfp {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// Rows of the product per GEMM task.
constexpr int64_t kRowsPerChunk = 64;

class MatMulOp : public OpKernel {
 public:
  explicit MatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_a", &transpose_a_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_b", &transpose_b_));
  }

  void Compute(OpKernelContext* ctx) override {
    GradualUnderflowScope gradual_underflow;
    KernelPath path = KernelPath::kPortable;
    OP_REQUIRES_OK(ctx, GetActiveKernelPath(&path));
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(2);
    int32_t a_exponent = 0;
    int32_t b_exponent = 0;
    OP_REQUIRES_OK(ctx, ReadExponent(ctx, 1, "a_exponent", &a_exponent));
    OP_REQUIRES_OK(ctx, ReadExponent(ctx, 3, "b_exponent", &b_exponent));
    OP_REQUIRES(ctx, a.dims() == 2 && b.dims() == 2,
                tensorflow::errors::InvalidArgument(
                    "Expected a and b to be matrices (rank 2). Received: "
                    "a.shape=",
                    a.shape().DebugString(), ", b.shape=",
                    b.shape().DebugString()));
    const int64_t m = a.dim_size(transpose_a_ ? 1 : 0);
    const int64_t k = a.dim_size(transpose_a_ ? 0 : 1);
    const int64_t k_b = b.dim_size(transpose_b_ ? 1 : 0);
    const int64_t n = b.dim_size(transpose_b_ ? 0 : 1);
    OP_REQUIRES(ctx, k == k_b,
                tensorflow::errors::InvalidArgument(
                    "Expected the inner dimensions of a and b to match. "
                    "Received: a.shape=",
                    a.shape().DebugString(), ", b.shape=",
                    b.shape().DebugString(), ", transpose_a=", transpose_a_,
                    ", transpose_b=", transpose_b_));
    OP_REQUIRES_OK(ctx, CheckReductionLength(k, "inner dimension of a"));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {m, n}, &output));
    float* out = output->flat<float>().data();
    if (m == 0 || n == 0) return;
    if (k == 0) {
      std::fill(out, out + m * n, 0.0f);
      return;
    }

    // The GEMM reads the left operand as K-contiguous rows, so a transposed
    // `a` ([K, M]) is copied into [M, K] order first.
    const int16_t* a_data = a.flat<int16_t>().data();
    std::vector<int16_t> a_rows;
    if (transpose_a_) {
      a_rows.resize(m * k);
      TransposeBlocked(a_data, k, m, a_rows.data());
      a_data = a_rows.data();
    }
    PackedRhsS16 packed_b(path);
    if (transpose_b_) {
      packed_b.Pack(b.flat<int16_t>().data(), n, k, /*row_stride=*/k,
                    /*k_stride=*/1);
    } else {
      packed_b.Pack(b.flat<int16_t>().data(), n, k, /*row_stride=*/1,
                    /*k_stride=*/n);
    }

    const int64_t exponent = int64_t{a_exponent} + b_exponent;
    const int64_t chunks = (m + kRowsPerChunk - 1) / kRowsPerChunk;
    ParallelFor(ctx, chunks, SaturatingProduct({kRowsPerChunk, k, n}),
                [&](int64_t begin, int64_t end) {
                  std::vector<int64_t> sums(kRowsPerChunk * n);
                  for (int64_t chunk = begin; chunk < end; ++chunk) {
                    const int64_t first = chunk * kRowsPerChunk;
                    const int64_t rows = std::min(kRowsPerChunk, m - first);
                    GemmS16S16S64(a_data + first * k, k, rows, packed_b,
                                  sums.data(), n, /*accumulate=*/false);
                    ConvertSumsToFloat(sums.data(), rows * n, exponent,
                                       out + first * n);
                  }
                });
  }

 private:
  bool transpose_a_ = false;
  bool transpose_b_ = false;
};

REGISTER_KERNEL_BUILDER(Name("KerasDfp>MatMul").Device(tensorflow::DEVICE_CPU),
                        MatMulOp);

}  // namespace
}  // namespace keras_dfp
