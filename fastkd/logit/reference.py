"""Pure-PyTorch reference of logit KD (SPEC §1, §1c): the contract written as code.

It is literal rather than fast, differentiable by autograd, and exact in float64 when given
float64 inputs (the tests compare every kernel against it that way).
"""
from __future__ import annotations

import math

import torch

from fastkd import _custom_op
from fastkd._dtypes import work_dtype

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")


def _masked_pterm(prob, logprob, other_log):
    """sum_v prob_v (logprob_v - other_log_v), with 0 where prob_v == 0 (0 log 0 = 0)."""
    diff = torch.where(prob > 0, logprob - other_log, torch.zeros_like(logprob))
    return (prob * diff).sum(-1)


def _log_mix(loga, logb, wa, wb):
    """log(wa exp(loga) + wb exp(logb)) elementwise, -inf (with a zero gradient) where both are -inf."""
    both = (loga == -math.inf) & (logb == -math.inf)
    a = torch.where(both, torch.zeros_like(loga), loga + math.log(wa))
    b = torch.where(both, torch.zeros_like(logb), logb + math.log(wb))
    return torch.where(both, torch.full_like(a, -math.inf), torch.logaddexp(a, b))


def jsd_endpoint(divergence: str, beta: float) -> str:
    """JSD at beta = 0 is exactly KL(p || q) and at beta = 1 exactly KL(q || p) (SPEC §1): every
    implementation computes those two as the KLs, not as a mixture with a zero weight."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "kl" if beta == 0.0 else "reverse_kl"
    return divergence


def divergence_rows(logp, logq, divergence: str, beta: float):
    """Row divergence D(p, q) from teacher log-probs ``logp`` and student log-probs ``logq``."""
    p, q = logp.exp(), logq.exp()
    divergence = jsd_endpoint(divergence, beta)
    if divergence == "kl":  # KL(p || q)
        return _masked_pterm(p, logp, logq)
    if divergence == "reverse_kl":  # KL(q || p)
        return _masked_pterm(q, logq, logp)
    if divergence == "jsd":  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        logm = _log_mix(logp, logq, beta, 1.0 - beta)
        return beta * _masked_pterm(p, logp, logm) + (1.0 - beta) * _masked_pterm(q, logq, logm)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def hard_ce_rows(student, target, label_smoothing: float):
    """Cross-entropy of softmax(student) (T = 1) against ``target``, like ``F.cross_entropy``.

    Label smoothing: (1 - eps) * nll + eps / V * sum_v (-log q_v), where the sum skips -inf
    (masked) entries; on inputs without -inf this is exactly ``F.cross_entropy``.
    """
    logq1 = torch.log_softmax(student, dim=-1)
    nll = -logq1.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if label_smoothing == 0.0:
        return nll
    finite = student != -math.inf
    smooth = -torch.where(finite, logq1, torch.zeros_like(logq1)).sum(-1) / student.shape[-1]
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth


@torch.library.custom_op("fastkd::logit_checked_rows", mutates_args=(),
                         schema="(Tensor student, Tensor[] teachers, Tensor? target, "
                                "int ignore_index) -> Tensor", **_custom_op.host_sync_tags())
def checked_rows(student, teachers, target, ignore_index):
    """The rows that count (``target != ignore_index``; all rows without target), ``[N]`` bool,
    after the data-dependent checks of SPEC §Errors: ``ValueError`` for a counted target outside
    ``[0, V)`` or a counted row that is -inf everywhere (student or a teacher). A custom op
    (``fastkd::logit_checked_rows``, no autograd: pass detached tensors) so that the reference
    compiles with ``torch.compile(fullgraph=True)``; its output feeds the loss, so it is never
    dropped from a graph."""
    n, vocab = student.shape
    if target is not None:
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise ValueError(f"target has values outside [0, {vocab}) other than "
                             f"ignore_index={ignore_index}, e.g. {int(target[bad][0])}")
    else:
        valid = torch.ones(n, dtype=torch.bool, device=student.device)
    for name, x in [("student_logits", student)] + [
            (f"teacher_logits[{i}]" if len(teachers) > 1 else "teacher_logits", t)
            for i, t in enumerate(teachers)]:
        if bool(((x == -math.inf).all(-1) & valid).any()):
            raise ValueError(f"{name} has a row that is -inf everywhere (no vocabulary entry left)")
    return valid


@checked_rows.register_fake
def _checked_rows_fake(student, teachers, target, ignore_index):
    return student.new_empty(student.shape[:1], dtype=torch.bool)


def kd_rows_reference(student, teachers, target, *, weights, temperature, soft_weight, hard_weight,
                      divergence, beta, t2_scale, ignore_index, label_smoothing):
    """Per-row KD loss, ``[N]``, for 2-D ``student`` ``[N, V]``, a list of 2-D ``teachers``.

    ``weights`` are the normalised teacher weights. Rows whose target is ``ignore_index`` are 0.
    Computes in float64 if any input is float64, else float32. Raises ``ValueError`` for a target
    outside [0, V) or a counted row that is -inf everywhere (SPEC §Errors).
    """
    dtype = work_dtype(student, *teachers)
    # The data-dependent checks run inside an opaque op (no graph break under torch.compile).
    valid = checked_rows(student.detach(), [t.detach() for t in teachers],
                         None if target is None else target.detach(), ignore_index)
    keep = valid.unsqueeze(-1)
    # Ignored rows are replaced by zeros so that garbage in padding rows cannot leak NaN.
    s = torch.where(keep, student.to(dtype), torch.zeros((), dtype=dtype, device=student.device))
    ts = [torch.where(keep, t.to(dtype), torch.zeros((), dtype=dtype, device=t.device))
          for t in teachers]

    logq = torch.log_softmax(s / temperature, dim=-1)
    logps = [torch.log_softmax(t / temperature, dim=-1) for t in ts]
    if len(logps) == 1:
        logp = logps[0]
    else:
        stacked = torch.stack([lp + math.log(w) if w > 0 else torch.full_like(lp, -math.inf)
                               for lp, w in zip(logps, weights)])
        # Entries masked (-inf) in every teacher: logsumexp's gradient there is NaN, so take them
        # out of the autograd graph and put -inf back.
        masked = (stacked == -math.inf).all(dim=0)
        safe = torch.where(masked.unsqueeze(0), torch.zeros_like(stacked), stacked)
        logp = torch.where(masked, torch.full_like(logps[0], -math.inf),
                           torch.logsumexp(safe, dim=0))
    soft_factor = soft_weight * (temperature ** 2 if t2_scale else 1.0)
    rows = soft_factor * divergence_rows(logp, logq, divergence, beta)
    if target is not None and hard_weight != 0.0:
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        rows = rows + hard_weight * hard_ce_rows(s, safe_target, label_smoothing)
    return torch.where(valid, rows, torch.zeros_like(rows))


def topk_bucket_logprobs(student, indices, logprobs, temperature):
    """Bucket log-probabilities of a sparse top-k teacher (SPEC §1b), each ``[N, k + 1]``.

    Buckets 0..k-1 are the teacher's listed vocabulary entries, bucket k the residual (every
    other entry). Teacher: ``log P_j = logprobs_j`` (taken as given: the teacher's log-probabilities
    at the distillation temperature), ``P_k = max(0, 1 - sum_j P_j)``. Student at temperature T:
    ``log Q_j = log_softmax(s / T)[indices_j]``, ``log Q_k = logsumexp of s / T over the entries not
    listed - logsumexp(s / T)``, computed directly (not as ``1 - sum Q_j``) so that a tiny residual
    keeps its relative precision. When ``k == V`` the residual bucket is empty on both sides and
    gets probability 0 on both (log = -inf), contributing nothing.
    """
    dtype = work_dtype(student, logprobs)
    z = student.to(dtype) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logq_k = z.gather(-1, indices) - lse
    listed = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, indices, True)
    rest = ~listed & (z != -math.inf)
    empty = ~rest.any(-1, keepdim=True)
    # logsumexp over an all -inf row has a NaN gradient: keep such rows out of the graph.
    z_rest = torch.where(rest, z, torch.full_like(z, -math.inf))
    z_rest = torch.where(empty, torch.zeros_like(z), z_rest)
    logq_res = torch.where(empty, torch.full_like(lse, -math.inf),
                           torch.logsumexp(z_rest, dim=-1, keepdim=True) - lse)
    logp_k = logprobs.to(dtype)
    p_res = (1.0 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    no_res = empty if indices.shape[-1] < student.shape[-1] else torch.ones_like(empty)
    p_res = torch.where(no_res, torch.zeros_like(p_res), p_res)
    logp_res = torch.where(p_res > 0, p_res.clamp_min(torch.finfo(dtype).tiny).log(),
                           torch.full_like(p_res, -math.inf))
    return torch.cat([logp_k, logp_res], -1), torch.cat([logq_k, logq_res], -1)


def kd_rows_topk_reference(student, indices, logprobs, target, *, temperature, soft_weight,
                           hard_weight, divergence, beta, t2_scale, ignore_index,
                           label_smoothing):
    """Per-row KD loss ``[N]`` against a sparse top-k teacher (SPEC §1b): D over the k + 1
    buckets of :func:`topk_bucket_logprobs`, plus the hard CE term as in
    :func:`kd_rows_reference`. ``student`` ``[N, V]``, ``indices`` ``[N, k]`` int64,
    ``logprobs`` ``[N, k]``. Rows whose target is ``ignore_index`` are 0."""
    valid = checked_rows(student.detach(), [], target, ignore_index)
    keep = valid.unsqueeze(-1)
    s = torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))
    lp = torch.where(keep, logprobs, torch.full((), -math.log(indices.shape[-1]) if
                                                 indices.shape[-1] else 0.0,
                                                 dtype=logprobs.dtype, device=logprobs.device))
    logp, logq = topk_bucket_logprobs(s, indices, lp, temperature)
    soft_factor = soft_weight * (temperature ** 2 if t2_scale else 1.0)
    rows = soft_factor * divergence_rows(logp, logq, divergence, beta)
    if target is not None and hard_weight != 0.0:
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        rows = rows + hard_weight * hard_ce_rows(s.to(rows.dtype), safe_target, label_smoothing)
    return torch.where(valid, rows, torch.zeros_like(rows))
