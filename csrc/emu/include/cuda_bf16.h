// Host stand-in for the CUDA toolkit's cuda_bf16.h, used only by the CUDA emulator
// (csrc/emu/README.md): bfloat16 storage types and the conversions the kernels call, rounding to
// nearest even like __float2bfloat16_rn (NaN stays a quiet NaN of the same sign).
#pragma once
#include <cstdint>
#include <cstring>

struct alignas(2) __nv_bfloat16 {
  unsigned short x;
};

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep the sign, force a quiet NaN
    h.x = static_cast<unsigned short>((u >> 16) | 0x0040u);
    return h;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  h.x = static_cast<unsigned short>(u >> 16);
  return h;
}

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
