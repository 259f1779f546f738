// Per-row core of the fused logit-KD CUDA kernel (csrc/cuda/logit_kd.cu); math in
// fastkd/logit/reference.py and csrc/include/fastkd/logit_kd.h.
//
// Everything here is written against an abstract thread group (a CUDA block, a warp, or a host
// emulation of either), so the same code can be compiled by a host compiler and checked without a
// GPU. A group provides:
//   static constexpr int kSize;          // threads, a multiple of 32
//   int rank;                            // this thread, 0 <= rank < kSize
//   float* red;                          // shared scratch of RowKD::kRedFloats floats (kSize > 32)
//   unsigned char* cache;                // shared row cache (16-byte aligned) or null
//   int64_t cache_bytes;                 // its size
//   void sync() const;                   // barrier of the whole group
//   float shfl_xor(float v, int m) const;  // __shfl_xor_sync within a warp of 32
//
// Row algorithm (one group per row, all statistics in float32, logs in base 2 internally):
//   pass 1: online (max, sum-exp) of s/T (and of s at T = 1 for the hard CE) and of each t_i/T;
//   pass 2: the row sums that the gradients need (D, Kq, sum q h, S_i, CE smoothing) and the loss;
//   pass 3: the gradients. When no gradient needs a row sum (kl, or only the loss), passes 2 and 3
//   are one sweep. Each thread keeps the first chunks of the row it loads in pass 1 in shared
//   memory (same thread, same chunk in every pass, so no barrier is needed), and the later passes
//   alternate direction, so that the re-read of the rest hits the most recently loaded L2 lines.
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
#else
#define FKD_HD inline
#define FKD_UNROLL
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

FKD_HD float inf_f() { return INFINITY; }

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

// exp2f / log2f of the CUDA math library (2 ulp / 1 ulp, subnormals handled), not fast-math.
FKD_HD float ex2(float x) { return exp2f(x); }
FKD_HD float lg2(float x) { return log2f(x); }

// max that returns NaN if either argument is NaN (fmaxf ignores NaN).
FKD_HD float fmax_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// sign(x) with sign(0) = 0 and sign(NaN) = NaN.
FKD_HD float sign_nan(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : x * 0.f); }

FKD_HD void atomic_or_flag(int* flags, int bits) {
#ifdef __CUDA_ARCH__
  atomicOr(flags, bits);
#else
  __atomic_fetch_or(flags, bits, __ATOMIC_RELAXED);
#endif
}

// ---- element types -------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  FKD_HD static float load1(const float* p) { return *p; }
  FKD_HD static void store1(float* p, float x) { *p = x; }
  // One 32-bit word holds 1 element.
  FKD_HD static void unpack(uint32_t w, float* f) { f[0] = bits_to_float(w); }
  FKD_HD static uint32_t pack(const float* f) { return float_to_bits(f[0]); }
};

template <>
struct Elem<__nv_bfloat16> {
  FKD_HD static float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  FKD_HD static void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
  // One word holds 2 elements, the first in the low half (little endian). bf16 -> f32 is exact.
  FKD_HD static void unpack(uint32_t w, float* f) {
    f[0] = bits_to_float(w << 16);
    f[1] = bits_to_float(w & 0xffff0000u);
  }
  FKD_HD static uint32_t pack(const float* f) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[0], f[1]);
    uint32_t u;
    std::memcpy(&u, &h, sizeof u);
    return u;
  }
};

template <>
struct Elem<__half> {
  FKD_HD static float load1(const __half* p) { return __half2float(*p); }
  FKD_HD static void store1(__half* p, float x) { *p = __float2half_rn(x); }
  FKD_HD static float from_bits(uint32_t b) {
    __half_raw r;
    r.x = static_cast<unsigned short>(b);
    return __half2float(__half(r));
  }
  FKD_HD static void unpack(uint32_t w, float* f) {
    f[0] = from_bits(w & 0xffffu);
    f[1] = from_bits(w >> 16);
  }
  FKD_HD static uint32_t pack(const float* f) {
    const __half2 h = __floats2half2_rn(f[0], f[1]);
    uint32_t u;
    std::memcpy(&u, &h, sizeof u);
    return u;
  }
};

// N consecutive elements of T as raw 32-bit words (8, 16 or 32 bytes).
template <typename T, int N>
struct Raw {
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  static constexpr int kWords = N / kPerWord;
  static constexpr int kBytes = kWords * 4;
  static_assert(kBytes == 8 || kBytes == 16 || kBytes == 32, "chunk of 8, 16 or 32 bytes");
  uint32_t w[kWords];

  FKD_HD void to_float(float (&f)[N]) const {
    FKD_UNROLL
    for (int k = 0; k < kWords; ++k) Elem<T>::unpack(w[k], f + k * kPerWord);
  }
  FKD_HD void from_float(const float (&f)[N]) {
    FKD_UNROLL
    for (int k = 0; k < kWords; ++k) w[k] = Elem<T>::pack(f + k * kPerWord);
  }
};

// Global loads: read-only path, or evict-first (".cs") for the last read of a row.
template <bool kStream, int W>
FKD_HD void load_global(const void* ptr, uint32_t (&w)[W]) {
#ifdef __CUDA_ARCH__
  if constexpr (W == 2) {
    const uint2* q = static_cast<const uint2*>(ptr);
    uint2 v;
    if constexpr (kStream) v = __ldcs(q); else v = __ldg(q);
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(W % 4 == 0, "16-byte pieces");
    const uint4* q = static_cast<const uint4*>(ptr);
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k) {
      uint4 v;
      if constexpr (kStream) v = __ldcs(q + k); else v = __ldg(q + k);
      w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
    }
  }
#else
  std::memcpy(w, ptr, sizeof w);
#endif
}

// Gradient stores: written once, never read here, so evict-first keeps L2 for the inputs.
template <int W>
FKD_HD void store_global(void* ptr, const uint32_t (&w)[W]) {
#ifdef __CUDA_ARCH__
  if constexpr (W == 2) {
    __stcs(static_cast<uint2*>(ptr), make_uint2(w[0], w[1]));
  } else {
    uint4* q = static_cast<uint4*>(ptr);
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k)
      __stcs(q + k, make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]));
  }
#else
  std::memcpy(ptr, w, sizeof w);
#endif
}

template <int W>
FKD_HD void load_shared(const unsigned char* ptr, uint32_t (&w)[W]) {
#ifdef __CUDA_ARCH__
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
  std::memcpy(w, ptr, sizeof w);
#endif
}

template <int W>
FKD_HD void store_shared(unsigned char* ptr, const uint32_t (&w)[W]) {
#ifdef __CUDA_ARCH__
  if constexpr (W == 2) {
    *reinterpret_cast<uint2*>(ptr) = make_uint2(w[0], w[1]);
  } else {
    FKD_UNROLL
    for (int k = 0; k < W / 4; ++k)
      reinterpret_cast<uint4*>(ptr)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
  }
#else
  std::memcpy(ptr, w, sizeof w);
#endif
}

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
template <typename TS, typename TT, bool kMulti>
struct KDTraits {
  static constexpr int kNT = kMulti ? kMaxTeachers : 1;
  // Elements per chunk: 16 bytes of the narrower input type (one teacher), 4 with several teachers
  // (keeps 8 teachers' chunks in registers).
  static constexpr int kMinSize = sizeof(TS) < sizeof(TT) ? static_cast<int>(sizeof(TS))
                                                          : static_cast<int>(sizeof(TT));
  static constexpr int kVec = kMulti ? 4 : 16 / kMinSize;
  static constexpr int kUnroll = kMulti ? 1 : 2;  // chunks in flight per thread per input
  static constexpr int kRedK = 3 + kNT;           // the largest reduction of a row
};

template <typename TS, typename TT, bool kMulti, class Group>
struct RowKD {
  using Tr = KDTraits<TS, TT, kMulti>;
  static constexpr int kNT = Tr::kNT;
  static constexpr int N = Tr::kVec;
  static constexpr int U = Tr::kUnroll;
  static constexpr int kRedK = Tr::kRedK;
  static constexpr int kRedFloats = red_floats<Group::kSize, kRedK>();
  static constexpr int64_t G = Group::kSize;
  using RS = Raw<TS, N>;
  using RT = Raw<TT, N>;

  const LogitKDParams& P;
  const Consts& C;
  const Group& g;

  int64_t V = 0;
  int nt = 1;
  const TS* __restrict__ s = nullptr;
  const TT* t[kNT] = {};
  TS* gs = nullptr;
  TT* gt[kNT] = {};
  float w[kNT] = {};

  // Layout of the row: `head` scalar elements, nvec chunks of N, scalar elements from tail0.
  bool vec = false;
  int64_t head = 0, nvec = 0, tail0 = 0, nscal = 0;
  int64_t jc = 0;  // chunks [0, jc) of every input are kept in g.cache

  // Statistics (pass 1).
  float ms = 0.f, lzs = 0.f, lz1 = 0.f, nf = 0.f;
  float mt[kNT] = {}, lzt[kNT] = {};
  int64_t y = -1;
  bool hard = false, hard2 = false, count_nf = false;

  // Row sums (natural-log units) and gradient coefficients.
  float dsum = 0.f, x1 = 0.f;  // D, and Kq (jsd) or sum_u q_u h_u (tvd)
  float ssum[kNT] = {};
  bool want_gs = false;
  bool sum_t[kNT] = {};  // S_i is needed (teacher gradient through a row sum)
  float cs = 0.f, a1 = 0.f, b1 = 0.f, c1 = 0.f;
  float ct[kNT] = {};

  FKD_HD RowKD(const LogitKDParams& p, const Consts& c, const Group& grp) : P(p), C(c), g(grp) {}

  FKD_HD unsigned char* cache_s() const { return g.cache; }
  FKD_HD unsigned char* cache_t(int i) const {
    return g.cache + jc * static_cast<int64_t>(sizeof(RS)) + i * jc * static_cast<int64_t>(sizeof(RT));
  }

  template <typename T>
  FKD_HD static bool aligned_at(const T* ptr, int64_t k) {
    constexpr int kAlign = Raw<T, N>::kBytes < 16 ? Raw<T, N>::kBytes : 16;
    return (reinterpret_cast<uintptr_t>(ptr + k) % kAlign) == 0;
  }

  // Chooses the vector layout: the first element k < N at which every pointer used is aligned for
  // chunk loads/stores; if there is none the row is processed element by element.
  FKD_HD void layout(bool inputs, bool grads) {
    int found = -1;
    for (int k = 0; k < N && found < 0; ++k) {
      bool ok = true;
      if (inputs) {
        ok = ok && aligned_at(s, k);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt) ok = ok && aligned_at(t[i], k);
      }
      if (grads) {
        if (gs) ok = ok && aligned_at(gs, k);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt && gt[i]) ok = ok && aligned_at(gt[i], k);
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
      const int64_t per_chunk = static_cast<int64_t>(sizeof(RS)) + nt * static_cast<int64_t>(sizeof(RT));
      const int64_t fit = g.cache_bytes / per_chunk;
      jc = fit < nvec ? fit : nvec;
    }
  }

  FKD_HD int64_t scalar_index(int64_t k) const { return k < head ? k : tail0 + (k - head); }

  // ---- ignored / invalid rows: loss 0, gradients 0 ----
  FKD_HD void zero_row(int64_t row) {
    if (g.rank == 0) P.row_loss[row] = 0.f;
    bool any = gs != nullptr;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) any = any || (i < nt && gt[i] != nullptr);
    if (!any) return;
    layout(false, true);
    const float zf[N] = {};
    RS zs;
    RT zt;
    zs.from_float(zf);
    zt.from_float(zf);
    if (vec) {
      for (int64_t j = g.rank; j < nvec; j += G) {
        const int64_t v0 = head + j * N;
        if (gs) store_global(gs + v0, zs.w);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt && gt[i]) store_global(gt[i] + v0, zt.w);
      }
      if (g.rank < nscal) {
        const int64_t v = scalar_index(g.rank);
        if (gs) Elem<TS>::store1(gs + v, 0.f);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt && gt[i]) Elem<TT>::store1(gt[i] + v, 0.f);
      }
    } else {
      for (int64_t v = g.rank; v < V; v += G) {
        if (gs) Elem<TS>::store1(gs + v, 0.f);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt && gt[i]) Elem<TT>::store1(gt[i] + v, 0.f);
      }
    }
  }

  // ---- pass 1: statistics ----
  // Per-thread online state: m = running raw max, z = sum exp2((x - m) c); while m == -inf the sum
  // is 0, or NaN once a NaN was seen (x - 0 keeps -inf -> 0 and NaN -> NaN).
  struct Stats {
    float m_s, z_s, z_1, cnt;
    float m_t[kNT], z_t[kNT];
  };

  template <int M>
  FKD_HD void acc_student(Stats& st, const float (&x)[M]) const {
    float lm = x[0];
    FKD_UNROLL
    for (int e = 1; e < M; ++e) lm = fmaxf(lm, x[e]);
    const float nm = fmaxf(st.m_s, lm);
    if (nm != st.m_s) {
      if (st.m_s != -INFINITY) {  // factor <= 1: no overflow
        const float d = st.m_s - nm;
        st.z_s *= ex2(d * C.c);
        if (hard2) st.z_1 *= ex2(d * kLog2e);
      }
      st.m_s = nm;
    }
    const float sh = st.m_s == -INFINITY ? 0.f : st.m_s;
    FKD_UNROLL
    for (int e = 0; e < M; ++e) {
      const float d = x[e] - sh;
      st.z_s += ex2(d * C.c);
      if (hard2) st.z_1 += ex2(d * kLog2e);
      if (count_nf) st.cnt += x[e] != -INFINITY ? 1.f : 0.f;
    }
  }

  template <int M>
  FKD_HD void acc_teacher(Stats& st, int i, const float (&x)[M]) const {
    float lm = x[0];
    FKD_UNROLL
    for (int e = 1; e < M; ++e) lm = fmaxf(lm, x[e]);
    const float nm = fmaxf(st.m_t[i], lm);
    if (nm != st.m_t[i]) {
      if (st.m_t[i] != -INFINITY) st.z_t[i] *= ex2((st.m_t[i] - nm) * C.c);
      st.m_t[i] = nm;
    }
    const float sh = st.m_t[i] == -INFINITY ? 0.f : st.m_t[i];
    FKD_UNROLL
    for (int e = 0; e < M; ++e) st.z_t[i] += ex2((x[e] - sh) * C.c);
  }

  // Rescales a thread's sum from its own max m to the row max mx (sum unchanged when m is -inf:
  // it is then 0 or NaN whatever the reference).
  FKD_HD static float rescale(float z, float m, float mx, float scale) {
    return (m == mx || m == -INFINITY) ? z : z * ex2((m - mx) * scale);
  }

  FKD_HD void load_scalar(int64_t v, float& xs, float (&xt)[kNT]) const {
    xs = Elem<TS>::load1(s + v);
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) xt[i] = i < nt ? Elem<TT>::load1(t[i] + v) : 0.f;
  }

  FKD_HD void pass_stats() {
    Stats st;
    st.m_s = -INFINITY; st.z_s = 0.f; st.z_1 = 0.f; st.cnt = 0.f;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) { st.m_t[i] = -INFINITY; st.z_t[i] = 0.f; }

    if (vec) {
      // The cache layout depends on jc, which may differ from the previous row's: wait until
      // every thread is done reading the previous row before overwriting it.
      if (jc > 0) g.sync();
      const int64_t steps = (nvec + G - 1) / G;
      for (int64_t s0 = 0; s0 < steps; s0 += U) {
        RS rs[U];
        RT rt[U][kNT];
        int64_t jj[U];
        bool ok[U];
        FKD_UNROLL
        for (int u = 0; u < U; ++u) {
          jj[u] = (s0 + u) * G + g.rank;
          ok[u] = jj[u] < nvec;
          if (ok[u]) {
            const int64_t v0 = head + jj[u] * N;
            load_global<false>(s + v0, rs[u].w);
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i)
              if (i < nt) load_global<false>(t[i] + v0, rt[u][i].w);
          }
        }
        FKD_UNROLL
        for (int u = 0; u < U; ++u) {
          if (!ok[u]) continue;
          if (jj[u] < jc) {
            store_shared(cache_s() + jj[u] * static_cast<int64_t>(sizeof(RS)), rs[u].w);
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i)
              if (i < nt) store_shared(cache_t(i) + jj[u] * static_cast<int64_t>(sizeof(RT)), rt[u][i].w);
          }
          float x[N];
          rs[u].to_float(x);
          acc_student(st, x);
          FKD_UNROLL
          for (int i = 0; i < kNT; ++i) {
            if (i < nt) {
              rt[u][i].to_float(x);
              acc_teacher(st, i, x);
            }
          }
        }
      }
      if (g.rank < nscal) {
        float xs[1], xt[kNT];
        load_scalar(scalar_index(g.rank), xs[0], xt);
        acc_student(st, xs);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i) {
          if (i < nt) {
            const float x[1] = {xt[i]};
            acc_teacher(st, i, x);
          }
        }
      }
    } else {
      for (int64_t v = g.rank; v < V; v += G) {
        float xs[1], xt[kNT];
        load_scalar(v, xs[0], xt);
        acc_student(st, xs);
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i) {
          if (i < nt) {
            const float x[1] = {xt[i]};
            acc_teacher(st, i, x);
          }
        }
      }
    }

    float mx[1 + kNT];
    mx[0] = st.m_s;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) mx[1 + i] = st.m_t[i];
    group_allreduce<OpMax, kRedK>(g, mx);
    float sm[3 + kNT];
    sm[0] = rescale(st.z_s, st.m_s, mx[0], C.c);
    sm[1] = hard2 ? rescale(st.z_1, st.m_s, mx[0], kLog2e) : 0.f;
    sm[2] = st.cnt;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) sm[3 + i] = rescale(st.z_t[i], st.m_t[i], mx[1 + i], C.c);
    group_allreduce<OpSum, kRedK>(g, sm);

    ms = mx[0];
    lzs = lg2(sm[0]);
    lz1 = hard2 ? lg2(sm[1]) : lzs;
    nf = sm[2];
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) {
      mt[i] = mx[1 + i];
      lzt[i] = lg2(sm[3 + i]);
    }
    // A row that is -inf everywhere has max -inf and sum exactly 0; with a NaN the sum is NaN and
    // the row goes on (its loss becomes NaN).
    flag_bits = 0;
    if (mx[0] == -INFINITY && sm[0] == 0.f) flag_bits |= kFlagStudentAllMasked;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i)
      if (i < nt && mx[1 + i] == -INFINITY && sm[3 + i] == 0.f) flag_bits |= kFlagTeacherAllMasked;
  }
  int flag_bits = 0;

  // ---- passes 2 and 3: one element ----
  // acc: [0] kl/rkl: sum p (Lp - Lq) / q (Lq - Lp); jsd: Kp; tvd: sum |p - q|
  //      [1] jsd: Kq; tvd: sum q h      [2] CE smoothing: sum over s != -inf of -Lq1
  //      [3 + i] S_i = sum p_i g        (base-2 logs in [0..2], natural units in [3 + i])
  template <Divergence D, bool ACC, bool WRITE>
  FKD_HD void elem(int64_t v, float xs, const float (&xt)[kNT], float (&acc)[3 + kNT], float& og,
                   float (&ot)[kNT]) const {
    const float ds = xs - ms;
    const float lq = fmaf(ds, C.c, -lzs);  // log2 q_v
    const float q = ex2(lq);
    float lpi[kNT];
    float lp;
    if constexpr (!kMulti) {
      lpi[0] = fmaf(xt[0] - mt[0], C.c, -lzt[0]);
      lp = lpi[0];
    } else {
      // log2 sum_i w_i p_iv, shifted by the max over teachers with w_i > 0.
      float mm = -INFINITY;
      FKD_UNROLL
      for (int i = 0; i < kNT; ++i) {
        lpi[i] = i < nt ? fmaf(xt[i] - mt[i], C.c, -lzt[i]) : -INFINITY;
        if (i < nt && w[i] > 0.f) mm = fmax_nan(mm, lpi[i]);
      }
      if (mm == -INFINITY) {
        lp = -INFINITY;
      } else {
        float sacc = 0.f;
        FKD_UNROLL
        for (int i = 0; i < kNT; ++i)
          if (i < nt && w[i] > 0.f) sacc += w[i] * ex2(lpi[i] - mm);
        lp = mm + lg2(sacc);
      }
    }
    const float p = ex2(lp);

    float dda = 0.f;  // dD/da_v
    float gv = 0.f;   // g_v (natural units) for S_i and the teacher gradients; rkl: see below
    if constexpr (D == Divergence::KL) {
      const float diff = lp - lq;
      if (ACC) acc[0] += p == 0.f ? 0.f : p * diff;
      dda = q - p;
      gv = kLn2 * diff;
    } else if constexpr (D == Divergence::ReverseKL) {
      const float diff = lq - lp;
      if (ACC) acc[0] += q == 0.f ? 0.f : q * diff;
      if (WRITE) dda = q == 0.f ? 0.f : q * fmaf(kLn2, diff, -dsum);
    } else if constexpr (D == Divergence::JSD) {
      const float mm = fmaxf(lp, lq);
      const float lm = mm == -INFINITY
                           ? -INFINITY
                           : mm + lg2(C.beta * ex2(lp - mm) + C.one_minus_beta * ex2(lq - mm));
      if (ACC) {
        acc[0] += p == 0.f ? 0.f : p * (lp - lm);
        acc[1] += q == 0.f ? 0.f : q * (lq - lm);
      }
      if (WRITE) dda = C.one_minus_beta * (q == 0.f ? 0.f : q * fmaf(kLn2, lq - lm, -x1));
      gv = C.beta * kLn2 * (lp - lm);
    } else {  // TVD
      const float diff = p - q;
      const float sg = sign_nan(diff);
      if (ACC) {
        acc[0] += fabsf(diff);
        acc[1] += q * (-0.5f * sg);
      }
      dda = q * (-0.5f * sg - x1);
      gv = 0.5f * sg;
    }

    // Teacher side: dD/db_iv = w_i (p_iv g_v - p_iv S_i); pg = p_iv g_v with 0 where p_iv = 0.
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) {
      ot[i] = 0.f;
      if (i >= nt) continue;
      const bool need_acc = ACC && sum_t[i];
      const bool need_wr = WRITE && gt[i] != nullptr && w[i] != 0.f;
      if (!need_acc && !need_wr) continue;
      const float pi = kMulti ? ex2(lpi[i]) : p;
      float pg;
      if constexpr (D == Divergence::ReverseKL) {
        // g_v = -q_v / p_v, so p_iv g_v = -q_v exp(logp_iv - logp_v) (one teacher: -q_v)
        if constexpr (kMulti) pg = lpi[i] == -INFINITY ? 0.f : -q * ex2(lpi[i] - lp);
        else pg = -q;
      } else {
        pg = pi == 0.f ? 0.f : pi * gv;
      }
      if (need_acc) acc[3 + i] += pg;
      if (need_wr) ot[i] = ct[i] * (pg - pi * ssum[i]);
    }

    if (WRITE && want_gs) {
      float gce = 0.f;
      if (hard) {
        const float q1 = C.same_t ? q : ex2(fmaf(ds, kLog2e, -lz1));
        gce = a1 * q1 - (v == y ? b1 : 0.f) - (xs != -INFINITY ? c1 : 0.f);
      }
      og = fmaf(cs, dda, gce);
    } else {
      og = 0.f;
    }
    if (ACC && count_nf) {
      const float lq1 = C.same_t ? lq : fmaf(ds, kLog2e, -lz1);
      acc[2] += xs == -INFINITY ? 0.f : -lq1;
    }
  }

  // One sweep over the row (pass 2 or 3). reverse: chunks from the end of the row backwards.
  // kLast: the row is not read again, so its lines are loaded evict-first.
  template <Divergence D, bool ACC, bool WRITE, bool kLast>
  FKD_HD void sweep(bool reverse, float (&acc)[3 + kNT]) const {
    if (vec) {
      const int64_t steps = (nvec + G - 1) / G;
      for (int64_t s0 = 0; s0 < steps; s0 += U) {
        RS rs[U];
        RT rt[U][kNT];
        int64_t jj[U];
        bool ok[U];
        FKD_UNROLL
        for (int u = 0; u < U; ++u) {
          const int64_t step = s0 + u;
          jj[u] = (reverse ? steps - 1 - step : step) * G + g.rank;
          ok[u] = step < steps && jj[u] < nvec;
          if (!ok[u]) continue;
          if (jj[u] < jc) {
            load_shared(cache_s() + jj[u] * static_cast<int64_t>(sizeof(RS)), rs[u].w);
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i)
              if (i < nt) load_shared(cache_t(i) + jj[u] * static_cast<int64_t>(sizeof(RT)), rt[u][i].w);
          } else {
            const int64_t v0 = head + jj[u] * N;
            load_global<kLast>(s + v0, rs[u].w);
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i)
              if (i < nt) load_global<kLast>(t[i] + v0, rt[u][i].w);
          }
        }
        FKD_UNROLL
        for (int u = 0; u < U; ++u) {
          if (!ok[u]) continue;
          const int64_t v0 = head + jj[u] * N;
          float xs[N];
          float xt[kNT][N];
          rs[u].to_float(xs);
          FKD_UNROLL
          for (int i = 0; i < kNT; ++i) {
            if (i < nt) rt[u][i].to_float(xt[i]);
            else {
              FKD_UNROLL
              for (int e = 0; e < N; ++e) xt[i][e] = 0.f;
            }
          }
          float og[N];
          float ot[kNT][N];
          FKD_UNROLL
          for (int e = 0; e < N; ++e) {
            float xc[kNT], oc[kNT];
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i) xc[i] = xt[i][e];
            elem<D, ACC, WRITE>(v0 + e, xs[e], xc, acc, og[e], oc);
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i) ot[i][e] = oc[i];
          }
          if (WRITE) {
            if (gs) {
              RS o;
              o.from_float(og);
              store_global(gs + v0, o.w);
            }
            FKD_UNROLL
            for (int i = 0; i < kNT; ++i) {
              if (i < nt && gt[i]) {
                RT o;
                o.from_float(ot[i]);
                store_global(gt[i] + v0, o.w);
              }
            }
          }
        }
      }
      if (g.rank < nscal) sweep_scalar<D, ACC, WRITE>(scalar_index(g.rank), acc);
    } else {
      for (int64_t v = g.rank; v < V; v += G) sweep_scalar<D, ACC, WRITE>(v, acc);
    }
  }

  template <Divergence D, bool ACC, bool WRITE>
  FKD_HD void sweep_scalar(int64_t v, float (&acc)[3 + kNT]) const {
    float xs, xt[kNT];
    load_scalar(v, xs, xt);
    float og, ot[kNT];
    elem<D, ACC, WRITE>(v, xs, xt, acc, og, ot);
    if (WRITE) {
      if (gs) Elem<TS>::store1(gs + v, og);
      FKD_UNROLL
      for (int i = 0; i < kNT; ++i)
        if (i < nt && gt[i]) Elem<TT>::store1(gt[i] + v, ot[i]);
    }
  }

  // Reduces the sweep sums, sets dsum / x1 / ssum and returns the row loss.
  template <Divergence D>
  FKD_HD float finish_sums(float (&acc)[3 + kNT], float nll) {
    group_allreduce<OpSum, kRedK>(g, acc);
    if constexpr (D == Divergence::KL || D == Divergence::ReverseKL) {
      dsum = kLn2 * acc[0];
    } else if constexpr (D == Divergence::JSD) {
      const float kp = kLn2 * acc[0];
      x1 = kLn2 * acc[1];
      dsum = C.beta * kp + C.one_minus_beta * x1;
    } else {
      dsum = 0.5f * acc[0];
      x1 = acc[1];
    }
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) ssum[i] = acc[3 + i];
    if constexpr (D == Divergence::ReverseKL && !kMulti) ssum[0] = -1.f;  // S = -sum q = -1
    float loss = P.soft_factor * dsum;
    if (hard) {
      const float ce = C.eps == 0.f ? nll
                                    : fmaf(1.f - C.eps, nll, C.eps_over_v * (kLn2 * acc[2]));
      loss = fmaf(C.hard_weight, ce, loss);
    }
    return loss;
  }

  template <Divergence D>
  FKD_HD void sweeps(int64_t row, float nll) {
    bool any_sum_t = false;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) any_sum_t = any_sum_t || sum_t[i];
    const bool sums_first = (want_gs && D != Divergence::KL) || any_sum_t;
    float acc[3 + kNT];
    FKD_UNROLL
    for (int i = 0; i < 3 + kNT; ++i) acc[i] = 0.f;
    float loss;
    if (sums_first) {
      sweep<D, true, false, false>(true, acc);
      loss = finish_sums<D>(acc, nll);
      sweep<D, false, true, true>(false, acc);
    } else {
      // Only gradients that need no row sum are written here: kl's student gradient, rkl's
      // one-teacher gradient p - q, and zeros for teachers of weight 0.
      if constexpr (D == Divergence::ReverseKL && !kMulti) ssum[0] = -1.f;
      sweep<D, true, true, true>(true, acc);
      loss = finish_sums<D>(acc, nll);
    }
    if (g.rank == 0) P.row_loss[row] = loss;
  }

  FKD_HD void run(int64_t row, float gscale) {
    V = P.vocab;
    nt = kMulti ? P.num_teachers : 1;
    s = static_cast<const TS*>(P.student) + row * P.student_stride;
    gs = P.grad_student ? static_cast<TS*>(P.grad_student) + row * V : nullptr;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) {
      if (i < nt) {
        t[i] = static_cast<const TT*>(P.teacher[i]) + row * P.teacher_stride[i];
        gt[i] = P.grad_teacher[i] ? static_cast<TT*>(P.grad_teacher[i]) + row * V : nullptr;
        w[i] = P.teacher_weight[i];
      } else {
        t[i] = nullptr;
        gt[i] = nullptr;
        w[i] = 0.f;
      }
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
    hard2 = hard && !C.same_t;
    count_nf = hard && C.eps != 0.f;

    layout(true, true);
    pass_stats();
    if (flag_bits != 0) {
      if (g.rank == 0 && P.flags != nullptr) atomic_or_flag(P.flags, flag_bits);
      zero_row(row);
      return;
    }

    float nll = 0.f;
    if (hard) {  // every thread reads the same element (one broadcast load per warp)
      const float xy = Elem<TS>::load1(s + y);
      nll = -kLn2 * fmaf(xy - ms, kLog2e, -lz1);
    }
    want_gs = gs != nullptr;
    cs = C.sf_over_t * gscale;
    if (hard) {
      const float hw = C.hard_weight * gscale;
      a1 = hw * (1.f - C.eps + C.eps_over_v * nf);
      b1 = hw * (1.f - C.eps);
      c1 = hw * C.eps_over_v;
    }
    const bool rkl1 = !kMulti && P.divergence == Divergence::ReverseKL;
    FKD_UNROLL
    for (int i = 0; i < kNT; ++i) {
      const bool need = i < nt && gt[i] != nullptr && w[i] != 0.f;
      sum_t[i] = need && !rkl1;
      ct[i] = need ? C.sf_over_t * gscale * w[i] : 0.f;
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
