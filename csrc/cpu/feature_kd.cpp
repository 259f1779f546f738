// CPU epilogue of feature KD (see csrc/include/fastkd/feature_kd.h for the formulas).
//
// Rows layout: at::parallel_for over rows, each row's channels swept with at::vec (8 floats per
// AVX2 register). Columns layout: at::parallel_for over tiles of 16 consecutive rows of one image;
// the 16 rows sit side by side in memory, so each register holds one channel of 8 rows and the
// per-row sums stay in registers while the channel loop walks down the map.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "fastkd/feature_kd.h"

namespace fastkd {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Loads/stores of kW (or n < kW) elements of type T as float32 lanes; missing lanes read 0.
// Half <-> float conversion needs F16C (-mf16c): c10::Half's own conversion uses F16C
// intrinsics whenever CPU_CAPABILITY_AVX2 is defined and fails to compile without -mf16c. Without
// F16C, Half therefore goes through the bit-level conversion below (BFloat16 converts with plain
// AVX2 shifts either way).
#if defined(__F16C__)
constexpr bool kHalfVec = true;
#else
constexpr bool kHalfVec = false;
#endif

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_to_float(c10::Half h) {
  const uint32_t exp_mask = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h.x) & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exp = o & exp_mask;
  o += (127u - 15u) << 23;                  // rebias the exponent
  if (exp == exp_mask) {
    o += (128u - 16u) << 23;                // Inf / NaN keep an all-ones exponent
  } else if (exp == 0) {                    // zero / subnormal: renormalise in float arithmetic
    o += 1u << 23;
    o = f32_bits(bits_f32(o) - bits_f32(113u << 23));
  }
  return bits_f32(o | ((static_cast<uint32_t>(h.x) & 0x8000u) << 16));
}

inline c10::Half float_to_half(float v) {  // round to nearest even, like the hardware
  uint32_t f = f32_bits(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= (143u << 23)) {                  // >= 65536 before rounding: Inf, or NaN
    o = f > (255u << 23) ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {            // result is subnormal or zero
    const uint32_t magic = 126u << 23;      // 0.5: adding it leaves the rounded half in the low bits
    o = static_cast<uint16_t>(f32_bits(bits_f32(f) + bits_f32(magic)) - magic);
  } else {
    const uint32_t odd = (f >> 13) & 1u;
    f += ((15u - 127u) << 23) + 0xfffu + odd;  // rebias and round half to even
    o = static_cast<uint16_t>(f >> 13);
  }
  return c10::Half(static_cast<uint16_t>(o | (sign >> 16)), c10::Half::from_bits());
}

template <typename T>
constexpr bool kVecConvert =
    std::is_same_v<T, c10::BFloat16> || (std::is_same_v<T, c10::Half> && kHalfVec);

template <typename T>
inline float to_f(T v) {
  if constexpr (std::is_same_v<T, c10::Half>) return half_to_float(v);
  else return static_cast<float>(v);
}

template <typename T>
inline T from_f(float v) {
  if constexpr (std::is_same_v<T, c10::Half>) return float_to_half(v);
  else return static_cast<T>(v);
}

template <typename T>
inline Vec load_f(const T* p, int64_t n = kW) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kW ? Vec::loadu(p) : Vec::loadu(p, n);
  } else if constexpr (kVecConvert<T>) {
    Vec out;
    if (n == kW) {
      at::vec::load_to_float<T>(p, out);
    } else {
      T tmp[kW] = {};
      for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
      at::vec::load_to_float<T>(tmp, out);
    }
    return out;
  } else {
    float tmp[kW] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = to_f(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline void store_f(T* p, const Vec& v, int64_t n = kW) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kW) v.store(p); else v.store(p, n);
  } else if constexpr (kVecConvert<T>) {
    at::vec::Vectorized<T> h = at::vec::convert_from_float<T>(v, v);
    h.store(p, n);  // the first kW lanes hold v
  } else {
    float tmp[kW];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = from_f<T>(tmp[i]);
  }
}

inline float hsum(const Vec& v) {
  float tmp[kW];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += tmp[i];
  return s;
}

// Per-row cosine factors: dL/dy = (y * ay - t * inv) * s, dL/dt = (t * at - y * inv) * s.
struct CosFactors {
  float loss, inv, ay, at;
};

inline CosFactors cos_factors(float dot, float yy, float tt) {
  const float d = std::sqrt(yy) * std::sqrt(tt);
  CosFactors f;
  if (d > kFeatureCosineEps) {
    f.inv = 1.f / d;
    const float c = dot * f.inv;
    f.loss = 1.f - c;
    f.ay = c / yy;  // yy, tt > 0 here since d > 0
    f.at = c / tt;
  } else {  // the clamp max(|y||t|, eps) is active: cos = y.t / eps, no norm derivative
    f.inv = 1.f / kFeatureCosineEps;
    f.loss = 1.f - dot * f.inv;
    f.ay = 0.f;
    f.at = 0.f;
  }
  return f;
}

template <typename T>
void rows_kernel(const FeatureEpilogueParams& p) {
  const int64_t dim = p.dim;
  const T* teacher = static_cast<const T*>(p.teacher);
  T* grad_t = static_cast<T*>(p.grad_teacher);
  float* grad_y = static_cast<float*>(p.grad_y);
  const bool cosine = p.loss == FeatureLoss::Cosine;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, p.outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* y = p.y + r * p.y_so;
      const T* t = teacher + r * p.t_so;
      float* gy = grad_y ? grad_y + r * p.g_so : nullptr;
      T* gt = grad_t ? grad_t + r * p.gt_so : nullptr;
      const float s_t = p.scale * (p.row_scale ? p.row_scale[r * p.l_so] : 1.f);
      const float s_y = p.gy_scale * (p.gy_row_scale ? p.gy_row_scale[r * p.l_so] : 1.f);
      if (!cosine) {
        const Vec two_sy(2.f * s_y), two_st(-2.f * s_t);
        Vec acc(0.f);
        for (int64_t c = 0; c < dim; c += kW) {
          const int64_t n = std::min(kW, dim - c);
          Vec yv = load_f(y + c, n);
          if (p.bias) yv = yv + load_f(p.bias + c, n);
          const Vec d = yv - load_f(t + c, n);
          acc = at::vec::fmadd(d, d, acc);
          if (gy) store_f(gy + c, d * two_sy, n);
          if (gt) store_f(gt + c, d * two_st, n);
        }
        if (p.row_loss) p.row_loss[r * p.l_so] = hsum(acc);
        continue;
      }
      Vec vdot(0.f), vyy(0.f), vtt(0.f);
      const bool grads = gy || gt;
      for (int64_t c = 0; c < dim; c += kW) {
        const int64_t n = std::min(kW, dim - c);
        Vec yv = load_f(y + c, n);
        if (p.bias) {
          yv = yv + load_f(p.bias + c, n);
          if (grads) store_f(y + c, yv, n);  // pass 2 reads y + bias
        }
        const Vec tv = load_f(t + c, n);
        vdot = at::vec::fmadd(yv, tv, vdot);
        vyy = at::vec::fmadd(yv, yv, vyy);
        vtt = at::vec::fmadd(tv, tv, vtt);
      }
      const CosFactors f = cos_factors(hsum(vdot), hsum(vyy), hsum(vtt));
      if (p.row_loss) p.row_loss[r * p.l_so] = f.loss;
      if (!grads) continue;
      const Vec inv_y(f.inv * s_y), ay(f.ay * s_y), inv_t(f.inv * s_t), at_(f.at * s_t);
      for (int64_t c = 0; c < dim; c += kW) {
        const int64_t n = std::min(kW, dim - c);
        const Vec yv = load_f(y + c, n);
        const Vec tv = load_f(t + c, n);
        if (gt) store_f(gt + c, tv * at_ - yv * inv_t, n);
        if (gy) store_f(gy + c, yv * ay - tv * inv_y, n);  // may overwrite y: read above
      }
    }
  });
}

// Columns layout: a tile is kLanes consecutive rows (positions) of one image.
constexpr int64_t kVecs = 2;
constexpr int64_t kLanes = kVecs * kW;

template <typename T>
void columns_kernel(const FeatureEpilogueParams& p) {
  const int64_t dim = p.dim;
  const int64_t tiles_per_block = (p.inner + kLanes - 1) / kLanes;
  const T* teacher = static_cast<const T*>(p.teacher);
  T* grad_t = static_cast<T*>(p.grad_teacher);
  float* grad_y = static_cast<float*>(p.grad_y);
  const bool cosine = p.loss == FeatureLoss::Cosine;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, p.outer * tiles_per_block, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / tiles_per_block;
      const int64_t i0 = (task % tiles_per_block) * kLanes;
      const int64_t lanes = std::min(kLanes, p.inner - i0);
      int64_t cnt[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) cnt[v] = std::max<int64_t>(0, std::min(kW, lanes - v * kW));
      float* y = p.y + o * p.y_so + i0;
      const T* t = teacher + o * p.t_so + i0;
      float* gy = grad_y ? grad_y + o * p.g_so + i0 : nullptr;
      T* gt = grad_t ? grad_t + o * p.gt_so + i0 : nullptr;
      float* loss = p.row_loss ? p.row_loss + o * p.l_so + i0 * p.l_si : nullptr;
      // Per-row gradient scales of the tile's rows (dL/dt and dL/dy).
      float st_arr[kLanes], sy_arr[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t idx = o * p.l_so + (i0 + l) * p.l_si;
        st_arr[l] = p.scale;
        sy_arr[l] = p.gy_scale;
        if (p.row_scale && l < lanes) st_arr[l] *= p.row_scale[idx];
        if (p.gy_row_scale && l < lanes) sy_arr[l] *= p.gy_row_scale[idx];
      }
      const bool grads = gy || gt;
      if (!cosine) {
        Vec acc[kVecs], two_sy[kVecs], two_st[kVecs];
        for (int64_t v = 0; v < kVecs; ++v) {
          acc[v] = Vec(0.f);
          two_sy[v] = Vec::loadu(sy_arr + v * kW) * Vec(2.f);
          two_st[v] = Vec::loadu(st_arr + v * kW) * Vec(-2.f);
        }
        for (int64_t c = 0; c < dim; ++c) {
          const Vec b(p.bias ? p.bias[c] : 0.f);
          for (int64_t v = 0; v < kVecs; ++v) {
            if (cnt[v] == 0) continue;
            const int64_t off = v * kW;
            const Vec yv = load_f(y + c * p.y_sc + off, cnt[v]) + b;
            const Vec d = yv - load_f(t + c * p.t_sc + off, cnt[v]);
            acc[v] = at::vec::fmadd(d, d, acc[v]);
            if (gy) store_f(gy + c * p.g_sc + off, d * two_sy[v], cnt[v]);
            if (gt) store_f(gt + c * p.gt_sc + off, d * two_st[v], cnt[v]);
          }
        }
        if (loss) {
          float tmp[kLanes];
          for (int64_t v = 0; v < kVecs; ++v) acc[v].store(tmp + v * kW);
          for (int64_t l = 0; l < lanes; ++l) loss[l * p.l_si] = tmp[l];
        }
        continue;
      }
      Vec vdot[kVecs], vyy[kVecs], vtt[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) vdot[v] = vyy[v] = vtt[v] = Vec(0.f);
      for (int64_t c = 0; c < dim; ++c) {
        const Vec b(p.bias ? p.bias[c] : 0.f);
        for (int64_t v = 0; v < kVecs; ++v) {
          if (cnt[v] == 0) continue;
          const int64_t off = v * kW;
          const Vec yv = load_f(y + c * p.y_sc + off, cnt[v]) + b;
          if (grads && p.bias) store_f(y + c * p.y_sc + off, yv, cnt[v]);
          const Vec tv = load_f(t + c * p.t_sc + off, cnt[v]);
          vdot[v] = at::vec::fmadd(yv, tv, vdot[v]);
          vyy[v] = at::vec::fmadd(yv, yv, vyy[v]);
          vtt[v] = at::vec::fmadd(tv, tv, vtt[v]);
        }
      }
      float dot[kLanes], yy[kLanes], tt[kLanes];
      for (int64_t v = 0; v < kVecs; ++v) {
        vdot[v].store(dot + v * kW);
        vyy[v].store(yy + v * kW);
        vtt[v].store(tt + v * kW);
      }
      float inv_y[kLanes], ay[kLanes], inv_t[kLanes], at_[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        const CosFactors f = cos_factors(dot[l], yy[l], tt[l]);
        if (loss && l < lanes) loss[l * p.l_si] = f.loss;
        inv_y[l] = f.inv * sy_arr[l];
        ay[l] = f.ay * sy_arr[l];
        inv_t[l] = f.inv * st_arr[l];
        at_[l] = f.at * st_arr[l];
      }
      if (!grads) continue;
      for (int64_t c = 0; c < dim; ++c) {
        for (int64_t v = 0; v < kVecs; ++v) {
          if (cnt[v] == 0) continue;
          const int64_t off = v * kW;
          const Vec yv = load_f(y + c * p.y_sc + off, cnt[v]);
          const Vec tv = load_f(t + c * p.t_sc + off, cnt[v]);
          if (gt) {
            store_f(gt + c * p.gt_sc + off,
                    tv * Vec::loadu(at_ + off) - yv * Vec::loadu(inv_t + off), cnt[v]);
          }
          if (gy) {
            store_f(gy + c * p.g_sc + off,
                    yv * Vec::loadu(ay + off) - tv * Vec::loadu(inv_y + off), cnt[v]);
          }
        }
      }
    }
  });
}

template <typename T>
void run(const FeatureEpilogueParams& p) {
  if (p.columns) columns_kernel<T>(p); else rows_kernel<T>(p);
}

}  // namespace

void feature_kd_epilogue_cpu(const FeatureEpilogueParams& p) {
  TORCH_CHECK(p.grad_y == nullptr || p.grad_y_dtype == DType::F32,
              "feature_kd_epilogue_cpu writes dL/dy in float32 only");
  TORCH_CHECK(p.columns || p.inner == 1, "feature_kd_epilogue_cpu: rows layout needs inner == 1");
  if (p.outer == 0 || p.inner == 0) return;
  switch (p.teacher_dtype) {
    case DType::F32: run<float>(p); break;
    case DType::BF16: run<c10::BFloat16>(p); break;
    case DType::F16: run<c10::Half>(p); break;
  }
}

}  // namespace fastkd
