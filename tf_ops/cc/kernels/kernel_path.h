// Run-time choice of the int16 GEMM implementation ("kernel path").
//
// Paths in order of preference, each exact (bit-identical to the portable
// reference path):
//   avx512_vnni : 512-bit vpdpwssd (AVX-512 F/BW/VNNI, ZMM state enabled by
//                 the operating system)
//   avx2        : 256-bit vpmaddwd + vpaddd (AVX2, YMM state enabled)
//   portable    : plain C++ that compilers vectorize with the baseline ISA
// NOTE: an AMX (tdpbssd) path would slot in above avx512_vnni; it is not
// implemented because no AMX CPU was available to test it on.
//
// The active path is chosen on first use: environment variable
// KERAS_DFP_KERNEL_PATH (auto, avx512_vnni, avx2 or portable; default auto),
// where auto picks the best path the CPU supports. SetKernelPath changes it
// for the whole process afterwards (the KerasDfp>KernelPath op calls it).

#ifndef KERAS_DFP_TF_OPS_CC_KERNELS_KERNEL_PATH_H_
#define KERAS_DFP_TF_OPS_CC_KERNELS_KERNEL_PATH_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace keras_dfp {

enum class KernelPath { kAvx512Vnni, kAvx2, kPortable };

// Name of the environment variable that forces a path.
inline constexpr char kKernelPathEnvVar[] = "KERAS_DFP_KERNEL_PATH";

// Returns the lower-case name of `path`, for example "avx512_vnni".
const char* KernelPathName(KernelPath path);

// Returns the paths this CPU and operating system support, best first.
// The portable path is always last.
std::vector<KernelPath> SupportedKernelPaths();

// Returns the names of SupportedKernelPaths(), joined by ", ".
std::string SupportedKernelPathNames();

// Stores the active path in *path. On first use it resolves
// KERAS_DFP_KERNEL_PATH and logs the chosen path once; an invalid or
// unsupported value gives InvalidArgument naming the value and the options.
absl::Status GetActiveKernelPath(KernelPath* path);

// Sets the active path from `name` ("auto" picks the best supported path).
// Returns InvalidArgument naming `name` and the supported paths when the
// name is unknown or the CPU lacks the path.
absl::Status SetKernelPath(const std::string& name);

}  // namespace keras_dfp

#endif  // KERAS_DFP_TF_OPS_CC_KERNELS_KERNEL_PATH_H_
