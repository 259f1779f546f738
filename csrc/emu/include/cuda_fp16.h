// Host stand-in for the CUDA toolkit's cuda_fp16.h, used only by the CUDA emulator
// (csrc/emu/README.md): float16 storage types and the conversions the kernels call, with the
// toolkit's rounding (round to nearest even, subnormals kept). GCC's _Float16 does the
// conversions in IEEE arithmetic.
#pragma once
#include <cstdint>
#include <cstring>

struct __half_raw {
  unsigned short x;
};

struct alignas(2) __half {
  unsigned short x;
  __half() = default;
  __half(__half_raw r) : x(r.x) {}
};

struct alignas(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}

inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
