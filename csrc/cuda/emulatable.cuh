// The three spellings in which a kernel of csrc/cuda/ differs between nvcc and the host CUDA
// emulator (csrc/emu/README.md): shared arrays, the dynamic shared array, and the launch.
//   FKD_SHARED(float, red, [3][8][32]);    // __shared__ float red[3][8][32];
//   FKD_DYNAMIC_SHARED(uint4, cache);      // extern __shared__ uint4 cache[];
//   FKD_LAUNCH(kernel, grid, block, smem, stream)(args...);   // kernel<<<...>>>(args...)
// `kernel` must be a constant expression (a kernel or a constexpr pointer to one), so the
// emulator knows which kernel (template arguments included) is launched.
#pragma once

#ifdef FASTKD_CUDA_EMULATION
#define FKD_SHARED(T, name, dims)                                                  \
  static char name##_emu_key;                                                      \
  T(&name) dims = *static_cast<T(*) dims>(                                         \
      ::emu::shared_static(&name##_emu_key, sizeof(T dims), alignof(T)))
#define FKD_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::shared_dynamic())
#define FKD_LAUNCH(kernel, grid, block, smem, stream) FKD_EMU_LAUNCH(kernel, grid, block, smem, stream)
#else
#define FKD_SHARED(T, name, dims) __shared__ T name dims
#define FKD_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define FKD_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
