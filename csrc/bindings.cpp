// The one torch-glue translation unit of fastkd._C: each loss family's glue is a header under
// csrc/glue/ (included here, so the heavy torch headers are compiled once) and registers itself.
#include "glue/common.h"
#include "glue/logit.h"
#include "glue/feature.h"
#include "glue/relation.h"

namespace {
bool built_with_cuda() {
#ifdef FASTKD_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastkd fused kernels (C++ CPU and, when built, CUDA)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  m.def(
      "set_cuda_emulation",
      [](int64_t table) {
        fastkd::glue::cuda_emulation() = reinterpret_cast<const fastkd::CudaKernelTable*>(table);
      },
      "Route CPU tensors through the CUDA launchers of the host emulator at this address "
      "(fastkd_emu_kernels() of the emulator library), or back to the CPU kernels with 0; tests only");
  fastkd::glue::register_logit(m);
  fastkd::glue::register_feature(m);
  fastkd::glue::register_relation(m);
}
