// Fused logit KD on CUDA (SPEC §1, §1c): one launch writes the per-row loss and the gradients.
// The math and the per-row passes are in logit_kd_impl.cuh; this file holds the kernels (one CTA
// per row, grid striding over rows) and the launcher declared in fastkd/logit_kd.h. No torch
// types here.
//
// Launch configuration (see the constants below): one teacher with V > 4096: 512 threads per
// row, 2 CTAs per SM; one teacher with V <= 4096: 128 threads per row, 8 CTAs per SM; several
// teachers: 512 threads, 1 CTA per SM. Each CTA keeps the head of its row in dynamic shared memory
// (what is left of the SM's shared memory for each resident CTA), so the second (and third) read of
// the row comes from shared memory for the head and mostly from L2 for the rest.
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "fastkd/logit_kd.h"
#include "emulatable.cuh"
#include "logit_kd_impl.cuh"

namespace fastkd {
namespace logit_cuda {
namespace {

// One teacher, V > kSmallVocab: 512 threads per row, 2 CTAs per SM (<= 64 registers per thread).
constexpr int kLargeThreads = 512;
constexpr int kLargeBlocksPerSm = 2;
// One teacher, V <= kSmallVocab: 128 threads per row, 8 CTAs per SM (<= 64 registers), so that
// small rows still fill the GPU without idling most of a large block.
constexpr int kSmallThreads = 128;
constexpr int kSmallBlocksPerSm = 8;
constexpr int64_t kSmallVocab = 4096;
// Several teachers: 512 threads per row, 1 CTA per SM (the per-teacher loops need 112 (sm_90) to
// 113 (sm_80) registers, benchmarks/results/resources-cuda.md; with 64 they spill), which also
// leaves the whole shared memory to the row cache.
constexpr int kMultiThreads = 512;
constexpr int kMultiBlocksPerSm = 1;
constexpr int kMaxDevices = 64;

template <int kThreads>
struct BlockGroup {
  static constexpr int kSize = kThreads;
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");
  int rank;
  float* red;
  unsigned char* cache;
  int64_t cache_bytes;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ float shfl_xor(float v, int m) const {
    return __shfl_xor_sync(0xffffffffu, v, m);
  }
};

// One CTA per row; the grid strides over rows (any number of rows in one launch).
template <bool kMulti, int kThreads, int kBlocksPerSm>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
logit_kd_kernel(const __grid_constant__ LogitKDParams p, const __grid_constant__ Consts c) {
  using Group = BlockGroup<kThreads>;
  using Row = RowKD<kMulti, Group>;
  FKD_SHARED(float, red, [Row::kRedFloats]);
  FKD_DYNAMIC_SHARED(uint4, row_cache);
  const Group g{static_cast<int>(threadIdx.x), red,
                c.cache_bytes > 0 ? reinterpret_cast<unsigned char*>(row_cache) : nullptr,
                c.cache_bytes};
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    Row r(p, c, g);
    r.run(row);
  }
}

struct DeviceInfo {
  int smem_per_sm = 0;     // bytes of shared memory per SM
  int smem_per_block = 0;  // opt-in maximum per block
};

cudaError_t device_info(int dev, DeviceInfo& out) {
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  static bool valid[kMaxDevices] = {};
  if (dev >= 0 && dev < kMaxDevices) {
    std::lock_guard<std::mutex> lock(mu);
    if (valid[dev]) {
      out = cache[dev];
      return cudaSuccess;
    }
  }
  DeviceInfo info;
  cudaError_t e = cudaDeviceGetAttribute(&info.smem_per_sm,
                                         cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  if (dev >= 0 && dev < kMaxDevices) {
    std::lock_guard<std::mutex> lock(mu);
    cache[dev] = info;
    valid[dev] = true;
  }
  out = info;
  return cudaSuccess;
}

// Allows kKernel up to `bytes` of dynamic shared memory on `dev` and asks for the largest shared
// memory carveout, so that its resident CTAs with their row caches fit on an SM. Done once per
// kernel and device: the flags are per template instance, i.e. per kernel (the kernels share one
// function type, so a flag keyed on the type would let the first kernel's call stand for all).
// `bytes` depends only on the kernel and the device, so the first call's value holds for later
// calls.
template <auto kKernel>
cudaError_t allow_dynamic_smem(int dev, int bytes) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = (dev >= 0 && dev < kMaxDevices) ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  // Shared memory over L1: the rows stream through L2, the cache is what is reused.
  e = cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return e;
  if (bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
  return cudaSuccess;
}

template <bool kMulti, int kThreads, int kBlocksPerSm>
cudaError_t launch(const LogitKDParams& p, Consts c, cudaStream_t stream) {
  using Row = RowKD<kMulti, BlockGroup<kThreads>>;
  constexpr auto kernel = logit_kd_kernel<kMulti, kThreads, kBlocksPerSm>;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  DeviceInfo info;
  e = device_info(dev, info);
  if (e != cudaSuccess) return e;

  // Row cache: the SM's shared memory shared by kBlocksPerSm resident CTAs, minus the static
  // reduction scratch and the 1 KiB the runtime reserves per block; no more than a row needs.
  const int64_t static_bytes = static_cast<int64_t>(Row::kRedFloats * sizeof(float));
  int64_t budget = static_cast<int64_t>(info.smem_per_sm) / kBlocksPerSm - static_bytes - 1024;
  if (budget > info.smem_per_block - static_bytes) budget = info.smem_per_block - static_bytes;
  budget = budget > 0 ? budget / 128 * 128 : 0;
  const int64_t chunk_bytes =
      Row::N * (dtype_size(p.student_dtype) +
                static_cast<int64_t>(p.num_teachers) * dtype_size(p.teacher_dtype));
  const int64_t need = ((p.vocab + Row::N - 1) / Row::N + 1) * chunk_bytes + 16;
  int64_t bytes = need < budget ? (need + 127) / 128 * 128 : budget;
  if (bytes < 2048) bytes = 0;  // not worth it
  if (bytes > 0) {
    e = allow_dynamic_smem<kernel>(dev, static_cast<int>(budget));
    if (e != cudaSuccess) return e;
  }
  c.cache_bytes = bytes;

  const int64_t grid = p.rows < INT_MAX ? p.rows : INT_MAX;
  FKD_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, static_cast<size_t>(bytes), stream)(p, c);
  return cudaGetLastError();
}

bool valid_dtype(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

}  // namespace
}  // namespace logit_cuda

int logit_kd_cuda(const LogitKDParams& p, void* stream) {
  using namespace logit_cuda;
  if (p.rows < 0 || p.vocab < 1 || p.num_teachers < 1 || p.num_teachers > kMaxTeachers ||
      p.student == nullptr || p.row_loss == nullptr || !(p.temperature > 0.f) ||
      !std::isfinite(p.temperature) || !valid_dtype(p.student_dtype) ||
      !valid_dtype(p.teacher_dtype)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  for (int i = 0; i < p.num_teachers; ++i)
    if (p.teacher[i] == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (p.rows == 0) return static_cast<int>(cudaSuccess);

  const Consts c = make_consts(p);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The math is compiled once per kernel; the dtypes are switched at each chunk load / store
  // (uniform branches), which keeps the build to three kernels instead of one per dtype pair.
  cudaError_t e;
  if (p.num_teachers > 1) {
    e = launch<true, kMultiThreads, kMultiBlocksPerSm>(p, c, s);
  } else if (p.vocab <= kSmallVocab) {
    e = launch<false, kSmallThreads, kSmallBlocksPerSm>(p, c, s);
  } else {
    e = launch<false, kLargeThreads, kLargeBlocksPerSm>(p, c, s);
  }
  return static_cast<int>(e);
}

}  // namespace fastkd
