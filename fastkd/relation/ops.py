"""Relation KD (SPEC §3): argument checks, backend dispatch, the custom ops over the blocked
kernels, and the functional forms :func:`sp_loss`, :func:`rkd_loss`, :func:`pkt_loss`.

Every fused backend (cuda, cpu, triton) runs the two sweeps of the blocked computation in the
forward pass (row statistics, then loss + feature gradients; see ``csrc/glue/relation.h``) and
computes in float32; backward only scales the saved gradients by ``grad_output`` (out of place,
so a retained graph may be walked twice). The kernels run behind the ``torch.library`` custom ops
``fastkd::relation_sp``, ``fastkd::relation_rkd`` and ``fastkd::relation_pkt`` (the pattern is
described in :mod:`fastkd._custom_op`): ``torch.compile(fullgraph=True)`` traces the losses without a
graph break. Under ``torch.autocast`` the features are taken in their own dtypes and the math
stays float32 (autocast is off inside the ops and around the reference).
"""
from __future__ import annotations

import torch

from fastkd import _backend, _checks, _custom_op, _dynamic, _ext
from fastkd.relation import reference as _ref

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
    return _backend.select_backend(backend, student.device, [student.dtype, teacher.dtype],
                                   what="features", ext_ops=_EXT_OPS)


# ------------------------------------------------------------------------------- kernel adapters
def _tile_elems() -> int:
    return 0 if TILE_ELEMS is None else int(TILE_ELEMS)


def _ext_sp(student, teacher, need_s, need_t, *, scale, tile_elems):
    return _ext._C.relation_sp_forward(student, teacher, scale, need_s, need_t, tile_elems)


def _ext_rkd(student, teacher, need_s, need_t, *, distance_scale, angle_scale, tile_elems):
    return _ext._C.relation_rkd_forward(student, teacher, distance_scale, angle_scale, need_s,
                                        need_t, tile_elems)


def _ext_pkt(student, teacher, need_s, need_t, *, eps, scale, tile_elems):
    return _ext._C.relation_pkt_forward(student, teacher, eps, scale, need_s, need_t, tile_elems)


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


# ------------------------------------------------------------------- torch.library custom ops
# One op per loss (the pattern is described in fastkd/_custom_op.py): [B, d] features in, the float32
# loss and the feature gradients (computed in forward; [0] placeholders where not asked for) out.
_RELATION_OUT = ("str reduction, bool need_grad_student, bool need_grad_teacher, int tile_elems, "
                 "str backend) -> (Tensor, Tensor, Tensor)")
_RKD_WEIGHTS = ("distance_weight", "angle_weight")
RELATION_SCHEMAS = {
    "sp": "(Tensor student, Tensor teacher, " + _RELATION_OUT,
    "rkd": "(Tensor student, Tensor teacher, float distance_weight, float angle_weight, "
           "Tensor? dynamic, " + _RELATION_OUT,
    "pkt": "(Tensor student, Tensor teacher, float eps, " + _RELATION_OUT,
}


def _relation_call(family, student, teacher, params, reduction, need_s, need_t, tile_elems,
                   backend):
    """Run the kernel of ``family`` with the loss scales of ``reduction``."""
    b = float(student.shape[0])
    mean = reduction == "mean"
    if family == "sp":
        kwargs = dict(scale=1.0 / (b * b) if mean else 1.0)
    elif family == "rkd":
        distance_weight, angle_weight = params
        kwargs = dict(distance_scale=distance_weight / (b * b) if mean else distance_weight,
                      angle_scale=angle_weight / (b * b * b) if mean else angle_weight)
    else:
        kwargs = dict(eps=params[0], scale=1.0 / (b * b) if mean else 1.0)
    kernel = _KERNELS[family][backend]
    if backend != "triton":
        kwargs["tile_elems"] = tile_elems
    with _custom_op.kernel_context(student.device):
        loss, grad_s, grad_t = kernel(student, teacher, bool(need_s), bool(need_t), **kwargs)
    return (loss.reshape(()).to(torch.float32),
            _custom_op.placeholder(student) if grad_s is None else grad_s.contiguous(),
            _custom_op.placeholder(teacher) if grad_t is None else grad_t.contiguous())


def _relation_fake(student, teacher, need_s, need_t):
    return (student.new_empty((), dtype=torch.float32),
            student.new_empty(student.shape) if need_s else _custom_op.placeholder(student),
            teacher.new_empty(teacher.shape) if need_t else _custom_op.placeholder(teacher))


def _relation_setup(ctx, inputs, output):
    *_, need_s, need_t, _tile, _backend_name = inputs
    ctx.num_inputs = len(inputs)
    _custom_op.save_gradients(ctx, output[1:], (need_s, need_t))


def _relation_backward(ctx, grad_loss, *_grads):
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    # [B, d] gradients: scaled out of place, so a retained graph may be walked again.
    grad_s, grad_t = _custom_op.scale_saved(ctx, ctx.saved_tensors, grad_loss, "relation KD loss",
                                      in_place=False)
    return (grad_s, grad_t) + (None,) * (ctx.num_inputs - 2)


def _relation_op(name, schema):
    return torch.library.custom_op(f"{_custom_op.NAMESPACE}::{name}", mutates_args=(), schema=schema)


@_relation_op("relation_sp", RELATION_SCHEMAS["sp"])
def sp_op(student, teacher, reduction, need_grad_student, need_grad_teacher, tile_elems,
          backend):
    """``fastkd::relation_sp``: blocked SP loss and its feature gradients (``backend``: cpu,
    cuda, triton; ``tile_elems`` 0 = the backend default)."""
    return _relation_call("sp", student, teacher, (), reduction, need_grad_student,
                          need_grad_teacher, tile_elems, backend)


@_relation_op("relation_rkd", RELATION_SCHEMAS["rkd"])
def rkd_op(student, teacher, distance_weight, angle_weight, dynamic, reduction,
           need_grad_student, need_grad_teacher, tile_elems, backend):
    """``fastkd::relation_rkd``: blocked RKD loss (distance + angle) and its feature gradients.
    ``dynamic``: the two weights as a float64 tensor (when they were tensors under
    ``torch.compile``; see :mod:`fastkd._dynamic`), or None."""
    weights = _dynamic.unpack((distance_weight, angle_weight), dynamic, _RKD_WEIGHTS,
                              (_checks.check_nonnegative,) * 2)
    return _relation_call("rkd", student, teacher, tuple(weights), reduction,
                          need_grad_student, need_grad_teacher, tile_elems, backend)


@_relation_op("relation_pkt", RELATION_SCHEMAS["pkt"])
def pkt_op(student, teacher, eps, reduction, need_grad_student, need_grad_teacher, tile_elems,
           backend):
    """``fastkd::relation_pkt``: blocked PKT loss and its feature gradients."""
    return _relation_call("pkt", student, teacher, (eps,), reduction, need_grad_student,
                          need_grad_teacher, tile_elems, backend)


@sp_op.register_fake
def _sp_fake(student, teacher, reduction, need_s, need_t, tile_elems, backend):
    return _relation_fake(student, teacher, need_s, need_t)


@rkd_op.register_fake
def _rkd_fake(student, teacher, distance_weight, angle_weight, dynamic, reduction, need_s,
              need_t, tile_elems, backend):
    return _relation_fake(student, teacher, need_s, need_t)


@pkt_op.register_fake
def _pkt_fake(student, teacher, eps, reduction, need_s, need_t, tile_elems, backend):
    return _relation_fake(student, teacher, need_s, need_t)


for _op in (sp_op, rkd_op, pkt_op):
    _custom_op.register_autograd(_op, _relation_backward, _relation_setup)
del _op


def _run(op, s2, t2, *params, reduction, backend):
    return _custom_op.call(op, s2, t2, *params, reduction, _custom_op.needs_grad(s2),
                           _custom_op.needs_grad(t2), _tile_elems(), backend)[0]


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
        with _custom_op.no_autocast(s2.device):
            return _ref.sp_loss_reference(s2, t2, reduction)
    return _run(sp_op, s2, t2, reduction=reduction, backend=name)


def rkd_loss(student_features, teacher_features, *, distance_weight=1.0, angle_weight=2.0,
             reduction="mean", backend="auto"):
    r"""Relational KD loss (Park et al. 2019); see :class:`fastkd.RKDLoss`.

    Args:
        student_features, teacher_features: ``[B, ...]`` features (widths may differ).
        distance_weight (float or one-element tensor): weight of the distance term (>= 0).
            Default: 1.0.
        angle_weight (float or one-element tensor): weight of the angle term (>= 0).
            Default: 2.0. (A tensor changes between compiled calls without recompilation.)
        reduction: ``"mean"`` (distance term / B^2, angle term / B^3; default) or ``"sum"``.
        backend: as in :func:`sp_loss`.
    """
    reduction = check_relation_reduction(reduction)
    weights = [_dynamic.resolve(n, w, _checks.check_nonnegative)
               for n, w in zip(_RKD_WEIGHTS, (distance_weight, angle_weight))]
    s2, t2 = validate_features(student_features, teacher_features)
    name = select_backend(backend, s2, t2)
    if name == "reference":
        with _custom_op.no_autocast(s2.device):
            return _ref.rkd_loss_reference(s2, t2, *weights, reduction)
    floats, dynamic = _dynamic.pack(weights)
    return _run(rkd_op, s2, t2, *floats, dynamic, reduction=reduction, backend=name)


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
        with _custom_op.no_autocast(s2.device):
            return _ref.pkt_loss_reference(s2, t2, eps, reduction)
    return _run(pkt_op, s2, t2, eps, reduction=reduction, backend=name)
