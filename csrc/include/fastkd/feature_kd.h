// Feature KD (SPEC §2): the fused loss/gradient epilogue that runs on one chunk of rows right
// after the adapter GEMM y = x W^T (torch side: csrc/tiled/feature_chunks.h).
//
// A chunk is a block of rows laid out as [outer, dim, inner]: row (o, i) has index o * inner + i
// and its `dim` channels are at base + o * s_outer + c * s_chan + i * s_inner. Two layouts exist:
//   rows layout    (inner == 1, s_chan == 1 for every tensor): features [N, C], channel-last;
//   columns layout (s_inner == 1 for every tensor): conv maps [B, C, H*W] read in place.
//
// For every row, with y = y_in + bias (bias broadcast over rows) and teacher t:
//   MSE:    row_loss = sum_c (y_c - t_c)^2                  dL/dy = 2 (y - t) * s
//   Cosine: row_loss = 1 - cos,  cos = y.t / max(|y||t|, 1e-8)
//           dL/dy = -(t / d - cos * y / |y|^2) * s,  dL/dt = -(y / d - cos * t / |t|^2) * s
//           with d = |y||t|; when |y||t| <= 1e-8 the clamp is active: dL/dy = -t / 1e-8 * s,
//           dL/dt = -y / 1e-8 * s (the derivative of the clamped formula; never NaN).
// where s = scale * (row_scale ? row_scale[row] : 1) for dL/dt, and
// s = gy_scale * (gy_row_scale ? gy_row_scale[row] : 1) for dL/dy. The two differ when dL/dy is
// written in a half dtype for the gradient GEMMs: the caller then keeps dL/dy at O(1) magnitude
// (the 1/(N*D) "mean" factor would underflow float16) and applies the rest after the GEMMs.
// All math is float32; half outputs of dL/dy saturate at the dtype's largest finite value.
#pragma once
#include <cstdint>

#include "fastkd/common.h"

namespace fastkd {

enum class FeatureLoss : int { MSE = 0, Cosine = 1 };

constexpr float kFeatureCosineEps = 1e-8f;

struct FeatureEpilogueParams {
  int64_t outer = 0;   // row blocks (rows layout: rows; columns layout: images)
  int64_t inner = 1;   // rows per block (rows layout: 1; columns layout: positions)
  int64_t dim = 0;     // channels (teacher_dim)
  bool columns = false;  // layout, see above
  FeatureLoss loss = FeatureLoss::MSE;

  // In: x W^T without bias, float32. Only read (and, for cosine with a gradient, overwritten with
  // y + bias) — the gradient goes to grad_y, which may alias y exactly (same pointer and strides).
  float* y = nullptr;
  int64_t y_so = 0, y_sc = 0, y_si = 0;
  const float* bias = nullptr;  // [dim] float32, or null

  const void* teacher = nullptr;
  DType teacher_dtype = DType::F32;
  int64_t t_so = 0, t_sc = 0, t_si = 0;

  // Raw per-row loss (MSE: the sum over channels, not the mean), float32; null: not wanted.
  // row_scale (optional, float32) uses the same strides.
  float* row_loss = nullptr;
  int64_t l_so = 0, l_si = 0;
  float scale = 1.f;
  const float* row_scale = nullptr;

  float gy_scale = 1.f;
  const float* gy_row_scale = nullptr;

  // dL/dy (scaled by its s), or null. The CPU kernel writes F32 only; CUDA any DType.
  void* grad_y = nullptr;
  DType grad_y_dtype = DType::F32;
  int64_t g_so = 0, g_sc = 0, g_si = 0;

  // dL/dt (scaled by s) in the teacher's dtype, or null.
  void* grad_teacher = nullptr;
  int64_t gt_so = 0, gt_sc = 0, gt_si = 0;
};

// CPU epilogue (csrc/cpu/feature_kd.cpp): at::parallel_for over rows, at::vec inner loops.
void feature_kd_epilogue_cpu(const FeatureEpilogueParams& p);

// CUDA epilogue (csrc/cuda/feature_kd.cu); `stream` is a cudaStream_t. Returns a cudaError_t as int.
int feature_kd_epilogue_cuda(const FeatureEpilogueParams& p, void* stream);

}  // namespace fastkd
