// Row helpers shared by the CPU kernels of the logit family: float32 scratch rows padded with
// -inf to whole vectors (so loops need no tail case: -inf has probability 0), vector reductions,
// and sums accumulated in float lanes over blocks and then in double, so that their error does
// not grow with V (V reaches 262,144).
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "fastkd/logit_kd.h"

namespace fastkd::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kSumBlock = 1024;

inline int64_t padded_length(int64_t n) { return (n + kW - 1) / kW * kW; }

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

// Blocked vector sums: f(offset, acc) adds the Vec of terms at `offset` to acc[0..K); NaN
// propagates.
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

inline float row_max(const float* x, int64_t padded) {
  Vec m(kNegInf);
  for (int64_t v = 0; v < padded; v += kW) m = at::vec::maximum(m, Vec::loadu(x + v));
  return hmax(m);
}

inline Vec sel(const Vec& mask, const Vec& a) {  // mask ? a : 0
  return Vec::blendv(Vec(0.f), a, mask);
}

// Inline exp and log for the per-element loops. at::vec's exp/log call Sleef's u10 routines out of
// line (a call per vector, registers spilled around it), which dominated the kernels' time. These
// are Cephes' single-precision algorithms (expf: Cody-Waite reduction by ln 2 and a degree-6
// polynomial; logf: mantissa in [sqrt(1/2), sqrt(2)) and a degree-10 polynomial), about 1 ulp,
// well inside what SPEC §1 allows. Special values behave like the library's: exp(-inf) = 0,
// exp underflows gradually to denormals and overflows to inf; log(0) = -inf, log(+inf) = +inf,
// log of a denormal is exact; NaN propagates. log of a negative number is not needed (unchecked).
#if defined(CPU_CAPABILITY_AVX2)
inline Vec fast_exp(const Vec& xin) {
  // min/max return their second operand for NaN, so NaN passes through the clamps.
  __m256 x = _mm256_min_ps(_mm256_set1_ps(89.f), xin);
  x = _mm256_max_ps(_mm256_set1_ps(-104.f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  // 2^n as 2^(n/2) 2^(n - n/2): n in [-150, 129] covers denormal results and overflow to inf.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

inline Vec fast_log(const Vec& uin) {
  __m256 u = uin;
  const __m256 tiny = _mm256_cmp_ps(u, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  u = _mm256_blendv_ps(u, _mm256_mul_ps(u, _mm256_set1_ps(8388608.f)), tiny);  // denormal: x 2^23
  const __m256i ui = _mm256_castps_si256(u);
  // u = m 2^e with m in [1/2, 1).
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(ui, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(ui, 23), _mm256_set1_epi32(126)));
  e = _mm256_sub_ps(e, _mm256_and_ps(tiny, _mm256_set1_ps(23.f)));
  // m < sqrt(1/2): x = 2m - 1 and e - 1, else x = m - 1 (both exact), so x in [-0.293, 0.414).
  const __m256 lo = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(lo, _mm256_set1_ps(1.f)));
  const __m256 x = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.f)), _mm256_and_ps(lo, m));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  __m256 res = _mm256_add_ps(x, y);
  res = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), res);
  res = _mm256_blendv_ps(res, _mm256_set1_ps(kNegInf),
                         _mm256_cmp_ps(uin, _mm256_setzero_ps(), _CMP_EQ_OQ));
  // +inf and NaN: themselves.
  return _mm256_blendv_ps(res, uin,
                          _mm256_cmp_ps(uin, _mm256_set1_ps(-kNegInf), _CMP_NLT_UQ));
}
#else
inline Vec fast_exp(const Vec& x) { return x.exp(); }
inline Vec fast_log(const Vec& x) { return x.log(); }
#endif

// log1p(x) for x >= -1/2: log(1 + x) with the rounding error of 1 + x added back (exact by
// Fast2Sum while |x| <= 1; beyond, it is negligible against log(1 + x) >= log 2), so small x
// keep their relative accuracy.
inline Vec fast_log1p(const Vec& x) {
  const Vec one(1.f);
  const Vec u = x + one;
  const Vec c = x - (u - one);
  return fast_log(u) + Vec::blendv(Vec(0.f), c, x.abs() <= one);
}

// Whether row r counts: false for target == ignore_index, and for a target outside [0, V)
// (then kFlagTargetOutOfRange is raised); its outputs are zeros then. y: the target, or -1.
inline bool counted_row(const int64_t* target, int64_t ignore_index, int64_t vocab, int64_t r,
                        int* flags, int64_t& y) {
  y = -1;
  if (!target) return true;
  y = target[r];
  if (y == ignore_index) return false;
  if (y < 0 || y >= vocab) {
    *flags |= kFlagTargetOutOfRange;
    return false;
  }
  return true;
}

}  // namespace fastkd::cpu
