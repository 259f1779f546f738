// Fused KD against a sparse top-k teacher (SPEC §1b): one launch computes the per-row loss and
// the student gradient.
//
// For every row r (student s over V entries, teacher indices idx[0..k) and log-probabilities
// l[0..k), temperature T), with z = s / T, q = softmax(z):
//   buckets: the k listed entries and one residual bucket (every other entry);
//   teacher  P_j = exp(l_j),  P_res = max(0, 1 - sum_j P_j);
//   student  Q_j = q[idx_j],  Q_res = sum of q over the unlisted entries (summed directly);
//   row_loss[r] = soft_factor * D(P, Q) + hard_weight * CE(softmax(s), target[r], label_smoothing)
// with D over the k + 1 buckets as in logit_kd.h. When no unlisted entry has mass (k = V, or all
// of them -inf, or their exponentials underflow) the residual bucket is empty on both sides.
// grad_student[r, v] = d row_loss[r] / d s[r, v] * (*grad_scale). Rows with target ==
// ignore_index get loss 0 and gradient 0. The indices are in [0, V) and distinct within a row,
// or -1: an empty slot (a row with fewer than k entries, or the padding of several teachers'
// merged lists), which names no vocabulary entry, has P = Q = 0, and whose logprob is not read.
// sum_j P_j <= 1 + 1e-3 over the non-empty slots (checked by the caller).
#pragma once
#include <cstdint>

#include "fastkd/common.h"
#include "fastkd/logit_kd.h"

namespace fastkd {

struct LogitTopKParams {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t k = 1;

  const void* student = nullptr;             // [rows, vocab], unit stride along the vocabulary
  int64_t student_stride = 0;
  DType student_dtype = DType::F32;
  const int64_t* indices = nullptr;          // [rows, k] contiguous
  const float* logprobs = nullptr;           // [rows, k] contiguous, float32

  const int64_t* target = nullptr;           // [rows] or null
  int64_t ignore_index = -100;

  float temperature = 1.f;
  Divergence divergence = Divergence::KL;
  float beta = 0.5f;
  float soft_factor = 1.f;
  float hard_weight = 0.f;
  float label_smoothing = 0.f;

  float* row_loss = nullptr;                 // [rows], float32
  const float* grad_scale = nullptr;         // scalar multiplying the gradient, or null
  void* grad_student = nullptr;              // [rows, vocab] contiguous, student dtype, or null
  int* flags = nullptr;                      // kFlagTargetOutOfRange | kFlagStudentAllMasked
};

// CPU kernel (csrc/cpu/logit_topk.cpp).
void logit_topk_cpu(const LogitTopKParams& p);

// CUDA launcher (csrc/cuda/logit_topk.cu): enqueues the kernel on `stream` (a cudaStream_t);
// returns a cudaError_t value (0 on success).
int logit_topk_cuda(const LogitTopKParams& p, void* stream);

}  // namespace fastkd
