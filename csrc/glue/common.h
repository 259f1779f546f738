// Torch-side helpers shared by the per-family glue files (included only by csrc/bindings.cpp).
#pragma once
#include <torch/extension.h>

#include <type_traits>

#ifdef FASTKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "fastkd/common.h"
#include "fastkd/cuda_kernels.h"
#include "tiled/kernel.h"

namespace fastkd::glue {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Throws the CUDA error of a launch (status is a cudaError_t returned by a pure .cu launcher).
inline void check_cuda_status(int status, const char* what) {
#ifdef FASTKD_WITH_CUDA
  TORCH_CHECK(status == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
#else
  TORCH_CHECK(status == 0, what, " failed");
#endif
}

// The CUDA launchers compiled for the host emulator (csrc/emu/README.md), or null. While set, CPU
// tensors go through them instead of the CPU kernels, with every decision the glue takes for CUDA
// tensors (tile sizes, dtypes of intermediates); only the tests set it.
inline const CudaKernelTable*& cuda_emulation() {
  static const CudaKernelTable* table = nullptr;
  return table;
}

inline bool emulating_cuda(const at::Tensor& t) { return t.is_cpu() && cuda_emulation() != nullptr; }

// Whether the CUDA kernels (real or emulated) serve this tensor.
inline bool runs_cuda_kernels(const at::Tensor& t) { return t.is_cuda() || emulating_cuda(t); }

inline void check_emulated_status(int status, const char* what) {
  TORCH_CHECK(status == 0, what, " failed in the CUDA emulator: ", cuda_emulation()->last_error());
}

#ifdef FASTKD_WITH_CUDA
inline void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(at::cuda::getCurrentCUDAStream(t.device().index()).stream());
}
#endif

// The current device set to a CUDA tensor's device for the scope; nothing for a CPU tensor.
struct DeviceScope {
#ifdef FASTKD_WITH_CUDA
  c10::optional<c10::cuda::CUDAGuard> guard;
  explicit DeviceScope(const at::Tensor& t) {
    if (t.is_cuda()) guard.emplace(t.device());
  }
#else
  explicit DeviceScope(const at::Tensor&) {}
#endif
};

template <typename Params>
using CudaLauncher = int (*)(const Params&, void*);

// One kernel of csrc/include/fastkd as the implementation that serves `t` runs it: the CUDA
// launcher on the current stream, the emulated launcher, or the CPU kernel. A failed launch throws.
template <typename Params>
tiled::Kernel<Params> kernel_for(const at::Tensor& t, const char* name, void (*cpu)(const Params&),
                                 std::type_identity_t<CudaLauncher<Params>> cuda,
                                 CudaLauncher<Params> CudaKernelTable::*emulated) {
  if (t.is_cuda()) {
    TORCH_CHECK(cuda != nullptr, "fastkd was built without CUDA kernels");
#ifdef FASTKD_WITH_CUDA
    return [t, name, cuda](const Params& p) {
      check_cuda_status(cuda(p, current_stream(t)), name);
    };
#endif
  }
  if (emulating_cuda(t)) {
    return [name, emulated](const Params& p) {
      check_emulated_status((cuda_emulation()->*emulated)(p, nullptr), name);
    };
  }
  return cpu;
}

#ifdef FASTKD_WITH_CUDA
#define FASTKD_CUDA_LAUNCHER(name) &::fastkd::name##_cuda
#else
#define FASTKD_CUDA_LAUNCHER(name) nullptr
#endif
// kernel_for of the kernel `name` (sp_stats, feature_kd_epilogue, ...): name_cpu, name_cuda and
// the emulator's table entry `name`.
#define FASTKD_KERNEL(tensor, name)                                                       \
  ::fastkd::glue::kernel_for(tensor, "fastkd " #name "_cuda", &::fastkd::name##_cpu,      \
                             FASTKD_CUDA_LAUNCHER(name), &::fastkd::CudaKernelTable::name)

}  // namespace fastkd::glue
