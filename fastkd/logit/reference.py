"""Pure-PyTorch reference of logit KD (SPEC §1, §1c): the contract written as code.

It is literal rather than fast, differentiable by autograd, and exact in float64 when given
float64 inputs (the tests compare every kernel against it that way).
"""
from __future__ import annotations

import math

import torch

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


def divergence_rows(logp, logq, divergence: str, beta: float):
    """Row divergence D(p, q) from teacher log-probs ``logp`` and student log-probs ``logq``."""
    p, q = logp.exp(), logq.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
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


def kd_rows_reference(student, teachers, target, *, weights, temperature, soft_weight, hard_weight,
                      divergence, beta, t2_scale, ignore_index, label_smoothing):
    """Per-row KD loss, ``[N]``, for 2-D ``student`` ``[N, V]``, a list of 2-D ``teachers``.

    ``weights`` are the normalised teacher weights. Rows whose target is ``ignore_index`` are 0.
    Computes in float64 if any input is float64, else float32. Raises ``ValueError`` for a target
    outside [0, V) or a counted row that is -inf everywhere (SPEC §Errors).
    """
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in [student, *teachers]) \
        else torch.float32
    n, vocab = student.shape
    if target is not None:
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise ValueError(f"target has values outside [0, {vocab}) other than "
                             f"ignore_index={ignore_index}, e.g. {int(target[bad][0])}")
    else:
        valid = torch.ones(n, dtype=torch.bool, device=student.device)
    keep = valid.unsqueeze(-1)
    # Ignored rows are replaced by zeros so that garbage in padding rows cannot leak NaN.
    s = torch.where(keep, student.to(dtype), torch.zeros((), dtype=dtype, device=student.device))
    ts = [torch.where(keep, t.to(dtype), torch.zeros((), dtype=dtype, device=t.device))
          for t in teachers]
    for name, x in [("student_logits", s)] + [(f"teacher_logits[{i}]" if len(ts) > 1
                                                else "teacher_logits", t) for i, t in enumerate(ts)]:
        if bool((x == -math.inf).all(-1).any()):
            raise ValueError(f"{name} has a row that is -inf everywhere (no vocabulary entry left)")

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
