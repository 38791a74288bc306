#include "tf_ops/cc/kernels/kernel_path.h"

#include <cpuid.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/logging.h"

namespace keras_dfp {
namespace {

// XCR0 bits that the operating system sets when it saves the register state
// on context switches: SSE (bit 1) and AVX upper halves (bit 2) for YMM, plus
// opmask (5), ZMM upper halves (6) and ZMM16-31 (7) for AVX-512.
constexpr uint64_t kXcr0YmmState = (1u << 1) | (1u << 2);
constexpr uint64_t kXcr0ZmmState = kXcr0YmmState | (1u << 5) | (1u << 6) |
                                   (1u << 7);

// Returns XCR0, or 0 when the OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE),
// in which case xgetbv would fault.
uint64_t ReadXcr0() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  if ((ecx & bit_OSXSAVE) == 0) return 0;
  uint32_t low = 0, high = 0;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  return (uint64_t{high} << 32) | low;
}

bool CpuSupports(KernelPath path) {
  __builtin_cpu_init();
  const uint64_t xcr0 = ReadXcr0();
  switch (path) {
    case KernelPath::kAvx512Vnni:
      return (xcr0 & kXcr0ZmmState) == kXcr0ZmmState &&
             __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    case KernelPath::kAvx2:
      return (xcr0 & kXcr0YmmState) == kXcr0YmmState &&
             __builtin_cpu_supports("avx2");
    case KernelPath::kPortable:
      return true;
  }
  return false;
}

constexpr KernelPath kAllPaths[] = {KernelPath::kAvx512Vnni, KernelPath::kAvx2,
                                    KernelPath::kPortable};

std::mutex path_mutex;
bool path_resolved = false;  // Guarded by path_mutex.
KernelPath active_path = KernelPath::kPortable;  // Guarded by path_mutex.

// Resolves `name` to a supported path ("auto": the best one).
absl::Status ParseKernelPath(const std::string& name, const char* source,
                             KernelPath* path) {
  const std::vector<KernelPath> supported = SupportedKernelPaths();
  if (name == "auto") {
    *path = supported.front();
    return absl::OkStatus();
  }
  for (KernelPath candidate : kAllPaths) {
    if (name != KernelPathName(candidate)) continue;
    for (KernelPath available : supported) {
      if (available == candidate) {
        *path = candidate;
        return absl::OkStatus();
      }
    }
    return tensorflow::errors::InvalidArgument(
        "Kernel path '", name, "' (from ", source,
        ") is not supported by this CPU or operating system. Supported "
        "paths: ",
        SupportedKernelPathNames(), ". Choose one of them or 'auto'.");
  }
  return tensorflow::errors::InvalidArgument(
      "Expected a kernel path of auto, avx512_vnni, avx2 or portable. "
      "Received: ",
      source, "='", name, "'. Supported on this CPU: ",
      SupportedKernelPathNames(), ".");
}

// Sets active_path and logs the change. Requires path_mutex.
void ActivateLocked(KernelPath path, const char* reason) {
  if (!path_resolved || path != active_path) {
    LOG(INFO) << "keras-dfp: int16 GEMM kernel path '" << KernelPathName(path)
              << "' (" << reason
              << "; supported: " << SupportedKernelPathNames() << ")";
  }
  active_path = path;
  path_resolved = true;
}

}  // namespace

const char* KernelPathName(KernelPath path) {
  switch (path) {
    case KernelPath::kAvx512Vnni:
      return "avx512_vnni";
    case KernelPath::kAvx2:
      return "avx2";
    case KernelPath::kPortable:
      return "portable";
  }
  return "unknown";
}

std::vector<KernelPath> SupportedKernelPaths() {
  static const std::vector<KernelPath>* const supported = [] {
    auto* paths = new std::vector<KernelPath>();
    for (KernelPath path : kAllPaths) {
      if (CpuSupports(path)) paths->push_back(path);
    }
    return paths;
  }();
  return *supported;
}

std::string SupportedKernelPathNames() {
  std::string names;
  for (KernelPath path : SupportedKernelPaths()) {
    if (!names.empty()) names += ", ";
    names += KernelPathName(path);
  }
  return names;
}

absl::Status GetActiveKernelPath(KernelPath* path) {
  std::lock_guard<std::mutex> lock(path_mutex);
  if (!path_resolved) {
    const char* env = std::getenv(kKernelPathEnvVar);
    const std::string requested = (env == nullptr || *env == '\0') ? "auto" : env;
    KernelPath resolved = KernelPath::kPortable;
    TF_RETURN_IF_ERROR(ParseKernelPath(
        requested, "environment variable KERAS_DFP_KERNEL_PATH", &resolved));
    ActivateLocked(resolved, requested == "auto"
                                 ? "best supported by this CPU"
                                 : "forced by KERAS_DFP_KERNEL_PATH");
  }
  *path = active_path;
  return absl::OkStatus();
}

absl::Status SetKernelPath(const std::string& name) {
  KernelPath resolved = KernelPath::kPortable;
  TF_RETURN_IF_ERROR(ParseKernelPath(name, "kernel path request", &resolved));
  std::lock_guard<std::mutex> lock(path_mutex);
  ActivateLocked(resolved, name == "auto" ? "best supported by this CPU"
                                          : "set by the caller");
  return absl::OkStatus();
}

}  // namespace keras_dfp
