"""Logit KD: backend dispatch and the custom op over the fused kernels.

Every fused backend (cuda, cpu, triton) runs one launch that writes the per-row loss *and* the
gradients (SPEC §1); backward only scales the saved gradients by ``grad_output``. The kernels run
behind the ``torch.library`` custom op ``fastkd::logit_kd`` (:func:`logit_kd_op`; the pattern is
described in :mod:`fastkd._custom_op`), so ``torch.compile(fullgraph=True)`` traces :func:`kd_loss`
without a graph break. Under ``torch.autocast`` the inputs are taken in their own dtypes and the
math stays float32 (autocast is off inside the op and around the reference).
"""
from __future__ import annotations

import torch

from fastkd import _backend, _checks, _custom_op, _ext
from fastkd._reduce import check_num_items, mean_count, reduce_rows
from fastkd.logit import topk
from fastkd.logit.config import (CONFIG_SCHEMA, N_CONFIG, REDUCTION_ARG, LogitKDConfig, as_rows,
                                 check_vocab_mismatch, match_vocab, raise_flags, unit_stride,
                                 validate_inputs)
from fastkd.logit.reference import kd_rows_reference


def _ext_kernel(student, teachers, target, weights, cfg, grad_scale, need_s, need_t):
    div, beta = cfg.kernel_divergence
    return _ext._C.logit_kd_forward(
        student, teachers, target, weights, cfg.log_mixture, cfg.ignore_index, cfg.temperature,
        div, beta, cfg.soft_factor, cfg.hard_weight, cfg.label_smoothing, grad_scale, need_s,
        need_t)


def _triton_kernel(student, teachers, target, weights, cfg, grad_scale, need_s, need_t):
    from fastkd.logit import triton_kernel
    return triton_kernel.logit_kd_forward(student, teachers, target, weights, cfg, grad_scale,
                                          need_s, need_t)


KERNELS = {"cpu": _ext_kernel, "cuda": _ext_kernel, "triton": _triton_kernel}


def _kd_loss_topk(student_logits, teacher_logits, target, teacher_topk, cfg, backend,
                  teacher_weights, num_items_in_batch):
    if teacher_logits is not None:
        raise ValueError("give either teacher_logits or teacher_topk, not both")
    if teacher_topk is None:
        raise ValueError("teacher_logits is None: give teacher logits or teacher_topk")
    student, _, target = validate_inputs(student_logits, student_logits, target)
    name = _backend.select_backend(backend, student.device, [student.dtype], what="logits")
    num_items = check_num_items(num_items_in_batch, cfg.reduction, student.device)
    return topk.kd_loss_topk(student, teacher_topk, target, cfg, name, num_items,
                             teacher_weights)


# The fused kernels behind one torch.library custom op (the pattern: fastkd/_custom_op.py).
LOGIT_KD_SCHEMA = (
    f"(Tensor student, Tensor[] teachers, Tensor? target, float[] weights, {CONFIG_SCHEMA}, "
    f"bool need_grad_student, bool[] need_grad_teachers, str backend, "
    f"Tensor? num_items=None) "
    f"-> (Tensor, Tensor, Tensor[])")


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::logit_kd", mutates_args=(),
                         schema=LOGIT_KD_SCHEMA, **_custom_op.host_sync_tags())
def logit_kd_op(student, teachers, target, weights, temperature, soft_weight, hard_weight,
                divergence, beta, t2_scale, ignore_index, label_smoothing, reduction,
                teacher_mixture, uld_top, dynamic, need_grad_student, need_grad_teachers,
                backend, num_items=None):
    """``fastkd::logit_kd``: the fused kernel of ``backend`` (cpu, cuda, triton) on rows.

    ``student`` ``[N, V]``, ``teachers`` ``[N, V]`` each in one dtype, ``target`` ``[N]`` int64
    or None; the configuration as validated by :class:`LogitKDConfig` (``reduction`` without the
    alias); ``num_items``: the float32 denominator of ``"mean"`` (SPEC §1e), or None for this
    call's count of rows. Returns ``(loss, grad_student, grad_teachers)``: the float32 loss (a
    scalar, or ``[N]`` row losses with ``"none"``) and its gradients (each ``[N, V]`` in its
    input's dtype, or a ``[0]`` placeholder where ``need_grad_*`` is false). Raises the
    data-dependent errors of SPEC §Errors (target out of range, a row that is -inf everywhere)
    from the kernel's flags.
    """
    cfg = LogitKDConfig.from_args((temperature, soft_weight, hard_weight, divergence, beta,
                                   t2_scale, ignore_index, label_smoothing, reduction,
                                   teacher_mixture, uld_top, dynamic))
    student = unit_stride(student)
    teachers = [unit_stride(t) for t in teachers]
    tgt = None if target is None else target.contiguous()
    with _custom_op.kernel_context(student.device):
        count = mean_count(tgt, cfg.ignore_index, student.shape[0], student.device, num_items)
        grad_scale = (1.0 / count).reshape(1) if cfg.reduction == "mean" else None
        row_loss, grad_s, grad_t, flags = KERNELS[backend](
            student, teachers, tgt, list(weights), cfg, grad_scale, bool(need_grad_student),
            [bool(n) for n in need_grad_teachers])
        flag_bits = int(flags.item())
        if flag_bits:
            raise_flags(flag_bits, cfg.ignore_index, student.shape[-1], len(teachers) > 1)
        loss = reduce_rows(row_loss, cfg.reduction, row_loss.shape, count)
    grad_s = _custom_op.placeholder(student) if grad_s is None else grad_s
    grad_t = [_custom_op.placeholder(t) if g is None else g for g, t in zip(grad_t, teachers)]
    return loss, grad_s, grad_t


@logit_kd_op.register_fake
def _logit_kd_fake(student, teachers, target, weights, temperature, soft_weight, hard_weight,
                   divergence, beta, t2_scale, ignore_index, label_smoothing, reduction,
                   teacher_mixture, uld_top, dynamic, need_grad_student, need_grad_teachers,
                   backend, num_items=None):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (),
                             dtype=torch.float32)
    grad_s = student.new_empty(student.shape) if need_grad_student \
        else _custom_op.placeholder(student)
    grad_t = [t.new_empty(t.shape) if n else _custom_op.placeholder(t)
              for t, n in zip(teachers, need_grad_teachers)]
    return loss, grad_s, grad_t


def _logit_kd_setup(ctx, inputs, output):
    reduction = inputs[4 + REDUCTION_ARG]
    need_s, need_t = inputs[4 + N_CONFIG], inputs[5 + N_CONFIG]
    _, grad_s, grad_t = output
    ctx.reduction = reduction
    _custom_op.save_gradients(ctx, [grad_s, *grad_t], [need_s, *need_t])


def _logit_kd_backward(ctx, grad_loss, _grad_s, _grad_t):
    saved = ctx.saved_tensors
    if grad_loss is None:
        grads = [None] * len(saved)
    else:
        grads = _custom_op.scale_saved(ctx, saved, grad_loss, "KD loss",
                                       per_row=ctx.reduction == "none")
    return (grads[0], list(grads[1:])) + (None,) * (N_CONFIG + 6)


_custom_op.register_autograd(logit_kd_op, _logit_kd_backward, _logit_kd_setup)


def kd_loss(student_logits, teacher_logits, target, cfg: LogitKDConfig, *, teacher_weights=None,
            backend="auto", teacher_topk=None, num_items_in_batch=None, vocab_mismatch="error"):
    """Single-process logit KD for a validated ``cfg``; see :func:`fastkd.functional.kd_loss`."""
    backend = _backend.check_backend_name(backend)
    vocab_mismatch = check_vocab_mismatch(vocab_mismatch)
    if cfg.divergence == "uld":
        from fastkd.logit import uld
        return uld.kd_loss_uld(student_logits, teacher_logits, target, cfg, backend=backend,
                               teacher_topk=teacher_topk, teacher_weights=teacher_weights,
                               num_items_in_batch=num_items_in_batch)
    if teacher_topk is not None or teacher_logits is None:
        if cfg.log_mixture and teacher_topk is not None:
            raise ValueError("teacher_mixture='logprob' applies to dense teacher_logits, not to "
                             "teacher_topk")
        return _kd_loss_topk(student_logits, teacher_logits, target, teacher_topk, cfg, backend,
                             teacher_weights, num_items_in_batch)
    student, teachers, target = validate_inputs(student_logits, teacher_logits, target)
    student, teachers = match_vocab(student, teachers, vocab_mismatch)
    weights = _checks.check_weights("teacher_weights", teacher_weights, len(teachers))
    lead_shape = student.shape[:-1]
    name = _backend.select_backend(backend, student.device,
                                   [student.dtype] + [t.dtype for t in teachers], what="logits")
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    num_items = check_num_items(num_items_in_batch, cfg.reduction, student.device)
    if name == "reference":
        s2 = student.reshape(-1, student.shape[-1])
        t2 = [t.reshape(-1, t.shape[-1]) for t in teachers]
        with _custom_op.no_autocast(s2.device):
            rows = kd_rows_reference(s2, t2, tgt, weights=weights, **cfg.reference_kwargs())
            count = mean_count(tgt, cfg.ignore_index, s2.shape[0], s2.device, num_items)
            return reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
    s2 = as_rows(student)
    t2 = [as_rows(t).to(teachers[0].dtype) for t in teachers]
    loss, _, _ = _custom_op.call(logit_kd_op, s2, t2, tgt, weights, *cfg.as_args(),
                                 _custom_op.needs_grad(s2), [_custom_op.needs_grad(t) for t in t2],
                                 name, num_items)
    return loss.reshape(lead_shape) if cfg.reduction == "none" else loss
