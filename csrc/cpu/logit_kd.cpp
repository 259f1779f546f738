// Fused logit KD on the CPU (math: csrc/include/fastkd/logit_kd.h, SPEC §1).
//
// Rows are spread over threads with at::parallel_for. Each thread converts one row of the student
// and of every teacher to float32 scratch (padded with -inf to a whole number of vectors, so the
// tail needs no special case: -inf has probability 0 and every term guards on that), then makes
// three sweeps with at::vec::Vectorized<float>: statistics, the row sums the gradient needs, and
// the gradient. The row stays in L2 between sweeps, so only the inputs and the gradient touch DRAM.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec_rows.h"
#include "fastkd/logit_kd.h"

namespace fastkd {
namespace {

#define FASTKD_INLINE inline __attribute__((always_inline))

using cpu::block_sums;
using cpu::fast_exp;
using cpu::fast_log;
using cpu::fast_log1p;
using cpu::hmax;
using cpu::hsum;
using cpu::kNegInf;
using cpu::kSumBlock;
using cpu::kW;
using cpu::load_row;
using cpu::row_max;
using cpu::store_row;
using cpu::Vec;
using cpu::zero_row;

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
// the probabilities by one multiply instead of another exp. With kSquares, *lse_sq is the same
// for the squared exponentials, i.e. at half the temperature (the hard CE at T = 2).
template <bool kSquares = false>
double row_log_sum_exp(const float* x, int64_t padded, float m, float inv_t, float* cache,
                       double* lse_sq = nullptr) {
  const Vec vm(m), vi(inv_t), one(1.f);
  double s[3];
  block_sums<3>(padded, [&](int64_t v, Vec* acc) {
    const Vec x0 = Vec::loadu(x + v);
    const Vec at_max = x0 == vm;
    const Vec e = fast_exp((x0 - vm) * vi);
    if (cache) e.store(cache + v);
    acc[0] = acc[0] + Vec::blendv(e, Vec(0.f), at_max);
    acc[1] = acc[1] + Vec::blendv(Vec(0.f), one, at_max);
    if constexpr (kSquares) acc[2] = acc[2] + Vec::blendv(e * e, Vec(0.f), at_max);
  }, s);
  if constexpr (kSquares) *lse_sq = std::log1p(s[2] + (s[1] - 1.0));
  return std::log1p(s[0] + (s[1] - 1.0));
}

using cpu::sel;

// phi(d) / d^2 for phi(d) = d + expm1(-d), by its Taylor series to d^7 (relative error < 1e-8
// for |d| < 1/2, where it is used). phi is the KL term function (see RowTerms::kl_terms), and
// expm1(-d) = d^2 phi_series(d) - d gives exp(.) - 1 of small arguments without an exp.
FASTKD_INLINE Vec phi_series(const Vec& dv) {
  Vec ser = Vec(1.f / 362880.f);
  ser = Vec(1.f / 40320.f) - dv * ser;
  ser = Vec(1.f / 5040.f) - dv * ser;
  ser = Vec(1.f / 720.f) - dv * ser;
  ser = Vec(1.f / 120.f) - dv * ser;
  ser = Vec(1.f / 24.f) - dv * ser;
  ser = Vec(1.f / 6.f) - dv * ser;
  return Vec(0.5f) - dv * ser;
}

// expm1(x) for |x| < 1/2, from the series.
FASTKD_INLINE Vec expm1_small(const Vec& x) { return x + x * x * phi_series(Vec(0.f) - x); }

struct Scratch {
  std::vector<float> s, g, lp, es, et, e1;  // rows; exp caches of s/T, t/T (one teacher), s
  std::vector<std::vector<float>> t, ets;  // teacher rows; exp caches of teachers 1, 2, ...
};

// Sweep 1's findings on a row: where its float32 copies are, and its scalar statistics.
struct RowStats {
  int64_t V = 0, Vp = 0;  // vocabulary, padded to whole vectors
  int nt = 1;
  const float* xs = nullptr;                  // student logits (padded with -inf)
  const float* xt[kMaxTeachers] = {};         // teacher logits
  const float* lp = nullptr;                  // teacher-mixture log-probabilities (nt > 1)
  const float *es = nullptr, *et = nullptr;   // exp((x - max) / T) of the student, teacher 0
  const float* e1 = nullptr;                  // exp(s - max) (hard CE)
  float inv_t = 1.f;
  float ms = 0.f, lzs = 0.f;                  // student max, log Z at temperature T
  double lzs_d = 0.0;
  int64_t js = 0;                             // student argmax
  float mt[kMaxTeachers] = {}, lzt[kMaxTeachers] = {};
  double lzt_d[kMaxTeachers] = {};            // log Z of each teacher, unrounded (see kl_terms)
  int64_t jt[kMaxTeachers] = {};
  double log_zs_zt = 0.0;                     // log(Zs / Zt), one teacher
  float lz1 = 0.f, finite_sum = 0.f, n_finite = 0.f;  // hard CE: log Z at T = 1, finite logits
  bool e1_squared = false;                    // hard CE: exp(s - max) = es^2 (T = 2)
};

// log(Zs / Zt) for one teacher. KL and reverse KL take lzs - lzt (its rounding, ~eps, is a
// common shift of d that cancels to first order in kl_terms). TVD and JSD do not cancel it, so
// there it is log1p((Zs - Zt) / Zt) with Zs - Zt = sum et (expm1(((s - t) - (ms - mt)) / T))
// (the exact difference where the exponents are close), accurate when the student is close to
// its teacher relative to the logits' magnitude.
double log_zs_over_zt(const RowStats& st, Divergence div) {
  if (st.nt != 1) return 0.0;
  if (div != Divergence::TVD && div != Divergence::JSD) return st.lzs_d - st.lzt_d[0];
  const Vec vd0(st.ms - st.mt[0]), vinv0(st.inv_t), zero0(0.f);
  double dz[1];
  block_sums<1>(st.Vp, [&](int64_t v, Vec* acc) {
    const Vec es = Vec::loadu(st.es + v), et = Vec::loadu(st.et + v);
    const Vec ab = ((Vec::loadu(st.xs + v) - Vec::loadu(st.xt[0] + v)) - vd0) * vinv0;
    // Where |ab| >= 1/2, es and et differ by a third or more and es - et is accurate.
    const Vec close = (ab.abs() < Vec(0.5f)) & (et > zero0);
    acc[0] = acc[0] + Vec::blendv(es - et, et * expm1_small(ab), close);
  }, dz);
  return std::log1p(dz[0] / std::exp(st.lzt_d[0]));
}

// The hard CE's row statistics: log Z of the student at T = 1 (its exponentials cached in e1)
// and, with label smoothing, the sum and count of the finite logits. At T = 1 and T = 2 the
// exponentials are the soft term's (squared at T = 2: e1_squared; lz1 then comes from sweep 1).
void hard_ce_stats(RowStats& st, float label_smoothing, float* e1) {
  if (st.inv_t == 1.f) {
    st.lz1 = st.lzs;
    st.e1 = st.es;
  } else if (st.e1_squared) {
    st.e1 = st.es;
  } else {
    st.lz1 = static_cast<float>(row_log_sum_exp(st.xs, st.Vp, st.ms, 1.f, e1));
    st.e1 = e1;
  }
  if (label_smoothing == 0.f) return;
  const Vec ninf(kNegInf), one(1.f);
  double sm[2];
  block_sums<2>(st.Vp, [&](int64_t v, Vec* acc) {
    const Vec x = Vec::loadu(st.xs + v);
    const Vec fin = x != ninf;
    acc[0] = acc[0] + sel(fin, x);
    acc[1] = acc[1] + sel(fin, one);
  }, sm);
  st.finite_sum = static_cast<float>(sm[0]);
  st.n_finite = static_cast<float>(sm[1]);
}

// Teacher mixture (several teachers): p = sum_i w_i e_i / Z_i from the teachers' cached
// exponentials e_i, written over teacher 0's cache (which becomes the mixture's), and lp = log p.
// Where p < 2^-100 (p may have underflowed, while log p is finite and matters, e.g. to the
// reverse KL's q log(q/p)) lp is log sum_i w_i exp(log p_i) with the largest log p_i taken out.
void teacher_mixture(const LogitKDParams& p, const RowStats& st, float* const* et, float* lp) {
  Vec cw[kMaxTeachers];
  for (int i = 0; i < st.nt; ++i)
    cw[i] = Vec(static_cast<float>(p.teacher_weight[i] * std::exp(-st.lzt_d[i])));
  const Vec tiny(7.88860905e-31f);
  for (int64_t v = 0; v < st.Vp; v += kW) {
    Vec pm(0.f);
    for (int i = 0; i < st.nt; ++i)
      if (p.teacher_weight[i] > 0.f) pm = pm + cw[i] * Vec::loadu(et[i] + v);
    Vec lpv = fast_log(pm);
    if ((pm < tiny).zero_mask() != (1 << kW) - 1) {  // some lane tiny (NaN lanes are not)
      Vec lmax(kNegInf);
      Vec li[kMaxTeachers];
      for (int i = 0; i < st.nt; ++i) {
        li[i] = (Vec::loadu(st.xt[i] + v) - Vec(st.mt[i])) * Vec(st.inv_t) - Vec(st.lzt[i]);
        if (p.teacher_weight[i] > 0.f) lmax = at::vec::maximum(lmax, li[i]);
      }
      const Vec finite = lmax != Vec(kNegInf);
      const Vec shift = sel(finite, lmax);
      Vec sum(0.f);
      for (int i = 0; i < st.nt; ++i)
        if (p.teacher_weight[i] > 0.f)
          sum = sum + Vec(p.teacher_weight[i]) * fast_exp(li[i] - shift);
      const Vec slow = Vec::blendv(Vec(kNegInf), shift + fast_log(sum), finite);
      lpv = Vec::blendv(lpv, slow, pm < tiny);
    }
    pm.store(et[0] + v);
    lpv.store(lp + v);
  }
}

// The log mixture's logits y = sum over w_i > 0 of w_i t_i (teachers of weight 0 are left out:
// 0 * -inf would be NaN; -inf in any other teacher stays -inf, as in the padding).
void mixed_logits(const LogitKDParams& p, const RowStats& st, float* y) {
  for (int64_t v = 0; v < st.Vp; v += kW) {
    Vec acc(0.f);
    for (int i = 0; i < st.nt; ++i)
      if (p.teacher_weight[i] > 0.f)
        acc = acc + Vec(p.teacher_weight[i]) * Vec::loadu(st.xt[i] + v);
    acc.store(y + v);
  }
}

// Sweep 1: loads row r into the scratch and fills `st`. False, with its flag raised, for a row
// whose student or some teacher has no finite logit.
template <typename TS, typename TT>
bool row_statistics(const LogitKDParams& p, int64_t r, bool hard, Scratch& w, int* flags,
                    RowStats& st) {
  st.V = p.vocab;
  st.Vp = (st.V + kW - 1) / kW * kW;
  st.nt = p.num_teachers;
  st.inv_t = 1.f / p.temperature;
  // float32 rows of whole vectors are read in place; others are converted / padded to scratch.
  const TS* srow = static_cast<const TS*>(p.student) + r * p.student_stride;
  const float* xs;
  if constexpr (std::is_same_v<TS, float>) {
    if (st.V == st.Vp) xs = srow;
  }
  if (!(std::is_same_v<TS, float> && st.V == st.Vp)) {
    load_row(srow, st.V, st.Vp, w.s.data());
    xs = w.s.data();
  }
  st.xs = xs;
  st.ms = row_max(xs, st.Vp);
  if (st.ms == kNegInf) {
    *flags |= kFlagStudentAllMasked;
    return false;
  }
  const bool log_mix = p.log_mixture && st.nt > 1;
  for (int i = 0; i < st.nt; ++i) {
    const TT* trow = static_cast<const TT*>(p.teacher[i]) + r * p.teacher_stride[i];
    if constexpr (std::is_same_v<TT, float>) {
      if (st.V == st.Vp) st.xt[i] = trow;
    }
    if (!(std::is_same_v<TT, float> && st.V == st.Vp)) {
      load_row(trow, st.V, st.Vp, w.t[i].data());
      st.xt[i] = w.t[i].data();
    }
    st.mt[i] = row_max(st.xt[i], st.Vp);
    if (st.mt[i] == kNegInf) {
      *flags |= kFlagTeacherAllMasked;
      return false;
    }
  }
  if (log_mix) {
    // The log mixture is one teacher with logits y (see logit_kd.h): from here on the row is a
    // single-teacher row, and kd_row spreads y's gradient over the teachers.
    mixed_logits(p, st, w.lp.data());
    st.nt = 1;
    st.xt[0] = w.lp.data();
    st.mt[0] = row_max(st.xt[0], st.Vp);
    if (st.mt[0] == kNegInf) {
      *flags |= kFlagMixtureAllMasked;
      return false;
    }
  }
  for (int i = 0; i < st.nt; ++i) {
    float* cache = i == 0 ? w.et.data() : w.ets[i].data();
    st.lzt_d[i] = row_log_sum_exp(st.xt[i], st.Vp, st.mt[i], st.inv_t, cache);
    st.lzt[i] = static_cast<float>(st.lzt_d[i]);
    st.jt[i] = row_argmax(st.xt[i], st.Vp, st.mt[i]);
  }
  st.et = w.et.data();
  st.e1_squared = hard && st.inv_t == 0.5f;
  if (st.e1_squared) {
    double lz1;
    st.lzs_d = row_log_sum_exp<true>(xs, st.Vp, st.ms, st.inv_t, w.es.data(), &lz1);
    st.lz1 = static_cast<float>(lz1);
  } else {
    st.lzs_d = row_log_sum_exp(xs, st.Vp, st.ms, st.inv_t, w.es.data());
  }
  st.es = w.es.data();
  st.lzs = static_cast<float>(st.lzs_d);
  st.js = row_argmax(xs, st.Vp, st.ms);
  st.log_zs_zt = log_zs_over_zt(st, p.divergence);
  if (hard) hard_ce_stats(st, p.label_smoothing, w.e1.data());
  if (st.nt > 1) {
    float* et[kMaxTeachers] = {w.et.data()};
    for (int i = 1; i < st.nt; ++i) et[i] = w.ets[i].data();
    teacher_mixture(p, st, et, w.lp.data());
    st.lp = w.lp.data();
  }
  return true;
}

// The per-entry math of a row, one vector of entries at offset v at a time: log-probabilities
// and probabilities of the student (q) and the teacher (p; a mixture for several teachers), the
// accurate log-ratio d = log p - log q, and the divergences' terms.
struct RowTerms {
  const RowStats& st;
  const bool mixed;
  const Divergence div;
  const float beta;
  const bool flip;  // JSD: beta > 1/2 (see jsd_logs)
  const Vec zero, vms, vinv, vlzs, vmt0, vlzt0, vinv_zs, vinv_zt0, vbeta, vomb, vbs, vratio,
      vnlog_bs, vdm, vdl, half;

  RowTerms(const RowStats& s, const LogitKDParams& p)
      : st(s), mixed(s.nt > 1), div(p.divergence), beta(p.beta), flip(p.beta > 0.5f), zero(0.f), vms(s.ms),
        vinv(s.inv_t), vlzs(s.lzs), vmt0(s.mt[0]), vlzt0(s.lzt[0]), vinv_zs(std::exp(-s.lzs)),
        vinv_zt0(std::exp(-s.lzt[0])), vbeta(p.beta), vomb(1.f - p.beta),
        vbs(std::min(p.beta, 1.f - p.beta)),
        vratio((1.f - std::min(p.beta, 1.f - p.beta)) / std::min(p.beta, 1.f - p.beta)),
        vnlog_bs(-std::log(std::min(p.beta, 1.f - p.beta))), vdm(s.mt[0] - s.ms),
        vdl(static_cast<float>(s.log_zs_zt)), half(0.5f) {}

  FASTKD_INLINE Vec logq(int64_t v) const { return (Vec::loadu(st.xs + v) - vms) * vinv - vlzs; }
  FASTKD_INLINE Vec logp(int64_t v) const {
    return mixed ? Vec::loadu(st.lp + v) : (Vec::loadu(st.xt[0] + v) - vmt0) * vinv - vlzt0;
  }
  FASTKD_INLINE Vec logpi(int i, int64_t v) const {
    return (Vec::loadu(st.xt[i] + v) - Vec(st.mt[i])) * vinv - Vec(st.lzt[i]);
  }
  // Probabilities: the cached exponentials times 1/Z; for several teachers the cached mixture.
  FASTKD_INLINE Vec q(int64_t v) const { return Vec::loadu(st.es + v) * vinv_zs; }
  FASTKD_INLINE Vec p(int64_t v) const {
    return mixed ? Vec::loadu(st.et + v) : Vec::loadu(st.et + v) * vinv_zt0;
  }

  // q - p without cancelling when both are close to 1: p expm1(-d) from the series where
  // |d| < 1/2 (ser = phi_series(d), d = log p - log q from d()); elsewhere q and p differ by a
  // third or more and q - p is accurate.
  FASTKD_INLINE Vec q_minus_p(const Vec& qv, const Vec& pv, const Vec& d, const Vec& ser) const {
    return Vec::blendv(qv - pv, pv * (d * d * ser - d), d.abs() < half);
  }
  // d = log p - log q. One teacher: from the raw difference t - s and log(Zs / Zt) (unrounded),
  // so a student close to its teacher keeps d to float32 precision rather than to
  // eps * |log p|.
  FASTKD_INLINE Vec d(int64_t v, const Vec& lpv, const Vec& lqv) const {
    if (mixed) return lpv - lqv;
    return ((Vec::loadu(st.xt[0] + v) - Vec::loadu(st.xs + v)) - vdm) * vinv + vdl;
  }
  // KL and reverse KL loss terms: KL(p||q) = sum_{p != 0} p phi(d) + sum_{p == 0} q with
  // phi(d) = d + expm1(-d) >= 0 (since sum p exp(-d) = sum_{p != 0} q): every term is >= 0, so
  // a small divergence (large T, a student near its teacher) is not the difference of terms of
  // size |d|, and a common rounding of d (from log Z) cancels to first order. phi: the series
  // (ser = phi_series(dv)) for |d| < 1/2, else p d + (q - p). The tests are != 0 so that NaN
  // propagates (SPEC).
  // Returns a phi(d) + (b - a) [a phi(d) with b = a exp(-d), b given]; a where a != 0, else b.
  FASTKD_INLINE Vec kl_terms(const Vec& a, const Vec& b, const Vec& dv, const Vec& ser) const {
    const Vec small = a * (dv * dv * ser);
    const Vec large = a * dv + (b - a);
    return Vec::blendv(b, Vec::blendv(large, small, dv.abs() < half), a != zero);
  }
  FASTKD_INLINE Vec kl_terms(const Vec& a, const Vec& b, const Vec& dv) const {
    return kl_terms(a, b, dv, phi_series(dv));
  }
  // JSD: lqm = log(q / m) and lpm = log(p / m), m = beta p + (1 - beta) q, from d = log p -
  // log q, with one exp and one log1p. With a the side of the smaller weight bs = min(beta,
  // 1 - beta) (q when beta <= 1/2, else p) and dm = log(other / a) (d, or -d when flipped):
  //   log(a / m) = -log1p(bs expm1(dm)), accurate relative to itself (expm1 by the series for
  //   |dm| < 1/2), and log(other / m) = log(a / m) + dm, whose cancellation is at most a factor
  //   (2 - bs) / (1 - bs) <= 3;
  // for dm >= 8 the other side first: log(other / m) = -log bs - log1p((1 - bs) / bs exp(-dm)),
  // then log(a / m) = log(other / m) - dm (no cancellation there, and no overflow of
  // exp(dm)). Masked entries (dm = +-inf) give the limits; NaN propagates.
  FASTKD_INLINE void jsd_logs(const Vec& dv, Vec& lqm, Vec& lpm) const {
    const Vec one(1.f);
    const Vec dm = flip ? zero - dv : dv;
    const Vec upper = dm >= Vec(8.f);
    const Vec e = fast_exp(Vec::blendv(dm, zero - dm, upper));
    const Vec em = Vec::blendv(e - one, expm1_small(dm), dm.abs() < half);
    const Vec l = fast_log1p(Vec::blendv(vbs * em, vratio * e, upper));
    const Vec other = Vec::blendv(dm - l, vnlog_bs - l, upper);
    const Vec a = Vec::blendv(zero - l, other - dm, upper);
    lqm = flip ? other : a;
    lpm = flip ? a : other;
  }
  // Student-side per-entry value x_v whose softmax gradient is q_v (x_v - sum q x) (RKL; JSD,
  // where it is log(q / m), without the factor 1 - beta).
  FASTKD_INLINE Vec student_x(int64_t v, const Vec& lqv, const Vec& lpv) const {
    if (div == Divergence::ReverseKL) return lqv - lpv;
    Vec lqm, lpm;
    jsd_logs(d(v, lpv, lqv), lqm, lpm);
    return lqm;
  }
  // Teacher-side "g" (d D / d p up to a constant) for KL and JSD (log(p / m); the factor beta
  // is applied with the gradient's coefficient, so that g - g* is exactly 0 at the dominant
  // entry: a product here could be fused into an FMA in one place and not in another).
  FASTKD_INLINE Vec teacher_g(int64_t v, const Vec& lpv, const Vec& lqv) const {
    if (div == Divergence::KL) return lpv - lqv;
    Vec lqm, lpm;
    jsd_logs(d(v, lpv, lqv), lqm, lpm);
    return lpm;
  }
  // p_i g for reverse KL: -q p_i / p, not p_i * (-q / p): with saturated rows q / p overflows
  // while p_i underflows (lost: -q). (The guard is log p_i > -inf: p_i itself may underflow to
  // 0 where -q p_i / p does not.) `rest`: what is subtracted from g (shift and row sum).
  FASTKD_INLINE Vec rkl_teacher(const Vec& qv, const Vec& lqv, const Vec& lpv, const Vec& lpi,
                                const Vec& pi, const Vec& rest) const {
    return sel(lpi > Vec(kNegInf), sel(qv > zero, zero - fast_exp(lqv + lpi - lpv)) - pi * rest);
  }
};

// The gradient's per-row constants.
struct RowGrad {
  bool student = false;                    // grad_student wanted
  bool teacher[kMaxTeachers] = {};         // grad_teacher[i] wanted
  bool student_sum = false;                // the student gradient needs sum q (x - x*)
  bool teacher_sum = false;                // the teacher gradients need sum p_i (g - g*_i)
  bool fused = false;                      // KL student gradient written in sweep 2
  bool hard = false;
  float c = 0.f;                           // soft_factor / T
  float scale = 1.f;                       // *grad_scale
  float x_star = 0.f, g_star[kMaxTeachers] = {};  // shifts at the dominant entries
};

// The CE gradient dCE/ds_v = q1_v * a1 - (1-eps)[v==y] - (eps/V)[s_v finite], times a factor f
// (hard_weight * grad_scale), without the [v==y] term (added at y alone: y_term).
struct HardCEGrad {
  const float *xs, *e1;
  bool square;  // e1 holds exp((s - max) / 2) (T = 2)
  float eps, y_term;
  Vec va1z, vninf, veps_v;
  HardCEGrad(const RowStats& st, float eps_, float f)
      : xs(st.xs), e1(st.e1), square(st.e1_squared), eps(eps_), y_term(f * (1.f - eps_)),
        va1z(f * (1.f - eps_ + eps_ * st.n_finite / static_cast<float>(st.V)) *
             std::exp(-st.lz1)),
        vninf(kNegInf), veps_v(f * eps_ / static_cast<float>(st.V)) {}
  FASTKD_INLINE Vec at(int64_t v) const {
    Vec e = Vec::loadu(e1 + v);
    if (square) e = e * e;
    Vec d = e * va1z;  // a1 / Z1: q1 = e1 / Z1
    if (eps != 0.f) d = d - sel(Vec::loadu(xs + v) != vninf, veps_v);
    return d;
  }
};

// The vector formula f evaluated where entry j lies, at j.
template <typename F>
float scalar_at(int64_t j, F&& f) {
  const int64_t base = j / kW * kW;
  float b[kW];
  f(base).store(b);
  return b[j - base];
}

// Gradients through a softmax have the form w_v (g_v - sum_u w_u g_u) (w = q or p_i). For a
// confident row the dominant entry's g_v nearly equals the sum, and the difference would cancel
// to noise in float32. Every such sum is therefore taken of g_u - g_*, with g_* the value at the
// dominant entry of w (its argmax), which is exact algebra (sum w = 1) without the cancellation.
void dominant_shifts(const RowTerms& T, RowGrad& rg) {
  const RowStats& st = T.st;
  if (rg.student_sum)
    rg.x_star = scalar_at(st.js, [&](int64_t v) { return T.student_x(v, T.logq(v), T.logp(v)); });
  if (!rg.teacher_sum) return;
  for (int i = 0; i < st.nt; ++i) {
    if (!rg.teacher[i]) continue;
    rg.g_star[i] = scalar_at(st.jt[i], [&](int64_t v) {
      const Vec lqv = T.logq(v), lpv = T.logp(v);
      if (T.div == Divergence::ReverseKL)  // g = -q / p
        return T.zero - fast_exp(lqv - lpv);
      return T.teacher_g(v, lpv, lqv);
    });
  }
}

// Sweep 2's row sums: sums[0] = D (TVD: sum |p - q|; JSD: sum p log(p/m)); sums[1] = JSD:
// sum q log(q/m); sums[2] = sum q (x - x*) (RKL, JSD), TVD: q mass where p > q; sums[3], sums[4]:
// TVD q mass where p < q and p == q. Teacher i: sums[5 + 3i] = sum p_i (g - g*_i), TVD: p_i
// class masses.
constexpr int kSums = 5 + 3 * kMaxTeachers;

// Sweep 2: the divergence and the row sums the gradient needs. Into g (Vp entries): for KL
// without teacher gradients the finished student gradient, which needs no row sum; for JSD with
// a student gradient x = log(q/m), so that sweep 3 need not compute it again.
void divergence_sums(const RowTerms& terms, const RowGrad& rg_in, const HardCEGrad& ce_in,
                     float* g, double (&sums)[kSums]) {
  // Local copies: the stores to g could alias the Vec members of the originals, whose values
  // would then be reloaded in the loop; locals stay in registers.
  const RowTerms T = terms;
  const RowGrad rg = rg_in;
  const HardCEGrad ce = ce_in;
  const RowStats& st = T.st;
  const Vec zero = T.zero, vxs(rg.x_star), vcs(rg.c * rg.scale);
  const bool write_kl = rg.fused && rg.student;
  const bool write_x = T.div == Divergence::JSD && rg.student;
  for (int k = 0; k < kSums; ++k) sums[k] = 0.0;
  for (int64_t b = 0; b < st.Vp; b += kSumBlock) {
    Vec acc[kSums];
    for (auto& a : acc) a = zero;
    const int64_t e = std::min(st.Vp, b + kSumBlock);
    for (int64_t v = b; v < e; v += kW) {
      const Vec lqv = T.logq(v), lpv = T.logp(v);
      const Vec qv = T.q(v), pv = T.p(v);
      Vec lqm, lpm;  // JSD
      switch (T.div) {
        case Divergence::KL: {
          const Vec dd = T.d(v, lpv, lqv), ser = phi_series(dd);
          acc[0] = acc[0] + T.kl_terms(pv, qv, dd, ser);
          if (write_kl) {
            Vec gv = vcs * T.q_minus_p(qv, pv, dd, ser);
            if (rg.hard) gv = gv + ce.at(v);
            gv.store(g + v);
          }
          break;
        }
        case Divergence::ReverseKL:
          acc[0] = acc[0] + T.kl_terms(qv, pv, zero - T.d(v, lpv, lqv));
          if (rg.student_sum) acc[2] = acc[2] + sel(qv > zero, qv * (lqv - lpv - vxs));
          break;
        case Divergence::JSD: {
          // KL(p||m) and KL(q||m) as kl_terms of log(p/m) and log(q/m) (see jsd_logs).
          T.jsd_logs(T.d(v, lpv, lqv), lqm, lpm);
          const Vec mv = T.vbeta * pv + T.vomb * qv;
          acc[0] = acc[0] + T.kl_terms(pv, mv, lpm);
          acc[1] = acc[1] + T.kl_terms(qv, mv, lqm);
          if (rg.student_sum) acc[2] = acc[2] + sel(qv > zero, qv * (lqm - vxs));
          if (write_x) lqm.store(g + v);
          break;
        }
        case Divergence::TVD: {
          // Sign classes of p - q from the sign of d = log p - log q (accurate, see d()), not
          // from the separately rounded p and q: a student near its teacher keeps its classes.
          const Vec dd = T.d(v, lpv, lqv);
          const Vec gt = dd > zero, lt = dd < zero, eq = dd == zero;
          acc[0] = acc[0] + T.q_minus_p(qv, pv, dd, phi_series(dd)).abs();
          acc[2] = acc[2] + sel(gt, qv);
          acc[3] = acc[3] + sel(lt, qv);
          acc[4] = acc[4] + sel(eq, qv);
          for (int i = 0; i < st.nt; ++i) {
            if (!rg.teacher[i]) continue;
            const Vec pi = fast_exp(T.logpi(i, v));
            acc[5 + 3 * i] = acc[5 + 3 * i] + sel(gt, pi);
            acc[6 + 3 * i] = acc[6 + 3 * i] + sel(lt, pi);
            acc[7 + 3 * i] = acc[7 + 3 * i] + sel(eq, pi);
          }
          break;
        }
      }
      if (rg.teacher_sum) {
        for (int i = 0; i < st.nt; ++i) {
          if (!rg.teacher[i]) continue;
          const Vec lpi = T.logpi(i, v), pi = fast_exp(lpi);
          Vec pg;  // p_i (g - g*_i)
          if (T.div == Divergence::ReverseKL)
            pg = T.rkl_teacher(qv, lqv, lpv, lpi, pi, Vec(rg.g_star[i]));
          else if (T.div == Divergence::JSD)
            pg = sel(pi > zero, pi * (lpm - Vec(rg.g_star[i])));
          else
            pg = sel(pi > zero, pi * ((lpv - lqv) - Vec(rg.g_star[i])));
          acc[5 + 3 * i] = acc[5 + 3 * i] + pg;
        }
      }
    }
    for (int k = 0; k < kSums; ++k) sums[k] += hsum(acc[k]);
  }
}

// The row's loss: soft_factor D + hard_weight CE.
float row_loss(const LogitKDParams& p, const RowStats& st, const double (&sums)[kSums], bool hard,
               int64_t y) {
  float D;
  switch (p.divergence) {
    case Divergence::JSD:
      D = static_cast<float>(p.beta * sums[0] + (1.0 - p.beta) * sums[1]);
      break;
    case Divergence::TVD: D = static_cast<float>(0.5 * sums[0]); break;
    default: D = static_cast<float>(sums[0]);
  }
  float loss = p.soft_factor * D;
  if (hard) {
    const float eps = p.label_smoothing;
    const float nll = -(st.xs[y] - st.ms - st.lz1);
    float ce = nll;
    if (eps != 0.f) {
      // sum over finite v of -(s_v - ms - lz1) = -finite_sum + n_finite (ms + lz1)
      const float smooth =
          (-st.finite_sum + st.n_finite * (st.ms + st.lz1)) / static_cast<float>(st.V);
      ce = (1.f - eps) * nll + eps * smooth;
    }
    loss += p.hard_weight * ce;
  }
  return loss;
}

// Sweep 3, student: the divergence's gradient (unless sweep 2 wrote it) plus the hard CE's, all
// times grad_scale, into g (Vp entries; g is the output row itself for float32 rows of whole
// vectors, else scratch copied to out).
template <typename TS>
void student_gradient(const RowTerms& terms, const RowGrad& rg_in, const HardCEGrad& ce_in,
                      int64_t y, const double (&sums)[kSums], float* g, TS* out) {
  const RowTerms T = terms;  // local copies, see divergence_sums
  const RowGrad rg = rg_in;
  const HardCEGrad ce = ce_in;
  const RowStats& st = T.st;
  const Vec zero = T.zero, vxs(rg.x_star);
  const Vec vcs(rg.c * rg.scale), vcs_jsd = vcs * T.vomb;
  if (!rg.fused) {
    // TVD: h_v - sum_u q_u h_u per sign class of p_v - q_v, from the class masses (no
    // cancellation).
    const float qa = static_cast<float>(sums[2]), qb = static_cast<float>(sums[3]),
                qc = static_cast<float>(sums[4]);
    const Vec tvd_gt(-qb - 0.5f * qc), tvd_lt(qa + 0.5f * qc), tvd_eq(0.5f * (qa - qb));
    const Vec vx_sum(static_cast<float>(sums[2]));  // x - x* first, then - S (see above)
    for (int64_t v = 0; v < st.Vp; v += kW) {
      const Vec lqv = T.logq(v), lpv = T.logp(v);
      const Vec qv = T.q(v);
      Vec gv;
      switch (T.div) {
        case Divergence::KL: {
          const Vec dd = T.d(v, lpv, lqv);
          gv = vcs * T.q_minus_p(qv, T.p(v), dd, phi_series(dd));
          break;
        }
        case Divergence::ReverseKL:
          gv = vcs * sel(qv > zero, qv * (((lqv - lpv) - vxs) - vx_sum));
          break;
        case Divergence::JSD:  // g holds x = log(q/m) from sweep 2
          gv = vcs_jsd * sel(qv > zero, qv * ((Vec::loadu(g + v) - vxs) - vx_sum));
          break;
        default: {
          const Vec dv = T.d(v, lpv, lqv);
          gv = vcs * (qv * Vec::blendv(Vec::blendv(tvd_eq, tvd_lt, dv < zero), tvd_gt, dv > zero));
          break;
        }
      }
      if (rg.hard) gv = gv + ce.at(v);
      gv.store(g + v);
    }
  }
  if (rg.hard) g[y] -= ce.y_term;
  if (static_cast<void*>(g) != static_cast<void*>(out)) store_row(g, st.V, out);
}

// Sweep 3, teacher i: p_i (g - g*_i - S_i) times soft_factor / T, the weight and grad_scale,
// into g and then grad_teacher[i] (when g is not out itself).
template <typename TT>
void teacher_gradient(const RowTerms& terms, const RowGrad& rg, int i, float wi,
                      const double (&sums)[kSums], float* g, TT* out) {
  const RowTerms T = terms;  // a local copy, see divergence_sums
  const RowStats& st = T.st;
  if (wi == 0.f) {
    if (out) zero_row(out, st.V);
    return;
  }
  const Vec zero = T.zero;
  const Vec coef(rg.c * wi * rg.scale * (T.div == Divergence::JSD ? T.beta : 1.f));
  const Vec vgs(rg.g_star[i]);
  const Vec vS(static_cast<float>(sums[5 + 3 * i]));
  const float pa = static_cast<float>(sums[5 + 3 * i]), pb = static_cast<float>(sums[6 + 3 * i]),
              pc = static_cast<float>(sums[7 + 3 * i]);
  const Vec t_gt(pb + 0.5f * pc), t_lt(-pa - 0.5f * pc), t_eq(-0.5f * (pa - pb));
  for (int64_t v = 0; v < st.Vp; v += kW) {
    const Vec lqv = T.logq(v), lpv = T.logp(v);
    const Vec qv = T.q(v);
    const Vec lpi = T.logpi(i, v), pi = fast_exp(lpi);
    Vec pg;  // p_i (g - g* - S)
    switch (T.div) {
      case Divergence::TVD: {
        const Vec dv = T.d(v, lpv, lqv);
        pg = sel(pi > zero, pi * Vec::blendv(Vec::blendv(t_eq, t_lt, dv < zero), t_gt, dv > zero));
        break;
      }
      case Divergence::ReverseKL: pg = T.rkl_teacher(qv, lqv, lpv, lpi, pi, vgs + vS); break;
      default: pg = sel(pi > zero, pi * (T.teacher_g(v, lpv, lqv) - vgs - vS));
    }
    (coef * pg).store(g + v);
  }
  if (out && static_cast<void*>(g) != static_cast<void*>(out)) store_row(g, st.V, out);
}

// Teacher i of a log mixture: w_i times the mixture's gradient g (d/dt_i = w_i d/dy).
template <typename TT>
void store_scaled_row(const float* g, int64_t n, float wi, TT* out) {
  if (wi == 0.f) return zero_row(out, n);
  constexpr int64_t kTile = 1024;
  float tile[kTile];
  const Vec vw(wi);
  for (int64_t b = 0; b < n; b += kTile) {
    const int64_t m = std::min(kTile, n - b);
    for (int64_t v = 0; v < m; v += kW) (Vec::loadu(g + b + v) * vw).store(tile + v);
    store_row(tile, m, out + b);
  }
}

// One row: its loss into row_loss[r] and its gradients.
template <typename TS, typename TT>
void kd_row(const LogitKDParams& p, int64_t r, Scratch& w, int* flags) {
  const int64_t V = p.vocab;
  const int nt = p.num_teachers;
  TS* gs_out = p.grad_student ? static_cast<TS*>(p.grad_student) + r * V : nullptr;
  TT* gt_out[kMaxTeachers];
  RowGrad rg;
  bool need_t = false;
  for (int i = 0; i < nt; ++i) {
    gt_out[i] = p.grad_teacher[i] ? static_cast<TT*>(p.grad_teacher[i]) + r * V : nullptr;
    rg.teacher[i] = gt_out[i] != nullptr;
    need_t = need_t || rg.teacher[i];
  }
  auto zero_outputs = [&]() {
    p.row_loss[r] = 0.f;
    if (gs_out) zero_row(gs_out, V);
    for (int i = 0; i < nt; ++i)
      if (gt_out[i]) zero_row(gt_out[i], V);
  };
  int64_t y;
  if (!cpu::counted_row(p.target, p.ignore_index, V, r, flags, y)) return zero_outputs();
  const bool hard = p.target && p.hard_weight != 0.f;

  RowStats st;
  if (!row_statistics<TS, TT>(p, r, hard, w, flags, st)) return zero_outputs();
  const bool log_mix = st.nt != nt;  // the row is now the one teacher y (row_statistics)
  if (log_mix) {
    // y's gradient is needed when some teacher of positive weight wants its gradient.
    need_t = false;
    for (int i = 0; i < nt; ++i) {
      need_t = need_t || (rg.teacher[i] && p.teacher_weight[i] > 0.f);
      rg.teacher[i] = false;
    }
    rg.teacher[0] = need_t;
  }
  const RowTerms T(st, p);
  const Divergence div = p.divergence;
  rg.student = gs_out != nullptr;
  rg.student_sum = rg.student && (div == Divergence::ReverseKL || div == Divergence::JSD);
  rg.teacher_sum = need_t && div != Divergence::TVD;
  rg.fused = div == Divergence::KL && !need_t;
  rg.hard = hard;
  rg.c = p.soft_factor * st.inv_t;
  rg.scale = p.grad_scale ? *p.grad_scale : 1.f;
  dominant_shifts(T, rg);

  const HardCEGrad ce(st, p.label_smoothing, p.hard_weight * rg.scale);
  // Gradients are built in place in float32 output rows of whole vectors, else in scratch.
  const bool direct = V % kW == 0;
  float* g = w.g.data();
  float* gs = g;
  if constexpr (std::is_same_v<TS, float>)
    if (direct && gs_out) gs = gs_out;
  double sums[kSums];
  divergence_sums(T, rg, ce, gs, sums);
  p.row_loss[r] = row_loss(p, st, sums, hard, y);

  if (gs_out) student_gradient(T, rg, ce, y, sums, gs, gs_out);
  if (log_mix) {
    if (need_t) teacher_gradient(T, rg, 0, 1.f, sums, g, static_cast<TT*>(nullptr));
    for (int i = 0; i < nt; ++i)
      if (gt_out[i]) store_scaled_row(g, V, need_t ? p.teacher_weight[i] : 0.f, gt_out[i]);
    return;
  }
  for (int i = 0; i < nt; ++i) {
    if (!gt_out[i]) continue;
    float* gt = g;
    if constexpr (std::is_same_v<TT, float>)
      if (direct) gt = gt_out[i];
    teacher_gradient(T, rg, i, p.teacher_weight[i], sums, gt, gt_out[i]);
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
    w.et.resize(Vp);
    if (p.num_teachers > 1) w.lp.resize(Vp);
    if (p.num_teachers > 1 && !p.log_mixture) {
      w.ets.resize(p.num_teachers);
      for (int i = 1; i < p.num_teachers; ++i) w.ets[i].resize(Vp);
    }
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
