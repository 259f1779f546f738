// Fused KD against a sparse top-k teacher on the CPU (math: csrc/include/fastkd/logit_topk.h).
//
// Rows are spread over threads with at::parallel_for. Per row: the student row is converted to a
// float32 scratch row; its max is taken; the listed entries are then set to -inf in the scratch,
// so that one exponential sweep gives the residual bucket's mass directly, relative to the max
// of the unlisted entries (a sum of positive terms, never total - listed, which would cancel for
// a tiny residual), while the listed entries' log-probabilities come from their k logits. The divergence and its bucket gradients are computed in
// double on the k + 1 buckets; a last sweep writes the gradient of the unlisted entries and the
// k listed entries are then written exactly.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/vec_rows.h"
#include "fastkd/logit_topk.h"

namespace fastkd {
namespace {

using cpu::block_sums;
using cpu::kNegInf;
using cpu::kW;
using cpu::Vec;

struct TopKScratch {
  std::vector<float> z;               // the student row (listed entries -inf after stats)
  std::vector<float> e;               // exp((s - m_rest) / T) of the unlisted entries
  std::vector<double> s_list;         // the listed entries' logits
  std::vector<double> logp, logq, g;  // k + 1 buckets: teacher, student, dD/dlog Q
};

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)), -inf when both are.
double log_add(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

// D(P, Q) over the buckets and g_b = dD / dlog Q_b (SPEC §1 divergences; JSD at beta 0 / 1 is
// mapped to the KLs by the caller).
double bucket_divergence(Divergence div, double beta, const std::vector<double>& logp,
                         const std::vector<double>& logq, std::vector<double>& g) {
  const size_t n = logp.size();
  double d = 0.0, d2 = 0.0;
  const double lb = std::log(beta), l1b = std::log1p(-beta);
  for (size_t b = 0; b < n; ++b) {
    const double lp = logp[b], lq = logq[b];
    const double p = std::exp(lp), q = std::exp(lq);
    switch (div) {
      case Divergence::KL:
        if (p > 0) d += p * (lp - lq);
        g[b] = -p;
        break;
      case Divergence::ReverseKL:
        if (q > 0) d += q * (lq - lp);
        g[b] = q > 0 ? q * (lq - lp + 1.0) : 0.0;
        break;
      case Divergence::JSD: {
        const double lm = log_add(lp + lb, lq + l1b);
        if (p > 0) d += p * (lp - lm);
        if (q > 0) d2 += q * (lq - lm);
        g[b] = q > 0 ? (1.0 - beta) * q * (lq - lm) : 0.0;
        break;
      }
      case Divergence::TVD:
        d += std::abs(p - q);
        g[b] = 0.5 * q * (q > p ? 1.0 : (q < p ? -1.0 : 0.0));
        break;
    }
  }
  if (div == Divergence::JSD) return beta * d + (1.0 - beta) * d2;
  if (div == Divergence::TVD) return 0.5 * d;
  return d;
}

// The row's statistics. m: the row max; m_rest: the max of the unlisted entries (-inf when none
// is finite). rest: sum of exp((s - m_rest) / T) over the unlisted entries, relative to their
// own max so that a residual far below the listed entries keeps its value; total: sum of
// exp((s - m) / T) over the row; for the hard CE the sum of exp(s - m) and the count and sum of
// (s - m) over the finite entries.
struct TopKStats {
  float m = 0.f, m_rest = 0.f;
  double rest = 0.0, rest_scale = 0.0, total = 0.0;  // rest_scale = exp((m_rest - m) / T)
  double z1 = 0.0, n_finite = 0.0, finite_sum = 0.0;
};

template <typename TS>
bool row_stats(const LogitTopKParams& p, int64_t r, bool hard, TopKScratch& w, TopKStats& st) {
  const int64_t V = p.vocab, Vp = cpu::padded_length(V), k = p.k;
  const int64_t* idx = p.indices + r * k;
  float* z = w.z.data();
  cpu::load_row(static_cast<const TS*>(p.student) + r * p.student_stride, V, Vp, z);
  st.m = cpu::row_max(z, Vp);
  if (st.m == kNegInf) return false;  // -inf everywhere (NaN rows go on and give NaN)
  const double inv_t = 1.0 / p.temperature;
  const bool smooth = hard && p.label_smoothing != 0.f;
  const bool sep_z1 = hard && p.temperature != 1.f;
  double listed_total = 0.0, listed_z1 = 0.0, listed_fin = 0.0, listed_fsum = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    if (idx[j] < 0) {  // an empty slot: Q_j = 0
      w.s_list[j] = -kInf;
      continue;
    }
    const double s = z[idx[j]];
    w.s_list[j] = s;
    listed_total += std::exp((s - st.m) * inv_t);
    if (sep_z1) listed_z1 += std::exp(s - st.m);
    if (smooth && s != -kInf) {
      listed_fin += 1.0;
      listed_fsum += s - st.m;
    }
    z[idx[j]] = kNegInf;
  }
  st.m_rest = cpu::row_max(z, Vp);
  const bool empty = st.m_rest == kNegInf;
  const Vec vm(st.m), vr(empty ? 0.f : st.m_rest), vi(static_cast<float>(inv_t)),
      ninf(kNegInf), one(1.f);
  float* e = w.e.data();
  double sums[4];
  block_sums<4>(Vp, [&](int64_t v, Vec* acc) {
    const Vec x = Vec::loadu(z + v);
    const Vec ev = ((x - vr) * vi).exp();
    ev.store(e + v);
    acc[0] = acc[0] + ev;
    if (sep_z1) acc[1] = acc[1] + (x - vm).exp();
    if (smooth) {
      const Vec fin = x != ninf;
      acc[2] = acc[2] + cpu::sel(fin, one);
      acc[3] = acc[3] + cpu::sel(fin, x - vm);
    }
  }, sums);
  st.rest = empty ? 0.0 : sums[0];
  st.rest_scale = empty ? 0.0 : std::exp((static_cast<double>(st.m_rest) - st.m) * inv_t);
  st.total = st.rest * st.rest_scale + listed_total;
  st.z1 = sep_z1 ? sums[1] + listed_z1 : st.total;
  st.n_finite = sums[2] + listed_fin;
  st.finite_sum = sums[3] + listed_fsum;
  return true;
}

// The k + 1 bucket log-probabilities of both sides; returns the divergence and fills w.g.
double bucket_terms(const LogitTopKParams& p, int64_t r, const TopKStats& st, TopKScratch& w) {
  const int64_t k = p.k;
  const float* lp = p.logprobs + r * k;
  const double inv_t = 1.0 / p.temperature;
  const double log_total = std::log(st.total);
  double listed_p = 0.0;
  const int64_t* idx = p.indices + r * k;
  for (int64_t j = 0; j < k; ++j) {
    w.logp[j] = idx[j] < 0 ? -kInf : lp[j];  // an empty slot's logprob is not read
    listed_p += std::exp(w.logp[j]);
    w.logq[j] = (w.s_list[j] - st.m) * inv_t - log_total;  // -inf for a -inf logit
  }
  const bool empty = !(st.rest > 0.0);  // also NaN: the row's NaN reaches the loss elsewhere
  const double p_res = empty ? 0.0 : std::max(0.0, 1.0 - listed_p);
  w.logp[k] = p_res > 0 ? std::log(p_res) : -kInf;
  w.logq[k] = empty ? -kInf
                    : std::log(st.rest) + (static_cast<double>(st.m_rest) - st.m) * inv_t -
                          log_total;
  Divergence div = p.divergence;
  if (div == Divergence::JSD && (p.beta == 0.f || p.beta == 1.f))
    div = p.beta == 0.f ? Divergence::KL : Divergence::ReverseKL;
  const double d = bucket_divergence(div, p.beta, w.logp, w.logq, w.g);
  if (empty) w.g[k] = 0.0;
  return d;
}

template <typename TS>
void topk_row(const LogitTopKParams& p, int64_t r, TopKScratch& w, int* flags) {
  const int64_t V = p.vocab, Vp = cpu::padded_length(V), k = p.k;
  TS* g_out = p.grad_student ? static_cast<TS*>(p.grad_student) + r * V : nullptr;
  auto zero_outputs = [&]() {
    p.row_loss[r] = 0.f;
    if (g_out) cpu::zero_row(g_out, V);
  };
  int64_t y;
  if (!cpu::counted_row(p.target, p.ignore_index, V, r, flags, y)) return zero_outputs();
  const bool hard = p.target && p.hard_weight != 0.f;
  TopKStats st;
  if (!row_stats<TS>(p, r, hard, w, st)) {
    *flags |= kFlagStudentAllMasked;
    return zero_outputs();
  }
  const double d = bucket_terms(p, r, st, w);
  const double eps = p.label_smoothing;
  const double lz1 = std::log(st.z1);
  double ce = 0.0;
  double s_y = 0.0;
  if (hard) {
    s_y = static_cast<const TS*>(p.student)[r * p.student_stride + y];
    ce = (1.0 - eps) * (lz1 - (s_y - st.m));
    if (eps != 0.0) ce += eps * (st.n_finite * lz1 - st.finite_sum) / static_cast<double>(V);
  }
  p.row_loss[r] = static_cast<float>(p.soft_factor * d + (hard ? p.hard_weight * ce : 0.0));
  if (!g_out) return;

  // Gradient: dD/dz_v = g_res e_v / rest [v unlisted] + g_j [v = idx_j] - G q_v, with e the
  // unlisted exponentials relative to m_rest (q_v = e_v rest_scale / total there).
  const double scale = p.grad_scale ? *p.grad_scale : 1.0;
  const double inv_t = 1.0 / p.temperature;
  const double cs = p.soft_factor * inv_t * scale;
  double big_g = 0.0;
  for (int64_t b = 0; b <= k; ++b) big_g += w.g[b];
  const double a_soft =
      st.rest > 0 ? cs * (w.g[k] / st.rest - big_g * st.rest_scale / st.total) : 0.0;
  const double hw = hard ? p.hard_weight * scale : 0.0;
  const double c1 = hard ? hw * (1.0 - eps + eps * st.n_finite / V) / st.z1 : 0.0;
  const double c_fin = hard ? hw * eps / V : 0.0;
  const bool sep_z1 = hard && p.temperature != 1.f;
  float* z = w.z.data();
  float* e = w.e.data();  // the gradient is written over the exponentials
  // At T = 1 the hard CE's exp(s - m) of an unlisted entry is e_v * rest_scale.
  const Vec va(static_cast<float>(a_soft)), vc1(static_cast<float>(c1)),
      vc1r(static_cast<float>(c1 * st.rest_scale)), vfin(static_cast<float>(c_fin)), vm(st.m),
      ninf(kNegInf);
  for (int64_t v = 0; v < Vp; v += kW) {
    const Vec x = Vec::loadu(z + v);
    const Vec ev = Vec::loadu(e + v);
    Vec g = ev * va;
    if (hard) {
      g = g + (sep_z1 ? (x - vm).exp() * vc1 : ev * vc1r);
      if (c_fin != 0.0) g = g - cpu::sel(x != ninf, vfin);
    }
    g.store(e + v);
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t v = p.indices[r * k + j];
    if (v < 0) continue;
    const double q_j = std::exp(w.logq[j]);
    double g = cs * (w.g[j] - big_g * q_j);
    if (hard) {
      const double s = w.s_list[j];
      g += c1 * std::exp(s - st.m) - (s != -kInf ? c_fin : 0.0);
    }
    e[v] = static_cast<float>(g);
  }
  if (hard) e[y] -= static_cast<float>(hw * (1.0 - eps));
  cpu::store_row(e, V, g_out);
}

template <typename TS>
void run(const LogitTopKParams& p) {
  const int64_t Vp = cpu::padded_length(p.vocab);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  int flags = 0;
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    TopKScratch w;
    w.z.resize(Vp);
    w.e.resize(Vp);
    w.s_list.resize(p.k);
    w.logp.resize(p.k + 1);
    w.logq.resize(p.k + 1);
    w.g.resize(p.k + 1);
    int local = 0;
    for (int64_t r = begin; r < end; ++r) topk_row<TS>(p, r, w, &local);
    if (local) {
#pragma omp atomic
      flags |= local;
    }
  });
  *p.flags |= flags;
}

}  // namespace

void logit_topk_cpu(const LogitTopKParams& p) {
  switch (p.student_dtype) {
    case DType::F32: return run<float>(p);
    case DType::BF16: return run<c10::BFloat16>(p);
    case DType::F16: return run<c10::Half>(p);
  }
}

}  // namespace fastkd
