// CPU kernel of KerasDfp>KernelPath.

#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf_ops/cc/kernels/kernel_path.h"

namespace keras_dfp {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::tstring;

class KernelPathOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& requested = ctx->input(0);
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(requested.shape()),
                tensorflow::errors::InvalidArgument(
                    "Expected requested to be a scalar string. Received: "
                    "requested.shape=",
                    requested.shape().DebugString()));
    const std::string name(requested.scalar<tstring>()());
    if (!name.empty()) OP_REQUIRES_OK(ctx, SetKernelPath(name));
    KernelPath active = KernelPath::kPortable;
    OP_REQUIRES_OK(ctx, GetActiveKernelPath(&active));

    Tensor* active_output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &active_output));
    active_output->scalar<tstring>()() = KernelPathName(active);

    const std::vector<KernelPath> supported = SupportedKernelPaths();
    Tensor* supported_output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, TensorShape({static_cast<int64_t>(supported.size())}),
                            &supported_output));
    auto names = supported_output->vec<tstring>();
    for (size_t i = 0; i < supported.size(); ++i) {
      names(i) = KernelPathName(supported[i]);
    }
  }
};

REGISTER_KERNEL_BUILDER(
    Name("KerasDfp>KernelPath").Device(tensorflow::DEVICE_CPU), KernelPathOp);

}  // namespace
}  // namespace keras_dfp
