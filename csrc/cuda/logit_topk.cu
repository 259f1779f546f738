// Fused KD against a sparse top-k teacher on CUDA (math: fastkd/logit_topk.h): one launch writes
// the per-row loss and the student gradient. No torch types here.
//
// One CTA per row, the grid striding over rows: 128 threads and 6 CTAs per SM for V <= 4096,
// 256 threads and 3 CTAs per SM above (<= 80 registers either way). Per row:
//   (1) statistics sweep over V: the row max (and, for the hard CE, the T = 1 sum, the count and
//       sum of the finite entries), and the max and sum of exp((s - m_rest) / T) over the
//       unlisted entries, relative to their own max (a direct sum of positive terms, never
//       total - listed, which cancels for a tiny residual). Which entries are listed comes from a
//       byte map in dynamic shared memory, filled from the indices window by window (windows of
//       up to kMapBytes entries, so any vocabulary fits under the 48 KiB that need no opt-in);
//   (2) loops over the k slots, strided across the block (gathered student loads, block
//       reductions): the listed sums, then the k + 1 bucket terms of the divergence in double,
//       in forms whose terms do not cancel (KL: P phi(d); TVD by sign classes; as the Triton
//       kernel), and the row sums the bucket gradients need;
//   (3) the gradient: the unlisted formula at every entry, a barrier (__syncthreads orders the
//       block's global writes), then the k listed entries written over it.
// Slots with index -1 (or outside [0, V)) are empty: P = Q = 0, their logprob is not read.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastkd/logit_topk.h"
#include "emulatable.cuh"
#include "logit_kd_impl.cuh"

namespace fastkd {
namespace topk_cuda {
namespace {

using logit_cuda::dtype_size;
using logit_cuda::ex2;
using logit_cuda::kLog2e;
using logit_cuda::load_elem;
using logit_cuda::store_elem;

// V <= kSmallVocab: 128 threads, 6 CTAs per SM; above: 256 threads, 3 CTAs per SM. Both cap the
// kernel at 80 registers (768 threads per SM): the double-precision bucket loops need more than
// 64 (at 64 ptxas spills, benchmarks/results/resources-cuda.md).
constexpr int kLargeThreads = 256;
constexpr int kLargeBlocksPerSm = 3;
constexpr int kSmallThreads = 128;
constexpr int kSmallBlocksPerSm = 6;
constexpr int64_t kSmallVocab = 4096;
// Window of the listed-entry byte map: a row of up to 32768 entries is one window; longer rows
// re-read the k indices once per window.
constexpr int64_t kMapBytes = 32 * 1024;
constexpr int kVec = 8;     // elements per chunk: 16 bytes of bf16 / fp16, 32 of float32
constexpr int kMaxRed = 4;  // values per block reduction
constexpr double kInf = INFINITY;

// Scalars of a launch, derived once on the host.
struct TopKConsts {
  float c;            // log2(e) / T
  int div;            // Divergence, JSD at beta 0 / 1 mapped to the KLs
  int map_bytes;      // dynamic shared memory of the byte map (a multiple of 16)
  double inv_t, inv_v, beta, log_beta, log_1mbeta;
};

#define FKD_TK __device__ __forceinline__

// 1 / x for x >= 1 (finite, or NaN): the hardware estimate and two Newton steps. A division
// would compile to a call of a slow-path routine, i.e. a stack frame.
FKD_TK double rcp_ge1(double x) {
#ifdef __CUDA_ARCH__
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
  r = fma(r, fma(-x, r, 1.0), r);
  return fma(r, fma(-x, r, 1.0), r);
#else
  return 1.0 / x;
#endif
}

// ---- bucket math (double) ------------------------------------------------------------------
// KL(a||b) term, d = log a - log b: a phi(d) with phi(d) = d + expm1(-d) >= 0 (b where a = 0).
// Non-negative terms, so a small divergence is no difference of large terms and an error common
// to every log Q cancels to first order. Series for |d| < 1/2.
FKD_TK double kl_term(double a, double b, double d) {
  if (a == 0.0) return b;
  if (fabs(d) < 0.5) {
    double ser = 1.0 / 479001600.0;  // 1 / 12!
    ser = 1.0 / 39916800.0 - d * ser;
    ser = 1.0 / 3628800.0 - d * ser;
    ser = 1.0 / 362880.0 - d * ser;
    ser = 1.0 / 40320.0 - d * ser;
    ser = 1.0 / 5040.0 - d * ser;
    ser = 1.0 / 720.0 - d * ser;
    ser = 1.0 / 120.0 - d * ser;
    ser = 1.0 / 24.0 - d * ser;
    ser = 1.0 / 6.0 - d * ser;
    ser = 0.5 - d * ser;
    return a * (d * d * ser);
  }
  return a * d + (b - a);
}

// p - q, near p = q as q expm1(d) (accurate relative to the difference).
FKD_TK double p_minus_q(double p, double q, double d) {
  return fabs(d) < 0.5 ? q * expm1(d) : p - q;
}

// JSD logs: e = log M - log Q = log(beta exp(d) + 1 - beta), f = log P - log M = d - e; exact for
// infinite d (Q = 0 < P: e = inf, f = -log beta; P = 0: f = -inf).
FKD_TK void jsd_logs(double d, const TopKConsts& c, double& e, double& f) {
  if (fabs(d) < 0.5) {
    e = log1p(c.beta * expm1(d));
    f = d - e;
    return;
  }
  const double z = d + (c.log_beta - c.log_1mbeta);
  const double l = log1p(exp(-fabs(z)));
  e = c.log_1mbeta + fmax(z, 0.0) + l;
  f = -c.log_beta - fmax(-z, 0.0) - l;
}

// d = log P - log Q with the conventions of the empty and masked buckets: -inf where P = 0, +inf
// where Q = 0 < P.
FKD_TK double bucket_d(double lp, double lq) {
  return lp == -kInf ? -kInf : (lq == -kInf ? kInf : lp - lq);
}

// Row sums a divergence needs (kl 1, reverse kl and jsd 2, tvd 4).
template <Divergence D>
constexpr int kSums = D == Divergence::KL ? 1 : (D == Divergence::TVD ? 4 : 2);

// Per-bucket terms whose sums give D and its gradient's row sums: kl: (P phi(d)); reverse kl:
// (Q phi(-d), -Q d); jsd: (P f, -Q e); tvd: (|P - Q|, Q [P > Q], Q [P < Q], Q [P = Q]).
template <Divergence D>
FKD_TK void bucket_terms(const TopKConsts& c, double p, double q, double d,
                         double (&t)[kSums<D>]) {
  if constexpr (D == Divergence::KL) {
    t[0] = kl_term(p, q, d);
  } else if constexpr (D == Divergence::ReverseKL) {
    t[0] = kl_term(q, p, -d);
    t[1] = q == 0.0 ? 0.0 : -q * d;
  } else if constexpr (D == Divergence::JSD) {
    double e, f;
    jsd_logs(d, c, e, f);
    t[0] = p == 0.0 ? 0.0 : p * f;
    t[1] = q == 0.0 ? 0.0 : -q * e;
  } else {
    const double diff = p_minus_q(p, q, d);
    t[0] = fabs(diff);
    t[1] = diff > 0.0 ? q : 0.0;
    t[2] = diff < 0.0 ? q : 0.0;
    t[3] = diff == 0.0 ? q : 0.0;
  }
}

// h_b = dD/dlog Q_b - Q_b sum_c dD/dlog Q_c, the gradient with respect to the bucket's logit,
// from the row sums (excess = sum_b P_b - 1 where the residual does not take up the rest).
template <Divergence D>
FKD_TK double bucket_h(const TopKConsts& c, double p, double q, double d, double excess,
                       const double (&sum)[kSums<D>]) {
  if constexpr (D == Divergence::KL) {
    return excess * q - p_minus_q(p, q, d);
  } else if constexpr (D == Divergence::ReverseKL) {
    return q == 0.0 ? 0.0 : q * (-d - sum[1]);
  } else if constexpr (D == Divergence::JSD) {
    if (q == 0.0) return 0.0;
    double e, f;
    jsd_logs(d, c, e, f);
    return (1.0 - c.beta) * q * (-e - sum[1]);
  } else {
    const double diff = p_minus_q(p, q, d);
    return q * (diff > 0.0   ? -sum[2] - 0.5 * sum[3]
                : diff < 0.0 ? sum[1] + 0.5 * sum[3]
                             : 0.5 * (sum[1] - sum[2]));
  }
}

// ---- block reductions -------------------------------------------------------------------------
struct OpSum {
  template <class T> FKD_TK static T id() { return T(0); }
  FKD_TK static float f(float a, float b) { return a + b; }
  FKD_TK static double f(double a, double b) { return a + b; }
};
struct OpMax {  // ignores NaN: the sums that follow carry it
  template <class T> FKD_TK static T id() { return T(-INFINITY); }
  FKD_TK static float f(float a, float b) { return fmaxf(a, b); }
};

FKD_TK float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
// A double as two 32-bit shuffles.
FKD_TK double shfl_xor(double v, int m) {
  uint32_t w[2];
  std::memcpy(w, &v, 8);
  w[0] = __shfl_xor_sync(0xffffffffu, w[0], m);
  w[1] = __shfl_xor_sync(0xffffffffu, w[1], m);
  double out;
  std::memcpy(&out, w, 8);
  return out;
}

template <int kThreads>
struct TopKRow {
  static constexpr int G = kThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kOut = kMaxRed * kWarps;
  // Row scalars after the reduction outputs: written by thread 0, read by every thread after the
  // next barrier where they are used (held in registers across the loops they would spill).
  enum RowConst {
    kMsh, kLogTotal, kPRes, kQRes, kDRes, kExcess, kZ1, kNf, kLs, kRest, kMr, kEmpty,
    kSum0, kCs = kSum0 + 4, kC1, kCFin, kCY, kRowConsts
  };
  static constexpr int kTab = kOut + kMaxRed;
  static constexpr int kRedDoubles = kTab + kRowConsts;
  static_assert(kThreads % 32 == 0 && kThreads >= 64, "whole warps, at least two");
  static_assert(2 * (kVec - 1) <= kThreads, "the scalar ends of a range: one per thread");
  using Vc = logit_cuda::Vec<kVec>;

  const LogitTopKParams& P;
  const TopKConsts& C;
  const int rank;
  double* red;          // shared reduction scratch, kRedDoubles
  unsigned char* map;   // shared byte map, C.map_bytes

  int y = -1;  // the target, or -1
  int64_t row = 0;
  bool vec = false, hard = false;
  int head = 0;  // chunks start at head + j * kVec

  // All-reduce of K values over the block; every thread gets bitwise the same result (the xor
  // butterfly combines the same pair on both lanes, the cross-warp step is done by warp 0 and
  // broadcast), so decisions taken on it are uniform. Partials and outputs live in disjoint
  // parts of red, so back-to-back reductions need no extra barrier.
  template <class Op, class T, int N>
  FKD_TK void allreduce(T (&v)[N]) const {
    static_assert(N <= kMaxRed, "reduction larger than the scratch");
#pragma unroll
    for (int k = 0; k < N; ++k) {
#pragma unroll
      for (int m = 16; m >= 1; m >>= 1) v[k] = Op::f(v[k], shfl_xor(v[k], m));
    }
    const int warp = rank >> 5, lane = rank & 31;
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) red[k * kWarps + warp] = static_cast<double>(v[k]);
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        T x = lane < kWarps ? static_cast<T>(red[k * kWarps + lane]) : Op::template id<T>();
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) x = Op::f(x, shfl_xor(x, m));
        if (lane == 0) red[kOut + k] = static_cast<double>(x);
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = static_cast<T>(red[kOut + k]);
  }

  // ---- the row as chunks -----------------------------------------------------------------
  FKD_TK static bool aligned_at(const unsigned char* ptr, int esz, int k) {
    return reinterpret_cast<uintptr_t>(ptr + k * esz) % 16 == 0;
  }

  // Chunks of kVec start at the first element at which the student row and the gradient row are
  // both 16-byte aligned; if there is none (different misalignments) the row goes element by
  // element.
  FKD_TK DType sd() const { return P.student_dtype; }
  FKD_TK int ssz() const { return dtype_size(P.student_dtype); }
  // The row's pointers, derived where used (kept across the sweeps they would take registers).
  FKD_TK const unsigned char* s() const {
    return static_cast<const unsigned char*>(P.student) + row * P.student_stride * ssz();
  }
  FKD_TK unsigned char* gs() const {
    return P.grad_student ? static_cast<unsigned char*>(P.grad_student) + row * P.vocab * ssz()
                          : nullptr;
  }
  FKD_TK float lp(int j) const { return P.logprobs[row * P.k + j]; }
  FKD_TK float ld(int v) const { return load_elem(s(), sd(), v); }

  FKD_TK void layout() {
    const int ssz = this->ssz();
    int found = -1;
#pragma unroll 1
    for (int k = 0; k < kVec && found < 0; ++k)
      if (aligned_at(s(), ssz, k) && (gs() == nullptr || aligned_at(gs(), ssz, k))) found = k;
    vec = found >= 0;
    head = vec ? found : 0;
  }

  // Calls f(v0, std::integral_constant<int, n>) for the units of [lo, hi) this thread owns:
  // whole chunks strided over the block (backwards when kReverse, so that a sweep after another
  // starts with the most recently loaded lines), and the at most 2 (kVec - 1) elements at the
  // ends one per thread.
  template <bool kReverse, class F>
  FKD_TK void for_range(int lo, int hi, F&& f) const {
    if (!vec) {
#pragma unroll 1
      for (int v = lo + rank; v < hi; v += G) f(v, std::integral_constant<int, 1>());
      return;
    }
    int a = lo <= head ? head : head + (lo - head + kVec - 1) / kVec * kVec;
    if (a > hi) a = hi;
    const int nch = (hi - a) / kVec, t0 = a + nch * kVec;
    const int nlead = a - lo, ntrail = hi - t0;
    const int steps = (nch + G - 1) / G;
#pragma unroll 1
    for (int st = 0; st < steps; ++st) {
      const int j = (kReverse ? steps - 1 - st : st) * G + rank;
      if (j < nch) f(a + j * kVec, std::integral_constant<int, kVec>());
    }
    if (rank < nlead) f(lo + rank, std::integral_constant<int, 1>());
    else if (rank < nlead + ntrail) f(t0 + (rank - nlead), std::integral_constant<int, 1>());
  }

  template <bool kStream, int N>
  FKD_TK void load(int v0, float (&x)[N]) const {
    if constexpr (N == 1) x[0] = ld(v0);
    else Vc::template load<kStream>(s() + static_cast<int64_t>(v0) * ssz(), sd(), nullptr, x);
  }
  template <int N>
  FKD_TK void store(int v0, const float (&o)[N]) const {
    if constexpr (N == 1) store_elem(gs(), sd(), v0, o[0]);
    else Vc::store(gs() + static_cast<int64_t>(v0) * ssz(), sd(), o);
  }

  // ---- rows that do not count: loss 0, gradient 0 -----------------------------------------
  FKD_TK void zero_row(int64_t row) const {
    if (rank == 0) P.row_loss[row] = 0.f;
    if (gs() == nullptr) return;
    for_range<false>(0, static_cast<int>(P.vocab), [&](int v0, auto n) {
      constexpr int N = decltype(n)::value;
      if constexpr (N == 1) store_elem(gs(), sd(), v0, 0.f);
      else Vc::store_zero(gs() + static_cast<int64_t>(v0) * ssz(), sd());
    });
  }

  FKD_TK int slot(int j) const {  // the vocabulary entry of slot j, or -1
    const int64_t i = P.indices[row * P.k + j];
    return i >= 0 && i < P.vocab ? static_cast<int>(i) : -1;
  }

  // ---- (1) statistics ---------------------------------------------------------------------
  // Per thread: m over every entry (with the hard CE: z1 = sum exp(s - m), nf = #finite,
  // ls = sum over finite of (s - m), re-based online as m grows: terms of one sign); mr, zr:
  // max and sum of exp2((s - mr) c) over the unlisted entries.
  struct Stats {
    float m, z1, nf, ls, mr, zr;
  };

  template <bool kZ1, bool kCnt, int N>
  FKD_TK void stats_unit(Stats& o, const float (&x)[N], const bool (&listed)[N]) const {
    float lm = x[0], lu = -INFINITY;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      lm = fmaxf(lm, x[e]);
      if (!listed[e]) lu = fmaxf(lu, x[e]);
    }
    if constexpr (kZ1 || kCnt) {
      const float nm = fmaxf(o.m, lm);
      if (nm != o.m) {
        if (o.m != -INFINITY) {
          if (kZ1) o.z1 *= ex2((o.m - nm) * kLog2e);
          if (kCnt) o.ls += o.nf * (o.m - nm);
        }
        o.m = nm;
      }
      const float sh = o.m == -INFINITY ? 0.f : o.m;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (kZ1) o.z1 += ex2((x[e] - sh) * kLog2e);
        if (kCnt && x[e] != -INFINITY) {
          o.nf += 1.f;
          o.ls += x[e] - sh;
        }
      }
    } else {
      o.m = fmaxf(o.m, lm);
    }
    const float nr = fmaxf(o.mr, lu);
    if (nr != o.mr) {
      if (o.mr != -INFINITY) o.zr *= ex2((o.mr - nr) * C.c);  // factor <= 1
      o.mr = nr;
    }
    const float shr = o.mr == -INFINITY ? 0.f : o.mr;
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (!listed[e]) o.zr += ex2((x[e] - shr) * C.c);
  }

  template <bool kZ1, bool kCnt>
  FKD_TK Stats stats_sweep() const {
    Stats o{-INFINITY, 0.f, 0.f, 0.f, -INFINITY, 0.f};
    const int V = static_cast<int>(P.vocab), K = static_cast<int>(P.k), W = C.map_bytes;
#pragma unroll 1
    for (int base = 0; base < V; base += W) {
      const int len = V - base < W ? V - base : W;
      __syncthreads();  // every thread is done with the previous window's map
#pragma unroll 1
      for (int i = rank; i < (len + 15) / 16; i += G)
        reinterpret_cast<uint4*>(map)[i] = make_uint4(0u, 0u, 0u, 0u);
      __syncthreads();
#pragma unroll 1
      for (int j = rank; j < K; j += G) {
        const int i = slot(j);
        if (i >= base && i < base + len) map[i - base] = 1;
      }
      __syncthreads();
      for_range<false>(base, base + len, [&](int v0, auto n) {
        constexpr int N = decltype(n)::value;
        float x[N];
        load<false>(v0, x);
        bool listed[N];
        const int o0 = v0 - base;
        if constexpr (N == 8) {
          if (o0 % 8 == 0) {  // one 8-byte shared load (bank-conflict free)
            const uint2 w = *reinterpret_cast<const uint2*>(map + o0);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              listed[e] = ((w.x >> (8 * e)) & 0xffu) != 0;
              listed[4 + e] = ((w.y >> (8 * e)) & 0xffu) != 0;
            }
          } else {
#pragma unroll
            for (int e = 0; e < N; ++e) listed[e] = map[o0 + e] != 0;
          }
        } else {
#pragma unroll
          for (int e = 0; e < N; ++e) listed[e] = map[o0 + e] != 0;
        }
        stats_unit<kZ1, kCnt>(o, x, listed);
      });
    }
    return o;
  }

  // ---- the row ------------------------------------------------------------------------------
  FKD_TK double tab(int i) const { return red[kTab + i]; }
  FKD_TK void set_tab(int i, double v) const { red[kTab + i] = v; }

  FKD_TK void run(int64_t r) {
    const int64_t V = P.vocab;
    const int K = static_cast<int>(P.k);
    row = r;
    layout();
    y = -1;
    if (P.target != nullptr) {
      const int64_t t = P.target[row];
      if (t == P.ignore_index) return zero_row(row);
      if (t < 0 || t >= V) {
        if (rank == 0 && P.flags != nullptr) atomicOr(P.flags, kFlagTargetOutOfRange);
        return zero_row(row);
      }
      y = static_cast<int>(t);
    }
    hard = P.target != nullptr && P.hard_weight != 0.f;
    const bool smooth = hard && P.label_smoothing != 0.f;
    const bool sep_z1 = hard && P.temperature != 1.f;

    // (1) statistics.
    Stats o;
    if (!hard) o = stats_sweep<false, false>();
    else if (smooth) o = sep_z1 ? stats_sweep<true, true>() : stats_sweep<false, true>();
    else o = sep_z1 ? stats_sweep<true, false>() : stats_sweep<false, false>();
    float mx[2] = {o.m, o.mr};
    allreduce<OpMax>(mx);
    const float m = mx[0], mr = mx[1];
    // A thread's sums rescaled to the row's maxima (unchanged where its max is -inf: they are
    // then 0, or NaN).
    float sm[4];
    sm[0] = (o.mr == mr || o.mr == -INFINITY) ? o.zr : o.zr * ex2((o.mr - mr) * C.c);
    sm[1] = (o.m == m || o.m == -INFINITY) ? o.z1 : o.z1 * ex2((o.m - m) * kLog2e);
    sm[2] = o.nf;
    sm[3] = o.nf > 0.f ? o.ls + o.nf * (o.m - m) : 0.f;
    allreduce<OpSum>(sm);

    // (2a) the listed sums: sum_j exp((s_j - m) / T) and sum_j P_j.
    const double inv_t = C.inv_t;
    const double msh = m == -INFINITY ? 0.0 : static_cast<double>(m);
    double lsum[2] = {0.0, 0.0};
#pragma unroll 1
    for (int j = rank; j < K; j += G) {
      const int i = slot(j);
      if (i < 0) continue;
      lsum[0] += exp((static_cast<double>(ld(i)) - msh) * inv_t);
      lsum[1] += exp(static_cast<double>(lp(j)));
    }
    allreduce<OpSum>(lsum);
    const double rest = sm[0];
    const double rest_term =
        mr == -INFINITY ? rest : rest * exp((static_cast<double>(mr) - msh) * inv_t);
    const double total = rest_term + lsum[0];
    if (m == -INFINITY && total == 0.0) {  // -inf everywhere (a NaN row goes on: NaN loss)
      if (rank == 0 && P.flags != nullptr) atomicOr(P.flags, kFlagStudentAllMasked);
      return zero_row(row);
    }
    if (rank == 0) {
      const double listed_p = lsum[1];
      const double log_total = log(total);
      const bool empty = !(rest > 0.0);  // also NaN: the row's NaN reaches the loss via total
      const double lq_res =
          empty ? -kInf : log(rest) + (static_cast<double>(mr) - msh) * inv_t - log_total;
      const double p_res = empty ? 0.0 : fmax(0.0, 1.0 - listed_p);
      set_tab(kMsh, msh);
      set_tab(kLogTotal, log_total);
      set_tab(kPRes, p_res);
      set_tab(kQRes, exp(lq_res));
      set_tab(kDRes, p_res == 0.0 ? -kInf : log(p_res) - lq_res);
      set_tab(kExcess, (empty || listed_p > 1.0) ? listed_p - 1.0 : 0.0);
      set_tab(kZ1, sep_z1 ? static_cast<double>(sm[1]) : total);
      set_tab(kNf, sm[2]);
      set_tab(kLs, sm[3]);
      set_tab(kRest, rest);
      set_tab(kMr, mr);
      set_tab(kEmpty, empty ? 1.0 : 0.0);
    }
    __syncthreads();

    switch (static_cast<Divergence>(C.div)) {
      case Divergence::KL: return tail<Divergence::KL>(row);
      case Divergence::ReverseKL: return tail<Divergence::ReverseKL>(row);
      case Divergence::JSD: return tail<Divergence::JSD>(row);
      default: return tail<Divergence::TVD>(row);
    }
  }

  // (2b) the bucket terms and the loss, (3) the gradient.
  template <Divergence D>
  FKD_TK void tail(int64_t row) const {
    constexpr int S = kSums<D>;
    const int K = static_cast<int>(P.k);
    double sum[S];
#pragma unroll
    for (int b = 0; b < S; ++b) sum[b] = 0.0;
    {
      const double msh = tab(kMsh), log_total = tab(kLogTotal), inv_t = C.inv_t;
#pragma unroll 1
      for (int j = rank; j < K; j += G) {
        const int i = slot(j);
        if (i < 0) continue;
        const double lpj = lp(j);
        const double lqj = (static_cast<double>(ld(i)) - msh) * inv_t - log_total;
        double t[S];
        bucket_terms<D>(C, exp(lpj), exp(lqj), bucket_d(lpj, lqj), t);
#pragma unroll
        for (int b = 0; b < S; ++b) sum[b] += t[b];
      }
    }
    allreduce<OpSum>(sum);
    {
      double t[S];
      bucket_terms<D>(C, tab(kPRes), tab(kQRes), tab(kDRes), t);
#pragma unroll
      for (int b = 0; b < S; ++b) sum[b] += t[b];
    }
    const double eps = P.label_smoothing;
    const double inv_v = C.inv_v;
    if (rank == 0) {
      double d;
      if constexpr (D == Divergence::KL) d = sum[0] + tab(kExcess);
      else if constexpr (D == Divergence::ReverseKL) d = sum[0] - tab(kExcess);
      else if constexpr (D == Divergence::JSD) d = C.beta * sum[0] + (1.0 - C.beta) * sum[1];
      else d = 0.5 * sum[0];
      double loss = static_cast<double>(P.soft_factor) * d;
      if (hard) {  // the hard CE at T = 1, label smoothing over the finite entries
        const double lz1 = log(tab(kZ1));
        double ce = (1.0 - eps) * (lz1 - (static_cast<double>(ld(y)) - tab(kMsh)));
        if (eps != 0.0) ce += eps * (tab(kNf) * lz1 - tab(kLs)) * inv_v;
        loss += static_cast<double>(P.hard_weight) * ce;
      }
      P.row_loss[row] = static_cast<float>(loss);
    }
    if (gs() == nullptr) return;

    // (3) the gradient. Unlisted v: cs h_res e_v / rest with e_v = exp((s_v - mr) / T); the hard
    // CE: c1 exp(s_v - m) - c_fin [s_v finite] - c_y [v = y].
    const double scale = P.grad_scale != nullptr ? *P.grad_scale : 1.f;
    const double cs = static_cast<double>(P.soft_factor) * C.inv_t * scale;
    const bool empty = tab(kEmpty) != 0.0;
    const double h_res = bucket_h<D>(C, tab(kPRes), tab(kQRes), tab(kDRes), tab(kExcess), sum);
    const float a_res = empty ? 0.f : static_cast<float>(cs * h_res * rcp_ge1(tab(kRest)));
    const float mrs = empty ? 0.f : static_cast<float>(tab(kMr));
    const double hw = hard ? static_cast<double>(P.hard_weight) * scale : 0.0;
    const double c1 = hard ? hw * (1.0 - eps + eps * tab(kNf) * inv_v) * rcp_ge1(tab(kZ1)) : 0.0;
    const double c_fin = hard ? hw * eps * inv_v : 0.0;
    const double c_y = hw * (1.0 - eps);
    // Slots no thread has read in this row; the barrier after the sweep publishes them.
    if (rank == 0) {
#pragma unroll
      for (int b = 0; b < S; ++b) set_tab(kSum0 + b, sum[b]);
      set_tab(kCs, cs);
      set_tab(kC1, c1);
      set_tab(kCFin, c_fin);
      set_tab(kCY, c_y);
    }
    const float c1f = static_cast<float>(c1), c_finf = static_cast<float>(c_fin),
                c_yf = static_cast<float>(c_y), mf = static_cast<float>(tab(kMsh)), cc = C.c;
    const bool hd = hard;
    const int yy = y;
    for_range<true>(0, static_cast<int>(P.vocab), [&](int v0, auto n) {
      constexpr int N = decltype(n)::value;
      float x[N];
      load<true>(v0, x);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        // e_v / rest <= 1 at an unlisted entry; the cap keeps listed ones (written over below)
        // finite.
        float g = a_res * ex2(fminf((x[e] - mrs) * cc, 0.f));
        if (hd) {
          g += c1f * ex2((x[e] - mf) * kLog2e);
          if (x[e] != -INFINITY) g -= c_finf;
          if (v0 + e == yy) g -= c_yf;
        }
        x[e] = g;
      }
      store(v0, x);
    });
    // The listed entries over it: the barrier orders every thread's stores above before these
    // (and makes the table visible).
    __syncthreads();
    if (hard) listed_grad<D, true>();
    else listed_grad<D, false>();
  }

  template <Divergence D, bool kHard>
  FKD_TK void listed_grad() const {
    constexpr int S = kSums<D>;
    const int K = static_cast<int>(P.k);
    double sum[S];
#pragma unroll
    for (int b = 0; b < S; ++b) sum[b] = tab(kSum0 + b);
    const double excess = tab(kExcess), log_total = tab(kLogTotal), msh = tab(kMsh);
    const double cs = tab(kCs);
    const double c1 = kHard ? tab(kC1) : 0.0, c_fin = kHard ? tab(kCFin) : 0.0;
    const double c_y = kHard ? tab(kCY) : 0.0;
#pragma unroll 1
    for (int j = rank; j < K; j += G) {
      const int i = slot(j);
      if (i < 0) continue;
      const double sj = ld(i);
      const double lpj = lp(j);
      const double lqj = (sj - msh) * C.inv_t - log_total;
      double g = cs * bucket_h<D>(C, exp(lpj), exp(lqj), bucket_d(lpj, lqj), excess, sum);
      if constexpr (kHard) {
        g += c1 * exp(sj - msh);
        if (sj != -kInf) g -= c_fin;
        if (i == y) g -= c_y;
      }
      store_elem(gs(), P.student_dtype, i, static_cast<float>(g));
    }
  }
};

template <int kThreads, int kBlocksPerSm>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
logit_topk_kernel(const __grid_constant__ LogitTopKParams p, const __grid_constant__ TopKConsts c) {
  using Row = TopKRow<kThreads>;
  FKD_SHARED(double, red, [Row::kRedDoubles]);
  FKD_DYNAMIC_SHARED(uint4, map);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    Row r{p, c, static_cast<int>(threadIdx.x), red, reinterpret_cast<unsigned char*>(map)};
    r.run(row);
  }
}

template <int kThreads, int kBlocksPerSm>
cudaError_t launch(const LogitTopKParams& p, TopKConsts c, cudaStream_t stream) {
  constexpr auto kernel = logit_topk_kernel<kThreads, kBlocksPerSm>;
  const int64_t need = (p.vocab + 15) / 16 * 16;
  c.map_bytes = static_cast<int>(need < kMapBytes ? need : kMapBytes);
  const int64_t grid = p.rows < INT_MAX ? p.rows : INT_MAX;
  FKD_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, static_cast<size_t>(c.map_bytes),
             stream)(p, c);
  return cudaGetLastError();
}

bool valid_dtype(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

}  // namespace
}  // namespace topk_cuda

int logit_topk_cuda(const LogitTopKParams& p, void* stream) {
  using namespace topk_cuda;
  const int div = static_cast<int>(p.divergence);
  // V and k below 2^31: offsets within a row are 32-bit (fewer registers).
  if (p.rows < 0 || p.vocab < 1 || p.vocab >= INT_MAX || p.k < 1 || p.k >= INT_MAX ||
      p.student == nullptr || p.indices == nullptr ||
      p.logprobs == nullptr || p.row_loss == nullptr || !(p.temperature > 0.f) ||
      !std::isfinite(p.temperature) || !valid_dtype(p.student_dtype) || div < 0 || div > 3 ||
      (p.divergence == Divergence::JSD && !(p.beta >= 0.f && p.beta <= 1.f))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (p.rows == 0) return static_cast<int>(cudaSuccess);

  TopKConsts c;
  const double t = p.temperature;
  c.c = static_cast<float>(1.4426950408889634074 / t);
  c.inv_t = 1.0 / t;
  c.inv_v = 1.0 / static_cast<double>(p.vocab);
  c.div = div;
  if (p.divergence == Divergence::JSD && (p.beta == 0.f || p.beta == 1.f))
    c.div = static_cast<int>(p.beta == 0.f ? Divergence::KL : Divergence::ReverseKL);
  c.beta = p.beta;
  c.log_beta = c.div == static_cast<int>(Divergence::JSD) ? std::log(c.beta) : 0.0;
  c.log_1mbeta = c.div == static_cast<int>(Divergence::JSD) ? std::log1p(-c.beta) : 0.0;
  c.map_bytes = 0;

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t e = p.vocab <= kSmallVocab
                            ? launch<kSmallThreads, kSmallBlocksPerSm>(p, c, s)
                            : launch<kLargeThreads, kLargeBlocksPerSm>(p, c, s);
  return static_cast<int>(e);
}

}  // namespace fastkd
