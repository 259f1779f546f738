// The memory each kernel's parameter struct hands it, as the headers of csrc/include/fastkd/
// specify it (shapes, strides, dtypes, which buffers are outputs). The emulator checks every
// access of a running kernel against these regions (csrc/emu/runtime.cpp).
#include "describe.h"

namespace fastkd {
namespace {

int elem_size(DType d) { return d == DType::F32 ? 4 : 2; }

// A [n0, n1] matrix with row stride s0 (elements) and contiguous rows.
void matrix(const void* base, int64_t n0, int64_t s0, int64_t n1, int elem, bool writable,
            const char* what) {
  emu::add_region(base, n0, s0, 1, 0, n1, 1, elem, writable, what);
}

void vector(const void* base, int64_t n, int elem, bool writable, const char* what) {
  emu::add_region(base, 1, 0, 1, 0, n, 1, elem, writable, what);
}

}  // namespace

void emu_describe(const LogitKDParams& p) {
  const int ss = elem_size(p.student_dtype), ts = elem_size(p.teacher_dtype);
  static const char* kTeacher[kMaxTeachers] = {"teacher[0]", "teacher[1]", "teacher[2]", "teacher[3]",
                                               "teacher[4]", "teacher[5]", "teacher[6]", "teacher[7]"};
  static const char* kGradTeacher[kMaxTeachers] = {
      "grad_teacher[0]", "grad_teacher[1]", "grad_teacher[2]", "grad_teacher[3]",
      "grad_teacher[4]", "grad_teacher[5]", "grad_teacher[6]", "grad_teacher[7]"};
  matrix(p.student, p.rows, p.student_stride, p.vocab, ss, false, "student");
  for (int i = 0; i < p.num_teachers && i < kMaxTeachers; ++i) {
    matrix(p.teacher[i], p.rows, p.teacher_stride[i], p.vocab, ts, false, kTeacher[i]);
    matrix(p.grad_teacher[i], p.rows, p.vocab, p.vocab, ts, true, kGradTeacher[i]);
  }
  vector(p.target, p.rows, 8, false, "target");
  vector(p.row_loss, p.rows, 4, true, "row_loss");
  vector(p.grad_scale, 1, 4, false, "grad_scale");
  matrix(p.grad_student, p.rows, p.vocab, p.vocab, ss, true, "grad_student");
  vector(p.flags, 1, 4, true, "flags");
}

void emu_describe(const LogitTopKParams& p) {
  const int ss = elem_size(p.student_dtype);
  matrix(p.student, p.rows, p.student_stride, p.vocab, ss, false, "student");
  matrix(p.indices, p.rows, p.k, p.k, 8, false, "indices");
  matrix(p.logprobs, p.rows, p.k, p.k, 4, false, "logprobs");
  vector(p.target, p.rows, 8, false, "target");
  vector(p.row_loss, p.rows, 4, true, "row_loss");
  vector(p.grad_scale, 1, 4, false, "grad_scale");
  matrix(p.grad_student, p.rows, p.vocab, p.vocab, ss, true, "grad_student");
  vector(p.flags, 1, 4, true, "flags");
}

void emu_describe(const FeatureEpilogueParams& p) {
  const int ts = elem_size(p.teacher_dtype), gs = elem_size(p.grad_y_dtype);
  // [outer, dim, inner] with the given strides; row-indexed arrays are [outer, inner].
  emu::add_region(p.y, p.outer, p.y_so, p.dim, p.y_sc, p.inner, p.y_si, 4, true, "y");
  vector(p.bias, p.dim, 4, false, "bias");
  emu::add_region(p.teacher, p.outer, p.t_so, p.dim, p.t_sc, p.inner, p.t_si, ts, false, "teacher");
  emu::add_region(p.row_loss, p.outer, p.l_so, 1, 0, p.inner, p.l_si, 4, true, "row_loss");
  emu::add_region(p.row_scale, p.outer, p.l_so, 1, 0, p.inner, p.l_si, 4, false, "row_scale");
  emu::add_region(p.gy_row_scale, p.outer, p.l_so, 1, 0, p.inner, p.l_si, 4, false, "gy_row_scale");
  emu::add_region(p.grad_y, p.outer, p.g_so, p.dim, p.g_sc, p.inner, p.g_si, gs, true, "grad_y");
  emu::add_region(p.grad_teacher, p.outer, p.gt_so, p.dim, p.gt_sc, p.inner, p.gt_si, ts, true,
                  "grad_teacher");
}

void emu_describe(const SPTileParams& p) {
  matrix(p.gs, p.rows, p.batch, p.batch, 4, true, "gs tile");
  matrix(p.gt, p.rows, p.batch, p.batch, 4, true, "gt tile");
  vector(p.sq_s, p.batch, 4, true, "sq_s");
  vector(p.sq_t, p.batch, 4, true, "sq_t");
  vector(p.inv_s, p.batch, 4, false, "inv_s");
  vector(p.inv_t, p.batch, 4, false, "inv_t");
  vector(p.row_loss, p.batch, 4, true, "row_loss");
  vector(p.row_a_s, p.batch, 4, true, "row_a_s");
  vector(p.row_a_t, p.batch, 4, true, "row_a_t");
}

void emu_describe(const RKDTileParams& p) {
  matrix(p.gs, p.rows, p.batch, p.batch, 4, true, "gs tile");
  matrix(p.gt, p.rows, p.batch, p.batch, 4, true, "gt tile");
  matrix(p.us, p.rows, p.batch, p.batch, 4, true, "us tile");
  matrix(p.ut, p.rows, p.batch, p.batch, 4, true, "ut tile");
  vector(p.nrm_s, p.batch, 4, false, "nrm_s");
  vector(p.nrm_t, p.batch, 4, false, "nrm_t");
  vector(p.row_dsum_s, p.batch, 4, true, "row_dsum_s");
  vector(p.row_dsum_t, p.batch, 4, true, "row_dsum_t");
  vector(p.inv_mu_s, 1, 4, false, "inv_mu_s");
  vector(p.inv_mu_t, 1, 4, false, "inv_mu_t");
  vector(p.row_loss, p.batch, 4, true, "row_loss");
  vector(p.row_a_s, p.batch, 4, true, "row_a_s");
  vector(p.row_a_t, p.batch, 4, true, "row_a_t");
  vector(p.row_v_s, p.batch, 4, true, "row_v_s");
  vector(p.row_u_s, p.batch, 4, true, "row_u_s");
  vector(p.row_v_t, p.batch, 4, true, "row_v_t");
  vector(p.row_u_t, p.batch, 4, true, "row_u_t");
}

void emu_describe(const RKDAngleParams& p) {
  const int64_t B = p.batch;
  matrix(p.gs, B, B, B, 4, false, "gs");
  matrix(p.gt, B, B, B, 4, false, "gt");
  matrix(p.rds, B, B, B, 4, false, "rds");
  matrix(p.rdt, B, B, B, 4, false, "rdt");
  matrix(p.ts, B, B, B, 4, true, "ts");
  matrix(p.rs, B, B, B, 4, true, "rs");
  matrix(p.es, B, B, B, 4, true, "es");
  matrix(p.tt, B, B, B, 4, true, "tt");
  matrix(p.rt, B, B, B, 4, true, "rt");
  matrix(p.et, B, B, B, 4, true, "et");
  vector(p.loss_part, (B + kAngleAnchorBlock - 1) / kAngleAnchorBlock * B, 4, true, "loss_part");
}

void emu_describe(const PKTTileParams& p) {
  matrix(p.gs, p.rows, p.batch, p.batch, 4, true, "gs tile");
  matrix(p.gt, p.rows, p.batch, p.batch, 4, true, "gt tile");
  vector(p.inv_m_s, p.batch, 4, false, "inv_m_s");
  vector(p.inv_m_t, p.batch, 4, false, "inv_m_t");
  vector(p.rsum_s, p.batch, 4, true, "rsum_s");
  vector(p.rsum_t, p.batch, 4, true, "rsum_t");
  vector(p.row_loss, p.batch, 4, true, "row_loss");
  vector(p.row_b_s, p.batch, 4, true, "row_b_s");
  vector(p.row_b_t, p.batch, 4, true, "row_b_t");
}

}  // namespace fastkd
