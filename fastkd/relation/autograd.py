"""Relation KD (SPEC §3): argument checks, backend dispatch, the autograd function over the blocked
kernels, and the functional forms :func:`sp_loss`, :func:`rkd_loss`, :func:`pkt_loss`.

Every fused backend (cuda, cpu, triton) runs the two sweeps of the blocked computation in the
forward pass (row statistics, then loss + feature gradients; see ``csrc/glue/relation.h``) and
computes in float32; backward only scales the saved gradients by ``grad_output``.
"""
from __future__ import annotations

import functools

import torch

from fastkd import _backend, _checks, _ext
from fastkd.relation import reference as _ref

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EXT_OPS = ("relation_sp_forward", "relation_rkd_forward", "relation_pkt_forward")

#: Floats per ``rows x B`` tile buffer of the cpu/cuda kernels (``None``: the backend default,
#: 2**22 on CPU and 2**24 on CUDA). The tests lower it to exercise the tiling on small batches.
TILE_ELEMS = None


def ext_has_relation_ops() -> bool:
    """Whether the compiled extension exists and carries the relation kernels."""
    return _ext._C is not None and all(hasattr(_ext._C, op) for op in _EXT_OPS)


def check_relation_reduction(reduction) -> str:
    """``"mean"`` (or its alias ``"batchmean"``) or ``"sum"``; ``"none"`` has no meaning here."""
    reduction = _checks.check_reduction(reduction)
    if reduction == "none":
        raise ValueError("reduction='none' is not defined for relation losses (the loss couples "
                         "all rows of the batch); use 'mean' or 'sum'")
    return reduction


def validate_features(student_features, teacher_features):
    """SPEC §Errors for relation losses; returns the ``[B, d]`` views of both inputs."""
    _checks.check_float_tensor("student_features", student_features)
    _checks.check_float_tensor("teacher_features", teacher_features)
    for name, x in (("student_features", student_features), ("teacher_features", teacher_features)):
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
    b_s, b_t = student_features.shape[0], teacher_features.shape[0]
    if b_s != b_t:
        raise ValueError(f"teacher_features has batch size {b_t} but student_features has "
                         f"{b_s}; the batch sizes must match (feature widths may differ)")
    if b_s < 2:
        raise ValueError(f"student_features has batch size {b_s}: relation losses are undefined "
                         f"for B < 2 (they compare pairs of rows)")
    _checks.check_same_device(student_features=student_features, teacher_features=teacher_features)
    return _ref.flatten_features(student_features), _ref.flatten_features(teacher_features)


def select_backend(backend, student: torch.Tensor, teacher: torch.Tensor) -> str:
    """The concrete backend for these inputs (SPEC §Common rules: no silent fallback when forced)."""
    backend = _backend.check_backend_name(backend)
    name = _backend.resolve_backend(backend, student.device)
    if name in ("cpu", "cuda") and not ext_has_relation_ops():
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} is unavailable: the compiled extension "
                               f"fastkd._C has no relation kernels (rebuild fastkd)")
        name = _backend.resolve_backend("auto", student.device, ("triton", "reference"))
    if name != "reference" and (student.dtype not in _KERNEL_DTYPES
                                or teacher.dtype not in _KERNEL_DTYPES):
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} takes float32, bfloat16 or float16 features; "
                               f"use backend='reference' for float64")
        name = "reference"
    return name


class _BlockedRelation(torch.autograd.Function):
    """Forward runs the blocked kernels (loss + feature gradients); backward scales the gradients."""

    @staticmethod
    def forward(ctx, kernel, student, teacher):
        need_s, need_t = bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])
        loss, grad_s, grad_t = kernel(student, teacher, need_s, need_t)
        ctx.save_for_backward(grad_s, grad_t)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_s, grad_t = ctx.saved_tensors
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return None, grad_s, grad_t  # the common case: loss.backward() on this loss
        scale = grad_output.float()
        return (None,
                None if grad_s is None else (grad_s.float() * scale).to(grad_s.dtype),
                None if grad_t is None else (grad_t.float() * scale).to(grad_t.dtype))


# ------------------------------------------------------------------------------- kernel adapters
def _tile_elems() -> int:
    return 0 if TILE_ELEMS is None else int(TILE_ELEMS)


def _ext_sp(student, teacher, need_s, need_t, *, scale):
    return _ext._C.relation_sp_forward(student, teacher, scale, need_s, need_t, _tile_elems())


def _ext_rkd(student, teacher, need_s, need_t, *, distance_scale, angle_scale):
    return _ext._C.relation_rkd_forward(student, teacher, distance_scale, angle_scale, need_s,
                                        need_t, _tile_elems())


def _ext_pkt(student, teacher, need_s, need_t, *, eps, scale):
    return _ext._C.relation_pkt_forward(student, teacher, eps, scale, need_s, need_t,
                                        _tile_elems())


def _triton(name):
    def run(student, teacher, need_s, need_t, **kwargs):
        from fastkd.relation import triton_kernel
        return getattr(triton_kernel, name)(student, teacher, need_s, need_t, **kwargs)
    return run


_KERNELS = {
    "sp": {"cpu": _ext_sp, "cuda": _ext_sp, "triton": _triton("sp_forward")},
    "rkd": {"cpu": _ext_rkd, "cuda": _ext_rkd, "triton": _triton("rkd_forward")},
    "pkt": {"cpu": _ext_pkt, "cuda": _ext_pkt, "triton": _triton("pkt_forward")},
}


def _run(family, backend_name, s2, t2, **kwargs):
    kernel = functools.partial(_KERNELS[family][backend_name], **kwargs)
    return _BlockedRelation.apply(kernel, s2, t2)


# ------------------------------------------------------------------------------ functional forms
def sp_loss(student_features, teacher_features, *, reduction="mean", backend="auto"):
    r"""Similarity-preserving KD loss (Tung & Mori 2019); see :class:`fastkd.SPLoss`.

    Args:
        student_features: ``[B, ...]`` float32/bfloat16/float16 (float64: reference only).
        teacher_features: ``[B, ...]``; the widths after flattening may differ from the student's.
        reduction: ``"mean"`` (``/ B^2``, default; ``"batchmean"`` is an alias) or ``"sum"``.
        backend: ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        float32 scalar (float64 from the reference on float64 inputs).
    """
    reduction = check_relation_reduction(reduction)
    s2, t2 = validate_features(student_features, teacher_features)
    name = select_backend(backend, s2, t2)
    if name == "reference":
        return _ref.sp_loss_reference(s2, t2, reduction)
    b = s2.shape[0]
    scale = 1.0 / (b * b) if reduction == "mean" else 1.0
    return _run("sp", name, s2, t2, scale=scale)


def rkd_loss(student_features, teacher_features, *, distance_weight=1.0, angle_weight=2.0,
             reduction="mean", backend="auto"):
    r"""Relational KD loss (Park et al. 2019); see :class:`fastkd.RKDLoss`.

    Args:
        student_features, teacher_features: ``[B, ...]`` features (widths may differ).
        distance_weight (float): weight of the distance term (>= 0). Default: 1.0.
        angle_weight (float): weight of the angle term (>= 0). Default: 2.0.
        reduction: ``"mean"`` (distance term / B^2, angle term / B^3; default) or ``"sum"``.
        backend: as in :func:`sp_loss`.
    """
    reduction = check_relation_reduction(reduction)
    distance_weight = _checks.check_finite_number("distance_weight", distance_weight,
                                                  nonnegative=True)
    angle_weight = _checks.check_finite_number("angle_weight", angle_weight, nonnegative=True)
    s2, t2 = validate_features(student_features, teacher_features)
    name = select_backend(backend, s2, t2)
    if name == "reference":
        return _ref.rkd_loss_reference(s2, t2, distance_weight, angle_weight, reduction)
    b = float(s2.shape[0])
    mean = reduction == "mean"
    return _run("rkd", name, s2, t2,
                distance_scale=distance_weight / (b * b) if mean else distance_weight,
                angle_scale=angle_weight / (b * b * b) if mean else angle_weight)


def pkt_loss(student_features, teacher_features, *, eps=1e-7, reduction="mean", backend="auto"):
    r"""Probabilistic knowledge transfer loss (Passalis & Tefas 2018); see :class:`fastkd.PKTLoss`.

    Args:
        student_features, teacher_features: ``[B, ...]`` features (widths may differ).
        eps (float): > 0, added to the row norms and to both probabilities. Default: 1e-7.
        reduction: ``"mean"`` (``/ B^2``, default) or ``"sum"``.
        backend: as in :func:`sp_loss`.
    """
    reduction = check_relation_reduction(reduction)
    eps = _checks.check_finite_number("eps", eps, positive=True)
    s2, t2 = validate_features(student_features, teacher_features)
    name = select_backend(backend, s2, t2)
    if name == "reference":
        return _ref.pkt_loss_reference(s2, t2, eps, reduction)
    b = s2.shape[0]
    return _run("pkt", name, s2, t2, eps=eps,
                scale=1.0 / (b * b) if reduction == "mean" else 1.0)
