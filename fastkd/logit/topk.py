"""Sparse top-k teacher (SPEC §1b, offline distillation): validation and the chunked path.

The teacher is given as ``(indices [N, k], logprobs [N, k])``: its k most likely vocabulary
entries and their log-probabilities, stored ahead of training. The divergence is computed over
k + 1 buckets (the listed entries and one residual bucket), see
:func:`fastkd.logit.reference.topk_bucket_logprobs`.

On every backend the loss and the student gradient are computed together in the forward pass,
in row chunks so that the float32 temporaries stay O(chunk * V) (the student gradient itself is
written in the student's dtype); backward only scales that gradient. The per-chunk math is the
reference's own bucket formulation differentiated by autograd (in float32, float64 for float64
inputs), so there is one definition of the top-k loss in the library.
"""
from __future__ import annotations

import torch

from fastkd import _checks
from fastkd._reduce import count_rows, reduce_rows
from fastkd.logit.reference import kd_rows_topk_reference

# Float32 elements per chunk of rows: bounds the temporaries (~8 x 4 bytes each) to ~128 MiB.
_CHUNK_ELEMENTS = 1 << 22


def validate_topk(teacher_topk, student_logits):
    """Check ``teacher_topk = (indices, logprobs)`` against ``student_logits`` ``[*, V]``.

    Returns ``(indices [N, k] int64, logprobs [N, k])``. Device-data checks (index range,
    duplicate indices, probabilities summing to more than 1) cost one host synchronisation.
    """
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices, logprobs) of tensors")
    indices, logprobs = teacher_topk
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_topk indices must be an int64 (or int32) tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    _checks.check_float_tensor("teacher_topk logprobs", logprobs)
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher_topk indices {tuple(indices.shape)} and logprobs "
                         f"{tuple(logprobs.shape)} must have the same shape")
    if indices.dim() < 1 or indices.shape[:-1] != lead:
        raise ValueError(f"teacher_topk tensors have shape {tuple(indices.shape)} but must be "
                         f"[*, k] with * = the leading shape of student_logits {tuple(lead)}")
    k = indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk has k = {k} entries per row; need 1 <= k <= V = {vocab}")
    _checks.check_same_device(student_logits=student_logits, teacher_topk_indices=indices,
                              teacher_topk_logprobs=logprobs)
    idx = indices.reshape(-1, k).to(torch.int64)
    lp = logprobs.reshape(-1, k)
    if idx.numel():
        srt = idx.sort(-1).values
        bad_range = (srt[:, 0] < 0) | (srt[:, -1] >= vocab)
        dup = (srt[:, 1:] == srt[:, :-1]).any(-1) if k > 1 else torch.zeros_like(bad_range)
        over = lp.float().exp().sum(-1) > 1.0 + 1e-3  # NaN rows compare False: NaN propagates
        flags = torch.stack([bad_range.any(), dup.any(), over.any()]).tolist()
        if flags[0]:
            raise ValueError(f"teacher_topk indices must lie in [0, {vocab})")
        if flags[1]:
            raise ValueError("teacher_topk indices must be distinct within a row")
        if flags[2]:
            raise ValueError("teacher_topk logprobs must be log-probabilities: the listed "
                             "probabilities of a row sum to more than 1")
    return idx, lp


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def topk_rows_and_grad(s2, idx, lp, tgt, cfg, grad_scale, need_grad: bool):
    """Row losses ``[N]`` (float32, float64 for float64 input) and, if ``need_grad``, the
    gradient of ``sum_r grad_scale * loss_r`` with respect to ``s2`` in its dtype."""
    n, vocab = s2.shape
    work = torch.float64 if s2.dtype == torch.float64 else torch.float32
    rows_out = torch.empty(n, dtype=work, device=s2.device)
    grad = torch.empty_like(s2) if need_grad else None
    kwargs = dict(temperature=cfg.temperature, soft_weight=cfg.soft_weight,
                  hard_weight=cfg.hard_weight, divergence=cfg.divergence, beta=cfg.beta,
                  t2_scale=cfg.t2_scale, ignore_index=cfg.ignore_index,
                  label_smoothing=cfg.label_smoothing)
    step = _chunk_rows(vocab)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        with torch.enable_grad():
            s = s2[lo:hi].detach().to(work).requires_grad_(need_grad)
            rows = kd_rows_topk_reference(s, idx[lo:hi], lp[lo:hi].detach(),
                                          None if tgt is None else tgt[lo:hi], **kwargs)
            if need_grad:
                weight = grad_scale.to(work) if grad_scale is not None else 1.0
                (g,) = torch.autograd.grad((rows * weight).sum(), s)
                grad[lo:hi] = g
        rows_out[lo:hi] = rows.detach()
    return rows_out, grad


class _TopkKD(torch.autograd.Function):
    """Loss and student gradient in forward (row chunks); backward scales the gradient."""

    @staticmethod
    def forward(ctx, cfg, lead_shape, target, idx, lp, student):
        s2 = student.reshape(-1, student.shape[-1])
        tgt = None if target is None else target.reshape(-1).to(torch.int64)
        count = count_rows(tgt, cfg.ignore_index, s2.shape[0], s2.device)
        grad_scale = (1.0 / count) if cfg.reduction == "mean" else None
        rows, grad = topk_rows_and_grad(s2, idx, lp, tgt, cfg, grad_scale,
                                        ctx.needs_input_grad[5])
        ctx.reduction = cfg.reduction
        ctx.shape = student.shape
        ctx.save_for_backward(grad)
        out = reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
        return out if student.dtype == torch.float64 else out.float()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        if ctx.reduction == "none":
            scale = grad_output.reshape(-1, 1).to(torch.float32)
        else:
            scale = grad_output.reshape(1, 1).to(torch.float32)
        g = (grad.float() * scale).to(grad.dtype) if grad.dtype != torch.float64 \
            else grad * scale.double()
        return None, None, None, None, None, g.view(ctx.shape)


def kd_loss_topk(student_logits, teacher_topk, target, cfg, backend_name: str):
    """KD loss against a sparse top-k teacher; ``cfg`` is a validated ``LogitKDConfig``."""
    idx, lp = validate_topk(teacher_topk, student_logits)
    lead_shape = student_logits.shape[:-1]
    if backend_name == "reference":
        s2 = student_logits.reshape(-1, student_logits.shape[-1])
        tgt = None if target is None else target.reshape(-1).to(torch.int64)
        rows = kd_rows_topk_reference(
            s2, idx, lp, tgt, temperature=cfg.temperature, soft_weight=cfg.soft_weight,
            hard_weight=cfg.hard_weight, divergence=cfg.divergence, beta=cfg.beta,
            t2_scale=cfg.t2_scale, ignore_index=cfg.ignore_index,
            label_smoothing=cfg.label_smoothing)
        count = count_rows(tgt, cfg.ignore_index, s2.shape[0], s2.device)
        return reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
    return _TopkKD.apply(cfg, lead_shape, target, idx, lp, student_logits)
