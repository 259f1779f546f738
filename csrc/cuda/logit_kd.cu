// Fused logit KD on CUDA (SPEC §1, §1c): one launch writes the per-row loss and the gradients.
// The math and the per-row passes are in logit_kd_impl.cuh; this file holds the kernels (thread
// groups, grid over rows) and the launcher declared in fastkd/logit_kd.h. No torch types here.
//
// Launch configuration:
// - V <= kWarpRowMaxVocab: one warp per row, kWarpKernelThreads / 32 rows per CTA (small
//   vocabularies would leave most of a block idle and pay block barriers for little work).
// - otherwise: one CTA of kBlockThreads per row. Rows are processed back to back by the same CTA,
//   and the head of the row is kept in dynamic shared memory (as much as fits with
//   kBlocksPerSm CTAs per SM), so the second (and third) read of the row comes mostly from shared
//   memory and L2 rather than HBM.
// Both grids stride over rows, so any number of rows works in one launch.
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "fastkd/logit_kd.h"
#include "logit_kd_impl.cuh"

namespace fastkd {
namespace logit_cuda {
namespace {

constexpr int kBlockThreads = 512;
constexpr int kWarpKernelThreads = 256;
constexpr int kWarpsPerCta = kWarpKernelThreads / 32;
constexpr int64_t kWarpRowMaxVocab = 4096;
// CTAs per SM the one-teacher block kernel is built for (launch bounds: <= 64 registers); the
// several-teacher kernel gets 1 (more registers for the teachers' chunks).
constexpr int kBlocksPerSmSingle = 2;
constexpr int kBlocksPerSmMulti = 1;
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

struct WarpGroup {
  static constexpr int kSize = 32;
  int rank;
  float* red;
  unsigned char* cache;
  int64_t cache_bytes;
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ float shfl_xor(float v, int m) const {
    return __shfl_xor_sync(0xffffffffu, v, m);
  }
};

template <typename TS, typename TT, bool kMulti>
__global__ void __launch_bounds__(kBlockThreads, kMulti ? kBlocksPerSmMulti : kBlocksPerSmSingle)
logit_kd_block_kernel(const __grid_constant__ LogitKDParams p, const __grid_constant__ Consts c) {
  using Group = BlockGroup<kBlockThreads>;
  using Row = RowKD<TS, TT, kMulti, Group>;
  __shared__ float red[Row::kRedFloats];
  extern __shared__ uint4 row_cache[];
  const Group g{static_cast<int>(threadIdx.x), red,
                c.cache_bytes > 0 ? reinterpret_cast<unsigned char*>(row_cache) : nullptr,
                c.cache_bytes};
  const float gscale = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    Row r(p, c, g);
    r.run(row, gscale);
  }
}

template <typename TS, typename TT, bool kMulti>
__global__ void __launch_bounds__(kWarpKernelThreads)
logit_kd_warp_kernel(const __grid_constant__ LogitKDParams p, const __grid_constant__ Consts c) {
  using Row = RowKD<TS, TT, kMulti, WarpGroup>;
  const WarpGroup g{static_cast<int>(threadIdx.x & 31u), nullptr, nullptr, 0};
  const float gscale = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerCta;
  for (int64_t row = first; row < p.rows; row += stride) {
    Row r(p, c, g);
    r.run(row, gscale);
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

// Allows `kernel` up to `bytes` of dynamic shared memory on `dev` (once per kernel and device).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int dev, int bytes) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = (dev >= 0 && dev < kMaxDevices) ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  // Shared memory over L1: the rows stream through L2, the cache is what we reuse.
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return e;
  if (bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename TS, typename TT, bool kMulti>
cudaError_t launch_block(const LogitKDParams& p, Consts c, cudaStream_t stream) {
  using Row = RowKD<TS, TT, kMulti, BlockGroup<kBlockThreads>>;
  auto kernel = logit_kd_block_kernel<TS, TT, kMulti>;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  DeviceInfo info;
  e = device_info(dev, info);
  if (e != cudaSuccess) return e;

  // Row cache: what is left of the SM's shared memory for each resident CTA, minus the static
  // reduction scratch and the 1 KiB the runtime reserves per block; no more than a row needs.
  const int per_sm = kMulti ? kBlocksPerSmMulti : kBlocksPerSmSingle;
  const int static_bytes = static_cast<int>(Row::kRedFloats * sizeof(float));
  int64_t budget = static_cast<int64_t>(info.smem_per_sm) / per_sm - static_bytes - 1024;
  if (budget > info.smem_per_block - static_bytes) budget = info.smem_per_block - static_bytes;
  budget = budget > 0 ? (budget / 128) * 128 : 0;
  const int64_t chunk = (sizeof(typename Row::RS) + p.num_teachers * sizeof(typename Row::RT));
  const int64_t need = ((p.vocab + Row::N - 1) / Row::N + 1) * chunk;
  int64_t bytes = need < budget ? ((need + 127) / 128) * 128 : budget;
  if (bytes < 4096) bytes = 0;  // not worth it
  if (bytes > 48 * 1024) {
    e = allow_dynamic_smem(kernel, dev, static_cast<int>(budget));
    if (e != cudaSuccess) return e;
  }
  c.cache_bytes = bytes;

  const int64_t grid = p.rows < INT_MAX ? p.rows : INT_MAX;
  kernel<<<static_cast<unsigned>(grid), kBlockThreads, static_cast<size_t>(bytes), stream>>>(p, c);
  return cudaGetLastError();
}

template <typename TS, typename TT, bool kMulti>
cudaError_t launch_warp(const LogitKDParams& p, Consts c, cudaStream_t stream) {
  c.cache_bytes = 0;
  const int64_t blocks = (p.rows + kWarpsPerCta - 1) / kWarpsPerCta;
  const int64_t grid = blocks < INT_MAX ? blocks : INT_MAX;
  logit_kd_warp_kernel<TS, TT, kMulti>
      <<<static_cast<unsigned>(grid), kWarpKernelThreads, 0, stream>>>(p, c);
  return cudaGetLastError();
}

template <typename TS, typename TT>
cudaError_t launch_typed(const LogitKDParams& p, const Consts& c, cudaStream_t stream) {
  const bool small = p.vocab <= kWarpRowMaxVocab;
  if (p.num_teachers == 1) {
    return small ? launch_warp<TS, TT, false>(p, c, stream) : launch_block<TS, TT, false>(p, c, stream);
  }
  return small ? launch_warp<TS, TT, true>(p, c, stream) : launch_block<TS, TT, true>(p, c, stream);
}

template <typename TS>
cudaError_t launch_teacher_dtype(const LogitKDParams& p, const Consts& c, cudaStream_t stream) {
  switch (p.teacher_dtype) {
    case DType::F32: return launch_typed<TS, float>(p, c, stream);
    case DType::BF16: return launch_typed<TS, __nv_bfloat16>(p, c, stream);
    case DType::F16: return launch_typed<TS, __half>(p, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace logit_cuda

int logit_kd_cuda(const LogitKDParams& p, void* stream) {
  using namespace logit_cuda;
  if (p.rows < 0 || p.vocab < 1 || p.num_teachers < 1 || p.num_teachers > kMaxTeachers ||
      p.student == nullptr || p.row_loss == nullptr || !(p.temperature > 0.f) ||
      !std::isfinite(p.temperature)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  for (int i = 0; i < p.num_teachers; ++i)
    if (p.teacher[i] == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (p.rows == 0) return static_cast<int>(cudaSuccess);

  Consts c;
  const double t = p.temperature;
  c.c = static_cast<float>(1.4426950408889634074 / t);
  c.sf_over_t = static_cast<float>(static_cast<double>(p.soft_factor) / t);
  c.beta = p.beta;
  c.one_minus_beta = static_cast<float>(1.0 - static_cast<double>(p.beta));
  c.hard_weight = p.hard_weight;
  c.eps = p.label_smoothing;
  c.eps_over_v = static_cast<float>(static_cast<double>(p.label_smoothing) / static_cast<double>(p.vocab));
  c.same_t = p.temperature == 1.f ? 1 : 0;
  c.cache_bytes = 0;

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaErrorInvalidValue;
  switch (p.student_dtype) {
    case DType::F32: e = launch_teacher_dtype<float>(p, c, s); break;
    case DType::BF16: e = launch_teacher_dtype<__nv_bfloat16>(p, c, s); break;
    case DType::F16: e = launch_teacher_dtype<__half>(p, c, s); break;
  }
  return static_cast<int>(e);
}

}  // namespace fastkd
