// Fused logit KD (SPEC §1, §1c): one launch computes the per-row loss and the gradients.
//
// For every row r (student s, teachers t_i with weights w_i, temperature T):
//   q = softmax(s/T),  p = sum_i w_i softmax(t_i/T)
//   (log_mixture: log p = sum_i w_i log softmax(t_i/T) - logsumexp(.) = log softmax(y/T) with
//   y = sum_{w_i > 0} w_i t_i: one teacher with logits y, and d/dt_i = w_i d/dy)
//   row_loss[r] = soft_factor * D(p, q) + hard_weight * CE(softmax(s), target[r], label_smoothing)
// with D one of KL(p||q), KL(q||p), JSD_beta, TVD (SPEC §1) and soft_factor = soft_weight * T^2
// (or soft_weight without t2_scale). Entries of -inf have probability 0 and contribute 0.
// Gradients (written only where the pointer is non-null), already multiplied by *grad_scale:
//   grad_student[r, v] = d row_loss[r] / d s[r, v]
//   grad_teacher[i][r, v] = d row_loss[r] / d t_i[r, v]
// Rows with target == ignore_index get loss 0 and gradient 0, and are not checked.
#pragma once
#include <cstdint>

#include "fastkd/common.h"

namespace fastkd {

constexpr int kMaxTeachers = 8;

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2, TVD = 3 };

// Bits of *flags, set by the kernel and read by the caller after it (SPEC §Errors).
enum : int {
  kFlagTargetOutOfRange = 1,   // a counted row's target is outside [0, V)
  kFlagStudentAllMasked = 2,   // a counted row of the student is -inf everywhere
  kFlagTeacherAllMasked = 4,   // a counted row of a teacher is -inf everywhere
  kFlagMixtureAllMasked = 8,   // log_mixture: a counted row of y is -inf everywhere
};

struct LogitKDParams {
  int64_t rows = 0;
  int64_t vocab = 0;

  // Inputs: row-major with unit stride along the vocabulary; *_stride is the row stride (elements).
  const void* student = nullptr;
  int64_t student_stride = 0;
  DType student_dtype = DType::F32;

  int num_teachers = 1;                      // 1..kMaxTeachers
  const void* teacher[kMaxTeachers] = {};
  int64_t teacher_stride[kMaxTeachers] = {};
  DType teacher_dtype = DType::F32;          // all teachers share one dtype
  float teacher_weight[kMaxTeachers] = {};   // normalised to sum 1; zero weights allowed

  const int64_t* target = nullptr;           // [rows] or null (then every row counts)
  int64_t ignore_index = -100;

  float temperature = 1.f;
  Divergence divergence = Divergence::KL;
  float beta = 0.5f;                         // JSD only, 0 < beta < 1
  float soft_factor = 1.f;                   // soft_weight * (T^2 if t2_scale else 1): factor on D
  float hard_weight = 0.f;                   // factor on CE; CE is skipped when 0 or target null
  float label_smoothing = 0.f;

  // Outputs.
  float* row_loss = nullptr;                 // [rows], float32
  const float* grad_scale = nullptr;         // device scalar multiplying every gradient, or null
  void* grad_student = nullptr;              // [rows, vocab] contiguous, student dtype, or null
  void* grad_teacher[kMaxTeachers] = {};     // [rows, vocab] contiguous, teacher dtype, or null
  int* flags = nullptr;                      // device int, OR-ed with kFlag* bits

  bool log_mixture = false;                  // several teachers mixed in log space (see above)
};

// CPU kernel (csrc/cpu/logit_kd.cpp): at::parallel_for over rows, at::vec inner loops.
void logit_kd_cpu(const LogitKDParams& p);

// CUDA kernel (csrc/cuda/logit_kd.cu); `stream` is a cudaStream_t. Returns a cudaError_t as int.
int logit_kd_cuda(const LogitKDParams& p, void* stream);

}  // namespace fastkd
