// Relation KD (SPEC §3): the pure kernels of the blocked computation. No torch types here.
//
// The torch side (csrc/tiled/relation_tiles.h) never builds a B x B matrix for SP, RKD-distance
// or PKT. It walks over row tiles: for rows [row0, row0 + rows) it computes the Gram tiles
//   gs[r, j] = x_s[row0 + r] . x_s[j],   gt[r, j] = x_t[row0 + r] . x_t[j]     (j = 0..batch-1)
// with one GEMM each (float32 result, row-major, leading dimension `batch`), then calls one of
// the "tile" kernels below, which turn the tile into
//   - sweep 1: per-row statistics (row norms of G for SP, row sums of distances for RKD, row
//     sums of c for PKT), or
//   - sweep 2: per-row loss partials, per-row reductions needed by the gradient through those
//     statistics, and a weight tile W written over gs (gt for the teacher side) such that the
//     gradient contribution of these rows is W @ X: the torch side contracts it at once, so dL/dG
//     is never stored beyond one tile.
// The RKD angle works on full B x B matrices (O(B^2) memory, never B x B x B or B x B x d).
//
// Every kernel reads the tile element (i, j) and writes its weight at the same place, and for
// symmetric weights also uses the column statistics of j, so the weight W_ij it writes is already
// the symmetrised dL/dG_ij + dL/dG_ji (the gradient is (dL/dG + dL/dG^T) X).
//
// Per-row outputs are float32 arrays of length `batch` of which entries [row0, row0 + rows) are
// written. NaN in an input propagates to the loss (clamps are written as `x < lo ? lo : x`).
#pragma once
#include <cstdint>

#include "fastkd/common.h"

namespace fastkd {

// Lower clamp of squared distances and of the SP row norms (SPEC §3).
constexpr float kRelDistClamp = 1e-12f;
constexpr float kRelNormClamp = 1e-12f;
// Squared distances at or below max(1e-12, kRelCoincident * (|x_i|^2 + |x_j|^2)) count as
// clamped (the rows coincide): in float32 the Gram expansion |x_i|^2 + |x_j|^2 - 2 x_i.x_j has a
// rounding error of a few ulps of |x_i|^2 + |x_j|^2, so a smaller value cannot be told from 0.
// 2^-20 is 16 float32 ulps; the features are centred first (RKD is translation invariant), so
// |x|^2 is the spread of the batch, not its offset.
constexpr float kRelCoincident = 9.5367431640625e-07f;  // 2^-20

// ---------------------------------------------------------------------------------------------
// SP (similarity preserving). G_hat_ij = G_ij * inv_i with inv_i = 1 / max(||G_i||, 1e-12).
//   loss = scale * sum_ij (G_hat_s_ij - G_hat_t_ij)^2         (scale = 1/B^2 or 1)
// Sweep 1 (sp_stats): sq_s[i] = sum_j gs_ij^2, sq_t[i] = sum_j gt_ij^2.
// Sweep 2 (sp_tile), with D_ij = G_hat_s_ij - G_hat_t_ij, D_ji = gs_ij inv_s_j - gt_ij inv_t_j:
//   row_loss[i] = sum_j D_ij^2
//   student (need_s): row_a_s[i] = sum_j D_ij G_hat_s_ij;
//                     gs_ij <- 2 scale (inv_s_i D_ij + inv_s_j D_ji)
//   teacher (need_t): the same with s and t swapped (the loss is symmetric in s and t).
// The gradient through the row norms, -(w (.) G X + G (w (.) X)) with w_i = 2 scale a_i inv_i^2
// (0 where the norm is clamped), is added by the torch side after the sweep.
struct SPTileParams {
  int64_t batch = 0, row0 = 0, rows = 0;
  float* gs = nullptr;          // [rows, batch]
  float* gt = nullptr;          // [rows, batch]
  float* sq_s = nullptr;        // sweep 1 outputs [batch]
  float* sq_t = nullptr;
  const float* inv_s = nullptr;  // sweep 2 inputs [batch]
  const float* inv_t = nullptr;
  float scale = 1.f;
  bool need_s = false, need_t = false;
  float* row_loss = nullptr;    // sweep 2 outputs [batch]
  float* row_a_s = nullptr;
  float* row_a_t = nullptr;
};

// ---------------------------------------------------------------------------------------------
// RKD distance, on centred features with squared norms n. For i != j:
//   q_ij = n_i + n_j - 2 G_ij; coincident if q_ij <= max(1e-12, kRelCoincident (n_i + n_j));
//   d_ij = 1e-6 if coincident else sqrt(q_ij);  d_ii = 0.
// Sweep 1 (rkd_stats): row_dsum_s[i] = sum_{j != i} ds_ij (teacher likewise); the torch side forms
//   mu = sum / (B (B - 1)) (every off-diagonal distance is >= 1e-6 > 0).
// Sweep 2 (rkd_tile), r_ij = ds_ij *inv_mu_s - dt_ij *inv_mu_t, h_ij = clamp(r_ij, -1, 1):
//   row_loss[i] = sum_{j != i} smooth_l1(r_ij)
//   student: row_a_s[i] = sum_j h_ij ds_ij inv_mu_s;  gs_ij <- V_ij = h_ij / ds_ij;
//            us_ij <- U_ij = 1 / ds_ij;  row_v_s[i] = sum_j V_ij;  row_u_s[i] = sum_j U_ij
//            (V = U = 0 on the diagonal and at coincident pairs, where dd/dx = 0)
//   teacher: the same with s and t swapped (h -> -h).
// The torch side then forms
//   grad = 2 scale inv_mu ((row_v x - V X) - A / (B (B - 1)) (row_u x - U X)),
// A = sum_i row_a[i]: the second term is the gradient through the mean distance.
struct RKDTileParams {
  int64_t batch = 0, row0 = 0, rows = 0;
  float* gs = nullptr;          // [rows, batch]
  float* gt = nullptr;
  float* us = nullptr;          // [rows, batch] sweep-2 output (need_s)
  float* ut = nullptr;          // [rows, batch] sweep-2 output (need_t)
  const float* nrm_s = nullptr;  // [batch] squared norms of the centred rows
  const float* nrm_t = nullptr;
  float* row_dsum_s = nullptr;  // sweep 1 outputs [batch]
  float* row_dsum_t = nullptr;
  const float* inv_mu_s = nullptr;  // sweep 2 input: one float each, 1 / mean distance (on the
  const float* inv_mu_t = nullptr;  // kernel's device, so the torch side never waits for the host)
  bool need_s = false, need_t = false;
  float* row_loss = nullptr;    // sweep 2 outputs [batch]
  float* row_a_s = nullptr;
  float* row_a_t = nullptr;
  float* row_v_s = nullptr;
  float* row_u_s = nullptr;
  float* row_v_t = nullptr;
  float* row_u_t = nullptr;
};

// ---------------------------------------------------------------------------------------------
// RKD angle on full matrices: g = Gram of the centred features, rd = 1/d (0 on the diagonal and
// at coincident pairs, NaN where the squared distance is NaN). For anchor j:
//   psi_jik = (g_ik - g_ij - g_jk + g_jj) rd_ji rd_jk,   h_jik = clamp(psi_s - psi_t, -1, 1)
//   H_jik = scale h_jik rd_ji rd_jk   (student; teacher: -scale h rdt rdt)
// Outputs (B x B, row-major):
//   t[i][k] = sum_j H_jik;  r[j][i] = sum_k H_jik;  e[j][i] = scale sum_k h_jik psi_jik
//   (teacher e uses -h and psi_t), loss partials of sum smooth_l1(psi_s - psi_t).
// The torch side finishes dL/dG = t - r - r^T + diag(rowsum r) + 2 e rd^2 and dL/dn = -(rowsum +
// colsum of e rd^2), then grad = (dL/dG + dL/dG^T) X + 2 dL/dn (.) X.
// Loss partials: the CPU kernel writes loss_part[i] (length batch); the CUDA kernel writes
// loss_part[(j / kAngleAnchorBlock) * batch + i] (length ceil(batch / kAngleAnchorBlock) * batch).
constexpr int kAngleAnchorBlock = 64;

struct RKDAngleParams {
  int64_t batch = 0;
  const float* gs = nullptr;
  const float* gt = nullptr;
  const float* rds = nullptr;
  const float* rdt = nullptr;
  float scale = 1.f;
  bool need_s = false, need_t = false;
  float* ts = nullptr;  // [B, B] outputs, student (need_s)
  float* rs = nullptr;
  float* es = nullptr;
  float* tt = nullptr;  // [B, B] outputs, teacher (need_t)
  float* rt = nullptr;
  float* et = nullptr;
  float* loss_part = nullptr;
};

// ---------------------------------------------------------------------------------------------
// PKT on the raw Gram tiles: c_ij = (G_ij inv_m_i inv_m_j + 1) / 2 with inv_m = 1/(||x|| + eps);
// P_ij = c_ij / rsum_i.
// Sweep 1 (pkt_stats): rsum_s[i] = sum_j cs_ij, rsum_t[i] = sum_j ct_ij.
// Sweep 2 (pkt_tile):
//   row_loss[i] = sum_j Pt_ij log((Pt_ij + eps) / (Ps_ij + eps))
//   student: g_ij = dL/dPs_ij + scale = scale (Ps_ij - Pt_ij + eps) / (Ps_ij + eps);
//            row_b_s[i] = sum_j g_ij Ps_ij;  gs_ij <- (g_ij / rsum_s_i + g_ji / rsum_s_j) inv_m_s_j / 2
//   teacher: f_ij = dL/dPt_ij - scale = scale (log((Pt+eps)/(Ps+eps)) - eps/(Pt+eps));
//            row_b_t[i] = sum_j f_ij Pt_ij;  gt_ij <- (f_ij / rsum_t_i + f_ji / rsum_t_j) inv_m_t_j / 2
//   (rows of P sum to 1, so a constant added to row i of dL/dP cancels in the row-sum
//   correction below; removing the constant `scale` first keeps g and f small when Ps ~ Pt,
//   instead of cancelling two large terms in float32)
//   (x_ji uses P_ji = c_ij / rsum_j). W @ X is then the gradient w.r.t. the normalised rows up
//   to the row-sum correction -beta_i sum_j e_hat_j - sum_j beta_j e_hat_j, beta = b / (2 rsum),
//   and the chain rule through the normalisation, both applied by the torch side.
struct PKTTileParams {
  int64_t batch = 0, row0 = 0, rows = 0;
  float* gs = nullptr;
  float* gt = nullptr;
  const float* inv_m_s = nullptr;  // [batch]
  const float* inv_m_t = nullptr;
  float eps = 1e-7f;
  float* rsum_s = nullptr;  // sweep 1 outputs, sweep 2 inputs [batch]
  float* rsum_t = nullptr;
  float scale = 1.f;
  bool need_s = false, need_t = false;
  float* row_loss = nullptr;  // sweep 2 outputs [batch]
  float* row_b_s = nullptr;
  float* row_b_t = nullptr;
};

// CPU kernels (csrc/cpu/relation_kd.cpp): at::parallel_for over rows, at::vec along the row.
void sp_stats_cpu(const SPTileParams& p);
void sp_tile_cpu(const SPTileParams& p);
void rkd_stats_cpu(const RKDTileParams& p);
void rkd_tile_cpu(const RKDTileParams& p);
void rkd_angle_cpu(const RKDAngleParams& p);
void pkt_stats_cpu(const PKTTileParams& p);
void pkt_tile_cpu(const PKTTileParams& p);

// CUDA kernels (csrc/cuda/relation_kd.cu); `stream` is a cudaStream_t. Return a cudaError_t.
int sp_stats_cuda(const SPTileParams& p, void* stream);
int sp_tile_cuda(const SPTileParams& p, void* stream);
int rkd_stats_cuda(const RKDTileParams& p, void* stream);
int rkd_tile_cuda(const RKDTileParams& p, void* stream);
int rkd_angle_cuda(const RKDAngleParams& p, void* stream);
int pkt_stats_cuda(const PKTTileParams& p, void* stream);
int pkt_tile_cuda(const PKTTileParams& p, void* stream);

}  // namespace fastkd
