// Registers KerasDfp>KernelPath, which reads or sets the int16 GEMM kernel
// path of the process (see tf_ops/cc/kernels/kernel_path.h).

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_dfp {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

absl::Status KernelPathShape(InferenceContext* c) {
  ShapeHandle scalar;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 0, &scalar));
  c->set_output(0, c->Scalar());
  c->set_output(1, c->Vector(c->UnknownDim()));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasDfp>KernelPath")
    .Input("requested: string")
    .Output("active: string")
    .Output("supported: string")
    .SetIsStateful()
    .SetShapeFn(KernelPathShape)
    .Doc(R"doc(
Reads or sets the int16 GEMM kernel path used by the conv and matmul ops.

requested: "" keeps the current path; "auto" selects the best path the CPU
  supports; "avx512_vnni", "avx2" or "portable" force that path and fail with
  InvalidArgument when the CPU or operating system lacks it.
active: name of the path in use after the request.
supported: names of the paths this machine supports, best first.
)doc");

}  // namespace keras_dfp
