// The chunked feature-KD algorithm (SPEC §2) in torch ops around the fused epilogue of
// csrc/include/fastkd/feature_kd.h; the caller (csrc/glue/feature.h) checks the inputs, allocates
// the outputs and chooses which implementation runs the epilogue (tiled::Kernel).
//
// For every chunk of rows: y = x W^T in float32 (MKL / cuBLAS; on CUDA with half inputs the GEMM
// reads bf16/fp16 on tensor cores and writes float32), then the epilogue kernel adds the bias,
// reduces y against the teacher chunk (row losses) and turns y into dL/dy in place (on CUDA with
// half inputs: into a half buffer, the operand of the next GEMMs); then
//   grad_x[chunk] = dL/dy W,   grad_W += dL/dy^T x[chunk] (float32),   grad_b += colsum(dL/dy).
// Only chunk-sized buffers exist: peak extra memory is chunk x (teacher_dim + student_dim) float32
// plus grad_W in float32, never N x teacher_dim.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "fastkd/feature_kd.h"
#include "tiled/kernel.h"

namespace fastkd::tiled {

// What feature_kd_chunks computes: each output the caller allocated (row_loss [P*Q] float32,
// grad_x [P, Ds, Q] and grad_t [P, Dt, Q] uninitialised, grad_w [Dt, Ds] and grad_b [Dt] float32
// zeros), or none.
struct FeatureKDOutputs {
  c10::optional<at::Tensor> row_loss, grad_x, grad_w, grad_b, grad_t;
};

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
  } else if (a.is_cuda()) {
    at::mm_out(out, a, b, at::kFloat);
  } else {
    // mm with a float32 result exists on CUDA only; on CPU tensors (the emulated CUDA route) the
    // half operands are widened first, which gives the same exact products and float32 sums.
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  }
}

// The kernels' name of a dtype the caller has checked (float32, bfloat16 or float16).
inline DType kernel_dtype(at::ScalarType s) {
  return s == at::kBFloat16 ? DType::BF16 : s == at::kHalf ? DType::F16 : DType::F32;
}

}  // namespace feature_detail

// x: [P, Ds, Q] student rows; t: [P, Dt, Q] teacher rows with unit stride along the channel
// (Q == 1, rows layout) or along the positions (Q > 1, columns layout). weight [Dt, Ds] and bias
// [Dt] or none (no adapter: y = x). rscale: float32 [P*Q] row scales or undefined. chunk_rows: 0
// for the default. cuda_kernels: whether the CUDA epilogue (real or emulated) runs.
inline void feature_kd_chunks(const at::Tensor& x, const at::Tensor& t,
                              const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& bias, FeatureLoss loss, double scale,
                              const at::Tensor& rscale, int64_t chunk_rows, bool cuda_kernels,
                              FeatureKDOutputs& out, const Kernel<FeatureEpilogueParams>& epilogue) {
  using feature_detail::mm_f32;
  const int64_t P = x.size(0), Ds = x.size(1), Q = x.size(2), Dt = t.size(1);
  const bool adapter = weight.has_value();
  const bool columns = Q > 1;
  const bool need_x = out.grad_x.has_value(), need_w = out.grad_w.has_value(),
             need_b = out.grad_b.has_value();
  // GEMM operand dtype: on CUDA the inputs' own dtype when x and W agree (bf16/fp16 tensor cores;
  // float32 follows torch's TF32 setting); otherwise, and always on CPU, float32.
  at::ScalarType cd = at::kFloat;
  if (cuda_kernels && adapter && x.scalar_type() == weight->scalar_type()) cd = x.scalar_type();
  auto f32 = x.options().dtype(at::kFloat);

  at::Tensor w_cd, bias_f;
  if (adapter) {
    w_cd = weight->to(cd).contiguous();
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  }

  // Chunk plan: rows layout takes pc rows at a time; columns layout takes pc whole images, or
  // qc positions of one image when a single image is larger than a chunk.
  const int64_t target =
      chunk_rows > 0 ? chunk_rows : feature_detail::auto_chunk_rows(Dt, cuda_kernels);
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
      ep.loss = loss;
      ep.y = y3.data_ptr<float>();
      ep.y_so = y3.stride(0); ep.y_sc = y3.stride(1); ep.y_si = y3.stride(2);
      ep.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
      ep.teacher = ts.data_ptr();
      ep.teacher_dtype = feature_detail::kernel_dtype(ts.scalar_type());
      ep.t_so = ts.stride(0); ep.t_sc = ts.stride(1); ep.t_si = ts.stride(2);
      ep.l_so = Q; ep.l_si = 1;
      if (out.row_loss) ep.row_loss = out.row_loss->data_ptr<float>() + p0 * Q + q0;
      ep.scale = static_cast<float>(scale);
      if (rscale.defined()) ep.row_scale = rscale.data_ptr<float>() + p0 * Q + q0;
      ep.gy_scale = half_gy ? 1.f : ep.scale;
      if (rs_norm.defined()) ep.gy_row_scale = rs_norm.data_ptr<float>() + p0 * Q + q0;
      else ep.gy_row_scale = half_gy ? nullptr : ep.row_scale;
      if (need_gy) {
        ep.grad_y = g3.data_ptr();
        ep.grad_y_dtype = feature_detail::kernel_dtype(g3.scalar_type());
        ep.g_so = g3.stride(0); ep.g_sc = g3.stride(1); ep.g_si = g3.stride(2);
      }
      if (out.grad_t) {
        at::Tensor gts = out.grad_t->narrow(0, p0, pc).narrow(2, q0, qc);
        ep.grad_teacher = gts.data_ptr();
        ep.gt_so = gts.stride(0); ep.gt_sc = gts.stride(1); ep.gt_si = gts.stride(2);
      }
      epilogue(ep);
      // 3) grad_x = dL/dy W.
      if (need_x) {
        at::Tensor gxs = out.grad_x->narrow(0, p0, pc).narrow(2, q0, qc);
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
            at::Tensor o = x_direct ? gxs.select(2, 0) : gxbuf.narrow(0, 0, R * Ds).view({R, Ds});
            gemm(o, g2, w_cd);
            if (!x_direct) gxs.select(2, 0).copy_(o);
          } else {
            at::Tensor o = x_direct ? gxs[0] : gxbuf.narrow(0, 0, R * Ds).view({Ds, R});
            gemm(o, w_cd.t(), g2);
            if (!x_direct) gxs.copy_(o.view({Ds, pc, qc}).permute({1, 0, 2}));
          }
        }
      }
      // 4) grad_W += dL/dy^T x (float32 accumulator; on CUDA half: float32 GEMM output + add;
      //    the factors left out of half dL/dy are applied once after the last chunk).
      if (need_w) {
        const at::Tensor a = columns ? g2 : g2.t();
        const at::Tensor b = columns ? x2.t() : x2;
        if (cd == at::kFloat) {
          out.grad_w->addmm_(a, b);
        } else if (first_w) {
          mm_f32(*out.grad_w, a, b);
        } else {
          mm_f32(wtmp, a, b);
          out.grad_w->add_(wtmp);
        }
        first_w = false;
      }
      // 5) grad_b += column sums of dL/dy.
      if (need_b) {
        const int64_t dim = columns ? 1 : 0;
        at::sum_out(btmp, g2, at::IntArrayRef(&dim, 1), false, at::kFloat);
        out.grad_b->add_(btmp);
      }
    }
  }
  if (half_gy) {
    if (out.grad_w) out.grad_w->mul_(scale);
    if (out.grad_b) out.grad_b->mul_(scale);
    if (rs_max.defined()) {
      if (out.grad_x) out.grad_x->mul_(rs_max);
      if (out.grad_w) out.grad_w->mul_(rs_max);
      if (out.grad_b) out.grad_b->mul_(rs_max);
    }
  }
}

}  // namespace fastkd::tiled
