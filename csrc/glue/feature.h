// Torch glue of feature KD (SPEC §2): the chunked adapter GEMMs and the fused epilogue.
//
// For every chunk of rows: y = x W^T in float32 (MKL / cuBLAS; on CUDA with half inputs the GEMM
// reads bf16/fp16 on tensor cores and writes float32), then the epilogue kernel adds the bias,
// reduces y against the teacher chunk (row losses) and turns y into dL/dy in place (on CUDA with
// half inputs: into a half buffer, the operand of the next GEMMs); then
//   grad_x[chunk] = dL/dy W,   grad_W += dL/dy^T x[chunk] (float32),   grad_b += colsum(dL/dy).
// Only chunk-sized buffers exist: peak extra memory is chunk x (teacher_dim + student_dim) float32
// plus grad_W in float32, never N x teacher_dim.
#pragma once
#include "glue/common.h"
#include "fastkd/feature_kd.h"

namespace fastkd::glue {

namespace feature_detail {

// Rows per chunk: the chunk's y (float32) is about 8 MB on CPU and 64 MB on CUDA: large enough
// that the per-chunk costs (GEMM setup, parallel regions, launches) vanish, small next to the
// N x teacher_dim float32 it replaces. (CPU timings were flat from 512 to 8192 rows at 1024
// teacher channels.)
inline int64_t auto_chunk_rows(int64_t teacher_dim, bool cuda) {
  const int64_t budget = cuda ? (int64_t(1) << 24) : (int64_t(1) << 21);
  return std::max<int64_t>(cuda ? 256 : 32, budget / std::max<int64_t>(teacher_dim, 1));
}

// out = a @ b, float32 out; on CUDA a/b may be bf16/fp16 (tensor cores, float32 output).
inline void mm_f32(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

}  // namespace feature_detail

// x: [P, Ds, Q] student rows; t: [P, Dt, Q] teacher rows. Q == 1: rows layout ([N, C] features);
// Q > 1: columns layout (conv maps [B, C, H*W], read in place). Row (p, q) has index p * Q + q.
// weight [Dt, Ds] and bias [Dt] (any float dtypes) or None (no adapter: y = x, Ds == Dt).
// loss: 0 = MSE, 1 = cosine. Gradients are multiplied by scale * row_scale[row] (row_scale: float32
// [P*Q] or None). Returns (raw row losses [P*Q] float32 (MSE: sum over channels) or None,
// grad_x [P, Ds, Q] in x's dtype, grad_w [Dt, Ds] float32, grad_b [Dt] float32,
// grad_t [P, Dt, Q] in t's dtype), each None unless asked for.
inline std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                  c10::optional<at::Tensor>, c10::optional<at::Tensor>>
feature_kd_forward(const at::Tensor& x_in, const at::Tensor& t_in,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   int64_t loss, double scale, const c10::optional<at::Tensor>& row_scale,
                   bool compute_loss, bool need_x, bool need_w, bool need_b, bool need_t,
                   int64_t chunk_rows) {
  using feature_detail::mm_f32;
  TORCH_CHECK(x_in.dim() == 3 && t_in.dim() == 3,
              "student_feat / teacher_feat must be 3-D [P, C, Q] here");
  const int64_t P = x_in.size(0), Ds = x_in.size(1), Q = x_in.size(2), Dt = t_in.size(1);
  TORCH_CHECK(t_in.size(0) == P && t_in.size(2) == Q,
              "teacher_feat must have the student's non-channel dimensions");
  TORCH_CHECK(Ds >= 1 && Dt >= 1, "student_dim and teacher_dim must be >= 1");
  TORCH_CHECK(loss == 0 || loss == 1, "loss id must be 0 (mse) or 1 (cosine)");
  TORCH_CHECK(chunk_rows >= 0, "chunk_size must be >= 0");
  TORCH_CHECK(t_in.device() == x_in.device(), "teacher_feat must be on student_feat's device");
  dtype_of(x_in, "student_feat");
  const DType t_dtype = dtype_of(t_in, "teacher_feat");
  const bool adapter = weight.has_value();
  if (adapter) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == Dt && weight->size(1) == Ds,
                "weight must have shape [teacher_dim, student_dim] = [", Dt, ", ", Ds, "]");
    TORCH_CHECK(weight->device() == x_in.device(), "weight must be on student_feat's device");
    dtype_of(*weight, "weight");
    if (bias.has_value()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Dt, "bias must have shape [teacher_dim]");
      TORCH_CHECK(bias->device() == x_in.device(), "bias must be on student_feat's device");
      dtype_of(*bias, "bias");
    }
  } else {
    TORCH_CHECK(Ds == Dt, "without an adapter student_dim must equal teacher_dim");
    TORCH_CHECK(!bias.has_value(), "bias needs a weight (adapter)");
    TORCH_CHECK(!need_w && !need_b, "no adapter: there is no weight or bias gradient");
  }
  const bool columns = Q > 1;
  // The epilogue needs unit stride along the channel (rows) or along the positions (columns).
  const at::Tensor& x = x_in;
  at::Tensor t = t_in;
  if (columns) {
    if (t.stride(2) != 1) t = t.contiguous();
  } else if (Dt > 1 && t.stride(1) != 1) {
    t = t.contiguous();
  }

  const bool cuda = x.is_cuda();
  TORCH_CHECK(cuda || x.is_cpu(), "student_feat must be a CPU or CUDA tensor");
#ifndef FASTKD_WITH_CUDA
  TORCH_CHECK(!cuda, "fastkd was built without CUDA kernels");
#endif
  // GEMM operand dtype: on CUDA the inputs' own dtype when x and W agree (bf16/fp16 tensor cores;
  // float32 follows torch's TF32 setting); otherwise, and always on CPU, float32.
  at::ScalarType cd = at::kFloat;
  if (runs_cuda_kernels(x) && adapter && x.scalar_type() == weight->scalar_type()) cd = x.scalar_type();

  auto f32 = x.options().dtype(at::kFloat);
  const int64_t rows = P * Q;
  c10::optional<at::Tensor> row_loss, grad_x, grad_w, grad_b, grad_t;
  if (compute_loss) row_loss = at::empty({rows}, f32);
  if (need_x) grad_x = at::empty({P, Ds, Q}, x.options());
  if (need_t) grad_t = at::empty({P, Dt, Q}, t.options());
  if (need_w) grad_w = at::zeros({Dt, Ds}, f32);
  if (need_b) grad_b = at::zeros({Dt}, f32);
  at::Tensor rscale;
  if (row_scale.has_value()) {
    rscale = row_scale->to(f32).contiguous();
    TORCH_CHECK(rscale.numel() == rows, "row_scale must hold one value per row");
  }
  if (rows == 0) return {row_loss, grad_x, grad_w, grad_b, grad_t};

#ifdef FASTKD_WITH_CUDA
  c10::optional<c10::cuda::CUDAGuard> guard;
  if (cuda) guard.emplace(x.device());
#endif

  at::Tensor w_cd, bias_f;
  if (adapter) {
    w_cd = weight->to(cd).contiguous();
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  }

  // Chunk plan: rows layout takes pc rows at a time; columns layout takes pc whole images, or
  // qc positions of one image when a single image is larger than a chunk.
  const int64_t target = chunk_rows > 0 ? chunk_rows : feature_detail::auto_chunk_rows(Dt, runs_cuda_kernels(x));
  int64_t pc_max = target, qc_max = 1;
  if (columns) {
    qc_max = std::min(Q, target);
    pc_max = std::max<int64_t>(1, target / qc_max);
  }
  pc_max = std::min(pc_max, P);
  const int64_t cap = pc_max * qc_max;

  const bool need_gy = need_x || need_w || need_b;
  // Half dL/dy (CUDA, bf16/fp16 GEMMs): written at O(1) magnitude, without `scale` and with the
  // row scales divided by their largest magnitude (rs_max, a device scalar: no host sync), so
  // that float16 does not underflow; both factors are applied to the GEMM outputs instead.
  const bool half_gy = need_gy && cd != at::kFloat;
  at::Tensor rs_norm, rs_max;
  if (half_gy && rscale.defined()) {
    rs_max = rscale.abs().amax().clamp_min(1e-30);
    rs_norm = rscale / rs_max;
  }
  // Per chunk, each operand is one 2-D matrix whose rows (rows layout) or columns (columns
  // layout) are the chunk's R = pc * qc rows, so every GEMM is a single call per chunk:
  //   rows layout:    X2 [R, Ds], Y2 = X2 W^T [R, Dt], dX2 = G2 W, dW += G2^T X2
  //   columns layout: X2 [Ds, R], Y2 = W X2 [Dt, R],   dX2 = W^T G2, dW += G2 X2^T
  // In the columns layout the y buffer holds the chunk's images side by side ([Dt, pc, qc]) and
  // the x chunk [pc, Ds, qc] is reordered into [Ds, pc, qc] (whole runs of qc contiguous
  // positions move; no map is transposed) when pc > 1; grad_x goes back the same way.
  const bool x_convert = adapter && x.scalar_type() != cd;
  const bool multi_image = columns && pc_max > 1;
  at::Tensor ybuf = at::empty({cap * Dt}, f32);
  at::Tensor gbuf, xbuf, gxbuf, wtmp, btmp;
  if (need_gy && cd != at::kFloat) gbuf = at::empty({cap * Dt}, x.options().dtype(cd));
  if (adapter && (x_convert || multi_image)) xbuf = at::empty({cap * Ds}, x.options().dtype(cd));
  if (adapter && need_x && (x_convert || multi_image)) {
    gxbuf = at::empty({cap * Ds}, x.options().dtype(cd));
  }
  if (need_w && cd != at::kFloat) wtmp = at::empty({Dt, Ds}, f32);
  if (need_b) btmp = at::empty({Dt}, f32);
  bool first_w = true;

  for (int64_t p0 = 0; p0 < P; p0 += pc_max) {
    const int64_t pc = std::min(pc_max, P - p0);
    for (int64_t q0 = 0; q0 < Q; q0 += qc_max) {
      const int64_t qc = std::min(qc_max, Q - q0);
      const int64_t R = pc * qc;
      const at::Tensor xs = x.narrow(0, p0, pc).narrow(2, q0, qc);  // [pc, Ds, qc]
      const at::Tensor ts = t.narrow(0, p0, pc).narrow(2, q0, qc);  // [pc, Dt, qc]
      // y2: the GEMM's view of the y buffer; y3: the same memory as [pc, Dt, qc] (epilogue).
      at::Tensor y2, y3, x2;
      const bool x_direct = !x_convert && (!columns || pc == 1);
      if (!columns) {
        y2 = ybuf.narrow(0, 0, R * Dt).view({R, Dt});
        y3 = y2.unsqueeze(2);
        if (adapter) {
          x2 = x_direct ? xs.select(2, 0) : xbuf.narrow(0, 0, R * Ds).view({R, Ds});
          if (!x_direct) x2.copy_(xs.select(2, 0));
        }
      } else {
        y2 = ybuf.narrow(0, 0, R * Dt).view({Dt, R});
        y3 = y2.view({Dt, pc, qc}).permute({1, 0, 2});
        if (adapter) {
          x2 = x_direct ? xs[0] : xbuf.narrow(0, 0, R * Ds).view({Ds, R});
          if (!x_direct) x2.view({Ds, pc, qc}).copy_(xs.permute({1, 0, 2}));
        }
      }
      // 1) y = x W^T (bias is added by the epilogue).
      if (!adapter) {
        y3.copy_(xs);
      } else if (!columns) {
        mm_f32(y2, x2, w_cd.t());
      } else {
        mm_f32(y2, w_cd, x2);
      }
      // 2) Epilogue: row losses, dL/dy (in place in the y buffer, or into the half buffer),
      //    dL/dt.
      at::Tensor g2 = y2, g3 = y3;
      if (need_gy && gbuf.defined()) {
        g2 = gbuf.narrow(0, 0, R * Dt).view(y2.sizes());
        g3 = columns ? g2.view({Dt, pc, qc}).permute({1, 0, 2}) : g2.unsqueeze(2);
      }
      FeatureEpilogueParams ep;
      ep.outer = pc;
      ep.inner = qc;
      ep.dim = Dt;
      ep.columns = columns;
      ep.loss = static_cast<FeatureLoss>(loss);
      ep.y = y3.data_ptr<float>();
      ep.y_so = y3.stride(0); ep.y_sc = y3.stride(1); ep.y_si = y3.stride(2);
      ep.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
      ep.teacher = ts.data_ptr();
      ep.teacher_dtype = t_dtype;
      ep.t_so = ts.stride(0); ep.t_sc = ts.stride(1); ep.t_si = ts.stride(2);
      ep.l_so = Q; ep.l_si = 1;
      if (row_loss) ep.row_loss = row_loss->data_ptr<float>() + p0 * Q + q0;
      ep.scale = static_cast<float>(scale);
      if (rscale.defined()) ep.row_scale = rscale.data_ptr<float>() + p0 * Q + q0;
      ep.gy_scale = half_gy ? 1.f : ep.scale;
      if (rs_norm.defined()) ep.gy_row_scale = rs_norm.data_ptr<float>() + p0 * Q + q0;
      else ep.gy_row_scale = half_gy ? nullptr : ep.row_scale;
      if (need_gy) {
        ep.grad_y = g3.data_ptr();
        ep.grad_y_dtype = dtype_of(g3, "grad_y");
        ep.g_so = g3.stride(0); ep.g_sc = g3.stride(1); ep.g_si = g3.stride(2);
      }
      if (grad_t) {
        at::Tensor gts = grad_t->narrow(0, p0, pc).narrow(2, q0, qc);
        ep.grad_teacher = gts.data_ptr();
        ep.gt_so = gts.stride(0); ep.gt_sc = gts.stride(1); ep.gt_si = gts.stride(2);
      }
      if (cuda) {
#ifdef FASTKD_WITH_CUDA
        check_cuda_status(feature_kd_epilogue_cuda(ep, current_stream(x)),
                          "fastkd feature_kd_epilogue_cuda");
#endif
      } else if (emulating_cuda(x)) {
        check_emulated_status(cuda_emulation()->feature_kd_epilogue(ep, nullptr),
                              "fastkd feature_kd_epilogue_cuda");
      } else {
        feature_kd_epilogue_cpu(ep);
      }
      // 3) grad_x = dL/dy W.
      if (need_x) {
        at::Tensor gxs = grad_x->narrow(0, p0, pc).narrow(2, q0, qc);
        if (!adapter) {
          gxs.copy_(g3);
        } else {
          // out = alpha * a @ b; alpha = scale restores the factor left out of half dL/dy
          // (beta = 0: the uninitialised `out` is not read).
          auto gemm = [&](at::Tensor o, const at::Tensor& a, const at::Tensor& b) {
            if (half_gy) at::addmm_out(o, o, a, b, 0, scale);
            else at::mm_out(o, a, b);
          };
          if (!columns) {
            at::Tensor out = x_direct ? gxs.select(2, 0) : gxbuf.narrow(0, 0, R * Ds).view({R, Ds});
            gemm(out, g2, w_cd);
            if (!x_direct) gxs.select(2, 0).copy_(out);
          } else {
            at::Tensor out = x_direct ? gxs[0] : gxbuf.narrow(0, 0, R * Ds).view({Ds, R});
            gemm(out, w_cd.t(), g2);
            if (!x_direct) gxs.copy_(out.view({Ds, pc, qc}).permute({1, 0, 2}));
          }
        }
      }
      // 4) grad_W += dL/dy^T x (float32 accumulator; on CUDA half: float32 GEMM output + add;
      //    the factors left out of half dL/dy are applied once after the last chunk).
      if (need_w) {
        const at::Tensor a = columns ? g2 : g2.t();
        const at::Tensor b = columns ? x2.t() : x2;
        if (cd == at::kFloat) {
          grad_w->addmm_(a, b);
        } else if (first_w) {
          mm_f32(*grad_w, a, b);
        } else {
          mm_f32(wtmp, a, b);
          grad_w->add_(wtmp);
        }
        first_w = false;
      }
      // 5) grad_b += column sums of dL/dy.
      if (need_b) {
        const int64_t dim = columns ? 1 : 0;
        at::sum_out(btmp, g2, at::IntArrayRef(&dim, 1), false, at::kFloat);
        grad_b->add_(btmp);
      }
    }
  }
  if (half_gy) {
    if (grad_w) grad_w->mul_(scale);
    if (grad_b) grad_b->mul_(scale);
    if (rs_max.defined()) {
      if (grad_x) grad_x->mul_(rs_max);
      if (grad_w) grad_w->mul_(rs_max);
      if (grad_b) grad_b->mul_(rs_max);
    }
  }
  return {row_loss, grad_x, grad_w, grad_b, grad_t};
}

inline void register_feature(pybind11::module_& m) {
  m.def("feature_kd_forward", &feature_kd_forward,
        "Feature KD: chunked adapter GEMMs + fused loss/gradient epilogue (SPEC §2)");
}

}  // namespace fastkd::glue
