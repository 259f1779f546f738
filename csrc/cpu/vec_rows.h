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
