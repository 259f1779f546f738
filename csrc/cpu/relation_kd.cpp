// CPU kernels of relation KD (SPEC §3): the per-tile epilogues of the blocked computation and the
// RKD angle. See csrc/include/fastkd/relation_kd.h for what each kernel computes.
//
// Tile kernels: at::parallel_for over the rows of a tile; along a row, at::vec::Vectorized<float>
// (AVX2 when built with CPU_CAPABILITY=AVX2). Row sums accumulate in float vectors and are flushed
// to double every few hundred columns, so a 65k-column row sums without drifting.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "fastkd/relation_kd.h"
#include "tiled/relation_tiles.h"

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

// ===================================================================================================
// CPU algorithms (declared in csrc/tiled/relation_tiles.h; the glue calls them when the CPU kernels
// serve the tensors).
namespace fastkd::tiled {
namespace {

using namespace relation_detail;  // to_f32, finish_grad, sum_double, rkd_angle
using Vec = at::vec::Vectorized<float>;

// ------------------------------------------------------------------------------------- helpers
// On 2 shared cores every parallel region can cost a scheduler time slice, far more than the
// O(B d) work around the GEMMs: that work is fused into a few row loops, run inline when small,
// and the sweeps are one region each.
using VecD = at::vec::Vectorized<double>;

inline double dot(const double* a, const double* b, int64_t n) {
  VecD acc(0.0);
  int64_t k = 0;
  for (; k + VecD::size() <= n; k += VecD::size())
    acc = at::vec::fmadd(VecD::loadu(a + k), VecD::loadu(b + k), acc);
  alignas(32) double tmp[VecD::size()];
  acc.store(tmp);
  double t = 0.0;
  for (int64_t l = 0; l < VecD::size(); ++l) t += tmp[l];
  for (; k < n; ++k) t += a[k] * b[k];
  return t;
}

// Row ranges for a loop over B rows of `per_row` cheap operations: 1 (inline) when small.
inline int64_t row_workers(int64_t B, int64_t per_row) {
  if (B * per_row < (int64_t{1} << 18)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 16));
}

// Runs f(w, i0, i1) on W contiguous row ranges of [0, B), one thread each (GEMMs inside run
// single-threaded): a phase costs one parallel region however many GEMMs it holds.
template <typename F>
void for_row_ranges(int64_t B, int64_t W, F&& f) {
  auto range = [&](int64_t w) { f(w, B * w / W, B * (w + 1) / W); };
  if (W == 1) {
    range(0);
    return;
  }
  at::parallel_for(0, W, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) range(w);
  });
}

// parts [W, ...] summed over W in a fixed order (small tensors).
template <typename T>
at::Tensor sum_parts(const at::Tensor& parts) {
  const int64_t W = parts.size(0), m = parts.numel() / W;
  at::Tensor out = at::empty(parts.sizes().slice(1), parts.options());
  const T* p = parts.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t k = 0; k < m; ++k) {
    T t = p[k];
    for (int64_t w = 1; w < W; ++w) t += p[w * m + k];
    o[k] = t;
  }
  return out;
}

// ------------------------------------------------------------------------------------ SP factored
// sum_j G_ij G'_ij = x_i^T (X^T X') x'_i: the row norms of both Gram matrices, their row inner
// products and the gradient (E + E^T) X of the loss come from the d x d blocks of Y^T Y,
// Y = [X_s | X_t], and no B x B tile is formed. The loss per row is 2 - 2 cos(G_s,i, G_t,i), a
// difference of O(1) terms, so [Ms | K], Mt, P_s = Gs Xs, Q = Gs Xt and P_t = Gt Xt are float64
// (float32 inputs are exact in it); the gradient is formed in float32 like the tiled path's (its
// terms are those of W @ X there).
bool sp_factored_pays(int64_t B, int64_t ds, int64_t dt) { return 2 * (ds + dt) <= B; }

RelationGrads sp_factored(const at::Tensor& student, const at::Tensor& teacher, double scale,
                          bool need_s, bool need_t) {
  const int64_t B = student.size(0), ds = student.size(1), dt = teacher.size(1), n = ds + dt;
  const int64_t W = row_workers(B, n * n / 4);
  at::Tensor xs32 = to_f32(student), xt32 = to_f32(teacher);
  auto f32 = xs32.options();
  auto f64 = f32.dtype(at::kDouble);
  at::Tensor y64 = at::empty({B, n}, f64), y32 = at::empty({B, n}, f32);  // [X_s | X_t]
  at::Tensor part_a = at::empty({W, ds, n}, f64), part_t = at::empty({W, dt, dt}, f64);
  for_row_ranges(B, W, [&](int64_t w, int64_t i0, int64_t i1) {
    const float* ps = xs32.data_ptr<float>();
    const float* pt = xt32.data_ptr<float>();
    double* p64 = y64.data_ptr<double>();
    float* p32 = y32.data_ptr<float>();
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t k = 0; k < ds; ++k) p64[i * n + k] = p32[i * n + k] = ps[i * ds + k];
      for (int64_t k = 0; k < dt; ++k) p64[i * n + ds + k] = p32[i * n + ds + k] = pt[i * dt + k];
    }
    at::Tensor yw = y64.narrow(0, i0, i1 - i0);
    at::Tensor out_a = part_a[w], out_t = part_t[w];
    at::mm_out(out_a, yw.narrow(1, 0, ds).t(), yw);                    // [Ms | K] of these rows
    at::mm_out(out_t, yw.narrow(1, ds, dt).t(), yw.narrow(1, ds, dt));  // Mt of these rows
  });
  at::Tensor ms_k = sum_parts<double>(part_a), mt = sum_parts<double>(part_t);
  at::Tensor k32t = at::empty({dt, ds}, f32);  // K^T, for R = Gt Xs = Xt K^T
  {
    const double* pk = ms_k.data_ptr<double>();
    float* o = k32t.data_ptr<float>();
    for (int64_t j = 0; j < dt; ++j)
      for (int64_t k = 0; k < ds; ++k) o[j * ds + k] = static_cast<float>(pk[k * n + ds + j]);
  }

  // Per row: the loss and the gradient weights. Side a against side b: dL/dG_a,ij =
  // 2 scale (inv_i D_ij - a_i inv_i^2 G_ij) with a_i = sum_j D_ij G_hat_a,ij (0 where the norm is
  // clamped: there it does not depend on G), so
  // (E + E^T) X_a = 2 scale [w1 (.) P_a - w2 (.) R_a + X_a (X_a^T w1 X_a) - X_b (X_b^T w2 X_a)]
  // with w1 = (1 - a) inv_a^2, w2 = inv_a inv_b, P_a = G_a X_a, R_a = G_b X_a.
  at::Tensor psq = at::empty({B, n}, f64), pt64 = at::empty({B, dt}, f64);
  at::Tensor rows = at::empty({4, B}, f64);  // loss, w1_s, w1_t, w2
  at::Tensor r32, z_s, z_t, m_s, m_t;
  if (need_s) {
    r32 = at::empty({B, ds}, f32);
    z_s = at::empty({B, n}, f32);
    m_s = at::empty({W, n, ds}, f32);
  }
  if (need_t) {
    z_t = at::empty({B, n}, f32);
    m_t = at::empty({W, n, dt}, f32);
  }
  double* rl = rows[0].data_ptr<double>();
  double* w1s = rows[1].data_ptr<double>();
  double* w1t = rows[2].data_ptr<double>();
  double* w2 = rows[3].data_ptr<double>();
  for_row_ranges(B, W, [&](int64_t w, int64_t i0, int64_t i1) {
    const int64_t bw = i1 - i0;
    at::Tensor yw = y64.narrow(0, i0, bw), y32w = y32.narrow(0, i0, bw);
    at::Tensor out_psq = psq.narrow(0, i0, bw), out_pt = pt64.narrow(0, i0, bw);
    at::mm_out(out_psq, yw.narrow(1, 0, ds), ms_k);  // [Ps | Q]
    at::mm_out(out_pt, yw.narrow(1, ds, dt), mt);    // Pt
    const double* py = y64.data_ptr<double>();
    const double* pq = psq.data_ptr<double>();
    const double* pp = pt64.data_ptr<double>();
    const double clamp = static_cast<double>(kRelNormClamp);
    for (int64_t i = i0; i < i1; ++i) {
      const double* yi = py + i * n;
      const double sq_s = std::max(dot(pq + i * n, yi, ds), 0.0);  // NaN stays NaN
      const double sq_t = std::max(dot(pp + i * dt, yi + ds, dt), 0.0);
      const double c = dot(pq + i * n + ds, yi + ds, dt);
      const double ns = std::sqrt(sq_s), nt = std::sqrt(sq_t);
      const double inv_s = 1.0 / (ns < clamp ? clamp : ns), inv_t = 1.0 / (nt < clamp ? clamp : nt);
      const double hat_s = inv_s * inv_s * sq_s, hat_t = inv_t * inv_t * sq_t;
      const double cross = inv_s * inv_t * c;
      rl[i] = hat_s + hat_t - 2.0 * cross;
      const double a_s = ns < clamp ? 0.0 : hat_s - cross, a_t = nt < clamp ? 0.0 : hat_t - cross;
      w1s[i] = (1.0 - a_s) * inv_s * inv_s;
      w1t[i] = (1.0 - a_t) * inv_t * inv_t;
      w2[i] = inv_s * inv_t;
    }
    // z = w1 (.) X_a and w2 (.) X_b in Y's column order; m = z^T X_a over these rows.
    auto weigh = [&](at::Tensor& z, at::Tensor& m, int64_t oa, int64_t da, const double* w1) {
      const float* p32 = y32.data_ptr<float>();
      float* pz = z.data_ptr<float>();
      for (int64_t i = i0; i < i1; ++i) {
        const float wa = static_cast<float>(w1[i]), wb = static_cast<float>(w2[i]);
        for (int64_t k = 0; k < n; ++k)
          pz[i * n + k] = (k >= oa && k < oa + da ? wa : wb) * p32[i * n + k];
      }
      at::Tensor out_m = m[w];
      at::mm_out(out_m, z.narrow(0, i0, bw).t(), y32w.narrow(1, oa, da));
    };
    if (need_s) {
      at::Tensor out_r = r32.narrow(0, i0, bw);
      at::mm_out(out_r, y32w.narrow(1, ds, dt), k32t);  // R = Xt K^T
      weigh(z_s, m_s, 0, ds, w1s);
    }
    if (need_t) weigh(z_t, m_t, ds, dt, w1t);
  });
  double total = 0.0;
  for (int64_t i = 0; i < B; ++i) total += rl[i];
  total *= scale;
  at::Tensor loss = at::scalar_tensor(total < 0.0 ? 0.0 : total, f32);  // NaN stays NaN

  // Side a (columns [oa, oa + da) of Y): g = Y @ [X^T w X_a, the X_b block negated] + the
  // row-scaled terms.
  auto grad = [&](const at::Tensor& m_parts, int64_t oa, int64_t da, const double* w1,
                  const double* pa, int64_t ldp, const float* ra_f, const double* ra_d,
                  int64_t ldr, const at::Tensor& like) {
    at::Tensor m = sum_parts<float>(m_parts);
    {
      float* pm = m.data_ptr<float>();
      for (int64_t k = 0; k < n; ++k)
        if (k < oa || k >= oa + da)
          for (int64_t j = 0; j < da; ++j) pm[k * da + j] = -pm[k * da + j];
    }
    at::Tensor g = at::empty({B, da}, f32);
    const float two_c = static_cast<float>(2.0 * scale);
    for_row_ranges(B, W, [&](int64_t, int64_t i0, int64_t i1) {
      at::Tensor out = g.narrow(0, i0, i1 - i0);
      at::mm_out(out, y32.narrow(0, i0, i1 - i0), m);
      float* pg = g.data_ptr<float>();
      for (int64_t i = i0; i < i1; ++i) {
        const double wa = w1[i], wb = w2[i];
        for (int64_t k = 0; k < da; ++k) {
          const double rk = ra_f ? ra_f[i * ldr + k] : ra_d[i * ldr + k];
          pg[i * da + k] = two_c * static_cast<float>(pg[i * da + k] + wa * pa[i * ldp + k] - wb * rk);
        }
      }
    });
    return finish_grad(g, like);
  };
  c10::optional<at::Tensor> grad_s, grad_t;
  if (need_s)
    grad_s = grad(m_s, 0, ds, w1s, psq.data_ptr<double>(), n, r32.data_ptr<float>(), nullptr, ds,
                  student);
  if (need_t)  // R_t = Gs Xt = Q
    grad_t = grad(m_t, ds, dt, w1t, pt64.data_ptr<double>(), dt, nullptr,
                  psq.data_ptr<double>() + ds, n, teacher);
  return {loss, grad_s, grad_t};
}

// ---------------------------------------------------------------------------- upper-triangle units
// A unit: rows [i0, i0 + r) x columns [c0, c1) of the relation, c0 >= i0. The first unit of a row
// tile starts at c0 = i0 and so holds the diagonal block (columns i0 .. i0 + r - 1, each ordered
// pair there seen once); every other entry (j >= i0 + r) stands for both (i, j) and (j, i).
struct Unit {
  int64_t i0, r, c0, c1;
  int64_t cols() const { return c1 - c0; }
  int64_t diag_cols() const { return c0 == i0 ? r : 0; }  // the leading diagonal-block columns
};

constexpr int64_t kUnitRows = 128, kUnitCols = 1024;

// The units of a B x B relation, dealt to workers (largest first, each to the least loaded
// worker): a fixed plan for a given thread count, so every sum has a fixed order.
struct UnitPlan {
  int64_t rows = 0, cols = 0;
  std::vector<std::vector<Unit>> work;
  int64_t workers() const { return static_cast<int64_t>(work.size()); }
  int64_t tile() const { return rows * cols; }
};

UnitPlan plan_units(int64_t B, int64_t tile_elems) {
  UnitPlan plan;
  if (tile_elems > 0) {
    plan.rows = relation_tile_rows(B, tile_elems, false);
    plan.cols = std::max(plan.rows, tile_elems / plan.rows);
  } else {
    plan.rows = std::min(B, kUnitRows);
    plan.cols = std::max(plan.rows, kUnitCols);
  }
  std::vector<Unit> units;
  for (int64_t i0 = 0; i0 < B; i0 += plan.rows) {
    const int64_t r = std::min(plan.rows, B - i0);
    for (int64_t c0 = i0; c0 < B; c0 += plan.cols) units.push_back({i0, r, c0, std::min(B, c0 + plan.cols)});
  }
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) {
    return a.r * a.cols() > b.r * b.cols();
  });
  int64_t workers = std::min<int64_t>(at::get_num_threads(), units.size());
  if (B * B < (int64_t{1} << 16)) workers = 1;  // too small to pay for a parallel region
  plan.work.resize(std::max<int64_t>(1, workers));
  std::vector<int64_t> load(plan.work.size(), 0);
  for (const Unit& u : units) {
    const int64_t w = std::min_element(load.begin(), load.end()) - load.begin();
    plan.work[w].push_back(u);
    load[w] += u.r * u.cols();
  }
  return plan;
}

// Runs f(w) for every worker w, one thread each (GEMMs inside run single-threaded).
template <typename F>
void for_workers(const UnitPlan& plan, F&& f) {
  const int64_t n = plan.workers();
  if (n == 1) {
    f(int64_t{0});
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) f(w);
  });
}

// buf[0:r, 0:cols] = x[i0:i0+r] x[c0:c1]^T.
inline at::Tensor unit_gram(float* buf, const at::Tensor& x, const Unit& u) {
  at::Tensor out = at::from_blob(buf, {u.r, u.cols()}, x.options());
  at::mm_out(out, x.narrow(0, u.i0, u.r), x.narrow(0, u.c0, u.cols()).t());
  return out;
}

// out[i0:i0+r] += w x[c0:c1] and, for the columns off the diagonal block, out[j] += w^T x[i0:i0+r]
// (w is symmetric: its block (j, i) is the transpose of (i, j)).
inline void unit_contract(at::Tensor& out, const at::Tensor& w, const at::Tensor& x, const Unit& u) {
  out.narrow(0, u.i0, u.r).addmm_(w, x.narrow(0, u.c0, u.cols()));
  const int64_t jo = u.diag_cols(), no = u.cols() - jo;
  if (no > 0) out.narrow(0, u.c0 + jo, no).addmm_(w.narrow(1, jo, no).t(), x.narrow(0, u.i0, u.r));
}

// A float vector sum (a unit row has at most a few thousand columns), read out in double.
struct Acc {
  Vec v = Vec(0.f);
  inline void add(const Vec& x, const Vec& valid) { v = v + Vec::blendv(Vec(0.f), x, valid); }
  inline double get() const {
    alignas(32) float tmp[Vec::size()];
    v.store(tmp);
    double t = 0.0;
    for (int64_t l = 0; l < Vec::size(); ++l) t += tmp[l];
    return t;
  }
};

// ------------------------------------------------------------------------------------ RKD distance
// x [B, d] -> xa = x - mean_rows(x) (float32) and the squared norms of the centred rows.
void rkd_centre(const at::Tensor& x32, at::Tensor& xa, at::Tensor& nrm) {
  const int64_t B = x32.size(0), d = x32.size(1), la = d;
  xa = at::empty({B, la}, x32.options());
  nrm = at::empty({B}, x32.options());
  const int64_t W = row_workers(B, d);
  std::vector<double> part(W * d, 0.0);
  const float* px = x32.data_ptr<float>();
  for_row_ranges(B, W, [&](int64_t w, int64_t i0, int64_t i1) {
    double* ps = part.data() + w * d;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = 0; k < d; ++k) ps[k] += px[i * d + k];
  });
  std::vector<float> mean(d);
  for (int64_t k = 0; k < d; ++k) {
    double t = 0.0;
    for (int64_t w = 0; w < W; ++w) t += part[w * d + k];
    mean[k] = static_cast<float>(t / static_cast<double>(B));
  }
  float* pa = xa.data_ptr<float>();
  float* pn = nrm.data_ptr<float>();
  for_row_ranges(B, W, [&](int64_t, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double q = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const float c = px[i * d + k] - mean[k];
        pa[i * la + k] = c;
        q += static_cast<double>(c) * c;
      }
      pn[i] = static_cast<float>(q);
    }
  });
}

// Sweep 1 on a unit: the sum of its distances (entries off the diagonal block twice).
double rkd_unit_dsum(const float* g, const float* nrm, const Unit& u) {
  const int64_t n = u.cols(), dc = u.diag_cols();
  const float* nj = nrm + u.c0;
  double total = 0.0;
  for (int64_t rr = 0; rr < u.r; ++rr) {
    const float* gi = g + rr * n;
    const float ni = nrm[u.i0 + rr];
    Acc acc[2];
    auto body = [&](int k) {
      return [&, k](int64_t j, int64_t cnt, const Vec& valid) {
        Vec d, co;
        distance(load(gi + j, cnt), ni, load(nj + j, cnt), d, co);
        acc[k].add(d, valid);
      };
    };
    if (dc > 0) {
      for_cols(0, rr, body(0));  // the diagonal (j = i) has d = 0
      for_cols(rr + 1, dc, body(0));
    }
    for_cols(dc, n, body(1));
    total += acc[0].get() + 2.0 * acc[1].get();
  }
  return total;
}

struct RKDUnitSums {
  double loss = 0.0, a_s = 0.0, a_t = 0.0;
};

// Sweep 2 on a unit: loss and sum_j h_ij d_ij per side; V = h / d and U = 1 / d (teacher: -h / d)
// written at the unit's entries (0 on the diagonal and at coincident pairs), and their row sums
// added to vu_s / vu_t ([2, B] float64: v, u; columns off the diagonal block count for row j too).
// col: 4 x cols floats of scratch.
void rkd_unit_tile(const float* gs, const float* gt, const float* nrm_s, const float* nrm_t,
                   float ims_f, float imt_f, bool need_s, bool need_t, float* vs, float* us,
                   float* vt, float* ut, double* vu_s, double* vu_t, float* col, const Unit& u,
                   RKDUnitSums& sums, int64_t B) {
  const int64_t n = u.cols(), dc = u.diag_cols();
  const float* njs = nrm_s + u.c0;
  const float* njt = nrm_t + u.c0;
  const Vec ims(ims_f), imt(imt_f);
  float* cvs = col;  // column sums of V_s, U_s, V_t, U_t over the unit's rows
  float* cus = col + n;
  float* cvt = col + 2 * n;
  float* cut = col + 3 * n;
  std::fill(col, col + 4 * n, 0.f);
  auto col_add = [](float* c, int64_t j, int64_t cnt, const Vec& v) {
    (load(c + j, cnt) + v).store(c + j, cnt);
  };
  for (int64_t rr = 0; rr < u.r; ++rr) {
    const int64_t i = u.i0 + rr, o = rr * n;
    const float nsi = nrm_s[i], nti = nrm_t[i];
    Acc l[2], as[2], at_[2], rvs, rus, rvt, rut;
    auto body = [&](int k) {
      return [&, k](int64_t j, int64_t cnt, const Vec& valid) {
        Vec ds, dt, cs, ct;
        distance(load(gs + o + j, cnt), nsi, load(njs + j, cnt), ds, cs);
        distance(load(gt + o + j, cnt), nti, load(njt + j, cnt), dt, ct);
        const Vec r = ds * ims - dt * imt;
        l[k].add(smooth_l1(r), valid);
        const Vec h = clamp_unit(r);
        if (need_s) {
          as[k].add(h * ds, valid);
          const Vec uu = Vec::blendv(Vec(1.f) / ds, Vec(0.f), cs);
          const Vec vv = h * uu;
          vv.store(vs + o + j, cnt);
          uu.store(us + o + j, cnt);
          rvs.add(vv, valid);
          rus.add(uu, valid);
          if (k == 1) {
            col_add(cvs, j, cnt, vv);
            col_add(cus, j, cnt, uu);
          }
        }
        if (need_t) {  // teacher: h -> -h
          at_[k].add(h * dt, valid);
          const Vec uu = Vec::blendv(Vec(1.f) / dt, Vec(0.f), ct);
          const Vec vv = Vec(0.f) - h * uu;
          vv.store(vt + o + j, cnt);
          uu.store(ut + o + j, cnt);
          rvt.add(vv, valid);
          rut.add(uu, valid);
          if (k == 1) {
            col_add(cvt, j, cnt, vv);
            col_add(cut, j, cnt, uu);
          }
        }
      };
    };
    if (dc > 0) {
      for_cols(0, rr, body(0));
      for_cols(rr + 1, dc, body(0));
      if (need_s) vs[o + rr] = us[o + rr] = 0.f;
      if (need_t) vt[o + rr] = ut[o + rr] = 0.f;
    }
    for_cols(dc, n, body(1));
    sums.loss += l[0].get() + 2.0 * l[1].get();
    if (need_s) {
      sums.a_s += as[0].get() + 2.0 * as[1].get();
      vu_s[i] += rvs.get();
      vu_s[B + i] += rus.get();
    }
    if (need_t) {
      sums.a_t -= at_[0].get() + 2.0 * at_[1].get();
      vu_t[i] += rvt.get();
      vu_t[B + i] += rut.get();
    }
  }
  for (int64_t j = dc; j < n; ++j) {
    if (need_s) {
      vu_s[u.c0 + j] += cvs[j];
      vu_s[B + u.c0 + j] += cus[j];
    }
    if (need_t) {
      vu_t[u.c0 + j] += cvt[j];
      vu_t[B + u.c0 + j] += cut[j];
    }
  }
}

// The distance term of RKD on the centred features xa: returns its loss and writes (add: adds) its
// gradient w.r.t. the centred features into g_s / g_t ([B, d] float32, where needed). The
// column mean of this gradient is 0 (V and U are symmetric), so the centring adds no term.
double rkd_distance_units(const at::Tensor& xa_s, const at::Tensor& xa_t, const at::Tensor& nrm_s,
                          const at::Tensor& nrm_t, double dist_scale, bool need_s, bool need_t,
                          int64_t tile_elems, float* g_s, float* g_t, bool add) {
  const int64_t B = xa_s.size(0), ds = xa_s.size(1), dt = xa_t.size(1);
  const UnitPlan plan = plan_units(B, tile_elems);
  const int64_t W = plan.workers(), tile = plan.tile();
  const double pairs = static_cast<double>(B) * static_cast<double>(B - 1);
  auto f32 = xa_s.options();
  const float* ns = nrm_s.data_ptr<float>();
  const float* nt = nrm_t.data_ptr<float>();
  const at::Tensor& xs = xa_s;
  const at::Tensor& xt = xa_t;
  at::Tensor gbuf = at::empty({W, 2, tile}, f32);

  // Sweep 1: the mean distance per side.
  std::vector<double> dsum_s(W, 0.0), dsum_t(W, 0.0);
  for_workers(plan, [&](int64_t w) {
    float* bs = gbuf[w][0].data_ptr<float>();
    float* bt = gbuf[w][1].data_ptr<float>();
    for (const Unit& u : plan.work[w]) {
      unit_gram(bs, xs, u);
      unit_gram(bt, xt, u);
      dsum_s[w] += rkd_unit_dsum(bs, ns, u);
      dsum_t[w] += rkd_unit_dsum(bt, nt, u);
    }
  });
  const double mu_s = std::accumulate(dsum_s.begin(), dsum_s.end(), 0.0) / pairs;
  const double mu_t = std::accumulate(dsum_t.begin(), dsum_t.end(), 0.0) / pairs;
  const float ims = static_cast<float>(1.0 / mu_s), imt = static_cast<float>(1.0 / mu_t);

  // Sweep 2: loss, and per worker V X, U X and the row sums v, u.
  at::Tensor acc_s, acc_t, wbuf_s, wbuf_t;  // acc: [W, 2 (V, U), B, d]
  if (need_s) {
    acc_s = at::empty({W, 2, B, ds}, f32);
    wbuf_s = at::empty({W, 2, tile}, f32);
  }
  if (need_t) {
    acc_t = at::empty({W, 2, B, dt}, f32);
    wbuf_t = at::empty({W, 2, tile}, f32);
  }
  at::Tensor vu = at::empty({W, 2, 2, B}, f32.dtype(at::kDouble));  // [w][side][v, u][row]
  at::Tensor colbuf = at::empty({W, 4 * plan.cols}, f32);
  std::vector<RKDUnitSums> sums(W);
  for_workers(plan, [&](int64_t w) {
    float* bs = gbuf[w][0].data_ptr<float>();
    float* bt = gbuf[w][1].data_ptr<float>();
    float* vs = need_s ? wbuf_s[w][0].data_ptr<float>() : nullptr;
    float* us = need_s ? wbuf_s[w][1].data_ptr<float>() : nullptr;
    float* vt = need_t ? wbuf_t[w][0].data_ptr<float>() : nullptr;
    float* ut = need_t ? wbuf_t[w][1].data_ptr<float>() : nullptr;
    at::Tensor gh_s, gf_s, gh_t, gf_t;
    if (need_s) {
      gh_s = acc_s[w][0];
      gf_s = acc_s[w][1];
      std::fill_n(gh_s.data_ptr<float>(), 2 * B * ds, 0.f);
    }
    if (need_t) {
      gh_t = acc_t[w][0];
      gf_t = acc_t[w][1];
      std::fill_n(gh_t.data_ptr<float>(), 2 * B * dt, 0.f);
    }
    double* vu_s = vu[w][0].data_ptr<double>();
    double* vu_t = vu[w][1].data_ptr<double>();
    std::fill_n(vu_s, 4 * B, 0.0);
    float* col = colbuf[w].data_ptr<float>();
    for (const Unit& u : plan.work[w]) {
      unit_gram(bs, xs, u);
      unit_gram(bt, xt, u);
      rkd_unit_tile(bs, bt, ns, nt, ims, imt, need_s, need_t, vs, us, vt, ut, vu_s, vu_t, col, u,
                    sums[w], B);
      auto view = [&](float* p) { return at::from_blob(p, {u.r, u.cols()}, f32); };
      if (need_s) {
        unit_contract(gh_s, view(vs), xa_s, u);
        unit_contract(gf_s, view(us), xa_s, u);
      }
      if (need_t) {
        unit_contract(gh_t, view(vt), xa_t, u);
        unit_contract(gf_t, view(ut), xa_t, u);
      }
    }
  });
  RKDUnitSums tot;
  for (const RKDUnitSums& s : sums) {
    tot.loss += s.loss;
    tot.a_s += s.a_s;
    tot.a_t += s.a_t;
  }
  // grad = 2 scale / mu * [(v x - V X) - A / N (u x - U X)], A = sum_ij h_ij d_hat_ij (see
  // relation_kd.h); the second term is the gradient through the mean distance.
  auto assemble = [&](float* g, const at::Tensor& xa, const at::Tensor& acc, int side,
                      double a_sum, float inv_mu) {
    const int64_t d = xa.size(1), la = d;
    const float* px = xa.data_ptr<float>();
    const float* pacc = acc.data_ptr<float>();
    const double* pvu = vu.data_ptr<double>();
    const float lam = static_cast<float>(a_sum * inv_mu / pairs);
    const float k = static_cast<float>(2.0 * dist_scale * inv_mu);
    const int64_t stride_w = 2 * B * la, stride_vu = B * la;
    for_row_ranges(B, row_workers(B, 4 * W * la), [&](int64_t, int64_t i0, int64_t i1) {
      std::vector<float> row(2 * la);
      for (int64_t i = i0; i < i1; ++i) {
        double vsum = 0.0, usum = 0.0;
        for (int64_t w = 0; w < W; ++w) {
          vsum += pvu[((w * 2 + side) * 2 + 0) * B + i];
          usum += pvu[((w * 2 + side) * 2 + 1) * B + i];
        }
        for (int64_t c = 0; c < la; ++c) {
          float v = 0.f, uu = 0.f;
          for (int64_t w = 0; w < W; ++w) {
            v += pacc[w * stride_w + i * la + c];
            uu += pacc[w * stride_w + stride_vu + i * la + c];
          }
          row[c] = v;
          row[la + c] = uu;
        }
        const float v = static_cast<float>(vsum), uu = static_cast<float>(usum);
        for (int64_t c = 0; c < d; ++c) {
          const float x = px[i * la + c];
          const float gh = v * x - row[c], gf = uu * x - row[la + c];
          const float val = (gh - lam * gf) * k;
          g[i * d + c] = add ? g[i * d + c] + val : val;
        }
      }
    });
  };
  if (need_s) assemble(g_s, xa_s, acc_s, 0, tot.a_s, ims);
  if (need_t) assemble(g_t, xa_t, acc_t, 1, tot.a_t, imt);
  return tot.loss * dist_scale;
}

// -------------------------------------------------------------------------------------------- PKT
// One pass over the units (the row sums of c come from sum_j e_hat_j): loss, b = sum_j g_ij P_ij
// per row (rows and, off the diagonal block, columns), and the symmetric weight
// W_ij = (g_ij / rsum_i + g_ji / rsum_j) / 2 (teacher: f) at the unit's entries.
double pkt_unit_tile(const float* gs, const float* gt, const float* ris, const float* rit,
                     float eps_f, float c_f, bool need_s, bool need_t, float* ws, float* wt,
                     double* b_s, double* b_t, float* col_s, float* col_t, const Unit& u) {
  const int64_t n = u.cols(), dc = u.diag_cols();
  const float* risj = ris + u.c0;
  const float* ritj = rit + u.c0;
  const Vec eps(eps_f), c(c_f), half(0.5f), one(1.f);
  if (need_s) std::fill(col_s, col_s + n, 0.f);
  if (need_t) std::fill(col_t, col_t + n, 0.f);
  double loss = 0.0;
  for (int64_t rr = 0; rr < u.r; ++rr) {
    const int64_t i = u.i0 + rr, o = rr * n;
    const Vec ris_i(ris[i]), rit_i(rit[i]);
    Acc l, bs, bt;
    auto body = [&](bool off) {
      return [&, off](int64_t j, int64_t cnt, const Vec& valid) {
        const Vec cs = (load(gs + o + j, cnt) + one) * half;
        const Vec ct = (load(gt + o + j, cnt) + one) * half;
        const Vec rsj = load(risj + j, cnt, 1.f), rtj = load(ritj + j, cnt, 1.f);
        const Vec ps = cs * ris_i, pt = ct * rit_i;  // P_ij
        const Vec ps_j = cs * rsj, pt_j = ct * rtj;  // P_ji
        const Vec q = one / (ps + eps);
        const Vec lg = ((pt - ps) * q).log1p();  // log((pt + eps) / (ps + eps))
        l.add(pt * lg, valid);
        const bool need_j = off || need_t;
        Vec qj, lgj;
        if (need_j || need_s) qj = one / (ps_j + eps);
        if (need_j) lgj = ((pt_j - ps_j) * qj).log1p();
        if (off) l.add(pt_j * lgj, valid);
        if (need_s) {  // g = dL/dPs + scale (see relation_kd.h)
          const Vec g = c * (ps - pt + eps) * q;
          const Vec gj = c * (ps_j - pt_j + eps) * qj;
          bs.add(g * ps, valid);
          if (off) (load(col_s + j, cnt) + gj * ps_j).store(col_s + j, cnt);
          (half * (g * ris_i + gj * rsj)).store(ws + o + j, cnt);
        }
        if (need_t) {  // f = dL/dPt - scale
          const Vec f = c * (lg - eps / (pt + eps));
          const Vec fj = c * (lgj - eps / (pt_j + eps));
          bt.add(f * pt, valid);
          if (off) (load(col_t + j, cnt) + fj * pt_j).store(col_t + j, cnt);
          (half * (f * rit_i + fj * rtj)).store(wt + o + j, cnt);
        }
      };
    };
    for_cols(0, dc, body(false));
    for_cols(dc, n, body(true));
    loss += l.get();
    if (need_s) b_s[i] += bs.get();
    if (need_t) b_t[i] += bt.get();
  }
  for (int64_t j = dc; j < n; ++j) {
    if (need_s) b_s[u.c0 + j] += col_s[j];
    if (need_t) b_t[u.c0 + j] += col_t[j];
  }
  return loss;
}

// One side of PKT: e_hat = x / (||x|| + eps), 1 / (||x|| + eps), ||x||, sum_j e_hat_j (float64),
// and the row sums of c, sum_j c_ij = (B + e_hat_i . sum_j e_hat_j) / 2.
struct PKTSide {
  at::Tensor x, e, norm, inv_m, rsum, rinv;
  std::vector<double> esum;
};

PKTSide pkt_side(const at::Tensor& x32, double eps) {
  PKTSide s;
  const int64_t B = x32.size(0), d = x32.size(1);
  auto f32 = x32.options();
  s.x = x32;
  s.e = at::empty({B, d}, f32);
  at::Tensor rows = at::empty({5, B}, f32);
  s.norm = rows[0];
  s.inv_m = rows[1];
  s.rsum = rows[2];
  s.rinv = rows[3];
  const int64_t W = row_workers(B, 4 * d);
  std::vector<double> part(W * d, 0.0);
  const float* px = x32.data_ptr<float>();
  float* pe = s.e.data_ptr<float>();
  float* pn = s.norm.data_ptr<float>();
  float* pi = s.inv_m.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  for_row_ranges(B, W, [&](int64_t w, int64_t i0, int64_t i1) {
    double* ps = part.data() + w * d;
    for (int64_t i = i0; i < i1; ++i) {
      double q = 0.0;
      for (int64_t k = 0; k < d; ++k) q += static_cast<double>(px[i * d + k]) * px[i * d + k];
      const float nrm = static_cast<float>(std::sqrt(q)), inv = 1.f / (nrm + epsf);
      pn[i] = nrm;
      pi[i] = inv;
      for (int64_t k = 0; k < d; ++k) {
        const float e = px[i * d + k] * inv;
        pe[i * d + k] = e;
        ps[k] += e;
      }
    }
  });
  s.esum.assign(d, 0.0);
  for (int64_t w = 0; w < W; ++w)
    for (int64_t k = 0; k < d; ++k) s.esum[k] += part[w * d + k];
  float* pr = s.rsum.data_ptr<float>();
  float* prr = s.rinv.data_ptr<float>();
  for_row_ranges(B, W, [&](int64_t, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double t = 0.0;
      for (int64_t k = 0; k < d; ++k) t += static_cast<double>(pe[i * d + k]) * s.esum[k];
      const float r = static_cast<float>((static_cast<double>(B) + t) * 0.5);
      pr[i] = r;
      prr[i] = 1.f / r;
    }
  });
  return s;
}

}  // namespace

RelationGrads sp_loss_cpu(const at::Tensor& student, const at::Tensor& teacher, double scale,
                          bool need_s, bool need_t, int64_t tile_elems) {
  const int64_t B = student.size(0);
  if (tile_elems <= 0 && sp_factored_pays(B, student.size(1), teacher.size(1)))
    return sp_factored(student, teacher, scale, need_s, need_t);
  const SPKernels k{sp_stats_cpu, sp_tile_cpu};
  return sp_loss(student, teacher, scale, need_s, need_t, relation_tile_rows(B, tile_elems, false), k);
}

RelationGrads rkd_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                           double dist_scale, double angle_scale, bool need_s, bool need_t,
                           int64_t tile_elems) {
  const int64_t B = student.size(0);
  at::Tensor xa_s, xa_t, nrm_s, nrm_t;
  rkd_centre(to_f32(student), xa_s, nrm_s);
  rkd_centre(to_f32(teacher), xa_t, nrm_t);
  const int64_t ds = xa_s.size(1), dt = xa_t.size(1);
  auto f32 = xa_s.options();
  c10::optional<at::Tensor> grad_s, grad_t;
  if (angle_scale == 0.0) {
    at::Tensor gs32, gt32;
    if (need_s) gs32 = dist_scale != 0.0 ? at::empty({B, ds}, f32) : at::zeros({B, ds}, f32);
    if (need_t) gt32 = dist_scale != 0.0 ? at::empty({B, dt}, f32) : at::zeros({B, dt}, f32);
    double loss = 0.0;
    if (dist_scale != 0.0)
      loss = rkd_distance_units(xa_s, xa_t, nrm_s, nrm_t, dist_scale, need_s, need_t, tile_elems,
                                need_s ? gs32.data_ptr<float>() : nullptr,
                                need_t ? gt32.data_ptr<float>() : nullptr, false);
    if (need_s) grad_s = finish_grad(gs32, student);
    if (need_t) grad_t = finish_grad(gt32, teacher);
    return {at::scalar_tensor(loss, f32), grad_s, grad_t};
  }
  // With the angle term (O(B^2) matrices, torch ops around its kernel).
  const at::Tensor& xs = xa_s;
  const at::Tensor& xt = xa_t;
  at::Tensor gs32, gt32;
  if (need_s) gs32 = at::zeros_like(xs);
  if (need_t) gt32 = at::zeros_like(xt);
  at::Tensor loss = at::zeros({}, xs.options().dtype(at::kDouble));
  if (dist_scale != 0.0)
    loss = loss + rkd_distance_units(xa_s, xa_t, nrm_s, nrm_t, dist_scale, need_s, need_t,
                                     tile_elems, need_s ? gs32.data_ptr<float>() : nullptr,
                                     need_t ? gt32.data_ptr<float>() : nullptr, true);
  const RKDKernels k{rkd_stats_cpu, rkd_tile_cpu, rkd_angle_cpu};
  rkd_angle(xs, xt, nrm_s, nrm_t, angle_scale, need_s, need_t, k, loss, gs32, gt32);
  // Chain rule through the centring x -> x - mean(x): subtract the column mean of the gradient.
  if (need_s) grad_s = finish_grad(gs32.sub_(gs32.mean(0, true)), student);
  if (need_t) grad_t = finish_grad(gt32.sub_(gt32.mean(0, true)), teacher);
  return {loss.to(at::kFloat), grad_s, grad_t};
}

RelationGrads pkt_loss_cpu(const at::Tensor& student, const at::Tensor& teacher, double eps,
                           double scale, bool need_s, bool need_t, int64_t tile_elems) {
  const int64_t B = student.size(0);
  const PKTSide S = pkt_side(to_f32(student), eps), T = pkt_side(to_f32(teacher), eps);
  const int64_t ds = S.x.size(1), dt = T.x.size(1);
  auto f32 = S.x.options();

  const UnitPlan plan = plan_units(B, tile_elems);
  const int64_t W = plan.workers(), tile = plan.tile();
  at::Tensor gbuf = at::empty({W, 2, tile}, f32);
  at::Tensor wbuf = at::empty({W, int64_t{need_s} + int64_t{need_t}, tile}, f32);
  at::Tensor colbuf = at::empty({W, 2, plan.cols}, f32);
  at::Tensor bsum = at::empty({W, 2, B}, f32.dtype(at::kDouble));  // b_s, b_t per worker
  at::Tensor ge_acc_s, ge_acc_t;
  if (need_s) ge_acc_s = at::empty({W, B, ds}, f32);
  if (need_t) ge_acc_t = at::empty({W, B, dt}, f32);
  std::vector<double> loss_w(W, 0.0);
  const float* ris = S.rinv.data_ptr<float>();
  const float* rit = T.rinv.data_ptr<float>();
  for_workers(plan, [&](int64_t w) {
    float* bs = gbuf[w][0].data_ptr<float>();
    float* bt = gbuf[w][1].data_ptr<float>();
    float* ws = need_s ? wbuf[w][0].data_ptr<float>() : nullptr;
    float* wt = need_t ? wbuf[w][need_s ? 1 : 0].data_ptr<float>() : nullptr;
    double* b_s = bsum[w][0].data_ptr<double>();
    double* b_t = bsum[w][1].data_ptr<double>();
    std::fill_n(b_s, 2 * B, 0.0);
    float* col_s = colbuf[w][0].data_ptr<float>();
    float* col_t = colbuf[w][1].data_ptr<float>();
    at::Tensor ge_s, ge_t;
    if (need_s) {
      ge_s = ge_acc_s[w];
      std::fill_n(ge_s.data_ptr<float>(), B * ds, 0.f);
    }
    if (need_t) {
      ge_t = ge_acc_t[w];
      std::fill_n(ge_t.data_ptr<float>(), B * dt, 0.f);
    }
    for (const Unit& u : plan.work[w]) {
      unit_gram(bs, S.e, u);
      unit_gram(bt, T.e, u);
      loss_w[w] += pkt_unit_tile(bs, bt, ris, rit, static_cast<float>(eps), static_cast<float>(scale),
                                 need_s, need_t, ws, wt, b_s, b_t, col_s, col_t, u);
      auto view = [&](float* p) { return at::from_blob(p, {u.r, u.cols()}, f32); };
      if (need_s) unit_contract(ge_s, view(ws), S.e, u);
      if (need_t) unit_contract(ge_t, view(wt), T.e, u);
    }
  });
  const double loss_sum = std::accumulate(loss_w.begin(), loss_w.end(), 0.0);
  at::Tensor loss = at::scalar_tensor(loss_sum * scale, f32);
  // Row-sum correction: dL/dG_hat_ij also holds -beta_i (beta = b / (2 rsum)), so the gradient
  // w.r.t. e_hat_i gains -beta_i sum_j e_hat_j - sum_j beta_j e_hat_j. Then the chain rule
  // through e_hat = x / (||x|| + eps): g_x = g / m - (g . x) x / (m^2 ||x||) (0 at x = 0).
  auto assemble = [&](const PKTSide& P, const at::Tensor& ge_acc, int side) {
    const int64_t d = P.x.size(1);
    const double* pb = bsum.data_ptr<double>();
    const float* pe = P.e.data_ptr<float>();
    const float* pr = P.rsum.data_ptr<float>();
    std::vector<float> beta(B);
    std::vector<double> tau(d, 0.0);
    for (int64_t i = 0; i < B; ++i) {
      double b = 0.0;
      for (int64_t w = 0; w < W; ++w) b += pb[(w * 2 + side) * B + i];
      beta[i] = static_cast<float>(b) / (2.f * pr[i]);
      for (int64_t k = 0; k < d; ++k) tau[k] += static_cast<double>(beta[i]) * pe[i * d + k];
    }
    std::vector<float> sigma(P.esum.begin(), P.esum.end()), tauf(tau.begin(), tau.end());
    at::Tensor g = at::empty({B, d}, f32);
    const float* pacc = ge_acc.data_ptr<float>();
    const float* px = P.x.data_ptr<float>();
    const float* pn = P.norm.data_ptr<float>();
    const float* pm = P.inv_m.data_ptr<float>();
    float* pg = g.data_ptr<float>();
    for_row_ranges(B, row_workers(B, (W + 4) * d), [&](int64_t, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float* gi = pg + i * d;
        float dotgx = 0.f;
        for (int64_t k = 0; k < d; ++k) {
          float v = pacc[i * d + k];
          for (int64_t w = 1; w < W; ++w) v += pacc[(w * B + i) * d + k];
          v = v - beta[i] * sigma[k] - tauf[k];
          gi[k] = v;
          dotgx += v * px[i * d + k];
        }
        const float m = pm[i], safe = pn[i] > 0.f ? pn[i] : 1.f;
        const float proj = dotgx * m * m / safe;
        for (int64_t k = 0; k < d; ++k) gi[k] = gi[k] * m - proj * px[i * d + k];
      }
    });
    return g;
  };
  c10::optional<at::Tensor> grad_s, grad_t;
  if (need_s) grad_s = finish_grad(assemble(S, ge_acc_s, 0), student);
  if (need_t) grad_t = finish_grad(assemble(T, ge_acc_t, 1), teacher);
  return {loss, grad_s, grad_t};
}

}  // namespace fastkd::tiled
