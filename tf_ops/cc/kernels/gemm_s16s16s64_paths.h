// Entry points of the vector kernel paths of GemmS16S16S64. Each one adds
// A * B^T to the int64 matrix C (the caller zeroes C first when needed) and
// is only called after SupportedKernelPaths() listed its path.

#ifndef KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_PATHS_H_
#define KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_PATHS_H_

#include <cstdint>

#include "tf_ops/cc/kernels/gemm_s16s16s64.h"

namespace keras_dfp {

void GemmS16S16S64Avx512Vnni(const int16_t* a, int64_t lda, int64_t m,
                             const PackedRhsS16& b, int64_t* c, int64_t ldc);

void GemmS16S16S64Avx2(const int16_t* a, int64_t lda, int64_t m,
                       const PackedRhsS16& b, int64_t* c, int64_t ldc);

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_KERNELS_GEMM_S16S16S64_PATHS_H_
