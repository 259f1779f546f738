// Fused logit KD on the CPU (math: csrc/include/fastkd/logit_kd.h, SPEC §1).
//
// Rows are spread over threads with at::parallel_for. Each thread converts one row of the student
// and of every teacher to float32 scratch (padded with -inf to a whole number of vectors, so the
// tail needs no special case: -inf has probability 0 and every term guards on that), then makes
// three sweeps with at::vec::Vectorized<float>: statistics, the row sums the gradient needs, and
// the gradient. The row stays in L2 between sweeps, so only the inputs and the gradient touch DRAM.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastkd/logit_kd.h"

namespace fastkd {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Sums are accumulated in float lanes over blocks of this many elements, then in double, so the
// error does not grow with V (V reaches 262,144).
constexpr int64_t kSumBlock = 1024;

// Load `n` elements of a row of type T into float32 `dst`, padding up to `padded` with -inf.
template <typename T>
void load_row(const T* src, int64_t n, int64_t padded, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
  std::fill(dst + n, dst + padded, kNegInf);
}

template <typename T>
void store_row(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
void zero_row(T* dst, int64_t n) {
  std::fill(dst, dst + n, T(0.f));
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Blocked vector sum: f(offset) returns the Vec of terms at `offset`; NaN propagates.
template <int K, typename F>
void block_sums(int64_t padded, F f, double (&out)[K]) {
  for (int k = 0; k < K; ++k) out[k] = 0.0;
  for (int64_t b = 0; b < padded; b += kSumBlock) {
    Vec acc[K];
    for (int k = 0; k < K; ++k) acc[k] = Vec(0.f);
    const int64_t e = std::min(padded, b + kSumBlock);
    for (int64_t v = b; v < e; v += kW) f(v, acc);
    for (int k = 0; k < K; ++k) out[k] += hsum(acc[k]);
  }
}

float row_max(const float* x, int64_t padded) {
  Vec m(kNegInf);
  for (int64_t v = 0; v < padded; v += kW) m = at::vec::maximum(m, Vec::loadu(x + v));
  return hmax(m);
}

// First index where x == m (m is the row max, finite), by a vectorised early-exit scan.
int64_t row_argmax(const float* x, int64_t padded, float m) {
  const Vec vm(m);
  for (int64_t v = 0; v < padded; v += kW) {
    const int mask = (Vec::loadu(x + v) - vm).zero_mask();
    if (mask) return v + __builtin_ctz(static_cast<unsigned>(mask));
  }
  return 0;  // only reached for a NaN max; any index serves then
}

// log sum_v exp((x_v - m) * inv_t) for the row max m, as log1p of the sum *without* one max
// entry (which contributes exactly 1): log-probabilities near 0 (a confident row) stay accurate.
// The unnormalised exponentials are kept in `cache` (when given) so that the later sweeps get
// the probabilities by one multiply instead of another exp.
double row_log_sum_exp(const float* x, int64_t padded, float m, float inv_t, float* cache) {
  const Vec vm(m), vi(inv_t), one(1.f);
  double s[2];
  block_sums<2>(padded, [&](int64_t v, Vec* acc) {
    const Vec x0 = Vec::loadu(x + v);
    const Vec at_max = x0 == vm;
    const Vec e = ((x0 - vm) * vi).exp();
    if (cache) e.store(cache + v);
    acc[0] = acc[0] + Vec::blendv(e, Vec(0.f), at_max);
    acc[1] = acc[1] + Vec::blendv(Vec(0.f), one, at_max);
  }, s);
  return std::log1p(s[0] + (s[1] - 1.0));
}

inline Vec sel(const Vec& mask, const Vec& a) {  // mask ? a : 0
  return Vec::blendv(Vec(0.f), a, mask);
}

struct Scratch {
  std::vector<float> s, g, lp, es, et, e1;  // rows; exp caches of s/T, t/T (one teacher), s
  std::vector<std::vector<float>> t;
};

// Gradients through a softmax have the form w_v (g_v - sum_u w_u g_u) (w = q or p_i). For a
// confident row the dominant entry's g_v nearly equals the sum, and the difference would cancel
// to noise in float32. Every such sum is therefore taken of g_u - g_*, with g_* the value at the
// dominant entry of w (its argmax), which is exact algebra (sum w = 1) without the cancellation.
template <typename TS, typename TT>
void kd_row(const LogitKDParams& p, int64_t r, Scratch& w, int* flags) {
  const int64_t V = p.vocab;
  const int64_t Vp = (V + kW - 1) / kW * kW;
  const int nt = p.num_teachers;
  TS* gs_out = p.grad_student ? static_cast<TS*>(p.grad_student) + r * V : nullptr;
  TT* gt_out[kMaxTeachers];
  bool need_t = false;
  for (int i = 0; i < nt; ++i) {
    gt_out[i] = p.grad_teacher[i] ? static_cast<TT*>(p.grad_teacher[i]) + r * V : nullptr;
    need_t = need_t || gt_out[i] != nullptr;
  }
  auto zero_outputs = [&]() {
    p.row_loss[r] = 0.f;
    if (gs_out) zero_row(gs_out, V);
    for (int i = 0; i < nt; ++i)
      if (gt_out[i]) zero_row(gt_out[i], V);
  };

  int64_t y = -1;
  if (p.target) {
    y = p.target[r];
    if (y == p.ignore_index) return zero_outputs();
    if (y < 0 || y >= V) {
      *flags |= kFlagTargetOutOfRange;
      return zero_outputs();
    }
  }
  const bool hard = p.target && p.hard_weight != 0.f;

  // ---- sweep 1: statistics -------------------------------------------------------------------
  float* xs = w.s.data();
  load_row(static_cast<const TS*>(p.student) + r * p.student_stride, V, Vp, xs);
  float* xt[kMaxTeachers];
  float mt[kMaxTeachers], lzt[kMaxTeachers];
  double lzt_d[kMaxTeachers];  // log Z of each teacher, unrounded (see kl_terms)
  int64_t jt[kMaxTeachers];
  const float inv_t = 1.f / p.temperature;
  const float ms = row_max(xs, Vp);
  if (ms == kNegInf) {
    *flags |= kFlagStudentAllMasked;
    return zero_outputs();
  }
  for (int i = 0; i < nt; ++i) {
    xt[i] = w.t[i].data();
    load_row(static_cast<const TT*>(p.teacher[i]) + r * p.teacher_stride[i], V, Vp, xt[i]);
    mt[i] = row_max(xt[i], Vp);
    if (mt[i] == kNegInf) {
      *flags |= kFlagTeacherAllMasked;
      return zero_outputs();
    }
    lzt_d[i] = row_log_sum_exp(xt[i], Vp, mt[i], inv_t, nt == 1 ? w.et.data() : nullptr);
    lzt[i] = static_cast<float>(lzt_d[i]);
    jt[i] = row_argmax(xt[i], Vp, mt[i]);
  }
  const double lzs_d = row_log_sum_exp(xs, Vp, ms, inv_t, w.es.data());
  const float lzs = static_cast<float>(lzs_d);
  const int64_t js = row_argmax(xs, Vp, ms);
  // log(Zs / Zt) for one teacher. KL and reverse KL take lzs - lzt (its rounding, ~eps, is a
  // common shift of d that cancels to first order in kl_terms). TVD and JSD do not cancel it, so
  // there it is log1p((Zs - Zt) / Zt) with Zs - Zt = sum et (expm1(((s - t) - (ms - mt)) / T))
  // (the exact difference where the exponents are close), accurate when the student is close to
  // its teacher relative to the logits' magnitude.
  double log_zs_zt = nt == 1 ? lzs_d - lzt_d[0] : 0.0;
  if (nt == 1 && (p.divergence == Divergence::TVD || p.divergence == Divergence::JSD)) {
    const Vec vd0(ms - mt[0]), vinv0(inv_t), one(1.f), zero0(0.f);
    double dz[1];
    block_sums<1>(Vp, [&](int64_t v, Vec* acc) {
      const Vec es = Vec::loadu(w.es.data() + v), et = Vec::loadu(w.et.data() + v);
      const Vec ab = ((Vec::loadu(xs + v) - Vec::loadu(xt[0] + v)) - vd0) * vinv0;
      const Vec close = (ab.abs() < one) & (et > zero0);
      acc[0] = acc[0] + Vec::blendv(es - et, et * ab.expm1(), close);
    }, dz);
    log_zs_zt = std::log1p(dz[0] / std::exp(lzt_d[0]));
  }
  float lz1 = 0.f, finite_sum = 0.f, n_finite = 0.f;
  if (hard) {
    lz1 = static_cast<float>(row_log_sum_exp(xs, Vp, ms, 1.f, w.e1.data()));
    if (p.label_smoothing != 0.f) {
      const Vec ninf(kNegInf), one(1.f);
      double sm[2];
      block_sums<2>(Vp, [&](int64_t v, Vec* acc) {
        const Vec x = Vec::loadu(xs + v);
        const Vec fin = x != ninf;
        acc[0] = acc[0] + sel(fin, x);
        acc[1] = acc[1] + sel(fin, one);
      }, sm);
      finite_sum = static_cast<float>(sm[0]);
      n_finite = static_cast<float>(sm[1]);
    }
  }

  // Teacher mixture log-probabilities (several teachers only): lp = log sum_i w_i p_i.
  const bool mixed = nt > 1;
  float* lp = mixed ? w.lp.data() : nullptr;
  if (mixed) {
    for (int64_t v = 0; v < Vp; v += kW) {
      Vec lmax(kNegInf);
      Vec li[kMaxTeachers];
      for (int i = 0; i < nt; ++i) {
        li[i] = (Vec::loadu(xt[i] + v) - Vec(mt[i])) * Vec(inv_t) - Vec(lzt[i]);
        if (p.teacher_weight[i] > 0.f) lmax = at::vec::maximum(lmax, li[i]);
      }
      const Vec finite = lmax != Vec(kNegInf);
      const Vec shift = sel(finite, lmax);
      Vec sum(0.f);
      for (int i = 0; i < nt; ++i)
        if (p.teacher_weight[i] > 0.f) sum = sum + Vec(p.teacher_weight[i]) * (li[i] - shift).exp();
      Vec::blendv(Vec(kNegInf), shift + sum.log(), finite).store(lp + v);
    }
  }
  const Vec vms(ms), vinv(inv_t), vlzs(lzs), vmt0(mt[0]), vlzt0(lzt[0]);
  auto logq_at = [&](int64_t v) { return (Vec::loadu(xs + v) - vms) * vinv - vlzs; };
  auto logp_at = [&](int64_t v) {
    return mixed ? Vec::loadu(lp + v) : (Vec::loadu(xt[0] + v) - vmt0) * vinv - vlzt0;
  };
  // Probabilities: the cached exponentials times 1/Z (one teacher), exp(log p) for a mixture.
  const Vec vinv_zs(std::exp(-lzs)), vinv_zt0(std::exp(-lzt[0]));
  auto q_at = [&](int64_t v) { return Vec::loadu(w.es.data() + v) * vinv_zs; };
  auto p_at = [&](int64_t v, const Vec& lpv) {
    return mixed ? lpv.exp() : Vec::loadu(w.et.data() + v) * vinv_zt0;
  };
  auto logpi_at = [&](int i, int64_t v) {
    return (Vec::loadu(xt[i] + v) - Vec(mt[i])) * vinv - Vec(lzt[i]);
  };

  const Divergence div = p.divergence;
  const float beta = p.beta;
  const Vec zero(0.f), vbeta(beta), vomb(1.f - beta);
  const Vec vlog_beta(std::log(beta)), vlog_1mb(std::log1p(-beta));
  // JSD works with y_q = log((1-beta) q / m) = -softplus(d) and y_p = log(beta p / m) =
  // -softplus(-d), d = logp - logq + log(beta / (1-beta)): accurate both when p ~ q and when
  // p and q are nearly disjoint (where log q - log m would cancel against its row mean).
  const Vec vlogit_beta(std::log(beta) - std::log1p(-beta));
  auto softplus = [&](const Vec& x) {
    return at::vec::maximum(x, zero) + (zero - x.abs()).exp().log1p();
  };
  auto jsd_d = [&](const Vec& lpv, const Vec& lqv) { return lpv - lqv + vlogit_beta; };
  // q - p without cancelling when both are close to 1: the factor exp(.) - 1 of the smaller
  // log-probability difference, computed by expm1.
  // (d = log p - log q; see d_at for the accurate one.)
  auto q_minus_p_d = [&](const Vec& qv, const Vec& pv, const Vec& d) {
    const Vec e = (zero - d.abs()).expm1();  // exp(-|d|) - 1, in (-1, 0]
    const Vec a = Vec::blendv(pv * e, zero - qv * e, d <= zero);  // q >= p: -q e; else p e
    return sel((qv > zero) | (pv > zero), a);
  };
  // KL and reverse KL loss terms. d = log p - log q; one teacher: from the raw difference t - s
  // and log(Zs / Zt) (unrounded), so a student close to its teacher keeps d to float32 precision
  // rather than to eps * |log p|. Then KL(p||q) = sum_{p != 0} p phi(d) + sum_{p == 0} q with
  // phi(d) = d + expm1(-d) >= 0 (since sum p exp(-d) = sum_{p != 0} q): every term is >= 0, so a
  // small divergence (large T, a student near its teacher) is not the difference of terms of
  // size |d|, and a common rounding of d (from log Z) cancels to first order. phi: a series for
  // |d| < 1/2, else p d + (q - p). The tests are != 0 so that NaN propagates (SPEC).
  const Vec vdm(mt[0] - ms), vdl(static_cast<float>(log_zs_zt)), half(0.5f);
  auto d_at = [&](int64_t v, const Vec& lpv, const Vec& lqv) {
    if (mixed) return lpv - lqv;
    return ((Vec::loadu(xt[0] + v) - Vec::loadu(xs + v)) - vdm) * vinv + vdl;
  };
  // a phi(d) + (b - a) [a phi(d) with b = a exp(-d), b given]; a where a != 0, else b.
  auto kl_terms = [&](const Vec& a, const Vec& b, const Vec& d) {
    Vec ser = Vec(1.f / 362880.f);
    ser = Vec(1.f / 40320.f) - d * ser;
    ser = Vec(1.f / 5040.f) - d * ser;
    ser = Vec(1.f / 720.f) - d * ser;
    ser = Vec(1.f / 120.f) - d * ser;
    ser = Vec(1.f / 24.f) - d * ser;
    ser = Vec(1.f / 6.f) - d * ser;
    ser = Vec(0.5f) - d * ser;
    const Vec small = a * (d * d * ser);
    const Vec large = a * d + (b - a);
    return Vec::blendv(b, Vec::blendv(large, small, d.abs() < half), a != zero);
  };
  // Student-side per-entry value x_v whose softmax gradient is q_v (x_v - sum q x) (RKL, JSD).
  auto student_x = [&](const Vec& lqv, const Vec& lpv) {
    if (div == Divergence::ReverseKL) return lqv - lpv;
    return zero - softplus(jsd_d(lpv, lqv));
  };
  // Teacher-side "g" (d D / d p up to a constant) times p_i, for KL and JSD and reverse KL.
  auto teacher_gv = [&](const Vec& lpv, const Vec& lqv) {
    if (div == Divergence::KL) return lpv - lqv;
    return vbeta * (zero - softplus(zero - jsd_d(lpv, lqv)));  // JSD
  };

  // Shift constants at the dominant entries: the vector formula evaluated where entry j lies.
  auto scalar_at = [&](int64_t j, auto&& f) -> float {
    const int64_t base = j / kW * kW;
    float b[kW];
    f(base).store(b);
    return b[j - base];
  };

  const bool student_sum = gs_out && (div == Divergence::ReverseKL || div == Divergence::JSD);
  const float x_star = student_sum ? scalar_at(js, [&](int64_t v) {
    return student_x(logq_at(v), logp_at(v)); }) : 0.f;
  float g_star[kMaxTeachers] = {};
  const bool teacher_sum = need_t && div != Divergence::TVD;
  for (int i = 0; i < nt; ++i) {
    if (!gt_out[i] || !teacher_sum) continue;
    g_star[i] = scalar_at(jt[i], [&](int64_t v) {
      const Vec lqv = logq_at(v), lpv = logp_at(v);
      if (div == Divergence::ReverseKL)  // g = -q / p
        return zero - (lqv - lpv).exp();
      return teacher_gv(lpv, lqv);
    });
  }

  // ---- sweep 2: the loss and the row sums the gradient needs ---------------------------------
  // sums[0] = D (TVD: sum |p - q|; JSD: sum p log(p/m)); sums[1] = JSD: sum q log(q/m);
  // sums[2] = sum q (x - x*) (RKL, JSD), TVD: q mass where p > q; sums[3], sums[4]: TVD q mass
  // where p < q and p == q. Teacher i: sums[5 + 3i] = sum p_i (g - g*_i), TVD: p_i class masses.
  constexpr int kSums = 5 + 3 * kMaxTeachers;
  double sums[kSums] = {};
  const bool fuse_grad = div == Divergence::KL && !need_t;  // the gradient needs no row sum
  float* g = w.g.data();
  const float c = p.soft_factor * inv_t;
  const float scale = p.grad_scale ? *p.grad_scale : 1.f;
  const float eps = p.label_smoothing;
  const float hw = p.hard_weight;
  // dCE/ds_v = q1_v * a1 - (1-eps)[v==y] - (eps/V)[s_v finite].
  const float a1 = 1.f - eps + eps * n_finite / static_cast<float>(V);
  const float eps_v = eps / static_cast<float>(V);
  const Vec vlz1(lz1), vninf(kNegInf), vxs(x_star);
  const Vec va1z(a1 * std::exp(-lz1));  // a1 / Z1: q1 = e1 / Z1
  auto ce_grad = [&](int64_t v) {
    const Vec x = Vec::loadu(xs + v);
    Vec d = Vec::loadu(w.e1.data() + v) * va1z;
    if (eps != 0.f) d = d - sel(x != vninf, Vec(eps_v));
    return d;
  };
  for (int64_t b = 0; b < Vp; b += kSumBlock) {
    Vec acc[kSums];
    for (auto& a : acc) a = zero;
    const int64_t e = std::min(Vp, b + kSumBlock);
    for (int64_t v = b; v < e; v += kW) {
      const Vec lqv = logq_at(v), lpv = logp_at(v);
      const Vec qv = q_at(v), pv = p_at(v, lpv);
      switch (div) {
        case Divergence::KL: {
          const Vec dd = d_at(v, lpv, lqv);
          acc[0] = acc[0] + kl_terms(pv, qv, dd);
          if (fuse_grad && gs_out) {
            Vec gv = Vec(c) * q_minus_p_d(qv, pv, dd);
            if (hard) gv = gv + Vec(hw) * ce_grad(v);
            gv.store(g + v);
          }
          break;
        }
        case Divergence::ReverseKL:
          acc[0] = acc[0] + kl_terms(qv, pv, zero - d_at(v, lpv, lqv));
          if (student_sum) acc[2] = acc[2] + sel(qv > zero, qv * (lqv - lpv - vxs));
          break;
        case Divergence::JSD: {
          const Vec d = jsd_d(lpv, lqv);
          const Vec yq = zero - softplus(d), yp = zero - softplus(zero - d);
          // KL(p||m) and KL(q||m) as kl_terms of log(p/m) = -log1p((1-beta) expm1(-dd)) and
          // log(q/m) = -log1p(beta expm1(dd)), dd = log p - log q (accurate when p ~ q; the
          // softplus forms where expm1 would overflow).
          const Vec dd = d_at(v, lpv, lqv), mv = vbeta * pv + vomb * qv;
          const Vec lpm = Vec::blendv(yp - vlog_beta, zero - (vomb * (zero - dd).expm1()).log1p(),
                                      dd > Vec(-80.f));
          const Vec lqm = Vec::blendv(yq - vlog_1mb, zero - (vbeta * dd.expm1()).log1p(),
                                      dd < Vec(80.f));
          acc[0] = acc[0] + kl_terms(pv, mv, lpm);
          acc[1] = acc[1] + kl_terms(qv, mv, lqm);
          if (student_sum) acc[2] = acc[2] + sel(qv > zero, qv * (yq - vxs));
          break;
        }
        case Divergence::TVD: {
          // Sign classes of p - q from the sign of d = log p - log q (accurate, see d_at), not
          // from the separately rounded p and q: a student near its teacher keeps its classes.
          const Vec dd = d_at(v, lpv, lqv);
          const Vec gt = dd > zero, lt = dd < zero, eq = dd == zero;
          acc[0] = acc[0] + q_minus_p_d(qv, pv, dd).abs();
          acc[2] = acc[2] + sel(gt, qv);
          acc[3] = acc[3] + sel(lt, qv);
          acc[4] = acc[4] + sel(eq, qv);
          for (int i = 0; i < nt; ++i) {
            if (!gt_out[i]) continue;
            const Vec pi = logpi_at(i, v).exp();
            acc[5 + 3 * i] = acc[5 + 3 * i] + sel(gt, pi);
            acc[6 + 3 * i] = acc[6 + 3 * i] + sel(lt, pi);
            acc[7 + 3 * i] = acc[7 + 3 * i] + sel(eq, pi);
          }
          break;
        }
      }
      if (teacher_sum) {
        for (int i = 0; i < nt; ++i) {
          if (!gt_out[i]) continue;
          const Vec lpi = logpi_at(i, v), pi = lpi.exp();
          Vec pg;  // p_i (g - g*_i)
          if (div == Divergence::ReverseKL)  // p_i g = -q p_i / p, not p_i * (-q / p): with
            // saturated rows q / p overflows while p_i underflows (lost: -q).
            // (The guard is log p_i > -inf: p_i itself may underflow to 0 where -q p_i / p
            // does not.)
            pg = sel(lpi > Vec(kNegInf), sel(qv > zero, zero - (lqv + lpi - lpv).exp())
                                             - pi * Vec(g_star[i]));
          else
            pg = sel(pi > zero, pi * (teacher_gv(lpv, lqv) - Vec(g_star[i])));
          acc[5 + 3 * i] = acc[5 + 3 * i] + pg;
        }
      }
    }
    for (int k = 0; k < kSums; ++k) sums[k] += hsum(acc[k]);
  }
  float D;
  switch (div) {
    case Divergence::JSD: D = static_cast<float>(beta * sums[0] + (1.0 - beta) * sums[1]); break;
    case Divergence::TVD: D = static_cast<float>(0.5 * sums[0]); break;
    default: D = static_cast<float>(sums[0]);
  }
  float loss = p.soft_factor * D;
  if (hard) {
    const float nll = -(xs[y] - ms - lz1);
    float ce = nll;
    if (eps != 0.f) {
      // sum over finite v of -(s_v - ms - lz1) = -finite_sum + n_finite (ms + lz1)
      const float smooth = (-finite_sum + n_finite * (ms + lz1)) / static_cast<float>(V);
      ce = (1.f - eps) * nll + eps * smooth;
    }
    loss += hw * ce;
  }
  p.row_loss[r] = loss;

  // ---- sweep 3: gradients ---------------------------------------------------------------------
  // TVD: h_v - sum_u q_u h_u per sign class of p_v - q_v, from the class masses (no cancellation).
  const float qa = static_cast<float>(sums[2]), qb = static_cast<float>(sums[3]),
              qc = static_cast<float>(sums[4]);
  const Vec tvd_gt(-qb - 0.5f * qc), tvd_lt(qa + 0.5f * qc), tvd_eq(0.5f * (qa - qb));
  const Vec vx_sum(static_cast<float>(sums[2]));
  if (gs_out) {
    if (!fuse_grad) {
      for (int64_t v = 0; v < Vp; v += kW) {
        const Vec lqv = logq_at(v), lpv = logp_at(v);
        const Vec qv = q_at(v), pv = p_at(v, lpv);
        Vec dd;
        switch (div) {
          case Divergence::KL: dd = q_minus_p_d(qv, pv, d_at(v, lpv, lqv)); break;
          case Divergence::ReverseKL:
            dd = sel(qv > zero, qv * (student_x(lqv, lpv) - vxs - vx_sum));
            break;
          case Divergence::JSD:
            dd = vomb * sel(qv > zero, qv * (student_x(lqv, lpv) - vxs - vx_sum));
            break;
          default: {
            const Vec d = d_at(v, lpv, lqv);
            dd = qv * Vec::blendv(Vec::blendv(tvd_eq, tvd_lt, d < zero), tvd_gt, d > zero);
            break;
          }
        }
        Vec gv = Vec(c) * dd;
        if (hard) gv = gv + Vec(hw) * ce_grad(v);
        gv.store(g + v);
      }
    }
    if (hard) g[y] -= hw * (1.f - eps);
    if (scale != 1.f) {
      const Vec vs(scale);
      for (int64_t v = 0; v < Vp; v += kW) (Vec::loadu(g + v) * vs).store(g + v);
    }
    store_row(g, V, gs_out);
  }
  for (int i = 0; i < nt; ++i) {
    if (!gt_out[i]) continue;
    const float wi = p.teacher_weight[i];
    if (wi == 0.f) {
      zero_row(gt_out[i], V);
      continue;
    }
    const Vec coef(c * wi * scale), vgs(g_star[i]);
    const Vec vS(static_cast<float>(sums[5 + 3 * i]));
    const float pa = static_cast<float>(sums[5 + 3 * i]), pb = static_cast<float>(sums[6 + 3 * i]),
                pc = static_cast<float>(sums[7 + 3 * i]);
    const Vec t_gt(pb + 0.5f * pc), t_lt(-pa - 0.5f * pc), t_eq(-0.5f * (pa - pb));
    for (int64_t v = 0; v < Vp; v += kW) {
      const Vec lqv = logq_at(v), lpv = logp_at(v);
      const Vec qv = q_at(v), pv = p_at(v, lpv);
      const Vec lpi = logpi_at(i, v), pi = lpi.exp();
      Vec pg;  // p_i (g - g* - S)
      switch (div) {
        case Divergence::TVD: {
          const Vec d = d_at(v, lpv, lqv);
          pg = sel(pi > zero, pi * Vec::blendv(Vec::blendv(t_eq, t_lt, d < zero), t_gt, d > zero));
          break;
        }
        case Divergence::ReverseKL:  // p_i g = -q p_i / p (see the sums above)
          pg = sel(lpi > Vec(kNegInf),
                   sel(qv > zero, zero - (lqv + lpi - lpv).exp()) - pi * (vgs + vS));
          break;
        default:
          pg = sel(pi > zero, pi * (teacher_gv(lpv, lqv) - vgs - vS));
      }
      (coef * pg).store(g + v);
    }
    store_row(g, V, gt_out[i]);
  }
}

template <typename TS, typename TT>
void run(const LogitKDParams& p) {
  const int64_t V = p.vocab;
  const int64_t Vp = (V + kW - 1) / kW * kW;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  int flags = 0;
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    Scratch w;
    w.s.resize(Vp);
    w.g.resize(Vp);
    w.es.resize(Vp);
    w.e1.resize(Vp);
    if (p.num_teachers == 1) w.et.resize(Vp);
    if (p.num_teachers > 1) w.lp.resize(Vp);
    w.t.resize(p.num_teachers);
    for (auto& t : w.t) t.resize(Vp);
    int local = 0;
    for (int64_t r = begin; r < end; ++r) kd_row<TS, TT>(p, r, w, &local);
    if (local) {
#pragma omp atomic
      flags |= local;
    }
  });
  *p.flags |= flags;
}

template <typename TS>
void run_teacher_dtype(const LogitKDParams& p) {
  switch (p.teacher_dtype) {
    case DType::F32: return run<TS, float>(p);
    case DType::BF16: return run<TS, c10::BFloat16>(p);
    case DType::F16: return run<TS, c10::Half>(p);
  }
}

}  // namespace

void logit_kd_cpu(const LogitKDParams& p) {
  switch (p.student_dtype) {
    case DType::F32: return run_teacher_dtype<float>(p);
    case DType::BF16: return run_teacher_dtype<c10::BFloat16>(p);
    case DType::F16: return run_teacher_dtype<c10::Half>(p);
  }
}

}  // namespace fastkd
