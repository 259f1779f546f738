// Host stand-in for <cuda_runtime.h> used by the CUDA emulator (see csrc/emu/README.md).
//
// A file of csrc/cuda/ compiled by the host compiler with -DFASTKD_CUDA_EMULATION and this
// directory first on the include path gets:
//   - the runtime API subset the launchers call, answered by a mock runtime with A100 / H100
//     limits that refuses what the real runtime refuses (csrc/emu/runtime.cpp);
//   - the device API subset the kernels call: threadIdx & co., __syncthreads, warp shuffles,
//     atomics, cache-hinted loads/stores, __shared__ through FKD_SHARED / FKD_DYNAMIC_SHARED;
//   - FKD_LAUNCH, which runs a grid on the host: one fiber per CUDA thread, blocks one after
//     another, every memory access of the kernel checked (bounds, alignment, shared-memory
//     races between barriers) through the -fsanitize=thread instrumentation hooks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cmath>
#include <tuple>
#include <utility>

#ifndef FASTKD_CUDA_EMULATION
#error "csrc/emu/include/cuda_runtime.h is only for the CUDA emulator (-DFASTKD_CUDA_EMULATION)"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

// ---- vector and launch types ------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;

// The numeric values are the real runtime's, so codes round-trip through the int returns.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxBlocksPerMultiprocessor = 106,
  cudaDevAttrReservedSharedMemoryPerBlock = 111,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

enum cudaSharedCarveout : int {
  cudaSharedmemCarveoutDefault = -1,
  cudaSharedmemCarveoutMaxL1 = 0,
  cudaSharedmemCarveoutMaxShared = 100,
};

// ---- mock runtime API (csrc/emu/runtime.cpp) ---------------------------------------------------
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace emu {
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
}  // namespace emu

template <class F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return emu::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}

// ---- device API ---------------------------------------------------------------------------------
namespace emu {

dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();

void syncthreads(int line);
// Warp shuffles: kind 0 xor, 1 down, 2 up, 3 idx. The value travels as 32 bits.
uint32_t shfl(unsigned mask, uint32_t bits, int arg, int kind, int width, int line);

template <class T>
T shfl_t(unsigned mask, T v, int arg, int kind, int width, int line) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t b;
  __builtin_memcpy(&b, &v, 4);
  b = shfl(mask, b, arg, kind, width, line);
  T out;
  __builtin_memcpy(&out, &b, 4);
  return out;
}

// Static shared memory: one allocation per (block, key); dynamic: the launch's extern array.
void* shared_static(const void* key, size_t bytes, size_t align);
void* shared_dynamic();

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, m, ...) ::emu::shfl_t(mask, v, m, 0, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) ::emu::shfl_t(mask, v, d, 1, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) ::emu::shfl_t(mask, v, d, 2, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __LINE__)
#define __shfl_sync(mask, v, l, ...) ::emu::shfl_t(mask, v, l, 3, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __LINE__)

// Fibers never run concurrently, so a plain read-modify-write is atomic; it is still an
// instrumented access, so its address is checked like any other.
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

namespace emu {
// Checks a vector load / store of `bytes` (bounds and natural alignment) before it happens.
void vector_access(const void* p, int bytes, bool write);
}  // namespace emu

template <class T>
inline T __ldg(const T* p) {
  ::emu::vector_access(p, sizeof(T), false);
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  ::emu::vector_access(p, sizeof(T), false);
  return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
  ::emu::vector_access(p, sizeof(T), true);
  *p = v;
}

// ---- launches -------------------------------------------------------------------------------------
namespace emu {

struct LaunchSpec {
  const void* func;
  const char* name;  // __PRETTY_FUNCTION__ of kernel_name<K>: carries the template arguments
  dim3 grid, block;
  size_t dynamic_smem;
};

// Validates the launch against the current device and the kernel's attributes (and logs it);
// false: refused (the error is what cudaGetLastError returns next) or not to be executed.
bool begin_launch(const LaunchSpec& spec);
// Read-only / writable memory a kernel may touch, described from its parameter structs.
void add_region(const void* base, int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t n2,
                int64_t s2, int elem, bool writable, const char* what);
// Runs every block of the launch begun last; thunk(ctx) is the body of one CUDA thread.
void run_grid(void (*thunk)(void*), void* ctx, size_t ctx_bytes);

template <auto K>
const char* kernel_name() { return __PRETTY_FUNCTION__; }

template <class T>
void describe(const T& arg) {
  if constexpr (requires { emu_describe(arg); }) emu_describe(arg);
}

template <auto K>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(const A&... a) const {
    if (!begin_launch(LaunchSpec{reinterpret_cast<const void*>(K), kernel_name<K>(), grid, block, smem}))
      return;
    (describe(a), ...);
    std::tuple<A...> args(a...);
    run_grid(&thunk<std::tuple<A...>>, &args, sizeof(args));
  }
  template <class Tuple>
  static void thunk(void* ctx) { std::apply(K, *static_cast<Tuple*>(ctx)); }
};

}  // namespace emu

#define FKD_EMU_LAUNCH(kernel, grid, block, smem, stream) \
  ::emu::Launcher<kernel>{dim3(grid), dim3(block), static_cast<size_t>(smem)}
