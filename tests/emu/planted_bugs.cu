// Kernels with planted bugs for tests/test_cuda_emulated.py: each case runs a small kernel twice,
// correct (bug = 0) and with one bug of a class the GPU punishes (bug = 1); the emulator must
// accept the first and refuse the second with the matching message. Compiled only into the
// emulator library (tests/cuda_emulator.py), never into fastkd.
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "emulatable.cuh"

namespace planted {

struct Params {
  const float* in = nullptr;
  float* out = nullptr;
  int n = 0;  // elements of in and out
  int bug = 0;
};

void emu_describe(const Params& p) {
  emu::add_region(p.in, 1, 0, 1, 0, p.n, 1, 4, false, "in");
  emu::add_region(p.out, 1, 0, 1, 0, p.n, 1, 4, true, "out");
}

constexpr int kThreads = 64;

// 1: a barrier inside a branch that half of the block skips (those threads exit).
__global__ void divergent_barrier(Params p) {
  const int t = threadIdx.x;
  if (!p.bug || t < kThreads / 2) __syncthreads();
  p.out[t] = p.in[t];
}

// 2: threads of a block at two different barriers.
__global__ void split_barrier(Params p) {
  const int t = threadIdx.x;
  if (p.bug && (t & 1)) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  p.out[t] = p.in[t];
}

// 3: a full-mask shuffle after the upper half-warps returned.
__global__ void shuffle_exited(Params p) {
  const int t = threadIdx.x;
  float v = p.in[t];
  if (p.bug && (t & 31) >= 16) return;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  p.out[t] = v;
}

// 4: a 16-byte vector load from an address that is 4 bytes off alignment.
__global__ void misaligned_vector(Params p) {
  const int t = threadIdx.x;
  if (t == 0) {
    const uint4* q = reinterpret_cast<const uint4*>(p.in + (p.bug ? 1 : 0));
    const uint4 w = __ldg(q);
    p.out[0] = static_cast<float>(w.x);
  }
}

// 5: a read one element past the end of the input.
__global__ void read_past_end(Params p) {
  const int t = threadIdx.x;
  p.out[t] = p.in[t + (p.bug && t == kThreads - 1 ? 1 : 0)];
}

// 6: a write one element before the start of the output.
__global__ void write_before_start(Params p) {
  const int t = threadIdx.x;
  p.out[t - (p.bug && t == 0 ? 1 : 0)] = p.in[t];
}

// 7: a write into an input buffer.
__global__ void write_input(Params p) {
  const int t = threadIdx.x;
  p.out[t] = p.in[t];
  if (p.bug && t == 0) const_cast<float*>(p.in)[0] = 0.f;
}

// 8: dynamic shared memory used beyond the bytes the launch requested (kThreads floats).
__global__ void dynamic_smem_overrun(Params p) {
  FKD_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  buf[t + (p.bug && t == kThreads - 1 ? 1 : 0)] = p.in[t];
  __syncthreads();
  p.out[t] = buf[kThreads - 1 - t];
}

// 9: a shared-memory race: each thread reads its neighbour's slot without a barrier between the
// neighbour's write and the read.
__global__ void shared_race(Params p) {
  FKD_SHARED(float, buf, [kThreads]);
  const int t = threadIdx.x;
  buf[t] = p.in[t];
  if (!p.bug) __syncthreads();
  p.out[t] = buf[(t + 1) % kThreads];
}

// 10: a write-after-read race: slot t is overwritten while its neighbour may still read it.
__global__ void shared_war(Params p) {
  FKD_SHARED(float, buf, [kThreads]);
  const int t = threadIdx.x;
  buf[t] = p.in[t];
  __syncthreads();
  const float v = buf[(t + 1) % kThreads];
  if (!p.bug) __syncthreads();
  buf[t] = 2.f * v;
  __syncthreads();
  p.out[t] = buf[t];
}

// 11: more dynamic shared memory than the 48 KiB default without raising the kernel's limit.
__global__ void big_dynamic_smem(Params p) {
  FKD_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  buf[t] = p.in[t];
  __syncthreads();
  p.out[t] = buf[t];
}

}  // namespace planted

extern "C" int fastkd_emu_planted(int which, int bug) {
  using namespace planted;
  // Separate allocations with room around them, so an out-of-bounds access cannot land inside
  // the other buffer.
  std::vector<float> in(kThreads + 64, 1.f), out(kThreads + 64, 0.f);
  Params p;
  p.in = in.data() + 32;
  p.out = out.data() + 32;
  p.n = kThreads;
  p.bug = bug;
  for (int i = 0; i < kThreads; ++i) in[32 + i] = static_cast<float>(i);
  cudaGetLastError();
  switch (which) {
    case 1: FKD_LAUNCH(divergent_barrier, 1, kThreads, 0, nullptr)(p); break;
    case 2: FKD_LAUNCH(split_barrier, 1, kThreads, 0, nullptr)(p); break;
    case 3: FKD_LAUNCH(shuffle_exited, 1, kThreads, 0, nullptr)(p); break;
    case 4: FKD_LAUNCH(misaligned_vector, 1, kThreads, 0, nullptr)(p); break;
    case 5: FKD_LAUNCH(read_past_end, 1, kThreads, 0, nullptr)(p); break;
    case 6: FKD_LAUNCH(write_before_start, 1, kThreads, 0, nullptr)(p); break;
    case 7: FKD_LAUNCH(write_input, 1, kThreads, 0, nullptr)(p); break;
    case 8: FKD_LAUNCH(dynamic_smem_overrun, 1, kThreads, kThreads * sizeof(float), nullptr)(p); break;
    case 9: FKD_LAUNCH(shared_race, 1, kThreads, 0, nullptr)(p); break;
    case 10: FKD_LAUNCH(shared_war, 1, kThreads, 0, nullptr)(p); break;
    case 11: {
      const int bytes = 64 * 1024;
      if (!bug) cudaFuncSetAttribute(big_dynamic_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      FKD_LAUNCH(big_dynamic_smem, 1, kThreads, bytes, nullptr)(p);
      break;
    }
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
