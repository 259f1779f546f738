"""Logit KD: argument checks, backend dispatch and the autograd function over the fused kernels.

Every fused backend (cuda, cpu, triton) runs one launch that writes the per-row loss *and* the
gradients (SPEC §1); backward only scales the saved gradients by ``grad_output``.
"""
from __future__ import annotations

import torch

from fastkd import _backend, _checks, _ext
from fastkd._reduce import count_rows, reduce_rows
from fastkd.logit.reference import DIVERGENCES, kd_rows_reference

DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
MAX_TEACHERS = 8
FLAG_TARGET, FLAG_STUDENT_MASKED, FLAG_TEACHER_MASKED = 1, 2, 4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LogitKDConfig:
    """Validated scalar arguments of one KD call (also what the kernels receive)."""

    __slots__ = ("temperature", "soft_weight", "hard_weight", "divergence", "beta", "t2_scale",
                 "ignore_index", "label_smoothing", "reduction")

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                 beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean"):
        self.temperature = _checks.check_finite_number("temperature", temperature, positive=True)
        self.soft_weight = _checks.check_finite_number("soft_weight", soft_weight, nonnegative=True)
        self.hard_weight = _checks.check_finite_number("hard_weight", hard_weight, nonnegative=True)
        self.divergence = _checks.check_choice("divergence", divergence, DIVERGENCES)
        self.beta = _checks.check_finite_number("beta", beta)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not isinstance(t2_scale, bool):
            raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
        self.t2_scale = t2_scale
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.label_smoothing = _checks.check_finite_number("label_smoothing", label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        self.reduction = _checks.check_reduction(reduction)

    @property
    def soft_factor(self) -> float:
        return self.soft_weight * (self.temperature ** 2 if self.t2_scale else 1.0)

    @property
    def kernel_divergence(self) -> tuple[int, float]:
        """(divergence id, beta) with JSD at beta = 0 / 1 mapped to KL / reverse KL exactly."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return DIVERGENCE_IDS["kl" if self.beta == 0.0 else "reverse_kl"], self.beta
        return DIVERGENCE_IDS[self.divergence], self.beta

    def reference_kwargs(self, weights):
        return dict(weights=weights, temperature=self.temperature, soft_weight=self.soft_weight,
                    hard_weight=self.hard_weight, divergence=self.divergence, beta=self.beta,
                    t2_scale=self.t2_scale, ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[*, V] -> [N, V] with unit stride along V; any row stride is read as is (no copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def validate_inputs(student_logits, teacher_logits, target):
    """Checks of SPEC §Errors that need no device data. Returns (student, [teachers], target)."""
    _checks.check_float_tensor("student_logits", student_logits)
    many = isinstance(teacher_logits, (list, tuple))
    teachers = list(teacher_logits) if many else [teacher_logits]
    if len(teachers) == 0:
        raise ValueError("teacher_logits is an empty list: give at least one teacher")
    if len(teachers) > MAX_TEACHERS:
        raise ValueError(f"teacher_logits has {len(teachers)} teachers; at most {MAX_TEACHERS}")
    names = [f"teacher_logits[{i}]" if many else "teacher_logits" for i in range(len(teachers))]
    for name, t in zip(names, teachers):
        _checks.check_float_tensor(name, t)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must have a vocabulary dimension V >= 1, got shape "
                         f"{tuple(student_logits.shape)}")
    for name, t in zip(names, teachers):
        if t.shape != student_logits.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but student_logits has shape "
                             f"{tuple(student_logits.shape)}; they must match")
    lead = student_logits.shape[:-1]
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor of class indices, got "
                            f"{type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
        if target.shape != lead:
            raise ValueError(f"target has shape {tuple(target.shape)} but must equal the leading "
                             f"shape of student_logits {tuple(lead)}")
    dev_kwargs = {"student_logits": student_logits, "target": target}
    dev_kwargs.update(dict(zip(names, teachers)))
    _checks.check_same_device(**dev_kwargs)
    return student_logits, teachers, target


def raise_flags(flags: int, ignore_index: int, vocab: int, many: bool) -> None:
    """Turn the kernel's error bits into the exceptions of SPEC §Errors."""
    if flags & FLAG_TARGET:
        raise ValueError(f"target has values outside [0, {vocab}) other than "
                         f"ignore_index={ignore_index}")
    if flags & FLAG_STUDENT_MASKED:
        raise ValueError("student_logits has a row that is -inf everywhere (no vocabulary entry left)")
    if flags & FLAG_TEACHER_MASKED:
        name = "teacher_logits[i]" if many else "teacher_logits"
        raise ValueError(f"{name} has a row that is -inf everywhere (no vocabulary entry left)")


def _ext_kernel(student, teachers, target, weights, cfg, grad_scale, need_s, need_t):
    div, beta = cfg.kernel_divergence
    return _ext._C.logit_kd_forward(
        student, teachers, target, weights, cfg.ignore_index, cfg.temperature, div, beta,
        cfg.soft_factor, cfg.hard_weight, cfg.label_smoothing, grad_scale, need_s, need_t)


def _triton_kernel(student, teachers, target, weights, cfg, grad_scale, need_s, need_t):
    from fastkd.logit import triton_kernel
    return triton_kernel.logit_kd_forward(student, teachers, target, weights, cfg, grad_scale,
                                          need_s, need_t)


KERNELS = {"cpu": _ext_kernel, "cuda": _ext_kernel, "triton": _triton_kernel}


class _FusedLogitKD(torch.autograd.Function):
    """Forward runs the fused kernel (loss + gradients); backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, backend, cfg, weights, lead_shape, target, student, *teachers):
        vocab = student.shape[-1]
        s2 = _as_rows(student)
        t2 = [_as_rows(t).to(teachers[0].dtype) for t in teachers]
        tgt = None if target is None else target.reshape(-1).to(torch.int64).contiguous()
        need_s = ctx.needs_input_grad[5]
        need_t = [bool(x) for x in ctx.needs_input_grad[6:]]
        count = count_rows(tgt, cfg.ignore_index, s2.shape[0], s2.device)
        grad_scale = (1.0 / count).reshape(1) if cfg.reduction == "mean" else None
        row_loss, grad_s, grad_t, flags = KERNELS[backend](
            s2, t2, tgt, weights, cfg, grad_scale, need_s, need_t)
        flag_bits = int(flags.item())
        if flag_bits:
            raise_flags(flag_bits, cfg.ignore_index, vocab, len(teachers) > 1)
        ctx.reduction = cfg.reduction
        ctx.shapes = [student.shape] + [t.shape for t in teachers]
        ctx.teacher_dtypes = [t.dtype for t in teachers]
        ctx.consumed = False
        ctx.save_for_backward(grad_s, *grad_t)
        return reduce_rows(row_loss, cfg.reduction, lead_shape, count)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "fastkd KD loss: backward ran twice through the same graph. The fused kernel "
                "computes the gradient once in the forward pass and scales it in place, so "
                "retain_graph=True with a second backward is not supported; recompute the loss.")
        ctx.consumed = True
        saved = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_output.reshape(-1, 1).float()
        elif grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            scale = None  # the common case: loss.backward() on the reduced loss
        else:
            scale = grad_output.reshape(1, 1).float()
        grads = []
        for g, shape, dtype in zip(saved, ctx.shapes, [None] + ctx.teacher_dtypes):
            if g is None:
                grads.append(None)
                continue
            if scale is not None:
                g.mul_(scale)  # in place: no second N x V buffer
            g = g.view(shape)
            grads.append(g if dtype is None else g.to(dtype))
        return (None, None, None, None, None, *grads)


def kd_loss(student_logits, teacher_logits, target=None, *, teacher_weights=None, backend="auto",
            **config):
    """See :func:`fastkd.functional.kd_loss`."""
    cfg = LogitKDConfig(**config)
    backend = _backend.check_backend_name(backend)
    student, teachers, target = validate_inputs(student_logits, teacher_logits, target)
    weights = _checks.check_weights("teacher_weights", teacher_weights, len(teachers))
    lead_shape = student.shape[:-1]
    name = _backend.resolve_backend(backend, student.device)
    if name != "reference" and (student.dtype not in _KERNEL_DTYPES
                                or any(t.dtype not in _KERNEL_DTYPES for t in teachers)):
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} takes float32, bfloat16 or float16 logits; "
                               f"use backend='reference' for float64")
        name = "reference"
    if name == "reference":
        s2 = student.reshape(-1, student.shape[-1])
        t2 = [t.reshape(-1, t.shape[-1]) for t in teachers]
        tgt = None if target is None else target.reshape(-1).to(torch.int64)
        rows = kd_rows_reference(s2, t2, tgt, **cfg.reference_kwargs(weights))
        count = count_rows(tgt, cfg.ignore_index, s2.shape[0], s2.device)
        out = reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
        return out
    return _FusedLogitKD.apply(name, cfg, weights, lead_shape, target, student, *teachers)
