// CUDA epilogue of feature KD (see csrc/include/fastkd/feature_kd.h for the formulas).
//
// Rows layout ([N, C], channels contiguous): one warp per row, lanes stride over the channels
// (coalesced); the row sums are reduced with warp shuffles. Columns layout ([B, C, H*W] conv maps,
// positions contiguous): a 32 x 8 block covers 32 consecutive positions (rows) of one image and
// splits the channels over its 8 thread rows; per-row sums are reduced in shared memory.
// Cosine needs the row's dot product and norms before any gradient, so it sweeps the channels
// twice (the first sweep leaves y + bias in the y buffer for the second).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "emulatable.cuh"
#include "fastkd/feature_kd.h"

namespace fastkd {
namespace {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static __device__ __forceinline__ float saturate(float v) { return v; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float saturate(float v) {
    const float m = 3.3895313892515355e38f;  // largest finite bf16; NaN compares false and stays
    return v > m ? m : (v < -m ? -m : v);
  }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float saturate(float v) {
    const float m = 65504.f;
    return v > m ? m : (v < -m ? -m : v);
  }
};

template <typename T>
__device__ __forceinline__ float load(const T* p) {
  return Cvt<T>::to_f(*p);
}
template <typename T>
__device__ __forceinline__ void store(T* p, float v) {
  *p = Cvt<T>::from_f(v);
}
// dL/dy in a half dtype feeds a GEMM: saturate instead of producing inf (then NaN in the GEMM).
template <typename G>
__device__ __forceinline__ void store_gy(G* p, float v) {
  *p = Cvt<G>::from_f(Cvt<G>::saturate(v));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

struct CosFactors {
  float loss, inv, ay, at;
};

__device__ __forceinline__ CosFactors cos_factors(float dot, float yy, float tt) {
  const float d = sqrtf(yy) * sqrtf(tt);
  CosFactors f;
  if (d > kFeatureCosineEps) {
    f.inv = 1.f / d;
    const float c = dot * f.inv;
    f.loss = 1.f - c;
    f.ay = c / yy;
    f.at = c / tt;
  } else {  // clamp active: cos = y.t / eps, no derivative through the norms
    f.inv = 1.f / kFeatureCosineEps;
    f.loss = 1.f - dot * f.inv;
    f.ay = 0.f;
    f.at = 0.f;
  }
  return f;
}

constexpr int kWarpsPerBlock = 8;

template <typename T, typename G>
__global__ void rows_kernel(const FeatureEpilogueParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= p.outer) return;  // whole warps leave together
  const int64_t dim = p.dim;
  float* y = p.y + r * p.y_so;
  const T* t = static_cast<const T*>(p.teacher) + r * p.t_so;
  G* gy = p.grad_y ? static_cast<G*>(p.grad_y) + r * p.g_so : nullptr;
  T* gt = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * p.gt_so : nullptr;
  const float s_t = p.scale * (p.row_scale ? p.row_scale[r * p.l_so] : 1.f);
  const float s_y = p.gy_scale * (p.gy_row_scale ? p.gy_row_scale[r * p.l_so] : 1.f);
  if (p.loss == FeatureLoss::MSE) {
    float acc = 0.f;
    for (int64_t c = lane; c < dim; c += 32) {
      const float yv = y[c] + (p.bias ? p.bias[c] : 0.f);
      const float d = yv - load(t + c);
      acc = fmaf(d, d, acc);
      if (gt) store(gt + c, -2.f * s_t * d);
      if (gy) store_gy(gy + c, 2.f * s_y * d);
    }
    acc = warp_sum(acc);
    if (lane == 0 && p.row_loss) p.row_loss[r * p.l_so] = acc;
    return;
  }
  const bool grads = gy || gt;
  float dot = 0.f, yy = 0.f, tt = 0.f;
  for (int64_t c = lane; c < dim; c += 32) {
    float yv = y[c];
    if (p.bias) {
      yv += p.bias[c];
      if (grads) y[c] = yv;  // the second sweep reads y + bias
    }
    const float tv = load(t + c);
    dot = fmaf(yv, tv, dot);
    yy = fmaf(yv, yv, yy);
    tt = fmaf(tv, tv, tt);
  }
  const CosFactors f = cos_factors(warp_sum(dot), warp_sum(yy), warp_sum(tt));
  if (lane == 0 && p.row_loss) p.row_loss[r * p.l_so] = f.loss;
  if (!grads) return;
  const float inv_y = f.inv * s_y, ay = f.ay * s_y, inv_t = f.inv * s_t, at = f.at * s_t;
  for (int64_t c = lane; c < dim; c += 32) {
    const float yv = y[c];
    const float tv = load(t + c);
    if (gt) store(gt + c, tv * at - yv * inv_t);
    if (gy) store_gy(gy + c, yv * ay - tv * inv_y);  // may overwrite y[c]: read above
  }
}

constexpr int kTX = 32;  // positions (rows) per block
constexpr int kTY = 8;   // channel splits per block

template <typename T, typename G>
__global__ void columns_kernel(const FeatureEpilogueParams p) {
  FKD_SHARED(float, red, [3][kTY][kTX]);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tiles = (p.inner + kTX - 1) / kTX;
  const int64_t o = blockIdx.x / tiles;
  const int64_t i = (blockIdx.x % tiles) * kTX + tx;
  const bool valid = i < p.inner;  // no early exit: every thread reaches __syncthreads
  const int64_t dim = p.dim;
  float* y = p.y + o * p.y_so + i * p.y_si;
  const T* t = static_cast<const T*>(p.teacher) + o * p.t_so + i * p.t_si;
  G* gy = p.grad_y ? static_cast<G*>(p.grad_y) + o * p.g_so + i * p.g_si : nullptr;
  T* gt = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + o * p.gt_so + i * p.gt_si : nullptr;
  const int64_t li = o * p.l_so + i * p.l_si;
  float s_t = p.scale, s_y = p.gy_scale;
  if (valid && p.row_scale) s_t *= p.row_scale[li];
  if (valid && p.gy_row_scale) s_y *= p.gy_row_scale[li];
  if (p.loss == FeatureLoss::MSE) {
    float acc = 0.f;
    if (valid) {
      for (int64_t c = ty; c < dim; c += kTY) {
        const float yv = y[c * p.y_sc] + (p.bias ? p.bias[c] : 0.f);
        const float d = yv - load(t + c * p.t_sc);
        acc = fmaf(d, d, acc);
        if (gt) store(gt + c * p.gt_sc, -2.f * s_t * d);
        if (gy) store_gy(gy + c * p.g_sc, 2.f * s_y * d);
      }
    }
    red[0][ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && valid && p.row_loss) {
      float total = 0.f;
      for (int k = 0; k < kTY; ++k) total += red[0][k][tx];
      p.row_loss[li] = total;
    }
    return;
  }
  const bool grads = gy || gt;
  float dot = 0.f, yy = 0.f, tt = 0.f;
  if (valid) {
    for (int64_t c = ty; c < dim; c += kTY) {
      float yv = y[c * p.y_sc];
      if (p.bias) {
        yv += p.bias[c];
        if (grads) y[c * p.y_sc] = yv;  // same thread re-reads it in the second sweep
      }
      const float tv = load(t + c * p.t_sc);
      dot = fmaf(yv, tv, dot);
      yy = fmaf(yv, yv, yy);
      tt = fmaf(tv, tv, tt);
    }
  }
  red[0][ty][tx] = dot;
  red[1][ty][tx] = yy;
  red[2][ty][tx] = tt;
  __syncthreads();
  dot = yy = tt = 0.f;
  for (int k = 0; k < kTY; ++k) {
    dot += red[0][k][tx];
    yy += red[1][k][tx];
    tt += red[2][k][tx];
  }
  if (!valid) return;
  const CosFactors f = cos_factors(dot, yy, tt);
  if (ty == 0 && p.row_loss) p.row_loss[li] = f.loss;
  if (!grads) return;
  const float inv_y = f.inv * s_y, ay = f.ay * s_y, inv_t = f.inv * s_t, at = f.at * s_t;
  for (int64_t c = ty; c < dim; c += kTY) {
    const float yv = y[c * p.y_sc];
    const float tv = load(t + c * p.t_sc);
    if (gt) store(gt + c * p.gt_sc, tv * at - yv * inv_t);
    if (gy) store_gy(gy + c * p.g_sc, yv * ay - tv * inv_y);
  }
}

template <typename T, typename G>
int launch(const FeatureEpilogueParams& p, cudaStream_t stream) {
  if (p.columns) {
    const int64_t blocks = p.outer * ((p.inner + kTX - 1) / kTX);
    if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    constexpr auto kernel = columns_kernel<T, G>;
    FKD_LAUNCH(kernel, static_cast<unsigned>(blocks), dim3(kTX, kTY), 0, stream)(p);
  } else {
    const int64_t blocks = (p.outer + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    constexpr auto kernel = rows_kernel<T, G>;
    FKD_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream)(p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int dispatch_grad_y(const FeatureEpilogueParams& p, cudaStream_t stream) {
  if (p.grad_y == nullptr) return launch<T, float>(p, stream);
  switch (p.grad_y_dtype) {
    case DType::F32: return launch<T, float>(p, stream);
    case DType::BF16: return launch<T, __nv_bfloat16>(p, stream);
    case DType::F16: return launch<T, __half>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int feature_kd_epilogue_cuda(const FeatureEpilogueParams& p, void* stream) {
  if (p.outer == 0 || p.inner == 0) return 0;
  if (!p.columns && p.inner != 1) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.teacher_dtype) {
    case DType::F32: return dispatch_grad_y<float>(p, s);
    case DType::BF16: return dispatch_grad_y<__nv_bfloat16>(p, s);
    case DType::F16: return dispatch_grad_y<__half>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastkd
