// CUDA kernels of relation KD (SPEC §3): the per-tile epilogues of the blocked computation and the
// RKD angle. Pure CUDA (no torch types); see csrc/include/fastkd/relation_kd.h for the contract.
//
// Tile kernels: one block of kThreads threads per tile row; the threads stride along the row
// (coalesced reads of the Gram tile and of the column statistics) and the row sums are reduced
// through shared memory at the end. The Gram tiles themselves come from cuBLAS
// (csrc/tiled/relation_tiles.h).
//
// RKD angle: two O(B^3) kernels over the full B x B matrices.
//   angle_t_kernel: thread (i, k), loop over anchors j -> t[i][k] = sum_j H_jik.
//   angle_r_kernel: thread (j, i), loop over k       -> r[j][i], e[j][i] and the loss.
// In both, the lanes of a warp run along the contiguous index of every row they read (k in
// g[j][k], or i in g[k][i] = g[i][k] by symmetry) and the remaining reads are warp-uniform
// broadcasts, so the B^3 loop streams coalesced rows from L1/L2 without shared-memory staging.
#include <cuda_runtime.h>

#include <cstdint>

#include "emulatable.cuh"
#include "fastkd/relation_kd.h"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums v[0..N) over the block; the totals are valid in thread 0. Call once per kernel.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  FKD_SHARED(float, part, [N][kWarps]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const float w = warp_sum(v[n]);
    if (lane == 0) part[n][warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float w = lane < kWarps ? part[n][lane] : 0.f;
      v[n] = warp_sum(w);
    }
  }
}

// NaN-propagating helpers (comparisons with NaN are false, so NaN takes the last branch).
__device__ __forceinline__ float clamp_unit(float r) { return r < -1.f ? -1.f : (r > 1.f ? 1.f : r); }

__device__ __forceinline__ float smooth_l1(float r) {
  const float a = fabsf(r);
  return a < 1.f ? 0.5f * r * r : a - 0.5f;
}

// d for i != j and whether the pair is coincident (clamped), as in relation_kd.h.
__device__ __forceinline__ float distance(float g, float ni, float nj, bool& coincident) {
  const float q = ni + nj - 2.f * g;
  const float thr = fmaxf(kRelDistClamp, kRelCoincident * (ni + nj));
  coincident = q <= thr;  // false for NaN, so NaN reaches sqrtf
  return coincident ? 1e-6f : sqrtf(q);
}

// ------------------------------------------------------------------------------------------ SP
__global__ void sp_stats_kernel(SPTileParams p) {
  const int64_t r = blockIdx.x, B = p.batch;
  const float* gs = p.gs + r * B;
  const float* gt = p.gt + r * B;
  float acc[2] = {0.f, 0.f};
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    const float a = gs[j], b = gt[j];
    acc[0] += a * a;
    acc[1] += b * b;
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    p.sq_s[p.row0 + r] = acc[0];
    p.sq_t[p.row0 + r] = acc[1];
  }
}

__global__ void sp_tile_kernel(SPTileParams p) {
  const int64_t r = blockIdx.x, B = p.batch, i = p.row0 + r;
  float* gs = p.gs + r * B;
  float* gt = p.gt + r * B;
  const float inv_si = p.inv_s[i], inv_ti = p.inv_t[i];
  const float two_c = 2.f * p.scale;
  float acc[3] = {0.f, 0.f, 0.f};  // loss, a_s, a_t
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    const float a = gs[j], b = gt[j];
    const float d_ij = a * inv_si - b * inv_ti;
    acc[0] += d_ij * d_ij;
    if (!p.need_s && !p.need_t) continue;
    const float inv_sj = p.inv_s[j], inv_tj = p.inv_t[j];
    const float d_ji = a * inv_sj - b * inv_tj;
    if (p.need_s) {
      acc[1] += d_ij * a * inv_si;
      gs[j] = two_c * (inv_si * d_ij + inv_sj * d_ji);
    }
    if (p.need_t) {
      acc[2] -= d_ij * b * inv_ti;
      gt[j] = -two_c * (inv_ti * d_ij + inv_tj * d_ji);
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    p.row_loss[i] = acc[0];
    if (p.need_s) p.row_a_s[i] = acc[1];
    if (p.need_t) p.row_a_t[i] = acc[2];
  }
}

// ----------------------------------------------------------------------------- RKD distance
__global__ void rkd_stats_kernel(RKDTileParams p) {
  const int64_t r = blockIdx.x, B = p.batch, i = p.row0 + r;
  const float* gs = p.gs + r * B;
  const float* gt = p.gt + r * B;
  const float nsi = p.nrm_s[i], nti = p.nrm_t[i];
  float acc[2] = {0.f, 0.f};
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    if (j == i) continue;  // d_ii = 0
    bool cs, ct;
    acc[0] += distance(gs[j], nsi, p.nrm_s[j], cs);
    acc[1] += distance(gt[j], nti, p.nrm_t[j], ct);
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    p.row_dsum_s[i] = acc[0];
    p.row_dsum_t[i] = acc[1];
  }
}

__global__ void rkd_tile_kernel(RKDTileParams p) {
  const int64_t r = blockIdx.x, B = p.batch, i = p.row0 + r;
  float* gs = p.gs + r * B;
  float* gt = p.gt + r * B;
  float* us = p.us ? p.us + r * B : nullptr;
  float* ut = p.ut ? p.ut + r * B : nullptr;
  const float nsi = p.nrm_s[i], nti = p.nrm_t[i];
  const float ims = *p.inv_mu_s, imt = *p.inv_mu_t;
  float acc[7] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // loss, a_s, v_s, u_s, a_t, v_t, u_t
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    if (j == i) {
      if (p.need_s) { gs[j] = 0.f; us[j] = 0.f; }
      if (p.need_t) { gt[j] = 0.f; ut[j] = 0.f; }
      continue;
    }
    bool cs, ct;
    const float ds = distance(gs[j], nsi, p.nrm_s[j], cs);
    const float dt = distance(gt[j], nti, p.nrm_t[j], ct);
    const float rr = ds * ims - dt * imt;
    acc[0] += smooth_l1(rr);
    const float h = clamp_unit(rr);
    if (p.need_s) {
      const float u = cs ? 0.f : 1.f / ds;
      acc[1] += h * ds * ims;
      acc[2] += h * u;
      acc[3] += u;
      gs[j] = h * u;
      us[j] = u;
    }
    if (p.need_t) {  // teacher: h -> -h
      const float u = ct ? 0.f : 1.f / dt;
      acc[4] -= h * dt * imt;
      acc[5] -= h * u;
      acc[6] += u;
      gt[j] = -h * u;
      ut[j] = u;
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    p.row_loss[i] = acc[0];
    if (p.need_s) { p.row_a_s[i] = acc[1]; p.row_v_s[i] = acc[2]; p.row_u_s[i] = acc[3]; }
    if (p.need_t) { p.row_a_t[i] = acc[4]; p.row_v_t[i] = acc[5]; p.row_u_t[i] = acc[6]; }
  }
}

// -------------------------------------------------------------------------------- RKD angle
constexpr int kAngleX = 32, kAngleY = 8;

// psi_jik from g_ik, g_jk, g_ij, g_jj and the inverse distances rd_ji, rd_jk.
__device__ __forceinline__ float psi(float gik, float gjk, float gij, float gjj, float rji, float rjk) {
  return ((gik - gjk) + (gjj - gij)) * rji * rjk;
}

__global__ void angle_t_kernel(RKDAngleParams p) {
  const int64_t B = p.batch;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kAngleX + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kAngleY + threadIdx.y;
  if (i >= B) return;  // whole warp (same i)
  const bool ok = k < B;
  const int64_t kc = ok ? k : B - 1;
  const float gsik = p.gs[i * B + kc], gtik = p.gt[i * B + kc];
  float ts = 0.f, tt = 0.f;
  for (int64_t j = 0; j < B; ++j) {
    const float* gsj = p.gs + j * B;
    const float* gtj = p.gt + j * B;
    const float rsji = p.rds[j * B + i], rtji = p.rdt[j * B + i];
    if (rsji == 0.f && rtji == 0.f) continue;  // u_ji = 0 on both sides; warp-uniform
    const float rsjk = p.rds[j * B + kc], rtjk = p.rdt[j * B + kc];
    const float ps = psi(gsik, gsj[kc], gsj[i], gsj[j], rsji, rsjk);
    const float pt = psi(gtik, gtj[kc], gtj[i], gtj[j], rtji, rtjk);
    const float h = clamp_unit(ps - pt);
    ts += h * rsji * rsjk;
    tt -= h * rtji * rtjk;
  }
  if (!ok) return;
  if (p.need_s) p.ts[i * B + k] = p.scale * ts;
  if (p.need_t) p.tt[i * B + k] = p.scale * tt;
}

__global__ void angle_r_kernel(RKDAngleParams p) {
  const int64_t B = p.batch;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kAngleX + threadIdx.x;
  const bool ok = i < B;
  const int64_t ic = ok ? i : B - 1;
  const int64_t jbase = static_cast<int64_t>(blockIdx.y) * kAngleAnchorBlock;
  float loss = 0.f;
  for (int jj = threadIdx.y; jj < kAngleAnchorBlock; jj += kAngleY) {
    const int64_t j = jbase + jj;
    if (j >= B) break;
    const float rsji = p.rds[j * B + ic], rtji = p.rdt[j * B + ic];
    float rs = 0.f, es = 0.f, rt = 0.f, et = 0.f;
    if (!(rsji == 0.f && rtji == 0.f)) {
      const float gsij = p.gs[j * B + ic], gsjj = p.gs[j * B + j];
      const float gtij = p.gt[j * B + ic], gtjj = p.gt[j * B + j];
      for (int64_t k = 0; k < B; ++k) {
        // Row k of the symmetric matrices: g[k][i] = g_ik (coalesced in i), g[k][j] = g_jk and
        // rd[k][j] = rd_jk (warp-uniform j).
        const float* gsk = p.gs + k * B;
        const float* gtk = p.gt + k * B;
        const float rsjk = p.rds[k * B + j], rtjk = p.rdt[k * B + j];
        const float ps = psi(gsk[ic], gsk[j], gsij, gsjj, rsji, rsjk);
        const float pt = psi(gtk[ic], gtk[j], gtij, gtjj, rtji, rtjk);
        const float d = ps - pt;
        loss += smooth_l1(d);
        const float h = clamp_unit(d);
        rs += h * rsjk;
        es += h * ps;
        rt += h * rtjk;
        et += h * pt;
      }
    }
    if (ok) {
      if (p.need_s) {
        p.rs[j * B + i] = p.scale * rsji * rs;
        p.es[j * B + i] = p.scale * es;
      }
      if (p.need_t) {
        p.rt[j * B + i] = -p.scale * rtji * rt;
        p.et[j * B + i] = -p.scale * et;
      }
    }
  }
  FKD_SHARED(float, part, [kAngleY][kAngleX]);
  part[threadIdx.y][threadIdx.x] = loss;
  __syncthreads();
  if (threadIdx.y == 0 && ok) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < kAngleY; ++y) total += part[y][threadIdx.x];
    p.loss_part[static_cast<int64_t>(blockIdx.y) * B + i] = total;
  }
}

// ------------------------------------------------------------------------------------- PKT
__global__ void pkt_stats_kernel(PKTTileParams p) {
  const int64_t r = blockIdx.x, B = p.batch, i = p.row0 + r;
  const float* gs = p.gs + r * B;
  const float* gt = p.gt + r * B;
  const float ims = p.inv_m_s[i], imt = p.inv_m_t[i];
  float acc[2] = {0.f, 0.f};
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    acc[0] += 0.5f * (gs[j] * ims * p.inv_m_s[j] + 1.f);
    acc[1] += 0.5f * (gt[j] * imt * p.inv_m_t[j] + 1.f);
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    p.rsum_s[i] = acc[0];
    p.rsum_t[i] = acc[1];
  }
}

__global__ void pkt_tile_kernel(PKTTileParams p) {
  const int64_t r = blockIdx.x, B = p.batch, i = p.row0 + r;
  float* gs = p.gs + r * B;
  float* gt = p.gt + r * B;
  const float ims = p.inv_m_s[i], imt = p.inv_m_t[i];
  const float ssi = p.rsum_s[i], sti = p.rsum_t[i];
  const float eps = p.eps, c = p.scale;
  float acc[3] = {0.f, 0.f, 0.f};  // loss, b_s, b_t
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    const float imsj = p.inv_m_s[j], imtj = p.inv_m_t[j];
    const float cs = 0.5f * (gs[j] * ims * imsj + 1.f);
    const float ct = 0.5f * (gt[j] * imt * imtj + 1.f);
    const float ps = cs / ssi, pt = ct / sti;
    const float lg = log1pf((pt - ps) / (ps + eps));  // log((pt + eps) / (ps + eps))
    acc[0] += pt * lg;
    if (!p.need_s && !p.need_t) continue;
    const float ssj = p.rsum_s[j], stj = p.rsum_t[j];
    const float ps_j = cs / ssj, pt_j = ct / stj;  // P_ji
    if (p.need_s) {
      const float g = c * (ps - pt + eps) / (ps + eps);  // dL/dPs + scale (relation_kd.h)
      const float g_j = c * (ps_j - pt_j + eps) / (ps_j + eps);
      acc[1] += g * ps;
      gs[j] = 0.5f * (g / ssi + g_j / ssj) * imsj;
    }
    if (p.need_t) {
      const float lg_j = log1pf((pt_j - ps_j) / (ps_j + eps));
      const float f = c * (lg - eps / (pt + eps));  // dL/dPt - scale
      const float f_j = c * (lg_j - eps / (pt_j + eps));
      acc[2] += f * pt;
      gt[j] = 0.5f * (f / sti + f_j / stj) * imtj;
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    p.row_loss[i] = acc[0];
    if (p.need_s) p.row_b_s[i] = acc[1];
    if (p.need_t) p.row_b_t[i] = acc[2];
  }
}

template <auto kKernel, class Params>
int launch_rows(const Params& p, void* stream) {
  if (p.rows <= 0) return static_cast<int>(cudaSuccess);
  FKD_LAUNCH(kKernel, static_cast<unsigned>(p.rows), kThreads, 0, static_cast<cudaStream_t>(stream))(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int sp_stats_cuda(const SPTileParams& p, void* stream) { return launch_rows<sp_stats_kernel>(p, stream); }
int sp_tile_cuda(const SPTileParams& p, void* stream) { return launch_rows<sp_tile_kernel>(p, stream); }
int rkd_stats_cuda(const RKDTileParams& p, void* stream) { return launch_rows<rkd_stats_kernel>(p, stream); }
int rkd_tile_cuda(const RKDTileParams& p, void* stream) { return launch_rows<rkd_tile_kernel>(p, stream); }
int pkt_stats_cuda(const PKTTileParams& p, void* stream) { return launch_rows<pkt_stats_kernel>(p, stream); }
int pkt_tile_cuda(const PKTTileParams& p, void* stream) { return launch_rows<pkt_tile_kernel>(p, stream); }

int rkd_angle_cuda(const RKDAngleParams& p, void* stream) {
  const int64_t B = p.batch;
  if (B <= 0) return static_cast<int>(cudaSuccess);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 block(kAngleX, kAngleY);
  if (p.need_s || p.need_t) {
    const dim3 grid_t(static_cast<unsigned>((B + kAngleX - 1) / kAngleX),
                      static_cast<unsigned>((B + kAngleY - 1) / kAngleY));
    FKD_LAUNCH(angle_t_kernel, grid_t, block, 0, s)(p);
    const int err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
  }
  const dim3 grid_r(static_cast<unsigned>((B + kAngleX - 1) / kAngleX),
                    static_cast<unsigned>((B + kAngleAnchorBlock - 1) / kAngleAnchorBlock));
  FKD_LAUNCH(angle_r_kernel, grid_r, block, 0, s)(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastkd
