// CPU kernels of relation KD (SPEC §3): the per-tile epilogues of the blocked computation and the
// RKD angle. See csrc/include/fastkd/relation_kd.h for what each kernel computes.
//
// Tile kernels: at::parallel_for over the rows of a tile; along a row, at::vec::Vectorized<float>
// (AVX2 when built with CPU_CAPABILITY=AVX2). Row sums accumulate in float vectors and are flushed
// to double every few hundred columns, so a 65k-column row sums without drifting.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "fastkd/relation_kd.h"

namespace fastkd {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

inline Vec all_lanes() { return Vec(0.f) == Vec(0.f); }  // every bit set in every lane

// Calls f(j, n, valid) on columns [j0, j1) in chunks of kW: n valid lanes, `valid` their mask.
template <class F>
inline void for_cols(int64_t j0, int64_t j1, F&& f) {
  const Vec all = all_lanes();
  int64_t j = j0;
  for (; j + kW <= j1; j += kW) f(j, kW, all);
  if (j < j1) {
    const int64_t n = j1 - j;
    f(j, n, Vec::arange(0.f, 1.f) < Vec(static_cast<float>(n)));
  }
}

// Loads n floats; the missing lanes hold `fill` (a harmless value for divisions).
inline Vec load(const float* p, int64_t n, float fill = 0.f) {
  if (n == kW) return Vec::loadu(p);
  return Vec::set(Vec(fill), Vec::loadu(p, n), n);
}

// Sum of masked vectors, flushed to double every 64 chunks.
struct RowSum {
  Vec acc = Vec(0.f);
  double total = 0.0;
  int pending = 0;
  inline void add(const Vec& v, const Vec& valid) {
    acc = acc + Vec::blendv(Vec(0.f), v, valid);
    if (++pending == 64) flush();
  }
  inline void flush() {
    alignas(32) float tmp[kW];
    acc.store(tmp);
    for (int64_t l = 0; l < kW; ++l) total += tmp[l];
    acc = Vec(0.f);
    pending = 0;
  }
  inline float get() {
    flush();
    return static_cast<float>(total);
  }
};

inline Vec smooth_l1(const Vec& r) {
  const Vec a = r.abs();
  // |r| < 1 is false for NaN, which then takes |r| - 0.5 = NaN.
  return Vec::blendv(a - Vec(0.5f), Vec(0.5f) * r * r, a < Vec(1.f));
}

inline Vec clamp_unit(const Vec& r) {  // NaN stays NaN (max/min return their second operand)
  return at::vec::clamp(r, Vec(-1.f), Vec(1.f));
}

// Distances of row i to columns j..j+n (the diagonal is handled by the callers).
// Returns d and the mask of coincident (clamped) pairs.
inline void distance(const Vec& g, float ni, const Vec& nj, Vec& d, Vec& coincident) {
  const Vec q = Vec(ni) + nj - Vec(2.f) * g;
  const Vec thr = at::vec::maximum(Vec(kRelDistClamp), Vec(kRelCoincident) * (Vec(ni) + nj));
  coincident = q <= thr;  // false for NaN, so NaN reaches sqrt
  d = Vec::blendv(q.sqrt(), Vec(1e-6f), coincident);
}

// parallel_for grain (rows): about 16k elements of work per task.
inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

}  // namespace

// ------------------------------------------------------------------------------------------ SP
void sp_stats_cpu(const SPTileParams& p) {
  const int64_t B = p.batch;
  at::parallel_for(0, p.rows, grain(B), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gs = p.gs + r * B;
      const float* gt = p.gt + r * B;
      RowSum ss, st;
      for_cols(0, B, [&](int64_t j, int64_t n, const Vec& valid) {
        const Vec a = load(gs + j, n), b = load(gt + j, n);
        ss.add(a * a, valid);
        st.add(b * b, valid);
      });
      p.sq_s[p.row0 + r] = ss.get();
      p.sq_t[p.row0 + r] = st.get();
    }
  });
}

void sp_tile_cpu(const SPTileParams& p) {
  const int64_t B = p.batch;
  const float two_c = 2.f * p.scale;
  at::parallel_for(0, p.rows, grain(B), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = p.row0 + r;
      float* gs = p.gs + r * B;
      float* gt = p.gt + r * B;
      const Vec inv_si(p.inv_s[i]), inv_ti(p.inv_t[i]);
      RowSum loss, a_s, a_t;
      for_cols(0, B, [&](int64_t j, int64_t n, const Vec& valid) {
        const Vec a = load(gs + j, n), b = load(gt + j, n);
        const Vec d_ij = a * inv_si - b * inv_ti;
        loss.add(d_ij * d_ij, valid);
        if (!p.need_s && !p.need_t) return;
        const Vec inv_sj = load(p.inv_s + j, n), inv_tj = load(p.inv_t + j, n);
        const Vec d_ji = a * inv_sj - b * inv_tj;
        if (p.need_s) {
          a_s.add(d_ij * a * inv_si, valid);
          (Vec(two_c) * (inv_si * d_ij + inv_sj * d_ji)).store(gs + j, n);
        }
        if (p.need_t) {  // teacher: D -> -D
          a_t.add(Vec(0.f) - d_ij * b * inv_ti, valid);
          (Vec(-two_c) * (inv_ti * d_ij + inv_tj * d_ji)).store(gt + j, n);
        }
      });
      p.row_loss[i] = loss.get();
      if (p.need_s) p.row_a_s[i] = a_s.get();
      if (p.need_t) p.row_a_t[i] = a_t.get();
    }
  });
}

// ----------------------------------------------------------------------------- RKD distance
void rkd_stats_cpu(const RKDTileParams& p) {
  const int64_t B = p.batch;
  at::parallel_for(0, p.rows, grain(B), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = p.row0 + r;
      const float* gs = p.gs + r * B;
      const float* gt = p.gt + r * B;
      const float nsi = p.nrm_s[i], nti = p.nrm_t[i];
      RowSum ss, st;
      auto body = [&](int64_t j, int64_t n, const Vec& valid) {
        Vec ds, dt, cs, ct;
        distance(load(gs + j, n), nsi, load(p.nrm_s + j, n), ds, cs);
        distance(load(gt + j, n), nti, load(p.nrm_t + j, n), dt, ct);
        ss.add(ds, valid);
        st.add(dt, valid);
      };
      for_cols(0, i, body);  // d_ii = 0: the diagonal is skipped
      for_cols(i + 1, B, body);
      p.row_dsum_s[i] = ss.get();
      p.row_dsum_t[i] = st.get();
    }
  });
}

void rkd_tile_cpu(const RKDTileParams& p) {
  const int64_t B = p.batch;
  at::parallel_for(0, p.rows, grain(B), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = p.row0 + r;
      float* gs = p.gs + r * B;
      float* gt = p.gt + r * B;
      float* us = p.us ? p.us + r * B : nullptr;
      float* ut = p.ut ? p.ut + r * B : nullptr;
      const float nsi = p.nrm_s[i], nti = p.nrm_t[i];
      const Vec ims(*p.inv_mu_s), imt(*p.inv_mu_t);
      RowSum loss, a_s, a_t, vs, vt, us_sum, ut_sum;
      auto body = [&](int64_t j, int64_t n, const Vec& valid) {
        Vec ds, dt, cs, ct;
        distance(load(gs + j, n), nsi, load(p.nrm_s + j, n), ds, cs);
        distance(load(gt + j, n), nti, load(p.nrm_t + j, n), dt, ct);
        const Vec rr = ds * ims - dt * imt;
        loss.add(smooth_l1(rr), valid);
        const Vec h = clamp_unit(rr);
        if (p.need_s) {
          a_s.add(h * ds * ims, valid);
          const Vec u = Vec::blendv(Vec(1.f) / ds, Vec(0.f), cs);
          const Vec v = h * u;
          v.store(gs + j, n);
          u.store(us + j, n);
          vs.add(v, valid);
          us_sum.add(u, valid);
        }
        if (p.need_t) {  // teacher: h -> -h
          a_t.add(Vec(0.f) - h * dt * imt, valid);
          const Vec u = Vec::blendv(Vec(1.f) / dt, Vec(0.f), ct);
          const Vec v = Vec(0.f) - h * u;
          v.store(gt + j, n);
          u.store(ut + j, n);
          vt.add(v, valid);
          ut_sum.add(u, valid);
        }
      };
      for_cols(0, i, body);
      for_cols(i + 1, B, body);
      if (p.need_s) { gs[i] = 0.f; us[i] = 0.f; }
      if (p.need_t) { gt[i] = 0.f; ut[i] = 0.f; }
      p.row_loss[i] = loss.get();
      if (p.need_s) {
        p.row_a_s[i] = a_s.get();
        p.row_v_s[i] = vs.get();
        p.row_u_s[i] = us_sum.get();
      }
      if (p.need_t) {
        p.row_a_t[i] = a_t.get();
        p.row_v_t[i] = vt.get();
        p.row_u_t[i] = ut_sum.get();
      }
    }
  });
}

// -------------------------------------------------------------------------------- RKD angle
// Thread-parallel over blocks of rows i (each thread owns rows i of t_s / t_t); for a block of
// anchors j and a chunk of k the working set (rows i and j of g and rd, both sides) stays in L2.
void rkd_angle_cpu(const RKDAngleParams& p) {
  const int64_t B = p.batch;
  constexpr int64_t kIB = 8, kJB = 16, kKB = 512;
  if (p.need_s) std::fill(p.ts, p.ts + B * B, 0.f);
  if (p.need_t) std::fill(p.tt, p.tt + B * B, 0.f);
  at::parallel_for(0, (B + kIB - 1) / kIB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ib = b0; ib < b1; ++ib) {
      const int64_t i0 = ib * kIB, i1 = std::min(B, i0 + kIB);
      double loss_acc[kIB] = {};
      for (int64_t j0 = 0; j0 < B; j0 += kJB) {
        const int64_t j1 = std::min(B, j0 + kJB);
        RowSum rs[kIB][kJB], es[kIB][kJB], rt[kIB][kJB], et[kIB][kJB], ls[kIB];
        for (int64_t k0 = 0; k0 < B; k0 += kKB) {
          const int64_t k1 = std::min(B, k0 + kKB);
          for (int64_t i = i0; i < i1; ++i) {
            const float* gsi = p.gs + i * B;
            const float* gti = p.gt + i * B;
            for (int64_t j = j0; j < j1; ++j) {
              // rd and g are symmetric: read (j, i) as (i, j), in row i.
              const float rsji = p.rds[i * B + j], rtji = p.rdt[i * B + j];
              if (rsji == 0.f && rtji == 0.f) continue;  // u_ji = 0 on both sides: psi = 0
              const float* gsj = p.gs + j * B;
              const float* gtj = p.gt + j * B;
              const float* rsj = p.rds + j * B;
              const float* rtj = p.rdt + j * B;
              const Vec cs(p.gs[j * B + j] - gsi[j]), ct(p.gt[j * B + j] - gti[j]);
              const Vec vrsji(rsji), vrtji(rtji);
              const Vec hs_scale(p.scale * rsji), ht_scale(-p.scale * rtji);
              RowSum& r_s = rs[i - i0][j - j0];
              RowSum& e_s = es[i - i0][j - j0];
              RowSum& r_t = rt[i - i0][j - j0];
              RowSum& e_t = et[i - i0][j - j0];
              RowSum& l = ls[i - i0];
              for_cols(k0, k1, [&](int64_t k, int64_t n, const Vec& valid) {
                const Vec rsjk = load(rsj + k, n), rtjk = load(rtj + k, n);
                const Vec psi_s = (load(gsi + k, n) - load(gsj + k, n) + cs) * rsjk * vrsji;
                const Vec psi_t = (load(gti + k, n) - load(gtj + k, n) + ct) * rtjk * vrtji;
                const Vec rr = psi_s - psi_t;
                l.add(smooth_l1(rr), valid);
                const Vec h = clamp_unit(rr);
                if (p.need_s) {
                  const Vec hh = hs_scale * h * rsjk;
                  float* t = p.ts + i * B + k;
                  (load(t, n) + hh).store(t, n);
                  r_s.add(hh, valid);
                  e_s.add(h * psi_s, valid);
                }
                if (p.need_t) {
                  const Vec hh = ht_scale * h * rtjk;
                  float* t = p.tt + i * B + k;
                  (load(t, n) + hh).store(t, n);
                  r_t.add(hh, valid);
                  e_t.add(Vec(0.f) - h * psi_t, valid);
                }
              });
            }
          }
        }
        for (int64_t i = i0; i < i1; ++i) {
          loss_acc[i - i0] += ls[i - i0].get();
          for (int64_t j = j0; j < j1; ++j) {
            if (p.need_s) {
              p.rs[j * B + i] = rs[i - i0][j - j0].get();
              p.es[j * B + i] = p.scale * es[i - i0][j - j0].get();
            }
            if (p.need_t) {
              p.rt[j * B + i] = rt[i - i0][j - j0].get();
              p.et[j * B + i] = p.scale * et[i - i0][j - j0].get();
            }
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i) p.loss_part[i] = static_cast<float>(loss_acc[i - i0]);
    }
  });
}

// ------------------------------------------------------------------------------------- PKT
void pkt_stats_cpu(const PKTTileParams& p) {
  const int64_t B = p.batch;
  at::parallel_for(0, p.rows, grain(B), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = p.row0 + r;
      const float* gs = p.gs + r * B;
      const float* gt = p.gt + r * B;
      const Vec ims(p.inv_m_s[i]), imt(p.inv_m_t[i]);
      RowSum ss, st;
      for_cols(0, B, [&](int64_t j, int64_t n, const Vec& valid) {
        const Vec cs = (load(gs + j, n) * ims * load(p.inv_m_s + j, n) + Vec(1.f)) * Vec(0.5f);
        const Vec ct = (load(gt + j, n) * imt * load(p.inv_m_t + j, n) + Vec(1.f)) * Vec(0.5f);
        ss.add(cs, valid);
        st.add(ct, valid);
      });
      p.rsum_s[i] = ss.get();
      p.rsum_t[i] = st.get();
    }
  });
}

void pkt_tile_cpu(const PKTTileParams& p) {
  const int64_t B = p.batch;
  const Vec eps(p.eps), c(p.scale), half(0.5f), one(1.f);
  at::parallel_for(0, p.rows, grain(B), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = p.row0 + r;
      float* gs = p.gs + r * B;
      float* gt = p.gt + r * B;
      const Vec ims(p.inv_m_s[i]), imt(p.inv_m_t[i]);
      const Vec ssi(p.rsum_s[i]), sti(p.rsum_t[i]);
      RowSum loss, bs, bt;
      for_cols(0, B, [&](int64_t j, int64_t n, const Vec& valid) {
        const Vec imsj = load(p.inv_m_s + j, n), imtj = load(p.inv_m_t + j, n);
        const Vec cs = (load(gs + j, n) * ims * imsj + one) * half;
        const Vec ct = (load(gt + j, n) * imt * imtj + one) * half;
        const Vec ps = cs / ssi, pt = ct / sti;
        const Vec lg = ((pt - ps) / (ps + eps)).log1p();  // log((pt + eps) / (ps + eps))
        loss.add(pt * lg, valid);
        if (!p.need_s && !p.need_t) return;
        const Vec ssj = load(p.rsum_s + j, n, 1.f), stj = load(p.rsum_t + j, n, 1.f);
        const Vec ps_j = cs / ssj, pt_j = ct / stj;  // P_ji
        if (p.need_s) {  // g = dL/dPs + scale (see relation_kd.h)
          const Vec g = c * (ps - pt + eps) / (ps + eps);
          const Vec g_j = c * (ps_j - pt_j + eps) / (ps_j + eps);
          bs.add(g * ps, valid);
          (half * (g / ssi + g_j / ssj) * imsj).store(gs + j, n);
        }
        if (p.need_t) {
          const Vec lg_j = ((pt_j - ps_j) / (ps_j + eps)).log1p();
          const Vec f = c * (lg - eps / (pt + eps));  // dL/dPt - scale
          const Vec f_j = c * (lg_j - eps / (pt_j + eps));
          bt.add(f * pt, valid);
          (half * (f / sti + f_j / stj) * imtj).store(gt + j, n);
        }
      });
      p.row_loss[i] = loss.get();
      if (p.need_s) p.row_b_s[i] = bs.get();
      if (p.need_t) p.row_b_t[i] = bt.get();
    }
  });
}

}  // namespace fastkd
