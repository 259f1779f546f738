"""Logit KD: argument checks, backend dispatch and the custom op over the fused kernels.

Every fused backend (cuda, cpu, triton) runs one launch that writes the per-row loss *and* the
gradients (SPEC §1); backward only scales the saved gradients by ``grad_output``. The kernels run
behind the ``torch.library`` custom op ``fastkd::logit_kd`` (:func:`logit_kd_op`; the pattern is
described in :mod:`fastkd._ops`), so ``torch.compile(fullgraph=True)`` traces :func:`kd_loss`
without a graph break. Under ``torch.autocast`` the inputs are taken in their own dtypes and the
math stays float32 (autocast is off inside the op and around the reference).
"""
from __future__ import annotations

import torch

from fastkd import _backend, _checks, _ext, _ops
from fastkd._reduce import count_rows, reduce_rows
from fastkd.logit.reference import DIVERGENCES, kd_rows_reference

DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
MAX_TEACHERS = 8
FLAG_TARGET, FLAG_STUDENT_MASKED, FLAG_TEACHER_MASKED = 1, 2, 4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Accepted temperatures: 1/T and T**2 stay finite float32 numbers (README "Guarantees": the
#: accuracy of SPEC §1 is tested for T in [0.05, 100] and holds to about T = 1e3).
TEMPERATURE_RANGE = (1e-30, 1e18)


class LogitKDConfig:
    """Validated scalar arguments of one KD call (also what the kernels receive)."""

    __slots__ = ("temperature", "soft_weight", "hard_weight", "divergence", "beta", "t2_scale",
                 "ignore_index", "label_smoothing", "reduction")

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                 beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean"):
        self.temperature = _checks.check_finite_number("temperature", temperature, positive=True)
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            # The kernels use 1/T and T**2 in float32: outside this range one of them overflows
            # (NaN losses, or an OverflowError for T**2 in Python).
            raise ValueError(f"temperature must be in [{TEMPERATURE_RANGE[0]:g}, "
                             f"{TEMPERATURE_RANGE[1]:g}] (1/T and T**2 are float32 in the "
                             f"kernels), got {self.temperature}")
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
        if not -2**63 <= ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64 (the target dtype), got {ignore_index}")
        self.ignore_index = ignore_index
        self.label_smoothing = _checks.check_finite_number("label_smoothing", label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        self.reduction = _checks.check_reduction(reduction)

    def as_args(self) -> tuple:
        """The fields in ``__slots__`` order: how the custom ops receive the configuration."""
        return tuple(getattr(self, key) for key in self.__slots__)

    @classmethod
    def from_args(cls, args) -> "LogitKDConfig":
        """Inverse of :meth:`as_args` (inside an op implementation)."""
        return cls(**dict(zip(cls.__slots__, args)))

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
        # Only the vocabulary may differ (SPEC §1b: the first min(V_s, V_t) entries are compared).
        if t.dim() != student_logits.dim() or t.shape[:-1] != student_logits.shape[:-1] \
                or t.shape[-1] < 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but student_logits has shape "
                             f"{tuple(student_logits.shape)}; they must match in every dimension "
                             f"but the last (vocabulary)")
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
    if len({t.dtype for t in teachers}) > 1:
        # The kernels take one teacher dtype. Teachers of different dtypes (e.g. bf16 and fp16)
        # are promoted to one that holds all of them exactly (float32; float64 if present),
        # never rounded to a narrower one. Autograd casts their gradients back.
        common = torch.float64 if any(t.dtype == torch.float64 for t in teachers) \
            else torch.float32
        teachers = [t.to(common) for t in teachers]
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


def match_vocab(student, teachers):
    """Vocabulary mismatch (SPEC §1b): keep the first min(V) entries of every side.

    Slicing is the same as masking the extra entries with -inf before the softmax (they get
    probability 0 and a zero gradient) without reading them; the slices are views.
    """
    vocab = min([student.shape[-1]] + [t.shape[-1] for t in teachers])
    if student.shape[-1] != vocab:
        student = student[..., :vocab]
    return student, [t if t.shape[-1] == vocab else t[..., :vocab] for t in teachers]


def _kd_loss_topk(student_logits, teacher_logits, target, teacher_topk, cfg, backend,
                  teacher_weights):
    from fastkd.logit import topk
    if teacher_logits is not None:
        raise ValueError("give either teacher_logits or teacher_topk, not both")
    if teacher_topk is None:
        raise ValueError("teacher_logits is None: give teacher logits or teacher_topk")
    if teacher_weights is not None:
        raise ValueError("teacher_weights applies to a list of teacher_logits, not to "
                         "teacher_topk")
    student, _, target = validate_inputs(student_logits, student_logits, target)
    name = _backend.resolve_backend(backend, student.device)
    if name != "reference" and student.dtype not in _KERNEL_DTYPES:
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} takes float32, bfloat16 or float16 logits; "
                               f"use backend='reference' for float64")
        name = "reference"
    return topk.kd_loss_topk(student, teacher_topk, target, cfg, name)


# The fused kernels behind one torch.library custom op (the pattern is described in fastkd/_ops.py).
LOGIT_KD_SCHEMA = (
    "(Tensor student, Tensor[] teachers, Tensor? target, float[] weights, float temperature, "
    "float soft_weight, float hard_weight, str divergence, float beta, bool t2_scale, "
    "int ignore_index, float label_smoothing, str reduction, bool need_grad_student, "
    "bool[] need_grad_teachers, str backend) -> (Tensor, Tensor, Tensor[])")


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op(f"{_ops.NAMESPACE}::logit_kd", mutates_args=(), schema=LOGIT_KD_SCHEMA,
                         **_ops.host_sync_tags())
def logit_kd_op(student, teachers, target, weights, temperature, soft_weight, hard_weight,
                divergence, beta, t2_scale, ignore_index, label_smoothing, reduction,
                need_grad_student, need_grad_teachers, backend):
    """``fastkd::logit_kd``: the fused kernel of ``backend`` (cpu, cuda, triton) on rows.

    ``student`` ``[N, V]``, ``teachers`` ``[N, V]`` each in one dtype, ``target`` ``[N]`` int64
    or None; the configuration as validated by :class:`LogitKDConfig` (``reduction`` without the
    alias). Returns ``(loss, grad_student, grad_teachers)``: the float32 loss (a scalar, or ``[N]``
    row losses with ``"none"``) and its gradients (each ``[N, V]`` in its input's dtype, or a
    ``[0]`` placeholder where ``need_grad_*`` is false). Raises the data-dependent errors of SPEC
    §Errors (target out of range, a row that is -inf everywhere) from the kernel's flags.
    """
    cfg = LogitKDConfig(temperature=temperature, soft_weight=soft_weight,
                        hard_weight=hard_weight, divergence=divergence, beta=beta,
                        t2_scale=t2_scale, ignore_index=ignore_index,
                        label_smoothing=label_smoothing, reduction=reduction)
    student = _unit_stride(student)
    teachers = [_unit_stride(t) for t in teachers]
    tgt = None if target is None else target.contiguous()
    with _ops.kernel_context(student.device):
        count = count_rows(tgt, cfg.ignore_index, student.shape[0], student.device)
        grad_scale = (1.0 / count).reshape(1) if cfg.reduction == "mean" else None
        row_loss, grad_s, grad_t, flags = KERNELS[backend](
            student, teachers, tgt, list(weights), cfg, grad_scale, bool(need_grad_student),
            [bool(n) for n in need_grad_teachers])
        flag_bits = int(flags.item())
        if flag_bits:
            raise_flags(flag_bits, cfg.ignore_index, student.shape[-1], len(teachers) > 1)
        loss = reduce_rows(row_loss, cfg.reduction, row_loss.shape, count)
    grad_s = _ops.placeholder(student) if grad_s is None else grad_s
    grad_t = [_ops.placeholder(t) if g is None else g for g, t in zip(grad_t, teachers)]
    return loss, grad_s, grad_t


@logit_kd_op.register_fake
def _logit_kd_fake(student, teachers, target, weights, temperature, soft_weight, hard_weight,
                   divergence, beta, t2_scale, ignore_index, label_smoothing, reduction,
                   need_grad_student, need_grad_teachers, backend):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (),
                             dtype=torch.float32)
    grad_s = student.new_empty(student.shape) if need_grad_student else _ops.placeholder(student)
    grad_t = [t.new_empty(t.shape) if n else _ops.placeholder(t)
              for t, n in zip(teachers, need_grad_teachers)]
    return loss, grad_s, grad_t


def _logit_kd_setup(ctx, inputs, output):
    *_, reduction, need_s, need_t, _backend_name = inputs
    _, grad_s, grad_t = output
    ctx.reduction = reduction
    _ops.save_gradients(ctx, [grad_s, *grad_t], [need_s, *need_t])


def _logit_kd_backward(ctx, grad_loss, _grad_s, _grad_t):
    saved = ctx.saved_tensors
    if grad_loss is None:
        grads = [None] * len(saved)
    else:
        grads = _ops.scale_saved(ctx, saved, grad_loss, "KD loss",
                                 per_row=ctx.reduction == "none")
    return (grads[0], list(grads[1:])) + (None,) * 14


logit_kd_op.register_autograd(_logit_kd_backward, setup_context=_logit_kd_setup)


def kd_loss(student_logits, teacher_logits, target=None, *, teacher_weights=None, backend="auto",
            teacher_topk=None, **config):
    """See :func:`fastkd.functional.kd_loss`."""
    cfg = LogitKDConfig(**config)
    backend = _backend.check_backend_name(backend)
    if teacher_topk is not None or teacher_logits is None:
        return _kd_loss_topk(student_logits, teacher_logits, target, teacher_topk, cfg, backend,
                             teacher_weights)
    student, teachers, target = validate_inputs(student_logits, teacher_logits, target)
    student, teachers = match_vocab(student, teachers)
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
        with _ops.no_autocast(s2.device):
            rows = kd_rows_reference(s2, t2, tgt, **cfg.reference_kwargs(weights))
            count = count_rows(tgt, cfg.ignore_index, s2.shape[0], s2.device)
            return reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
    s2 = _as_rows(student)
    t2 = [_as_rows(t).to(teachers[0].dtype) for t in teachers]
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    loss, _, _ = logit_kd_op(
        s2, t2, tgt, weights, cfg.temperature, cfg.soft_weight, cfg.hard_weight, cfg.divergence,
        cfg.beta, cfg.t2_scale, cfg.ignore_index, cfg.label_smoothing, cfg.reduction,
        _ops.needs_grad(s2), [_ops.needs_grad(t) for t in t2], name)
    return loss.reshape(lead_shape) if cfg.reduction == "none" else loss
