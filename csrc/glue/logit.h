// Torch glue of the fused logit-KD kernels (SPEC §1): checks, allocation, dispatch to CPU/CUDA.
#pragma once
#include "glue/common.h"
#include "fastkd/logit_kd.h"
#include "fastkd/logit_topk.h"

namespace fastkd::glue {

// The KD configuration of a logit kernel's parameter struct.
template <typename Params>
void set_config(Params& p, int64_t ignore_index, double temperature, int64_t divergence,
                double beta, double soft_factor, double hard_weight, double label_smoothing) {
  TORCH_CHECK(divergence >= 0 && divergence <= 3, "divergence id out of range");
  p.ignore_index = ignore_index;
  p.temperature = static_cast<float>(temperature);
  p.divergence = static_cast<Divergence>(divergence);
  p.beta = static_cast<float>(beta);
  p.soft_factor = static_cast<float>(soft_factor);
  p.hard_weight = static_cast<float>(hard_weight);
  p.label_smoothing = static_cast<float>(label_smoothing);
}

// The per-row outputs every logit kernel writes: row losses (float32), the error flags, the
// gradient scale and the student gradient (student dtype), allocated and pointed to by `p`.
struct RowOutputs {
  at::Tensor row_loss, flags, scale;
  c10::optional<at::Tensor> grad_student;

  template <typename Params>
  RowOutputs(const at::Tensor& student, const c10::optional<at::Tensor>& grad_scale,
             bool need_grad_student, Params& p) {
    row_loss = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
    flags = at::zeros({1}, student.options().dtype(at::kInt));
    p.row_loss = row_loss.data_ptr<float>();
    p.flags = flags.data_ptr<int>();
    if (grad_scale.has_value()) {
      scale = grad_scale->to(at::kFloat).contiguous();
      TORCH_CHECK(scale.numel() == 1, "grad_scale must hold one value");
      p.grad_scale = scale.data_ptr<float>();
    }
    if (need_grad_student) {
      grad_student = at::empty(student.sizes(), student.options());
      p.grad_student = grad_student->data_ptr();
    }
  }
};

// Returns (row_loss [N] float32, grad_student or None, [grad_teacher_i or None], flags int32 [1]).
inline std::tuple<at::Tensor, c10::optional<at::Tensor>, std::vector<c10::optional<at::Tensor>>,
                  at::Tensor>
logit_kd_forward(const at::Tensor& student, const std::vector<at::Tensor>& teachers,
                 const c10::optional<at::Tensor>& target, const std::vector<double>& weights,
                 bool log_mixture, int64_t ignore_index, double temperature, int64_t divergence,
                 double beta, double soft_factor, double hard_weight, double label_smoothing,
                 const c10::optional<at::Tensor>& grad_scale, bool need_grad_student,
                 const std::vector<bool>& need_grad_teacher) {
  TORCH_CHECK(student.dim() == 2, "student_logits must be 2-D here");
  const int64_t rows = student.size(0), vocab = student.size(1);
  TORCH_CHECK(vocab >= 1, "student_logits: V must be >= 1");
  TORCH_CHECK(vocab == 1 || student.stride(1) == 1, "student_logits: vocabulary stride must be 1");
  const int nt = static_cast<int>(teachers.size());
  TORCH_CHECK(nt >= 1 && nt <= kMaxTeachers, "teacher_logits: 1 to ", kMaxTeachers, " teachers");
  TORCH_CHECK(static_cast<int>(weights.size()) == nt, "teacher_weights: one weight per teacher");
  TORCH_CHECK(static_cast<int>(need_grad_teacher.size()) == nt, "need_grad_teacher: one per teacher");

  LogitKDParams p;
  p.rows = rows;
  p.vocab = vocab;
  p.student = student.data_ptr();
  p.student_stride = student.stride(0);
  p.student_dtype = dtype_of(student, "student_logits");
  p.num_teachers = nt;
  p.teacher_dtype = dtype_of(teachers[0], "teacher_logits");
  p.log_mixture = log_mixture;
  for (int i = 0; i < nt; ++i) {
    const at::Tensor& t = teachers[i];
    TORCH_CHECK(t.sizes() == student.sizes(), "teacher_logits must have the student's shape");
    TORCH_CHECK(t.scalar_type() == teachers[0].scalar_type(), "teacher_logits: one dtype for all");
    TORCH_CHECK(vocab == 1 || t.stride(1) == 1, "teacher_logits: vocabulary stride must be 1");
    TORCH_CHECK(t.device() == student.device(), "teacher_logits must be on the student's device");
    p.teacher[i] = t.data_ptr();
    p.teacher_stride[i] = t.stride(0);
    p.teacher_weight[i] = static_cast<float>(weights[i]);
  }
  at::Tensor tgt;
  if (target.has_value()) {
    tgt = target->contiguous();
    TORCH_CHECK(tgt.scalar_type() == at::kLong && tgt.numel() == rows, "target must be int64 [N]");
    TORCH_CHECK(tgt.device() == student.device(), "target must be on the student's device");
    p.target = tgt.data_ptr<int64_t>();
  }
  set_config(p, ignore_index, temperature, divergence, beta, soft_factor, hard_weight,
             label_smoothing);

  const RowOutputs out(student, grad_scale, need_grad_student, p);
  const at::Tensor &row_loss = out.row_loss, &flags = out.flags;
  const c10::optional<at::Tensor>& grad_s = out.grad_student;
  std::vector<c10::optional<at::Tensor>> grad_t(nt);
  for (int i = 0; i < nt; ++i) {
    if (need_grad_teacher[i]) {
      grad_t[i] = at::empty({rows, vocab}, teachers[0].options());
      p.grad_teacher[i] = grad_t[i]->data_ptr();
    }
  }
  if (rows == 0) return {row_loss, grad_s, grad_t, flags};

  if (student.is_cuda()) {
#ifdef FASTKD_WITH_CUDA
    c10::cuda::CUDAGuard guard(student.device());
    check_cuda_status(logit_kd_cuda(p, current_stream(student)), "fastkd logit_kd_cuda");
#else
    TORCH_CHECK(false, "fastkd was built without CUDA kernels");
#endif
  } else if (emulating_cuda(student)) {
    check_emulated_status(cuda_emulation()->logit_kd(p, nullptr), "fastkd logit_kd_cuda");
  } else {
    TORCH_CHECK(student.is_cpu(), "student_logits must be a CPU or CUDA tensor");
    logit_kd_cpu(p);
  }
  return {row_loss, grad_s, grad_t, flags};
}

// KD against a sparse top-k teacher (SPEC §1b). Returns (row_loss [N] float32,
// grad_student or None, flags int32 [1]). The indices are checked by the caller (in range,
// distinct within a row).
inline std::tuple<at::Tensor, c10::optional<at::Tensor>, at::Tensor>
logit_topk_forward(const at::Tensor& student, const at::Tensor& indices,
                   const at::Tensor& logprobs, const c10::optional<at::Tensor>& target,
                   int64_t ignore_index, double temperature, int64_t divergence, double beta,
                   double soft_factor, double hard_weight, double label_smoothing,
                   const c10::optional<at::Tensor>& grad_scale, bool need_grad_student) {
  TORCH_CHECK(student.dim() == 2, "student_logits must be 2-D here");
  const int64_t rows = student.size(0), vocab = student.size(1);
  TORCH_CHECK(vocab >= 1, "student_logits: V must be >= 1");
  TORCH_CHECK(vocab == 1 || student.stride(1) == 1, "student_logits: vocabulary stride must be 1");
  TORCH_CHECK(student.is_cpu() || student.is_cuda(), "student_logits must be a CPU or CUDA tensor");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == rows && indices.scalar_type() == at::kLong,
              "teacher_topk indices must be int64 [N, k]");
  const int64_t k = indices.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "teacher_topk: need 1 <= k <= V");
  TORCH_CHECK(logprobs.sizes() == indices.sizes(), "teacher_topk logprobs must be [N, k]");
  TORCH_CHECK(indices.device() == student.device() && logprobs.device() == student.device(),
              "teacher_topk must be on the student's device");
  const at::Tensor idx = indices.contiguous();
  const at::Tensor lp = logprobs.to(at::kFloat).contiguous();

  LogitTopKParams p;
  p.rows = rows;
  p.vocab = vocab;
  p.k = k;
  p.student = student.data_ptr();
  p.student_stride = student.stride(0);
  p.student_dtype = dtype_of(student, "student_logits");
  p.indices = idx.data_ptr<int64_t>();
  p.logprobs = lp.data_ptr<float>();
  at::Tensor tgt;
  if (target.has_value()) {
    tgt = target->contiguous();
    TORCH_CHECK(tgt.scalar_type() == at::kLong && tgt.numel() == rows, "target must be int64 [N]");
    TORCH_CHECK(tgt.device() == student.device(), "target must be on the student's device");
    p.target = tgt.data_ptr<int64_t>();
  }
  set_config(p, ignore_index, temperature, divergence, beta, soft_factor, hard_weight,
             label_smoothing);

  const RowOutputs out(student, grad_scale, need_grad_student, p);
  if (rows == 0) return {out.row_loss, out.grad_student, out.flags};
  if (student.is_cuda()) {
#ifdef FASTKD_WITH_CUDA
    c10::cuda::CUDAGuard guard(student.device());
    check_cuda_status(logit_topk_cuda(p, current_stream(student)), "fastkd logit_topk_cuda");
#else
    TORCH_CHECK(false, "fastkd was built without CUDA kernels");
#endif
  } else if (emulating_cuda(student)) {
    check_emulated_status(cuda_emulation()->logit_topk(p, nullptr), "fastkd logit_topk_cuda");
  } else {
    logit_topk_cpu(p);
  }
  return {out.row_loss, out.grad_student, out.flags};
}

inline void register_logit(pybind11::module_& m) {
  m.def("logit_kd_forward", &logit_kd_forward,
        "Fused logit KD: per-row loss and gradients in one launch (SPEC §1)");
  m.def("logit_topk_forward", &logit_topk_forward,
        "Fused KD against a sparse top-k teacher: per-row loss and gradient (SPEC §1b)");
}

}  // namespace fastkd::glue
