// Torch glue of feature KD (SPEC §2): checks, the outputs, the choice of the epilogue kernel (CPU /
// CUDA / emulated, csrc/include/fastkd/feature_kd.h) and the call of the chunked algorithm
// (csrc/tiled/feature_chunks.h).
#pragma once
#include "glue/common.h"
#include "tiled/feature_chunks.h"

namespace fastkd::glue {

// x: [P, Ds, Q] student rows; t: [P, Dt, Q] teacher rows. Q == 1: rows layout ([N, C] features);
// Q > 1: columns layout (conv maps [B, C, H*W], read in place). Row (p, q) has index p * Q + q.
// weight [Dt, Ds] and bias [Dt] (any float dtypes) or None (no adapter: y = x, Ds == Dt).
// loss: 0 = MSE, 1 = cosine. Gradients are multiplied by scale * row_scale[row] (row_scale: float32
// [P*Q] or None). Returns (raw row losses [P*Q] float32 (MSE: sum over channels) or None,
// grad_x [P, Ds, Q] in x's dtype, grad_w [Dt, Ds] float32, grad_b [Dt] float32,
// grad_t [P, Dt, Q] in t's dtype), each None unless asked for.
inline std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                  c10::optional<at::Tensor>, c10::optional<at::Tensor>>
feature_kd_forward(const at::Tensor& x, const at::Tensor& t_in,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   int64_t loss, double scale, const c10::optional<at::Tensor>& row_scale,
                   bool compute_loss, bool need_x, bool need_w, bool need_b, bool need_t,
                   int64_t chunk_rows) {
  TORCH_CHECK(x.dim() == 3 && t_in.dim() == 3,
              "student_feat / teacher_feat must be 3-D [P, C, Q] here");
  const int64_t P = x.size(0), Ds = x.size(1), Q = x.size(2), Dt = t_in.size(1);
  TORCH_CHECK(t_in.size(0) == P && t_in.size(2) == Q,
              "teacher_feat must have the student's non-channel dimensions");
  TORCH_CHECK(Ds >= 1 && Dt >= 1, "student_dim and teacher_dim must be >= 1");
  TORCH_CHECK(loss == 0 || loss == 1, "loss id must be 0 (mse) or 1 (cosine)");
  TORCH_CHECK(chunk_rows >= 0, "chunk_size must be >= 0");
  TORCH_CHECK(t_in.device() == x.device(), "teacher_feat must be on student_feat's device");
  dtype_of(x, "student_feat");
  dtype_of(t_in, "teacher_feat");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == Dt && weight->size(1) == Ds,
                "weight must have shape [teacher_dim, student_dim] = [", Dt, ", ", Ds, "]");
    TORCH_CHECK(weight->device() == x.device(), "weight must be on student_feat's device");
    dtype_of(*weight, "weight");
    if (bias.has_value()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Dt, "bias must have shape [teacher_dim]");
      TORCH_CHECK(bias->device() == x.device(), "bias must be on student_feat's device");
      dtype_of(*bias, "bias");
    }
  } else {
    TORCH_CHECK(Ds == Dt, "without an adapter student_dim must equal teacher_dim");
    TORCH_CHECK(!bias.has_value(), "bias needs a weight (adapter)");
    TORCH_CHECK(!need_w && !need_b, "no adapter: there is no weight or bias gradient");
  }
  // The epilogue needs unit stride along the channel (rows) or along the positions (columns).
  at::Tensor t = t_in;
  if (Q > 1) {
    if (t.stride(2) != 1) t = t.contiguous();
  } else if (Dt > 1 && t.stride(1) != 1) {
    t = t.contiguous();
  }
  TORCH_CHECK(x.is_cuda() || x.is_cpu(), "student_feat must be a CPU or CUDA tensor");
#ifndef FASTKD_WITH_CUDA
  TORCH_CHECK(!x.is_cuda(), "fastkd was built without CUDA kernels");
#endif

  auto f32 = x.options().dtype(at::kFloat);
  const int64_t rows = P * Q;
  tiled::FeatureKDOutputs out;
  if (compute_loss) out.row_loss = at::empty({rows}, f32);
  if (need_x) out.grad_x = at::empty({P, Ds, Q}, x.options());
  if (need_t) out.grad_t = at::empty({P, Dt, Q}, t.options());
  if (need_w) out.grad_w = at::zeros({Dt, Ds}, f32);
  if (need_b) out.grad_b = at::zeros({Dt}, f32);
  at::Tensor rscale;
  if (row_scale.has_value()) {
    rscale = row_scale->to(f32).contiguous();
    TORCH_CHECK(rscale.numel() == rows, "row_scale must hold one value per row");
  }
  if (rows > 0) {
    DeviceScope scope(x);
    tiled::feature_kd_chunks(x, t, weight, bias, static_cast<FeatureLoss>(loss), scale, rscale,
                             chunk_rows, runs_cuda_kernels(x), out,
                             FASTKD_KERNEL(x, feature_kd_epilogue));
  }
  return {out.row_loss, out.grad_x, out.grad_w, out.grad_b, out.grad_t};
}

inline void register_feature(pybind11::module_& m) {
  m.def("feature_kd_forward", &feature_kd_forward,
        "Feature KD: chunked adapter GEMMs + fused loss/gradient epilogue (SPEC §2)");
}

}  // namespace fastkd::glue
