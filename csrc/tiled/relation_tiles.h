// The blocked relation-KD algorithms (SPEC §3) in torch ops around the tile kernels of
// csrc/include/fastkd/relation_kd.h; the caller (csrc/glue/relation.h) checks the inputs and
// chooses which implementation runs the kernels (tiled::Kernel).
//
// SP, RKD-distance and PKT never hold a B x B matrix: rows are processed in tiles of `rows x B`.
// GramTiles::for_each_tile walks them: for each tile it computes the Gram tiles with one GEMM per
// side (MKL / cuBLAS; on CUDA, bfloat16 / float16 features use tensor cores with a float32
// result) and hands them to a per-tile callback. Sweep 1 reduces the tiles to row statistics;
// sweep 2 recomputes them, the kernel turns each into loss partials and a weight tile W, and
// W @ X (one GEMM) adds the tile's gradient. Extra memory: O(B d) (float32 copies of the features
// and gradients) + O(B) + the tiles. The RKD angle builds B x B matrices (Gram, 1/d, and the
// dL/dG accumulators): O(B^2).
//
// Every function returns (loss: float32 scalar, grad_student or None, grad_teacher or None); the
// gradients are those of the returned loss (already including `scale`), in the input dtypes.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "fastkd/relation_kd.h"
#include "tiled/kernel.h"

namespace fastkd::tiled {

using RelationGrads = std::tuple<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>>;

// Rows per tile so that one rows x B float32 buffer holds at most `tile_elems` values (0: a
// default that suits the device).
inline int64_t relation_tile_rows(int64_t batch, int64_t tile_elems, bool cuda) {
  if (tile_elems <= 0) tile_elems = cuda ? (int64_t{1} << 24) : (int64_t{1} << 22);
  int64_t rows = std::max<int64_t>(1, tile_elems / batch);
  if (rows >= 32) rows -= rows % 16;  // GEMM-friendly
  return std::min(rows, batch);
}

namespace relation_detail {

inline at::Tensor to_f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

// The GEMM operand of the Gram tiles: float32, except bfloat16 / float16 on CUDA, which use
// mm with a float32 result (the products of the rounded inputs are exact in float32).
inline at::Tensor gemm_operand(const at::Tensor& x, const at::Tensor& x32) {
  if (x.is_cuda() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf))
    return x.contiguous();
  return x32;
}

// out[0:rows] = x[row0:row0+rows] @ x^T, float32.
inline void gram_rows(at::Tensor& out, const at::Tensor& x, int64_t row0, int64_t rows) {
  at::Tensor a = x.narrow(0, row0, rows);
  if (x.scalar_type() == at::kFloat) {
    at::mm_out(out, a, x.t());
  } else {
    at::mm_out(out, a, x.t(), at::kFloat);
  }
}

// out[row0:row0+rows] = w @ x: the gradient of one tile's rows.
inline void mm_rows(at::Tensor& out, int64_t row0, int64_t rows, const at::Tensor& w,
                    const at::Tensor& x) {
  at::Tensor o = out.narrow(0, row0, rows);
  at::mm_out(o, w, x);
}

// G @ y with G = x x^T, never forming G when d < B (then x (x^T y) is cheaper and O(d^2)).
inline at::Tensor gram_apply(const at::Tensor& x, const at::Tensor& y) {
  if (x.size(1) <= x.size(0)) return at::mm(x, at::mm(x.t(), y));
  return at::mm(at::mm(x, x.t()), y);  // d > B: B^2 <= B d
}

inline at::Tensor sum_double(const at::Tensor& v) { return v.sum(at::kDouble); }

inline at::Tensor finish_grad(const at::Tensor& g32, const at::Tensor& like) {
  return g32.to(like.scalar_type());
}

// The row tiles of the student and teacher Gram matrices, one tile buffer per side.
class GramTiles {
 public:
  // xs, xt: the GEMM operands [B, d]; rows: rows per tile.
  GramTiles(at::Tensor xs, at::Tensor xt, int64_t rows)
      : xs_(std::move(xs)), xt_(std::move(xt)), rows_(rows) {
    auto f32 = xs_.options().dtype(at::kFloat);
    s_buf_ = at::empty({rows_, batch()}, f32);
    t_buf_ = at::empty({rows_, batch()}, f32);
  }
  int64_t batch() const { return xs_.size(0); }
  int64_t rows() const { return rows_; }

  // For each tile of rows [i0, i0 + r): computes gs = xs[i0:i0+r] xs^T and gt likewise, points
  // the kernel parameters p (row0, rows, gs, gt) at the tile and calls visit(i0, r, gs, gt).
  template <typename Params, typename Visit>
  void for_each_tile(Params& p, Visit&& visit) const {
    const int64_t B = batch();
    for (int64_t i0 = 0; i0 < B; i0 += rows_) {
      const int64_t r = std::min(rows_, B - i0);
      at::Tensor gs = s_buf_.narrow(0, 0, r), gt = t_buf_.narrow(0, 0, r);
      gram_rows(gs, xs_, i0, r);
      gram_rows(gt, xt_, i0, r);
      p.row0 = i0;
      p.rows = r;
      p.gs = gs.data_ptr<float>();
      p.gt = gt.data_ptr<float>();
      visit(i0, r, gs, gt);
    }
  }

  // A sweep that only runs `kernel` on each tile.
  template <typename Params>
  void run_on_each_tile(Params& p, const Kernel<Params>& kernel) const {
    for_each_tile(p, [&](int64_t, int64_t, const at::Tensor&, const at::Tensor&) { kernel(p); });
  }

  // A second sweep whose `kernel` writes weight tiles W over the Gram tiles: W @ x becomes the
  // tile's rows of out_s (W of the student side, x = xs) and out_t (each only where defined).
  template <typename Params>
  void run_and_contract(Params& p, const Kernel<Params>& kernel, const at::Tensor& xs,
                        const at::Tensor& xt, at::Tensor& out_s, at::Tensor& out_t) const {
    for_each_tile(p, [&](int64_t i0, int64_t r, const at::Tensor& gs, const at::Tensor& gt) {
      kernel(p);
      if (out_s.defined()) mm_rows(out_s, i0, r, gs, xs);
      if (out_t.defined()) mm_rows(out_t, i0, r, gt, xt);
    });
  }

 private:
  at::Tensor xs_, xt_, s_buf_, t_buf_;
  int64_t rows_;
};

}  // namespace relation_detail

// ------------------------------------------------------------------------------------------ SP
struct SPKernels {
  Kernel<SPTileParams> stats, tile;
};

// loss = scale * sum_ij (G_hat_t - G_hat_s)_ij^2 (scale = 1/B^2 for "mean", 1 for "sum").
inline RelationGrads sp_loss(const at::Tensor& student, const at::Tensor& teacher, double scale,
                             bool need_s, bool need_t, int64_t rows, const SPKernels& k) {
  using namespace relation_detail;
  const int64_t B = student.size(0);
  at::Tensor xs = to_f32(student), xt = to_f32(teacher);
  auto f32 = xs.options();
  GramTiles tiles(gemm_operand(student, xs), gemm_operand(teacher, xt), rows);

  at::Tensor sq_s = at::empty({B}, f32), sq_t = at::empty({B}, f32);
  SPTileParams p;
  p.batch = B;
  p.sq_s = sq_s.data_ptr<float>();
  p.sq_t = sq_t.data_ptr<float>();
  tiles.run_on_each_tile(p, k.stats);
  // inv = 1 / max(||G_i||, 1e-12); clamp_min keeps NaN.
  at::Tensor norm_s = sq_s.sqrt(), norm_t = sq_t.sqrt();
  at::Tensor inv_s = norm_s.clamp_min(kRelNormClamp).reciprocal();
  at::Tensor inv_t = norm_t.clamp_min(kRelNormClamp).reciprocal();

  at::Tensor row_loss = at::empty({B}, f32);
  at::Tensor row_a_s = at::empty({B}, f32), row_a_t = at::empty({B}, f32);
  at::Tensor gs32, gt32;
  if (need_s) gs32 = at::empty_like(xs);
  if (need_t) gt32 = at::empty_like(xt);
  p.inv_s = inv_s.data_ptr<float>();
  p.inv_t = inv_t.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.need_s = need_s;
  p.need_t = need_t;
  p.row_loss = row_loss.data_ptr<float>();
  p.row_a_s = row_a_s.data_ptr<float>();
  p.row_a_t = row_a_t.data_ptr<float>();
  tiles.run_and_contract(p, k.tile, xs, xt, gs32, gt32);
  at::Tensor loss = (sum_double(row_loss) * scale).to(at::kFloat);
  // Gradient through the row norms: -(w (.) G X + G (w (.) X)), w_i = 2 scale a_i inv_i^2 (0 if
  // the norm is clamped, where it does not depend on G).
  auto norm_term = [&](at::Tensor& g, const at::Tensor& x, const at::Tensor& a, const at::Tensor& inv,
                       const at::Tensor& norm) {
    at::Tensor w = (a * inv * inv * (2.0 * scale)).masked_fill(norm < kRelNormClamp, 0.0).unsqueeze(1);
    at::Tensor both = gram_apply(x, at::cat({x, w * x}, 1));
    const int64_t d = x.size(1);
    g.sub_(w * both.narrow(1, 0, d)).sub_(both.narrow(1, d, d));
  };
  c10::optional<at::Tensor> grad_s, grad_t;
  if (need_s) {
    norm_term(gs32, xs, row_a_s, inv_s, norm_s);
    grad_s = finish_grad(gs32, student);
  }
  if (need_t) {
    norm_term(gt32, xt, row_a_t, inv_t, norm_t);
    grad_t = finish_grad(gt32, teacher);
  }
  return {loss, grad_s, grad_t};
}

// ------------------------------------------------------------------------------------------ RKD
struct RKDKernels {
  Kernel<RKDTileParams> stats, tile;
  Kernel<RKDAngleParams> angle;
  int64_t angle_parts = 1;  // loss partials per anchor the angle kernel writes
};

namespace relation_detail {

// The distance term of RKD on the centred float32 features; adds its loss and gradients.
inline void rkd_distance(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& nrm_s,
                         const at::Tensor& nrm_t, double dist_scale, bool need_s, bool need_t,
                         int64_t rows, const RKDKernels& k, at::Tensor& loss, at::Tensor& gs32,
                         at::Tensor& gt32) {
  const int64_t B = xs.size(0);
  auto f32 = xs.options();
  const double pairs = static_cast<double>(B) * static_cast<double>(B - 1);
  GramTiles tiles(xs, xt, rows);
  at::Tensor us_buf, ut_buf;
  if (need_s) us_buf = at::empty({rows, B}, f32);
  if (need_t) ut_buf = at::empty({rows, B}, f32);
  at::Tensor dsum_s = at::empty({B}, f32), dsum_t = at::empty({B}, f32);
  RKDTileParams p;
  p.batch = B;
  p.nrm_s = nrm_s.data_ptr<float>();
  p.nrm_t = nrm_t.data_ptr<float>();
  p.row_dsum_s = dsum_s.data_ptr<float>();
  p.row_dsum_t = dsum_t.data_ptr<float>();
  tiles.run_on_each_tile(p, k.stats);
  // mu = mean of the B (B - 1) off-diagonal distances (each >= 1e-6 > 0).
  at::Tensor mu_s = sum_double(dsum_s) / pairs, mu_t = sum_double(dsum_t) / pairs;
  at::Tensor inv_mu_s = mu_s.reciprocal().to(at::kFloat).reshape({1});
  at::Tensor inv_mu_t = mu_t.reciprocal().to(at::kFloat).reshape({1});

  at::Tensor row_loss = at::empty({B}, f32);
  at::Tensor row_stats = at::empty({6, B}, f32);  // a_s, v_s, u_s, a_t, v_t, u_t
  at::Tensor gh_s, gf_s, gh_t, gf_t;
  if (need_s) { gh_s = at::empty_like(xs); gf_s = at::empty_like(xs); }
  if (need_t) { gh_t = at::empty_like(xt); gf_t = at::empty_like(xt); }
  p.inv_mu_s = inv_mu_s.data_ptr<float>();
  p.inv_mu_t = inv_mu_t.data_ptr<float>();
  p.need_s = need_s;
  p.need_t = need_t;
  p.row_loss = row_loss.data_ptr<float>();
  p.row_a_s = row_stats[0].data_ptr<float>();
  p.row_v_s = row_stats[1].data_ptr<float>();
  p.row_u_s = row_stats[2].data_ptr<float>();
  p.row_a_t = row_stats[3].data_ptr<float>();
  p.row_v_t = row_stats[4].data_ptr<float>();
  p.row_u_t = row_stats[5].data_ptr<float>();
  tiles.for_each_tile(p, [&](int64_t i0, int64_t r, const at::Tensor& gs, const at::Tensor& gt) {
    at::Tensor us, ut;
    if (need_s) { us = us_buf.narrow(0, 0, r); p.us = us.data_ptr<float>(); }
    if (need_t) { ut = ut_buf.narrow(0, 0, r); p.ut = ut.data_ptr<float>(); }
    k.tile(p);
    if (need_s) {
      mm_rows(gh_s, i0, r, gs, xs);
      mm_rows(gf_s, i0, r, us, xs);
    }
    if (need_t) {
      mm_rows(gh_t, i0, r, gt, xt);
      mm_rows(gf_t, i0, r, ut, xt);
    }
  });
  loss = loss + sum_double(row_loss) * dist_scale;
  // grad = 2 scale / mu * [(v x - V X) - A / N (u x - U X)]: the second term is the gradient
  // through the mean distance mu (A = sum_ij h_ij d_hat_ij = -mu dL/dmu / scale).
  auto assemble = [&](at::Tensor& g, const at::Tensor& x, at::Tensor& gh, at::Tensor& gf,
                      int64_t s, const at::Tensor& inv_mu) {
    gh.neg_().add_(row_stats[s + 1].unsqueeze(1) * x);
    gf.neg_().add_(row_stats[s + 2].unsqueeze(1) * x);
    at::Tensor lam = (sum_double(row_stats[s]) / pairs).to(at::kFloat);
    g.add_((gh - lam * gf) * (inv_mu * static_cast<float>(2.0 * dist_scale)));
  };
  if (need_s) assemble(gs32, xs, gh_s, gf_s, 0, inv_mu_s);
  if (need_t) assemble(gt32, xt, gh_t, gf_t, 3, inv_mu_t);
}

// The angle term of RKD on the centred float32 features (B x B matrices); adds its loss and
// gradients.
inline void rkd_angle(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& nrm_s,
                      const at::Tensor& nrm_t, double angle_scale, bool need_s, bool need_t,
                      const RKDKernels& k, at::Tensor& loss, at::Tensor& gs32, at::Tensor& gt32) {
  const int64_t B = xs.size(0);
  auto f32 = xs.options();
  // 1/d with 0 on the diagonal and at coincident pairs (see kRelCoincident), NaN kept.
  auto inv_dist = [&](const at::Tensor& g, const at::Tensor& n) {
    at::Tensor nn = n.unsqueeze(1) + n.unsqueeze(0);
    at::Tensor q = nn - 2.0 * g;
    at::Tensor coincident = q <= nn.mul_(kRelCoincident).clamp_min_(kRelDistClamp);  // not NaN
    at::Tensor rd = q.rsqrt_();
    rd.masked_fill_(coincident, 0.0);
    rd.fill_diagonal_(0.0);
    return rd;
  };
  at::Tensor g_s = at::mm(xs, xs.t()), g_t = at::mm(xt, xt.t());
  at::Tensor rd_s = inv_dist(g_s, nrm_s), rd_t = inv_dist(g_t, nrm_t);
  RKDAngleParams a;
  a.batch = B;
  a.gs = g_s.data_ptr<float>();
  a.gt = g_t.data_ptr<float>();
  a.rds = rd_s.data_ptr<float>();
  a.rdt = rd_t.data_ptr<float>();
  a.scale = static_cast<float>(angle_scale);
  a.need_s = need_s;
  a.need_t = need_t;
  at::Tensor t_s, r_s, e_s, t_t, r_t, e_t;
  if (need_s) {
    t_s = at::empty({B, B}, f32); r_s = at::empty({B, B}, f32); e_s = at::empty({B, B}, f32);
    a.ts = t_s.data_ptr<float>(); a.rs = r_s.data_ptr<float>(); a.es = e_s.data_ptr<float>();
  }
  if (need_t) {
    t_t = at::empty({B, B}, f32); r_t = at::empty({B, B}, f32); e_t = at::empty({B, B}, f32);
    a.tt = t_t.data_ptr<float>(); a.rt = r_t.data_ptr<float>(); a.et = e_t.data_ptr<float>();
  }
  at::Tensor loss_part = at::empty({k.angle_parts * B}, f32);
  a.loss_part = loss_part.data_ptr<float>();
  k.angle(a);
  loss = loss + sum_double(loss_part) * angle_scale;
  // dL/dG = t - r - r^T + diag(rowsum r) + 2 Z and dL/dn = -(rowsum Z + colsum Z), Z = e rd^2;
  // grad = (dL/dG + dL/dG^T) X + 2 dL/dn (.) X.
  auto assemble = [&](at::Tensor& g, const at::Tensor& x, at::Tensor& t, at::Tensor& r,
                      at::Tensor& e, const at::Tensor& rd) {
    at::Tensor z = e.mul_(rd).mul_(rd);
    t.sub_(r).sub_(r.t());
    t.diagonal().add_(r.sum(1));
    t.add_(z, 2.0);
    at::Tensor gn = (z.sum(1) + z.sum(0)).neg_();
    g.add_(at::mm(t, x)).add_(at::mm(t.t(), x)).add_(gn.unsqueeze(1) * x, 2.0);
  };
  if (need_s) assemble(gs32, xs, t_s, r_s, e_s, rd_s);
  if (need_t) assemble(gt32, xt, t_t, r_t, e_t, rd_t);
}

}  // namespace relation_detail

// loss = dist_scale * sum_{ij} smooth_l1(d_hat_s - d_hat_t) + angle_scale * sum_{jik}
// smooth_l1(psi_s - psi_t); a term whose scale is 0 is skipped. The features are centred first
// (both terms are translation invariant, and the Gram expansion of distances is then accurate).
inline RelationGrads rkd_loss(const at::Tensor& student, const at::Tensor& teacher,
                              double dist_scale, double angle_scale, bool need_s, bool need_t,
                              int64_t rows, const RKDKernels& k) {
  using namespace relation_detail;
  at::Tensor xs = to_f32(student), xt = to_f32(teacher);
  xs = xs - xs.mean(0, true);
  xt = xt - xt.mean(0, true);
  at::Tensor nrm_s = (xs * xs).sum(1), nrm_t = (xt * xt).sum(1);
  at::Tensor loss = at::zeros({}, xs.options().dtype(at::kDouble));
  at::Tensor gs32, gt32;
  if (need_s) gs32 = at::zeros_like(xs);
  if (need_t) gt32 = at::zeros_like(xt);
  if (dist_scale != 0.0)
    rkd_distance(xs, xt, nrm_s, nrm_t, dist_scale, need_s, need_t, rows, k, loss, gs32, gt32);
  if (angle_scale != 0.0)
    rkd_angle(xs, xt, nrm_s, nrm_t, angle_scale, need_s, need_t, k, loss, gs32, gt32);

  c10::optional<at::Tensor> grad_s, grad_t;
  // Chain rule through the centring x -> x - mean(x): subtract the column mean of the gradient.
  if (need_s) grad_s = finish_grad(gs32.sub_(gs32.mean(0, true)), student);
  if (need_t) grad_t = finish_grad(gt32.sub_(gt32.mean(0, true)), teacher);
  return {loss.to(at::kFloat), grad_s, grad_t};
}

// ------------------------------------------------------------------------------------------ PKT
struct PKTKernels {
  Kernel<PKTTileParams> stats, tile;
};

// loss = scale * sum_ij P_t log((P_t + eps) / (P_s + eps)).
inline RelationGrads pkt_loss(const at::Tensor& student, const at::Tensor& teacher, double eps,
                              double scale, bool need_s, bool need_t, int64_t rows,
                              const PKTKernels& k) {
  using namespace relation_detail;
  const int64_t B = student.size(0);
  at::Tensor xs = to_f32(student), xt = to_f32(teacher);
  auto f32 = xs.options();
  GramTiles tiles(gemm_operand(student, xs), gemm_operand(teacher, xt), rows);
  at::Tensor norm_s = (xs * xs).sum(1).sqrt(), norm_t = (xt * xt).sum(1).sqrt();
  at::Tensor inv_m_s = (norm_s + eps).reciprocal(), inv_m_t = (norm_t + eps).reciprocal();
  at::Tensor rsum_s = at::empty({B}, f32), rsum_t = at::empty({B}, f32);
  PKTTileParams p;
  p.batch = B;
  p.inv_m_s = inv_m_s.data_ptr<float>();
  p.inv_m_t = inv_m_t.data_ptr<float>();
  p.eps = static_cast<float>(eps);
  p.rsum_s = rsum_s.data_ptr<float>();
  p.rsum_t = rsum_t.data_ptr<float>();
  tiles.run_on_each_tile(p, k.stats);
  at::Tensor row_loss = at::empty({B}, f32);
  at::Tensor row_b_s = at::empty({B}, f32), row_b_t = at::empty({B}, f32);
  at::Tensor ge_s, ge_t;  // gradients w.r.t. the normalised rows (before the row-sum correction)
  if (need_s) ge_s = at::empty_like(xs);
  if (need_t) ge_t = at::empty_like(xt);
  p.scale = static_cast<float>(scale);
  p.need_s = need_s;
  p.need_t = need_t;
  p.row_loss = row_loss.data_ptr<float>();
  p.row_b_s = row_b_s.data_ptr<float>();
  p.row_b_t = row_b_t.data_ptr<float>();
  tiles.run_and_contract(p, k.tile, xs, xt, ge_s, ge_t);
  at::Tensor loss = (sum_double(row_loss) * scale).to(at::kFloat);
  // Row-sum correction: dL/dG_hat_ij also holds -beta_i (beta = b / (2 rowsum)), so the
  // gradient w.r.t. e_hat_i gains -beta_i sum_j e_hat_j - sum_j beta_j e_hat_j. Then the chain
  // rule through e_hat = x / (||x|| + eps): g_x = g / m - (g . x) x / (m^2 ||x||) (0 at x = 0).
  auto assemble = [&](at::Tensor& ge, const at::Tensor& x, const at::Tensor& b,
                      const at::Tensor& rsum, const at::Tensor& inv_m, const at::Tensor& norm) {
    at::Tensor beta = b / (2.0 * rsum);
    at::Tensor sigma = at::mv(x.t(), inv_m);
    at::Tensor tau = at::mv(x.t(), beta * inv_m);
    ge.sub_(at::outer(beta, sigma)).sub_(tau.unsqueeze(0));
    at::Tensor safe = at::where(norm > 0, norm, at::ones_like(norm));
    at::Tensor proj = (ge * x).sum(1) * inv_m * inv_m / safe;
    return ge.mul_(inv_m.unsqueeze(1)).sub_(proj.unsqueeze(1) * x);
  };
  c10::optional<at::Tensor> grad_s, grad_t;
  if (need_s) grad_s = finish_grad(assemble(ge_s, xs, row_b_s, rsum_s, inv_m_s, norm_s), student);
  if (need_t) grad_t = finish_grad(assemble(ge_t, xt, row_b_t, rsum_t, inv_m_t, norm_t), teacher);
  return {loss, grad_s, grad_t};
}

// --------------------------------------------------------------------------- CPU algorithms
// The CPU kernels run their own algorithms (csrc/cpu/relation_kd.cpp), chosen by the glue when
// the CPU kernels serve the tensors (not for CUDA or the CUDA emulator):
// - SP in factored form when d_s + d_t is small next to B: sum_j G_ij G'_ij = x_i^T (X^T X') x'_i,
//   so the loss and its gradient come from d x d matrices (float64, O(B d + d^2) memory) and no
//   B x B tile is formed; otherwise (or when tile_elems > 0 asks for the tiled path) sp_loss.
// - RKD-distance and PKT over the upper triangle of the relation only (it is symmetric): work
//   units of rows [i0, i0 + r) x columns [c0, c1), c0 >= i0, each worker thread running its own
//   units with single-threaded GEMMs; an entry off the diagonal block serves (i, j) and (j, i).
//   PKT's row sums of c are sum_j c_ij = (B + e_hat_i . sum_j e_hat_j) / 2 (no first sweep).
// tile_elems as for the other paths (0: the CPU default).
RelationGrads sp_loss_cpu(const at::Tensor& student, const at::Tensor& teacher, double scale,
                          bool need_s, bool need_t, int64_t tile_elems);
RelationGrads rkd_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                           double dist_scale, double angle_scale, bool need_s, bool need_t,
                           int64_t tile_elems);
RelationGrads pkt_loss_cpu(const at::Tensor& student, const at::Tensor& teacher, double eps,
                           double scale, bool need_s, bool need_t, int64_t tile_elems);

}  // namespace fastkd::tiled
