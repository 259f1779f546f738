// Torch glue of the relation-KD losses (SPEC §3): checks, the tile size, the choice of the tile
// kernels (CPU / CUDA / emulated, csrc/include/fastkd/relation_kd.h) and the call of the blocked
// algorithms (csrc/tiled/relation_tiles.h).
//
// Every function returns (loss: float32 scalar, grad_student or None, grad_teacher or None); the
// gradients are those of the returned loss (already including `scale`), in the input dtypes.
#pragma once
#include "glue/common.h"
#include "tiled/relation_tiles.h"

namespace fastkd::glue {
namespace relation_detail {

inline void check_pair(const at::Tensor& s, const at::Tensor& t) {
  TORCH_CHECK_VALUE(s.dim() == 2, "student_features must be 2-D [B, ds] here, got ", s.dim(), "-D");
  TORCH_CHECK_VALUE(t.dim() == 2, "teacher_features must be 2-D [B, dt] here, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(s.size(0) == t.size(0), "teacher_features has ", t.size(0),
                    " rows but student_features has ", s.size(0), "; the batch sizes must match");
  TORCH_CHECK_VALUE(s.size(0) >= 2, "student_features: relation losses need a batch of B >= 2 rows, got ",
                    s.size(0));
  TORCH_CHECK(s.device() == t.device(), "teacher_features is on ", t.device(),
              " but student_features is on ", s.device());
  TORCH_CHECK(s.is_cpu() || s.is_cuda(), "student_features must be a CPU or CUDA tensor");
  dtype_of(s, "student_features");
  dtype_of(t, "teacher_features");
}

inline int64_t tile_rows(const at::Tensor& student, int64_t tile_elems) {
  return tiled::relation_tile_rows(student.size(0), tile_elems, runs_cuda_kernels(student));
}

}  // namespace relation_detail

inline tiled::RelationGrads relation_sp_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                double scale, bool need_s, bool need_t,
                                                int64_t tile_elems) {
  relation_detail::check_pair(student, teacher);
  DeviceScope scope(student);
  if (!runs_cuda_kernels(student))
    return tiled::sp_loss_cpu(student, teacher, scale, need_s, need_t, tile_elems);
  const tiled::SPKernels k{FASTKD_KERNEL(student, sp_stats), FASTKD_KERNEL(student, sp_tile)};
  return tiled::sp_loss(student, teacher, scale, need_s, need_t,
                        relation_detail::tile_rows(student, tile_elems), k);
}

inline tiled::RelationGrads relation_rkd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                 double dist_scale, double angle_scale, bool need_s,
                                                 bool need_t, int64_t tile_elems) {
  relation_detail::check_pair(student, teacher);
  DeviceScope scope(student);
  if (!runs_cuda_kernels(student))
    return tiled::rkd_loss_cpu(student, teacher, dist_scale, angle_scale, need_s, need_t,
                               tile_elems);
  const int64_t B = student.size(0);
  tiled::RKDKernels k{FASTKD_KERNEL(student, rkd_stats), FASTKD_KERNEL(student, rkd_tile),
                      FASTKD_KERNEL(student, rkd_angle)};
  // The CUDA angle kernel writes one loss partial per anchor and anchor block.
  if (runs_cuda_kernels(student)) k.angle_parts = (B + kAngleAnchorBlock - 1) / kAngleAnchorBlock;
  return tiled::rkd_loss(student, teacher, dist_scale, angle_scale, need_s, need_t,
                         relation_detail::tile_rows(student, tile_elems), k);
}

inline tiled::RelationGrads relation_pkt_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                 double eps, double scale, bool need_s, bool need_t,
                                                 int64_t tile_elems) {
  relation_detail::check_pair(student, teacher);
  DeviceScope scope(student);
  if (!runs_cuda_kernels(student))
    return tiled::pkt_loss_cpu(student, teacher, eps, scale, need_s, need_t, tile_elems);
  const tiled::PKTKernels k{FASTKD_KERNEL(student, pkt_stats), FASTKD_KERNEL(student, pkt_tile)};
  return tiled::pkt_loss(student, teacher, eps, scale, need_s, need_t,
                         relation_detail::tile_rows(student, tile_elems), k);
}

inline void register_relation(pybind11::module_& m) {
  m.def("relation_sp_forward", &relation_sp_forward,
        "Blocked SP loss and its feature gradients (SPEC §3)", pybind11::arg("student"),
        pybind11::arg("teacher"), pybind11::arg("scale"), pybind11::arg("need_grad_student"),
        pybind11::arg("need_grad_teacher"), pybind11::arg("tile_elems") = 0);
  m.def("relation_rkd_forward", &relation_rkd_forward,
        "Blocked RKD loss (distance + angle) and its feature gradients (SPEC §3)",
        pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("distance_scale"),
        pybind11::arg("angle_scale"), pybind11::arg("need_grad_student"),
        pybind11::arg("need_grad_teacher"), pybind11::arg("tile_elems") = 0);
  m.def("relation_pkt_forward", &relation_pkt_forward,
        "Blocked PKT loss and its feature gradients (SPEC §3)", pybind11::arg("student"),
        pybind11::arg("teacher"), pybind11::arg("eps"), pybind11::arg("scale"),
        pybind11::arg("need_grad_student"), pybind11::arg("need_grad_teacher"),
        pybind11::arg("tile_elems") = 0);
}

}  // namespace fastkd::glue
