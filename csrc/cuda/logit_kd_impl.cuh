// Per-row core of the fused logit-KD CUDA kernel (csrc/cuda/logit_kd.cu); math in
// fastkd/logit/reference.py and csrc/include/fastkd/logit_kd.h.
//
// Everything here is written against an abstract thread group (a CUDA block, or a host emulation
// of one with std::thread), so the same code can be compiled by a host compiler and checked
// without a GPU. A group provides:
//   static constexpr int kSize;          // threads, a multiple of 32
//   int rank;                            // this thread, 0 <= rank < kSize
//   float* red;                          // shared scratch of RowKD::kRedFloats floats (kSize > 32)
//   unsigned char* cache;                // shared row cache (16-byte aligned) or null
//   int64_t cache_bytes;                 // its size
//   void sync() const;                   // barrier of the whole group
//   float shfl_xor(float v, int m) const;  // __shfl_xor_sync within a warp of 32
//
// Row algorithm (one group per row, all statistics in float32, logs in base 2 internally):
//   pass 1: online (max, sum-exp) of s/T (and of s at T = 1 for the hard CE) and of each t_i/T
//   (a log mixture: also of y/T, y = sum_i w_i t_i, the logits of the mixture, mixed_logits);
//   pass 2: the row sums that the gradients need (D, Kq, sum q h, S_i, CE smoothing) and the loss;
//   pass 3: the gradients. When no gradient needs a row sum (kl's student gradient, or only the
//   loss), passes 2 and 3 are one sweep. Each thread keeps the first chunks of the row it loads in
//   pass 1 in shared memory (the same thread handles the same chunk in every pass), and pass 2 runs
//   backwards (pass 3 forwards again), so that the re-read of the rest starts with the most
//   recently loaded L2 lines. Gradients are stored evict-first, and the last read of a row too.
// Inputs are read through 16-byte vector loads from the first element at which every row pointer
// is aligned (the few elements before and after are done one by one); rows whose pointers have
// different misalignments are read element by element. The dtypes are run-time values: the math is
// compiled once, and only the loads / stores branch (uniformly) on the dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastkd/logit_kd.h"

#if defined(__CUDACC__)
#define FKD_HD __host__ __device__ __forceinline__
#define FKD_UNROLL _Pragma("unroll")
#define FKD_NO_UNROLL _Pragma("unroll 1")
#else
#define FKD_HD inline
#define FKD_UNROLL
#define FKD_NO_UNROLL
#endif

namespace fastkd {
namespace logit_cuda {

constexpr float kLn2 = 0.693147180559945309417f;
constexpr float kLog2e = 1.442695040888963407360f;

// Scalars derived once on the host from LogitKDParams.
struct Consts {
  float c;            // log2(e) / T: multiplies (s - max) to give s/T in base-2 log units
  float sf_over_t;    // soft_factor / T (d/ds = (1/T) d/da)
  float beta;         // JSD
  float one_minus_beta;
  float hard_weight;
  float eps;          // label smoothing
  float eps_over_v;
  int same_t;         // T == 1: the CE statistics are the soft ones
  int64_t cache_bytes;  // dynamic shared memory available to the row cache (block kernel)
};

// Consts of a launch (host side; cache_bytes is filled in by the launcher).
inline Consts make_consts(const LogitKDParams& p) {
  Consts c;
  const double t = p.temperature;
  c.c = static_cast<float>(1.4426950408889634074 / t);
  c.sf_over_t = static_cast<float>(static_cast<double>(p.soft_factor) / t);
  c.beta = p.beta;
  c.one_minus_beta = static_cast<float>(1.0 - static_cast<double>(p.beta));
  c.hard_weight = p.hard_weight;
  c.eps = p.label_smoothing;
  c.eps_over_v = static_cast<float>(static_cast<double>(p.label_smoothing) /
                                    static_cast<double>(p.vocab));
  c.same_t = p.temperature == 1.f ? 1 : 0;  // then c.c == kLog2e exactly
  c.cache_bytes = 0;
  return c;
}

FKD_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FKD_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// 2^x. On the device this is the hardware ex2.approx.ftz.f32 (MUFU.EX2), which is also the core
// of exp2f: max relative error 2^-22 (2 ulp, < 1e-6) for normal results. exp2f only adds 4
// instructions per call to return subnormal results instead of 0 below 2^-126. Here the
// arguments are max-shifted (<= 0, or bounded by log2(1 / w_i) for p_i / p), so a flushed term is
// < 1.2e-38 next to sums that are >= 1 (the max element contributes 2^0) or next to the float32
// rounding of the terms it is added to. The host emulation flushes the same way.
FKD_HD float ex2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.f : y;
#endif
}
// log2f of the CUDA math library (1 ulp), used per row or per element only with several teachers
// and for JSD.
FKD_HD float lg2(float x) { return log2f(x); }

// max that returns NaN if either argument is NaN (fmaxf ignores NaN).
FKD_HD float fmax_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// sign(x) with sign(0) = 0 and sign(NaN) = NaN.
FKD_HD float sign_nan(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : x * 0.f); }

FKD_HD void atomic_or_flag(int* flags, int bits) {
#if defined(__CUDA_ARCH__) || defined(FASTKD_CUDA_EMULATION)
  atomicOr(flags, bits);
#else
  __atomic_fetch_or(flags, bits, __ATOMIC_RELAXED);
#endif
}

// ---- element types (runtime dtype: the math is compiled once, only loads/stores switch) ----
FKD_HD int dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

FKD_HD float half_bits_to_float(uint32_t b) {
  __half_raw r;
  r.x = static_cast<unsigned short>(b);
  return __half2float(__half(r));
}

FKD_HD float load_elem(const unsigned char* row, DType dt, int64_t v) {
  switch (dt) {
    case DType::F32: return reinterpret_cast<const float*>(row)[v];
    case DType::BF16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[v]);
    default: return __half2float(reinterpret_cast<const __half*>(row)[v]);
  }
}

FKD_HD void store_elem(unsigned char* row, DType dt, int64_t v, float x) {
  switch (dt) {
    case DType::F32: reinterpret_cast<float*>(row)[v] = x; break;
    case DType::BF16: reinterpret_cast<__nv_bfloat16*>(row)[v] = __float2bfloat16_rn(x); break;
    default: reinterpret_cast<__half*>(row)[v] = __float2half_rn(x); break;
  }
}

// W 32-bit words from global memory: read-only path, or evict-first (".cs") for the last read.
template <bool kStream, int W>
FKD_HD void load_words(const unsigned char* ptr, uint32_t* w) {
#if defined(__CUDA_ARCH__) || defined(FASTKD_CUDA_EMULATION)
  if constexpr (W == 2) {
    const uint2* q = reinterpret_cast<const uint2*>(ptr);
    uint2 v;
    if constexpr (kStream) v = __ldcs(q); else v = __ldg(q);
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(W % 4 == 0, "16-byte pieces");
    const uint4* q = reinterpret_cast<const uint4*>(ptr);
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k) {
      uint4 v;
      if constexpr (kStream) v = __ldcs(q + k); else v = __ldg(q + k);
      w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
    }
  }
#else
  std::memcpy(w, ptr, W * 4);
#endif
}

// Gradient stores: written once and never read here, so evict-first keeps L2 for the inputs.
template <int W>
FKD_HD void store_words(unsigned char* ptr, const uint32_t* w) {
#if defined(__CUDA_ARCH__) || defined(FASTKD_CUDA_EMULATION)
  if constexpr (W == 2) {
    __stcs(reinterpret_cast<uint2*>(ptr), make_uint2(w[0], w[1]));
  } else {
    uint4* q = reinterpret_cast<uint4*>(ptr);
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k)
      __stcs(q + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
  }
#else
  std::memcpy(ptr, w, W * 4);
#endif
}

template <int W>
FKD_HD void load_words_shared(const unsigned char* ptr, uint32_t* w) {
#if defined(__CUDA_ARCH__) || defined(FASTKD_CUDA_EMULATION)
  if constexpr (W == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(ptr);
    w[0] = v.x; w[1] = v.y;
  } else {
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k) {
      const uint4 v = reinterpret_cast<const uint4*>(ptr)[k];
      w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
    }
  }
#else
  std::memcpy(w, ptr, W * 4);
#endif
}

template <int W>
FKD_HD void store_words_shared(unsigned char* ptr, const uint32_t* w) {
#if defined(__CUDA_ARCH__) || defined(FASTKD_CUDA_EMULATION)
  if constexpr (W == 2) {
    *reinterpret_cast<uint2*>(ptr) = make_uint2(w[0], w[1]);
  } else {
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k)
      reinterpret_cast<uint4*>(ptr)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
  }
#else
  std::memcpy(ptr, w, W * 4);
#endif
}

// N consecutive elements of a row <-> N floats. Each dtype branch keeps its own raw words, so no
// register is shared between the 16-bit and the float32 layouts (that would keep dead words live
// across iterations). The branch is uniform: one dtype per tensor and launch.
template <int N>
struct Vec {
  static_assert(N == 4 || N == 8, "chunks of 4 or 8 elements");

  template <int W>
  FKD_HD static void words_to_f32(const uint32_t (&w)[W], float (&f)[N]) {
    FKD_UNROLL
    for (int k = 0; k < N; ++k) f[k] = bits_to_float(w[k]);
  }
  // Little endian: the element with the lower index is in the low half of a word.
  template <int W>
  FKD_HD static void words_to_16(const uint32_t (&w)[W], DType dt, float (&f)[N]) {
    if (dt == DType::BF16) {  // bf16 -> f32 is a shift
      FKD_UNROLL
      for (int k = 0; k < N / 2; ++k) {
        f[2 * k] = bits_to_float(w[k] << 16);
        f[2 * k + 1] = bits_to_float(w[k] & 0xffff0000u);
      }
    } else {
      FKD_UNROLL
      for (int k = 0; k < N / 2; ++k) {
        f[2 * k] = half_bits_to_float(w[k] & 0xffffu);
        f[2 * k + 1] = half_bits_to_float(w[k] >> 16);
      }
    }
  }

  // Global load; when keep != null the raw bytes are also copied there (the shared row cache).
  template <bool kStream>
  FKD_HD static void load(const unsigned char* ptr, DType dt, unsigned char* keep, float (&f)[N]) {
    if (dt == DType::F32) {
      uint32_t w[N];
      load_words<kStream, N>(ptr, w);
      if (keep != nullptr) store_words_shared<N>(keep, w);
      words_to_f32(w, f);
    } else {
      uint32_t w[N / 2];
      load_words<kStream, N / 2>(ptr, w);
      if (keep != nullptr) store_words_shared<N / 2>(keep, w);
      words_to_16(w, dt, f);
    }
  }

  FKD_HD static void load_shared(const unsigned char* ptr, DType dt, float (&f)[N]) {
    if (dt == DType::F32) {
      uint32_t w[N];
      load_words_shared<N>(ptr, w);
      words_to_f32(w, f);
    } else {
      uint32_t w[N / 2];
      load_words_shared<N / 2>(ptr, w);
      words_to_16(w, dt, f);
    }
  }

  // Rounds to nearest even, once, and stores.
  FKD_HD static void store(unsigned char* ptr, DType dt, const float (&f)[N]) {
    if (dt == DType::F32) {
      uint32_t w[N];
      FKD_UNROLL
      for (int k = 0; k < N; ++k) w[k] = float_to_bits(f[k]);
      store_words<N>(ptr, w);
    } else {
      uint32_t w[N / 2];
      if (dt == DType::BF16) {
        FKD_UNROLL
        for (int k = 0; k < N / 2; ++k) {
          const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
          std::memcpy(&w[k], &h, 4);
        }
      } else {
        FKD_UNROLL
        for (int k = 0; k < N / 2; ++k) {
          const __half2 h = __floats2half2_rn(f[2 * k], f[2 * k + 1]);
          std::memcpy(&w[k], &h, 4);
        }
      }
      store_words<N / 2>(ptr, w);
    }
  }

  // Stores N zeros (+0 in every dtype).
  FKD_HD static void store_zero(unsigned char* ptr, DType dt) {
    if (dt == DType::F32) {
      const uint32_t w[N] = {};
      store_words<N>(ptr, w);
    } else {
      const uint32_t w[N / 2] = {};
      store_words<N / 2>(ptr, w);
    }
  }
};

// ---- group reductions ----------------------------------------------------------------------
struct OpSum {
  FKD_HD static float id() { return 0.f; }
  FKD_HD static float f(float a, float b) { return a + b; }
};
struct OpMax {  // ignores NaN (the sums that follow carry it)
  FKD_HD static float id() { return -INFINITY; }
  FKD_HD static float f(float a, float b) { return fmaxf(a, b); }
};

// Size of Group::red for reductions of up to kMaxK values.
template <int kSize, int kMaxK>
constexpr int red_floats() { return kMaxK * (kSize / 32) + kMaxK; }

// All-reduce of K values over the group; every thread gets bitwise the same result (the xor
// butterfly combines the same pair in the same order on both lanes, and the cross-warp step is
// done by warp 0 and broadcast), so decisions taken on it are uniform. Partials and outputs live
// in disjoint parts of red, so back-to-back reductions need no extra barrier.
template <class Op, int kMaxK, int K, class Group>
FKD_HD void group_allreduce(const Group& g, float (&v)[K]) {
  static_assert(Group::kSize % 32 == 0, "groups are whole warps");
  static_assert(K <= kMaxK, "reduction larger than the scratch");
  FKD_UNROLL
  for (int k = 0; k < K; ++k) {
    FKD_UNROLL
    for (int m = 16; m >= 1; m >>= 1) v[k] = Op::f(v[k], g.shfl_xor(v[k], m));
  }
  if constexpr (Group::kSize > 32) {
    constexpr int W = Group::kSize / 32;
    constexpr int kOut = kMaxK * W;
    const int warp = g.rank >> 5, lane = g.rank & 31;
    if (lane == 0) {
      FKD_UNROLL
      for (int k = 0; k < K; ++k) g.red[k * W + warp] = v[k];
    }
    g.sync();
    if (warp == 0) {
      FKD_UNROLL
      for (int k = 0; k < K; ++k) {
        float x = lane < W ? g.red[k * W + lane] : Op::id();
        FKD_UNROLL
        for (int m = 16; m >= 1; m >>= 1) x = Op::f(x, g.shfl_xor(x, m));
        if (lane == 0) g.red[kOut + k] = x;
      }
    }
    g.sync();
    FKD_UNROLL
    for (int k = 0; k < K; ++k) v[k] = g.red[kOut + k];
  }
}

// ---- the row ---------------------------------------------------------------------------------
// Sums: the row sums only (pass 2, or the only sweep when no gradient is wanted). Write: the
// gradients from the sums (pass 3). Merged: kl's student gradient, which needs no row sum, and the
// sums in one sweep (never teacher gradients).
enum class SweepMode { Sums, Write, Merged };

template <bool kMulti>
struct KDTraits {
  // Several teachers: up to kMaxTeachers, their number a run-time value (see RowKD for where
  // their state lives).
  static constexpr int kNT = kMulti ? kMaxTeachers : 1;
  // Elements per chunk: one teacher 8 (16 bytes of bf16/fp16, 32 of fp32); several teachers 4
  // (their chunks are loaded one teacher at a time; smaller code and fewer registers).
  static constexpr int kVec = kMulti ? 4 : 8;
  static constexpr int kRedK = 3 + kNT;  // the largest reduction of a row
};

template <bool kMulti, class Group>
struct RowKD {
  using Tr = KDTraits<kMulti>;
  static constexpr int kNT = Tr::kNT;
  static constexpr int N = Tr::kVec;
  static constexpr int kRedK = Tr::kRedK;
  static constexpr int kSumN = 3 + kNT;   // per-thread sweep sums that are reduced, see unit()
  static constexpr int kXd = kSumN;       // then rkl's dominant-entry log-ratio
  static constexpr int kAccN = kSumN + 1;
  // Several teachers: per-teacher row state that every thread reads (pointers, weight, statistics,
  // gradient factors) is a table in shared memory after the reduction scratch, written by thread 0
  // between barriers. Loops over the teachers that only read it run over the run-time count; the
  // per-thread accumulators (pass-1 online statistics, pass-2 S_i parts) are register arrays that
  // only loops unrolled over kMaxTeachers (guarded by i < nt) touch. A per-thread array indexed at
  // run time would live in local memory (a stack frame per thread, read in the inner loops).
  static constexpr int kTabStride = 10;  // words per teacher, see the tab_* accessors
  static constexpr int kTabOffset = red_floats<Group::kSize, kRedK>();
  // A multiple of 16 bytes, as ptxas allocates it: the launcher's shared-memory budget uses it.
  static constexpr int kRedFloats = (kTabOffset + (kMulti ? kTabStride * kNT : 0) + 3) / 4 * 4;
  static constexpr int64_t G = Group::kSize;
  using Vc = Vec<N>;

  const LogitKDParams& P;
  const Consts& C;
  const Group& g;

  int64_t V = 0;
  int nt = 1;
  DType sd = DType::F32, td = DType::F32;
  int ssz = 4, tsz = 4;  // element sizes in bytes
  const unsigned char* s = nullptr;
  unsigned char* gs = nullptr;

  // Layout of the row: `head` scalar elements, nvec chunks of N, scalar elements from tail0.
  bool vec = false;
  int64_t head = 0, nvec = 0, tail0 = 0, nscal = 0;
  int64_t jc = 0;  // chunks [0, jc) of every input are kept in g.cache

  // Statistics (pass 1).
  float ms = 0.f, lzs = 0.f, lz1 = 0.f, nf = 0.f;
  int flag_bits = 0;
  int64_t y = -1;
  bool hard = false;

  // Row sums (natural-log units) and gradient coefficients.
  float dsum = 0.f;  // rkl: sum_u q_u (x_u - x*) (see finish_sums); else D
  float x1 = 0.f;    // jsd: Kq; tvd: sum_u q_u h_u; rkl: x* (base 2)
  bool want_gs = false, any_gt = false;
  float cs = 0.f, b1 = 0.f, c1 = 0.f;

  // Per teacher: in registers for one teacher, in the shared table (tab_*) for several.
  struct Teacher {
    const unsigned char* t;
    unsigned char* gt;
    float w;       // mixture weight
    float mt;      // raw max
    float lzt;     // log2 of the sum of exp2((t - mt) c)
    float ssum;    // S_i (natural units)
    float ct;      // gradient factor; 0 = write exact zeros
    bool sum_t;    // S_i is needed
  };
  Teacher tc{nullptr, nullptr, 0.f, -INFINITY, 0.f, 0.f, 0.f, false};  // one teacher only

  // Shared table, words of teacher i: 0-1 t, 2-3 gt (pointer halves), 4 w, 5 mt, 6 lzt, 7 ssum,
  // 8 ct, 9 sum_t (0 or 1). Written by thread 0 only, read by all after the next barrier.
  enum TabField { kTabT = 0, kTabGt = 2, kTabW = 4, kTabMt, kTabLzt, kTabSsum, kTabCt, kTabSumT };
  FKD_HD float* tab(int i, int f) const { return g.red + kTabOffset + i * kTabStride + f; }
  FKD_HD uintptr_t tab_ptr(int i, int f) const {
    const uint64_t lo = float_to_bits(*tab(i, f)), hi = float_to_bits(*tab(i, f + 1));
    return static_cast<uintptr_t>(lo | (hi << 32));
  }
  FKD_HD void tab_set_ptr(int i, int f, const void* ptr) const {
    const uint64_t u = reinterpret_cast<uintptr_t>(ptr);
    *tab(i, f) = bits_to_float(static_cast<uint32_t>(u));
    *tab(i, f + 1) = bits_to_float(static_cast<uint32_t>(u >> 32));
  }

  // Teacher i's state, wherever it lives (i < nt).
  FKD_HD const unsigned char* t_row(int i) const {
    if constexpr (kMulti) return reinterpret_cast<const unsigned char*>(tab_ptr(i, kTabT));
    else return tc.t;
  }
  FKD_HD unsigned char* gt_row(int i) const {
    if constexpr (kMulti) return reinterpret_cast<unsigned char*>(tab_ptr(i, kTabGt));
    else return tc.gt;
  }
  FKD_HD float t_w(int i) const { if constexpr (kMulti) return *tab(i, kTabW); else return tc.w; }
  FKD_HD float t_mt(int i) const { if constexpr (kMulti) return *tab(i, kTabMt); else return tc.mt; }
  FKD_HD float t_lzt(int i) const {
    if constexpr (kMulti) return *tab(i, kTabLzt); else return tc.lzt;
  }
  FKD_HD float t_ssum(int i) const {
    if constexpr (kMulti) return *tab(i, kTabSsum); else return tc.ssum;
  }
  FKD_HD float t_ct(int i) const { if constexpr (kMulti) return *tab(i, kTabCt); else return tc.ct; }
  FKD_HD bool t_sum(int i) const {
    if constexpr (kMulti) return *tab(i, kTabSumT) != 0.f; else return tc.sum_t;
  }

  FKD_HD RowKD(const LogitKDParams& p, const Consts& c, const Group& grp) : P(p), C(c), g(grp) {}

  // Row cache layout: jc student chunks, then (16-byte aligned) jc chunks of each teacher.
  FKD_HD unsigned char* cache_s(int64_t j) const { return g.cache + j * (N * ssz); }
  FKD_HD int64_t cache_t0() const { return (jc * (N * ssz) + 15) / 16 * 16; }
  FKD_HD unsigned char* cache_t(int i, int64_t j) const {
    return g.cache + cache_t0() + (i * jc + j) * (N * tsz);
  }

  FKD_HD static bool aligned_at(const unsigned char* ptr, int esz, int64_t k) {
    const int align = N * esz < 16 ? N * esz : 16;
    return (reinterpret_cast<uintptr_t>(ptr + k * esz) % align) == 0;
  }

  // Chooses the vector layout: the first element k < N at which every pointer used is aligned for
  // chunk loads/stores; if there is none (pointers with different misalignments) the row is
  // processed element by element.
  FKD_HD void layout(bool inputs, bool grads) {
    int found = -1;
    FKD_NO_UNROLL
    for (int k = 0; k < N && found < 0; ++k) {
      bool ok = true;
      if (inputs) ok = ok && aligned_at(s, ssz, k);
      if (grads && gs) ok = ok && aligned_at(gs, ssz, k);
      FKD_NO_UNROLL
      for (int i = 0; i < nt; ++i) {
        if (inputs) ok = ok && aligned_at(t_row(i), tsz, k);
        if (grads && gt_row(i)) ok = ok && aligned_at(gt_row(i), tsz, k);
      }
      if (ok) found = k;
    }
    vec = found >= 0;
    if (vec) {
      head = found < V ? found : V;
      nvec = (V - head) / N;
      tail0 = head + nvec * N;
      nscal = head + (V - tail0);  // < 2N <= 16 <= G: one scalar element per thread at most
    } else {
      head = nvec = tail0 = nscal = 0;
    }
    jc = 0;
    if (vec && inputs && g.cache != nullptr) {
      const int64_t per_chunk = N * ssz + nt * (N * tsz);
      const int64_t fit = g.cache_bytes >= 16 ? (g.cache_bytes - 16) / per_chunk : 0;  // 16: padding
      jc = fit < nvec ? fit : nvec;
    }
  }

  FKD_HD int64_t scalar_index(int64_t k) const { return k < head ? k : tail0 + (k - head); }

  // ---- ignored / invalid rows: loss 0, gradients 0 (the buffers are uninitialised) ----
  FKD_HD void zero_row(int64_t row) {
    if (g.rank == 0) P.row_loss[row] = 0.f;
    bool any = gs != nullptr;
    FKD_NO_UNROLL
    for (int i = 0; i < nt; ++i) any = any || gt_row(i) != nullptr;
    if (!any) return;
    layout(false, true);
    if (vec) {
      FKD_NO_UNROLL
      for (int64_t j = g.rank; j < nvec; j += G) {
        const int64_t v0 = head + j * N;
        if (gs) Vc::store_zero(gs + v0 * ssz, sd);
        FKD_NO_UNROLL
        for (int i = 0; i < nt; ++i)
          if (unsigned char* gt = gt_row(i)) Vc::store_zero(gt + v0 * tsz, td);
      }
      if (g.rank < nscal) zero_elem(scalar_index(g.rank));
    } else {
      FKD_NO_UNROLL
      for (int64_t v = g.rank; v < V; v += G) zero_elem(v);
    }
  }

  FKD_HD void zero_elem(int64_t v) const {
    if (gs) store_elem(gs, sd, v, 0.f);
    FKD_NO_UNROLL
    for (int i = 0; i < nt; ++i)
      if (unsigned char* gt = gt_row(i)) store_elem(gt, td, v, 0.f);
  }

  // ---- pass 1: statistics ----
  // Per-thread online state: m = running raw max, z = sum exp2((x - m) c). While m == -inf the sum
  // is 0, or NaN once a NaN was seen (the shift is then 0: -inf -> 0 and NaN -> NaN).
  // kZ1: also the T = 1 sum (hard CE with T != 1); kCnt: count the entries != -inf (hard CE).
  struct Online {
    float m, z, z1, cnt;
  };

  template <bool kZ1, bool kCnt, int K>
  FKD_HD void online(Online& o, float c, const float (&x)[K]) const {
    float lm = x[0];
    FKD_UNROLL
    for (int e = 1; e < K; ++e) lm = fmaxf(lm, x[e]);
    const float nm = fmaxf(o.m, lm);
    if (nm != o.m) {
      if (o.m != -INFINITY) {  // factor <= 1: no overflow
        const float d = o.m - nm;
        o.z *= ex2(d * c);
        if (kZ1) o.z1 *= ex2(d * kLog2e);
      }
      o.m = nm;
    }
    const float sh = o.m == -INFINITY ? 0.f : o.m;
    FKD_UNROLL
    for (int e = 0; e < K; ++e) {
      const float d = x[e] - sh;  // subtract the raw max before scaling (precision at large |s|)
      o.z += ex2(d * c);
      if (kZ1) o.z1 += ex2(d * kLog2e);
      if (kCnt) o.cnt += x[e] != -INFINITY ? 1.f : 0.f;
    }
  }

  // Rescales a thread's sum from its own max m to the row max mx (unchanged when m is -inf: it is
  // then 0 or NaN whatever the reference).
  FKD_HD static float rescale(float z, float m, float mx, float scale) {
    return (m == mx || m == -INFINITY) ? z : z * ex2((m - mx) * scale);
  }

  // oy: the log mixture's logits y (several teachers, P.log_mixture), summed as mixed_logits
  // does (the same fmaf chain, so pass 1 and the later passes see bitwise the same y).
  template <bool kZ1, bool kCnt, int K, class Src>
  FKD_HD void stats_unit(Online& os, Online (&ot)[kNT], Online& oy, const Src& src) const {
    float x[K], ym[K];
    src.ld_s(x);
    online<kZ1, kCnt>(os, C.c, x);
    FKD_UNROLL
    for (int e = 0; e < K; ++e) ym[e] = 0.f;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) {
      if (kNT == 1 || i < nt) {
        src.ld_t(i, x);
        online<false, false>(ot[i], C.c, x);
        if (kMulti && P.log_mixture) {
          const float wi = t_w(i);
          if (wi > 0.f) {
            FKD_UNROLL
            for (int e = 0; e < K; ++e) ym[e] = fmaf(wi, x[e], ym[e]);
          }
        }
      }
    }
    if (kMulti && P.log_mixture) online<false, false>(oy, C.c, ym);
  }

  // The log mixture's logits y = sum over w_i > 0 of w_i t_i of one unit: log p = log softmax
  // (y / T), so the mixture is one teacher with logits y (statistics in tc) and d/dt_i = w_i d/dy.
  // Teachers of weight 0 are left out (0 * -inf would be NaN); -inf in any other stays -inf.
  template <class Src>
  FKD_HD void mixed_logits(const Src& src, float (&ym)[Src::K]) const {
    constexpr int K = Src::K;
    FKD_UNROLL
    for (int e = 0; e < K; ++e) ym[e] = 0.f;
    weighted_teachers(src, [&](int, float wi, const float (&xt)[K]) {
      FKD_UNROLL
      for (int e = 0; e < K; ++e) ym[e] = fmaf(wi, xt[e], ym[e]);
    });
  }

  // f(i, w_i, chunk of t_i) for the teachers of positive weight, in order (several teachers).
  template <class Src, class F>
  FKD_HD void weighted_teachers(const Src& src, F&& f) const {
    FKD_NO_UNROLL
    for (int i = 0; i < nt; ++i) {
      const float wi = t_w(i);
      if (!(wi > 0.f)) continue;
      float xt[Src::K];
      src.ld_t(i, xt);
      f(i, wi, xt);
    }
  }

  template <bool kZ1, bool kCnt>
  FKD_HD void pass_stats() {
    Online os{-INFINITY, 0.f, 0.f, 0.f}, oy{-INFINITY, 0.f, 0.f, 0.f};
    Online ot[kNT];
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) ot[i] = Online{-INFINITY, 0.f, 0.f, 0.f};

    if (vec) {
      // The cache layout depends on jc, which may differ from the previous row's: wait until
      // every thread is done reading the previous row before overwriting it (several teachers:
      // done at the start of the row).
      if (!kMulti && jc > 0) g.sync();
      FKD_NO_UNROLL
      for (int64_t j = g.rank; j < nvec; j += G) {
        const ChunkSrc<false, true> src{*this, j};
        stats_unit<kZ1, kCnt, N>(os, ot, oy, src);
      }
      if (g.rank < nscal)
        stats_unit<kZ1, kCnt, 1>(os, ot, oy, ElemSrc{*this, scalar_index(g.rank)});
    } else {
      FKD_NO_UNROLL
      for (int64_t v = g.rank; v < V; v += G)
        stats_unit<kZ1, kCnt, 1>(os, ot, oy, ElemSrc{*this, v});
    }

    constexpr int kMy = 1 + kNT;  // several teachers: the max of y (-inf unless log mixture)
    float mx[kMy + (kMulti ? 1 : 0)];
    mx[0] = os.m;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) mx[1 + i] = ot[i].m;  // -inf beyond nt
    if constexpr (kMulti) mx[kMy] = oy.m;
    group_allreduce<OpMax, kRedK>(g, mx);
    float sm[3 + kNT];
    sm[0] = rescale(os.z, os.m, mx[0], C.c);
    sm[1] = kZ1 ? rescale(os.z1, os.m, mx[0], kLog2e) : 0.f;
    sm[2] = os.cnt;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) sm[3 + i] = rescale(ot[i].z, ot[i].m, mx[1 + i], C.c);
    group_allreduce<OpSum, kRedK>(g, sm);

    ms = mx[0];
    lzs = lg2(sm[0]);
    lz1 = kZ1 ? lg2(sm[1]) : lzs;  // T == 1: c == log2(e) exactly, so the CE terms are the soft ones
    nf = sm[2];
    // A row that is -inf everywhere has max -inf and sum exactly 0; with a NaN the sum is NaN and
    // the row goes on (its loss becomes NaN, as in the reference).
    flag_bits = 0;
    if (mx[0] == -INFINITY && sm[0] == 0.f) flag_bits |= kFlagStudentAllMasked;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) {
      if (kNT == 1 || i < nt) {
        if (mx[1 + i] == -INFINITY && sm[3 + i] == 0.f) flag_bits |= kFlagTeacherAllMasked;
        if constexpr (!kMulti) {
          tc.mt = mx[1];
          tc.lzt = lg2(sm[3]);
        } else if (g.rank == 0) {  // every thread holds the same reduced values
          *tab(i, kTabMt) = mx[1 + i];
          *tab(i, kTabLzt) = lg2(sm[3 + i]);
        }
      }
    }
    if constexpr (kMulti) {
      if (P.log_mixture) {  // y's sum: one more reduction, only for a log mixture
        float zy[1] = {rescale(oy.z, oy.m, mx[kMy], C.c)};
        group_allreduce<OpSum, kRedK>(g, zy);
        tc.mt = mx[kMy];
        tc.lzt = lg2(zy[0]);
        if (mx[kMy] == -INFINITY && zy[0] == 0.f) flag_bits |= kFlagMixtureAllMasked;
      }
      g.sync();
    }
  }

  // ---- sources of one unit of work: a chunk of N elements, or one element ----
  // kLast: the row is not read again, so its lines are loaded evict-first. kKeep (pass 1): copy
  // the chunk into the row cache when it has a slot there.
  template <bool kLast, bool kKeep>
  struct ChunkSrc {
    static constexpr int K = N;
    const RowKD& r;
    int64_t j;
    FKD_HD int64_t v0() const { return r.head + j * N; }
    FKD_HD void ld_s(float (&x)[N]) const {
      if (!kKeep && j < r.jc) Vc::load_shared(r.cache_s(j), r.sd, x);
      else Vc::template load<kLast>(r.s + v0() * r.ssz, r.sd, kKeep && j < r.jc ? r.cache_s(j) : nullptr, x);
    }
    FKD_HD void ld_t(int i, float (&x)[N]) const {
      if (!kKeep && j < r.jc) Vc::load_shared(r.cache_t(i, j), r.td, x);
      else Vc::template load<kLast>(r.t_row(i) + v0() * r.tsz, r.td,
                                    kKeep && j < r.jc ? r.cache_t(i, j) : nullptr, x);
    }
    FKD_HD void st_s(const float (&o)[N]) const { Vc::store(r.gs + v0() * r.ssz, r.sd, o); }
    FKD_HD void st_t(int i, const float (&o)[N]) const {
      Vc::store(r.gt_row(i) + v0() * r.tsz, r.td, o);
    }
    // Index of the target in this chunk, or -1.
    FKD_HD int target_at() const {
      const int64_t a = v0();
      return r.y >= a && r.y < a + N ? static_cast<int>(r.y - a) : -1;
    }
  };

  struct ElemSrc {
    static constexpr int K = 1;
    const RowKD& r;
    int64_t v;
    FKD_HD void ld_s(float (&x)[1]) const { x[0] = load_elem(r.s, r.sd, v); }
    FKD_HD void ld_t(int i, float (&x)[1]) const { x[0] = load_elem(r.t_row(i), r.td, v); }
    FKD_HD void st_s(const float (&o)[1]) const { store_elem(r.gs, r.sd, v, o[0]); }
    FKD_HD void st_t(int i, const float (&o)[1]) const {
      store_elem(r.gt_row(i), r.td, v, o[0]);
    }
    FKD_HD int target_at() const { return v == r.y ? 0 : -1; }
  };

  // ---- passes 2 and 3 ----
  // Sweep sums, per thread, acc:
  //   [0] kl: sum p (Lp - Lq); rkl: sum q (Lq - Lp) but the entry at kXd; jsd: Kp;
  //       tvd: sum |p - q|
  //   [1] jsd: Kq; tvd: sum q h; rkl: sum q but the entry at kXd
  //   [2] CE smoothing: sum over s != -inf of -Lq1     [3 + i] S_i (teacher i)
  //   [kXd] rkl: Lq - Lp at the first entry of the thread where s is the row max (-inf: none)
  // Base-2 logs in [0..2], natural units in [3 + i]. Every term multiplied by a probability is selected
  // to exactly 0 where that probability is 0 (never 0 * inf); the test is == 0 so that a NaN
  // probability still reaches the sums.

  // Teacher i of one unit: dD/db_iv = w_i (p_iv g_v - p_iv S_i). Sums: accumulates S_i; Write:
  // stores the gradient (exact zeros for a teacher of weight 0).
  template <Divergence D, SweepMode M, class Src>
  FKD_HD void teacher_side(int i, const Src& src, const float (&lp)[Src::K],
                           const float (&p)[Src::K], const float (&q)[Src::K],
                           const float (&gv)[Src::K], float (&acc)[kAccN], bool store) const {
    constexpr int K = Src::K;
    const float ct = M == SweepMode::Write ? t_ct(i) : 0.f;
    const bool need = M == SweepMode::Sums ? t_sum(i) : ct != 0.f;
    const bool st = M == SweepMode::Write && store && gt_row(i) != nullptr;
    if (!need && !st) return;
    float o[K];
    FKD_UNROLL
    for (int e = 0; e < K; ++e) o[e] = 0.f;
    if (need) {
      float lpi[K], pi[K];
      if (!kMulti || P.log_mixture) {  // a log mixture: teacher y, times w_i (in ct)
        FKD_UNROLL
        for (int e = 0; e < K; ++e) { lpi[e] = lp[e]; pi[e] = p[e]; }
      } else {
        float xt[K];
        src.ld_t(i, xt);
        const float mt = t_mt(i), lzt = t_lzt(i);
        FKD_UNROLL
        for (int e = 0; e < K; ++e) {
          lpi[e] = fmaf(xt[e] - mt, C.c, -lzt);
          pi[e] = ex2(lpi[e]);
        }
      }
      const float ssum = M == SweepMode::Write ? t_ssum(i) : 0.f;
      float sacc = 0.f;
      FKD_UNROLL
      for (int e = 0; e < K; ++e) {
        float pg;  // p_iv g_v, 0 where p_iv = 0
        if constexpr (D == Divergence::ReverseKL) {
          // g_v = -q_v / p_v: p_iv g_v = -q_v exp(logp_iv - logp_v) (one teacher: -q_v)
          if constexpr (kMulti) pg = lpi[e] == -INFINITY ? 0.f : -q[e] * ex2(lpi[e] - lp[e]);
          else pg = -q[e];
        } else {
          pg = pi[e] == 0.f ? 0.f : pi[e] * gv[e];
        }
        if constexpr (M == SweepMode::Sums) sacc += pg;
        else o[e] = ct * (pg - pi[e] * ssum);
      }
      if constexpr (M == SweepMode::Sums) acc[3 + i] += sacc;
    }
    if (st) src.st_t(i, o);
  }

  template <Divergence D, SweepMode M, bool kHard, class Src>
  FKD_HD void unit(const Src& src, float (&acc)[kAccN], bool wr_t) const {
    constexpr int K = Src::K;
    constexpr bool kAcc = M != SweepMode::Write;
    constexpr bool kWr = M != SweepMode::Sums;
    float xs[K], lq[K], q[K], lp[K];
    src.ld_s(xs);
    FKD_UNROLL
    for (int e = 0; e < K; ++e) {
      lq[e] = fmaf(xs[e] - ms, C.c, -lzs);  // log2 q_v
      q[e] = ex2(lq[e]);
    }
    if constexpr (!kMulti) {
      float xt[K];
      src.ld_t(0, xt);
      FKD_UNROLL
      for (int e = 0; e < K; ++e) lp[e] = fmaf(xt[e] - tc.mt, C.c, -tc.lzt);
    } else if (P.log_mixture) {
      float ym[K];
      mixed_logits(src, ym);
      FKD_UNROLL
      for (int e = 0; e < K; ++e) lp[e] = fmaf(ym[e] - tc.mt, C.c, -tc.lzt);
    } else {
      // log2 sum_i w_i p_iv, accumulated online over the teachers with w_i > 0, shifted by the
      // running max (no underflow; a NaN anywhere gives NaN).
      float mm[K], sa[K];
      FKD_UNROLL
      for (int e = 0; e < K; ++e) { mm[e] = -INFINITY; sa[e] = 0.f; }
      weighted_teachers(src, [&](int i, float wi, const float (&xt)[K]) {
        const float mt = t_mt(i), lzt = t_lzt(i);
        FKD_UNROLL
        for (int e = 0; e < K; ++e) {
          const float l = fmaf(xt[e] - mt, C.c, -lzt);
          const float nm = fmax_nan(mm[e], l);
          const float old = mm[e] == -INFINITY ? 0.f : sa[e] * ex2(mm[e] - nm);
          sa[e] = old + (l == -INFINITY ? 0.f : wi * ex2(l - nm));
          mm[e] = nm;
        }
      });
      FKD_UNROLL
      for (int e = 0; e < K; ++e) lp[e] = mm[e] == -INFINITY ? -INFINITY : mm[e] + lg2(sa[e]);
    }

    const int ey = kHard ? src.target_at() : -1;
    float og[K], gv[K], pv[K];
    FKD_UNROLL
    for (int e = 0; e < K; ++e) {
      const float p = ex2(lp[e]);
      pv[e] = p;
      float dda = 0.f;  // dD/da_v
      gv[e] = 0.f;      // g_v (natural units) for S_i and the teacher gradients (rkl: see below)
      if constexpr (D == Divergence::KL) {
        const float diff = lp[e] - lq[e];
        if (kAcc) acc[0] += p == 0.f ? 0.f : p * diff;
        dda = q[e] - p;
        gv[e] = kLn2 * diff;
      } else if constexpr (D == Divergence::ReverseKL) {
        // dD/da_v = q_v (x_v - sum_u q_u x_u), x = Lq - Lp, taken as q_v ((x_v - x*) - sum_u q_u
        // (x_u - x*)) with x* = x at a dominant entry (s = row max), which is exact algebra
        // (sum q = 1): in a confident row the dominant x_v nearly equals the sum, and their
        // difference would be float32 noise of size |x|. Dominant entries stay out of acc[0..1]
        // (finish_sums adds them with the shift); at the one that gives x*, x_v - x* is exactly 0.
        const float diff = lq[e] - lp[e];
        if (kAcc) {
          if (xs[e] == ms && acc[kXd] == -INFINITY) {
            acc[kXd] = diff;
          } else if (q[e] != 0.f) {
            acc[0] += q[e] * diff;
            acc[1] += q[e];
          }
        }
        dda = q[e] == 0.f ? 0.f : q[e] * fmaf(kLn2, diff - x1, -dsum);
      } else if constexpr (D == Divergence::JSD) {
        const float mm = fmaxf(lp[e], lq[e]);
        const float lm =
            mm == -INFINITY
                ? -INFINITY
                : mm + lg2(C.beta * ex2(lp[e] - mm) + C.one_minus_beta * ex2(lq[e] - mm));
        if (kAcc) {
          acc[0] += p == 0.f ? 0.f : p * (lp[e] - lm);
          acc[1] += q[e] == 0.f ? 0.f : q[e] * (lq[e] - lm);
        }
        dda = C.one_minus_beta * (q[e] == 0.f ? 0.f : q[e] * fmaf(kLn2, lq[e] - lm, -x1));
        gv[e] = C.beta * kLn2 * (lp[e] - lm);
      } else {  // TVD
        const float diff = p - q[e];
        const float sg = sign_nan(diff);
        if (kAcc) {
          acc[0] += fabsf(diff);
          acc[1] += q[e] * (-0.5f * sg);
        }
        dda = q[e] * (-0.5f * sg - x1);
        gv[e] = 0.5f * sg;
      }

      // Hard CE at T = 1 (lz1 == lzs when T == 1, and then the soft terms are reused).
      const float lq1 = fmaf(xs[e] - ms, kLog2e, -lz1);
      if (kAcc && (kHard || M == SweepMode::Sums)) acc[2] += xs[e] == -INFINITY ? 0.f : -lq1;
      og[e] = 0.f;
      if (kWr) {
        float gce = 0.f;
        if (kHard) {
          const float q1 = C.same_t ? q[e] : ex2(lq1);
          // (1 - eps)(q1 - [v = y]) + (eps / V)(nf q1 - [s_v finite]): where a single finite
          // entry has q1 = 1, both brackets are exactly 0.
          gce = fmaf(b1, q1 - (e == ey ? 1.f : 0.f),
                     c1 * fmaf(nf, q1, xs[e] != -INFINITY ? -1.f : 0.f));
        }
        og[e] = fmaf(cs, dda, gce);
      }
    }
    if (kWr && gs) src.st_s(og);

    // Teacher side: dD/db_iv = w_i (p_iv g_v - p_iv S_i).
    if constexpr (M != SweepMode::Merged) {
      if constexpr (!kMulti) {
        teacher_side<D, M>(0, src, lp, pv, q, gv, acc, wr_t);
      } else if constexpr (M == SweepMode::Sums) {  // S_i goes to the register acc[3 + i]
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt) teacher_side<D, M>(i, src, lp, pv, q, gv, acc, wr_t);
      } else {
        FKD_NO_UNROLL
        for (int i = 0; i < nt; ++i) teacher_side<D, M>(i, src, lp, pv, q, gv, acc, wr_t);
      }
    }
  }

  // One sweep over the row. reverse: from the end of the row backwards, so that the chunks loaded
  // last in the previous pass (most likely still in L2) come first.
  template <Divergence D, SweepMode M, bool kHard, bool kLast>
  FKD_HD void sweep(bool reverse, float (&acc)[kAccN]) const {
    const bool wr_t = M == SweepMode::Write && any_gt;
    if (vec) {
      const int64_t steps = (nvec + G - 1) / G;
      FKD_NO_UNROLL
      for (int64_t step = 0; step < steps; ++step) {
        const int64_t j = (reverse ? steps - 1 - step : step) * G + g.rank;
        if (j < nvec) unit<D, M, kHard>(ChunkSrc<kLast, false>{*this, j}, acc, wr_t);
      }
      if (g.rank < nscal) unit<D, M, kHard>(ElemSrc{*this, scalar_index(g.rank)}, acc, wr_t);
    } else {
      FKD_NO_UNROLL
      for (int64_t v = g.rank; v < V; v += G) unit<D, M, kHard>(ElemSrc{*this, v}, acc, wr_t);
    }
  }

  // Reduces the sweep sums, sets dsum / x1 / S_i and returns the row loss.
  template <Divergence D>
  FKD_HD float finish_sums(float (&acc)[kAccN], float nll) {
    float red[kSumN];  // acc[3 + i] is 0 for i >= nt
    FKD_UNROLL
    for (int k = 0; k < kSumN; ++k) red[k] = acc[k];
    if constexpr (D == Divergence::ReverseKL) {
      // red[0]: sum q x, the loss; red[1]: sum q (x - x*), with x* the largest of the threads'
      // dominant x (the row max is reached, so some thread has one). Every dominant entry has
      // q = 2^-lzs. Only the student gradient reads red[1] and x*.
      const float xd = acc[kXd];
      const float qd = xd == -INFINITY ? 0.f : ex2(-lzs);
      float xm[1] = {0.f};
      if (want_gs) {
        xm[0] = xd;
        group_allreduce<OpMax, kRedK>(g, xm);
      }
      x1 = xm[0];
      red[0] = acc[0] + (qd == 0.f ? 0.f : qd * xd);
      red[1] = (acc[1] == 0.f ? acc[0] : fmaf(-acc[1], x1, acc[0])) +
               (qd == 0.f ? 0.f : qd * (xd - x1));
    }
    group_allreduce<OpSum, kRedK>(g, red);
    if constexpr (D == Divergence::KL) {
      dsum = kLn2 * red[0];
    } else if constexpr (D == Divergence::ReverseKL) {
      dsum = kLn2 * red[1];
    } else if constexpr (D == Divergence::JSD) {
      const float kp = kLn2 * red[0];
      x1 = kLn2 * red[1];
      dsum = C.beta * kp + C.one_minus_beta * x1;
    } else {
      dsum = 0.5f * red[0];
      x1 = red[1];
    }
    if constexpr (!kMulti) {
      tc.ssum = D == Divergence::ReverseKL ? -1.f : red[3];  // rkl: S = -sum q = -1
    } else if (any_gt) {  // only the teacher gradients (pass 3) read S_i
      if (g.rank == 0) {
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt) *tab(i, kTabSsum) = red[3 + i];
      }
      g.sync();
    }
    float loss = P.soft_factor * (D == Divergence::ReverseKL ? kLn2 * red[0] : dsum);
    if (hard) {
      const float ce = C.eps == 0.f ? nll
                                    : fmaf(1.f - C.eps, nll, C.eps_over_v * (kLn2 * red[2]));
      loss = fmaf(C.hard_weight, ce, loss);
    }
    return loss;
  }

  template <Divergence D>
  FKD_HD void sweeps(int64_t row, float nll) {
    float acc[kAccN];
    FKD_UNROLL
    for (int k = 0; k < kSumN; ++k) acc[k] = 0.f;
    acc[kXd] = -INFINITY;
    float loss;
    if (D == Divergence::KL && want_gs && !any_gt) {
      // The common case: the student gradient q - p needs no row sum.
      if (hard) sweep<D, SweepMode::Merged, true, true>(true, acc);
      else sweep<D, SweepMode::Merged, false, true>(true, acc);
      loss = finish_sums<D>(acc, nll);
    } else if (!want_gs && !any_gt) {
      sweep<D, SweepMode::Sums, false, true>(true, acc);
      loss = finish_sums<D>(acc, nll);
    } else {
      sweep<D, SweepMode::Sums, false, false>(true, acc);
      loss = finish_sums<D>(acc, nll);
      if (hard) sweep<D, SweepMode::Write, true, true>(false, acc);
      else sweep<D, SweepMode::Write, false, true>(false, acc);
    }
    if (g.rank == 0) P.row_loss[row] = loss;
  }

  FKD_HD void run(int64_t row) {
    // Read per row rather than once per CTA: held across the row loop it would take a register.
    const float gscale = P.grad_scale != nullptr ? *P.grad_scale : 1.f;
    V = P.vocab;
    nt = kMulti ? P.num_teachers : 1;
    sd = P.student_dtype;
    td = P.teacher_dtype;
    ssz = dtype_size(sd);
    tsz = dtype_size(td);
    s = static_cast<const unsigned char*>(P.student) + row * P.student_stride * ssz;
    gs = P.grad_student ? static_cast<unsigned char*>(P.grad_student) + row * V * ssz : nullptr;
    any_gt = false;
    if constexpr (!kMulti) {
      tc = Teacher{nullptr, nullptr, 0.f, -INFINITY, 0.f, 0.f, 0.f, false};
      tc.t = static_cast<const unsigned char*>(P.teacher[0]) + row * P.teacher_stride[0] * tsz;
      tc.gt = P.grad_teacher[0] ? static_cast<unsigned char*>(P.grad_teacher[0]) + row * V * tsz
                                : nullptr;
      tc.w = P.teacher_weight[0];
      any_gt = tc.gt != nullptr;
    } else {
      // Every thread must be done with the previous row (its table and row cache) first.
      g.sync();
      FKD_UNROLL
      for (int i = 0; i < kNT; ++i) {
        if (i < nt) {
          any_gt = any_gt || P.grad_teacher[i] != nullptr;
          if (g.rank == 0) {
            const float w = P.teacher_weight[i];
            unsigned char* gt =
                P.grad_teacher[i] ? static_cast<unsigned char*>(P.grad_teacher[i]) + row * V * tsz
                                  : nullptr;
            tab_set_ptr(i, kTabT, static_cast<const unsigned char*>(P.teacher[i]) +
                                      row * P.teacher_stride[i] * tsz);
            tab_set_ptr(i, kTabGt, gt);
            *tab(i, kTabW) = w;
            // As for one teacher below; known before the row is read.
            const bool need = gt != nullptr && w != 0.f;
            *tab(i, kTabSumT) = need ? 1.f : 0.f;
            *tab(i, kTabCt) = need ? C.sf_over_t * gscale * w : 0.f;
          }
        }
      }
      g.sync();
    }
    y = -1;
    if (P.target != nullptr) {
      y = P.target[row];
      if (y == P.ignore_index) {
        zero_row(row);
        return;
      }
      if (y < 0 || y >= V) {
        if (g.rank == 0 && P.flags != nullptr) atomic_or_flag(P.flags, kFlagTargetOutOfRange);
        zero_row(row);
        return;
      }
    }
    hard = P.target != nullptr && P.hard_weight != 0.f;

    layout(true, true);
    if (!hard) pass_stats<false, false>();
    else if (C.same_t) pass_stats<false, true>();
    else pass_stats<true, true>();
    if (flag_bits != 0) {
      if (g.rank == 0 && P.flags != nullptr) atomic_or_flag(P.flags, flag_bits);
      zero_row(row);
      return;
    }

    float nll = 0.f;
    if (hard) {  // every thread reads the same element (one broadcast load per warp)
      const float xy = load_elem(s, sd, y);
      nll = -kLn2 * fmaf(xy - ms, kLog2e, -lz1);
    } else {
      y = -1;
    }
    want_gs = gs != nullptr;
    cs = C.sf_over_t * gscale;
    if (hard) {
      const float hw = C.hard_weight * gscale;
      b1 = hw * (1.f - C.eps);
      c1 = hw * C.eps_over_v;
    }
    if constexpr (!kMulti) {
      const bool need = tc.gt != nullptr && tc.w != 0.f;
      tc.sum_t = need && P.divergence != Divergence::ReverseKL;  // rkl: S = -1 without a sum
      // A teacher of weight 0 gets ct = 0 and exact zeros (never 0 * inf).
      tc.ct = need ? C.sf_over_t * gscale * tc.w : 0.f;
    }

    switch (P.divergence) {
      case Divergence::KL: sweeps<Divergence::KL>(row, nll); break;
      case Divergence::ReverseKL: sweeps<Divergence::ReverseKL>(row, nll); break;
      case Divergence::JSD: sweeps<Divergence::JSD>(row, nll); break;
      default: sweeps<Divergence::TVD>(row, nll); break;
    }
  }
};

}  // namespace logit_cuda
}  // namespace fastkd
