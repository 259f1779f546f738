// The emulated CUDA launchers as the table the torch glue takes (fastkd/cuda_kernels.h).
#include "fastkd/cuda_kernels.h"

extern "C" const char* fastkd_emu_last_error();

extern "C" const fastkd::CudaKernelTable* fastkd_emu_kernels() {
  static const fastkd::CudaKernelTable table{
      &fastkd::logit_kd_cuda, &fastkd::feature_kd_epilogue_cuda, &fastkd::sp_stats_cuda,
      &fastkd::sp_tile_cuda,  &fastkd::rkd_stats_cuda,           &fastkd::rkd_tile_cuda,
      &fastkd::rkd_angle_cuda, &fastkd::pkt_stats_cuda,          &fastkd::pkt_tile_cuda,
      &fastkd_emu_last_error,  &fastkd::logit_topk_cuda};
  return &table;
}
