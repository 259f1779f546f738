"""Pure-PyTorch reference of logit KD (SPEC §1, §1c): the contract written as code.

It is literal rather than fast, differentiable by autograd, and exact in float64 when given
float64 inputs (the tests compare every kernel against it that way).
"""
from __future__ import annotations

import math

import torch

from fastkd import _custom_op
from fastkd._dtypes import work_dtype

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "uld")


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


def _log_mixture(logps, weights):
    """Normalised geometric mean of the teachers (``teacher_mixture="logprob"``):
    ``log p = sum_i w_i log p_i - logsumexp_v(sum_i w_i log p_i)``. A teacher of weight 0 is
    left out (0 * -inf would be NaN); an entry masked in any other teacher stays -inf."""
    terms = [w * lp for lp, w in zip(logps, weights) if w > 0]
    mixed = torch.stack(terms).sum(0)
    masked = mixed == -math.inf
    safe = torch.where(masked, torch.zeros_like(mixed), mixed)
    all_masked = masked.all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(masked, torch.full_like(mixed, -math.inf), safe), -1,
                          keepdim=True)
    lse = torch.where(all_masked, torch.zeros_like(lse), lse)
    return torch.where(masked, torch.full_like(mixed, -math.inf), safe - lse)


def _with_hard_ce(rows, s, target, valid, hard_weight, label_smoothing):
    """``rows + hard_weight * CE`` (when there is a target and a weight), 0 on rows not
    counted. A tensor ``hard_weight`` (a schedule under ``torch.compile``) is data: the CE is
    computed and selected where the weight is not 0, with no branch on its value."""
    if target is not None and (isinstance(hard_weight, torch.Tensor) or hard_weight != 0.0):
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        hard = hard_weight * hard_ce_rows(s, safe_target, label_smoothing)
        if isinstance(hard_weight, torch.Tensor):
            hard = torch.where(hard_weight != 0, hard, torch.zeros_like(hard))
        rows = rows + hard
    return torch.where(valid, rows, torch.zeros_like(rows))


def kd_rows_reference(student, teachers, target, *, weights, temperature, soft_weight, hard_weight,
                      divergence, beta, t2_scale, ignore_index, label_smoothing,
                      teacher_mixture="prob", uld_top=None):
    """Per-row KD loss, ``[N]``, for 2-D ``student`` ``[N, V]``, a list of 2-D ``teachers``.

    ``weights`` are the normalised teacher weights, mixed as probabilities
    (``teacher_mixture="prob"``) or as log-probabilities (``"logprob"``, :func:`_log_mixture`).
    Rows whose target is ``ignore_index`` are 0. Computes in float64 if any input is float64,
    else float32. Raises ``ValueError`` for a target outside [0, V) or a counted row that is
    -inf everywhere (SPEC §Errors), in a teacher or in the log mixture. ``uld_top`` belongs to
    ``divergence="uld"`` (:mod:`fastkd.logit.uld`), not to this function.
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
    elif teacher_mixture == "logprob":
        logp = _log_mixture(logps, weights)
        if bool(((logp == -math.inf).all(-1) & valid).any()):
            raise ValueError("teacher_logits: the log mixture of the teachers has a row that is "
                             "-inf everywhere (their unmasked entries do not overlap)")
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
    return _with_hard_ce(rows, s, target, valid, hard_weight, label_smoothing)


def _listed_mask(indices, vocab: int):
    """``[N, V]`` bool: the entries a top-k teacher lists (an index of -1 is an empty slot)."""
    used = indices >= 0
    hits = torch.zeros(indices.shape[0], vocab, dtype=torch.int32, device=indices.device)
    return hits.scatter_add_(-1, indices.clamp_min(0), used.to(torch.int32)) > 0


def _student_rest(z, listed):
    """``(logsumexp of z over the unlisted finite entries, empty)``, ``[N, 1]`` each, with -inf
    where no such entry exists (``empty``), kept out of the autograd graph there."""
    rest = ~listed & (z != -math.inf)
    empty = ~rest.any(-1, keepdim=True)
    # logsumexp over an all -inf row has a NaN gradient: keep such rows out of the graph.
    z_rest = torch.where(rest, z, torch.full_like(z, -math.inf))
    z_rest = torch.where(empty, torch.zeros_like(z), z_rest)
    lse_rest = torch.where(empty, torch.full_like(z[:, :1], -math.inf),
                           torch.logsumexp(z_rest, dim=-1, keepdim=True))
    return lse_rest, empty


def _log_or_ninf(x):
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(),
                       torch.full_like(x, -math.inf))


def topk_bucket_logprobs(student, indices, logprobs, temperature):
    """Bucket log-probabilities of a sparse top-k teacher (SPEC §1b), each ``[N, k + 1]``.

    Buckets 0..k-1 are the teacher's listed vocabulary entries, bucket k the residual (every
    other entry). Teacher: ``log P_j = logprobs_j`` (taken as given: the teacher's log-probabilities
    at the distillation temperature), ``P_k = max(0, 1 - sum_j P_j)``. Student at temperature T:
    ``log Q_j = log_softmax(s / T)[indices_j]``, ``log Q_k = logsumexp of s / T over the entries not
    listed - logsumexp(s / T)``, computed directly (not as ``1 - sum Q_j``) so that a tiny residual
    keeps its relative precision. When no unlisted entry has mass (``k == V``, or every unlisted
    entry -inf) the residual bucket is empty: probability 0 on both sides (log = -inf),
    contributing nothing. An index of -1 is an empty slot: ``P_j = Q_j = 0``.
    """
    dtype = work_dtype(student, logprobs)
    z = student.to(dtype) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    used = indices >= 0
    ninf = torch.full((), -math.inf, dtype=dtype, device=z.device)
    logq_k = torch.where(used, z.gather(-1, indices.clamp_min(0)) - lse, ninf)
    lse_rest, empty = _student_rest(z, _listed_mask(indices, z.shape[-1]))
    logq_res = torch.where(empty, ninf, lse_rest - lse)
    logp_k = torch.where(used, logprobs.to(dtype), ninf)
    p_res = (1.0 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    p_res = torch.where(empty, torch.zeros_like(p_res), p_res)
    return torch.cat([logp_k, _log_or_ninf(p_res)], -1), torch.cat([logq_k, logq_res], -1)


def topk_mixture_bucket_logprobs(student, teachers, weights, temperature):
    """Bucket log-probabilities of several sparse top-k teachers mixed with ``weights``
    (SPEC §1c for top-k teachers), each ``[N, V + 1]``: one bucket per vocabulary entry of the
    union U of the listed sets (entries outside U have probability 0 on both sides), then the
    residual bucket (every entry outside U).

    Each teacher ``(indices, logprobs)`` (at the loss's temperature) is taken as the full
    distribution that lists its entries and spreads its residual ``r_i = 1 - sum P_i`` evenly
    over its ``V - k_i`` unlisted entries (the assumption of re-tempering); the teachers are
    mixed entry by entry, ``p = sum_i w_i p_i``, and p is then bucketed over U and the rest.
    Written densely over ``[N, V]`` on purpose: the kernels' merge of the sorted lists is checked
    against it. The student side is as in :func:`topk_bucket_logprobs` with U listed."""
    dtype = work_dtype(student, *[lp for _, lp in teachers])
    n, vocab = student.shape
    z = student.to(dtype) / temperature
    p = torch.zeros(n, vocab, dtype=dtype, device=z.device)
    union = torch.zeros(n, vocab, dtype=torch.bool, device=z.device)
    for (indices, logprobs), w in zip(teachers, weights):
        used = indices >= 0
        pk = torch.where(used, logprobs.to(dtype).exp(), torch.zeros((), dtype=dtype,
                                                                       device=z.device))
        listed = _listed_mask(indices, vocab)
        n_rest = vocab - listed.sum(-1, keepdim=True)
        r = (1.0 - pk.sum(-1, keepdim=True)).clamp_min(0.0)
        rho = torch.where(n_rest > 0, r / n_rest.clamp_min(1), torch.zeros_like(r))
        at_listed = torch.zeros_like(p).scatter_add_(-1, indices.clamp_min(0), pk)
        p = p + w * torch.where(listed, at_listed, rho.expand(n, vocab))
        union |= listed
    ninf = torch.full((), -math.inf, dtype=dtype, device=z.device)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    lse_rest, empty = _student_rest(z, union)
    logq = torch.where(union, z - lse, ninf)
    logq_res = torch.where(empty, ninf, lse_rest - lse)
    logp = torch.where(union, _log_or_ninf(p), ninf)
    p_res = torch.where(union, torch.zeros_like(p), p).sum(-1, keepdim=True)
    p_res = torch.where(empty, torch.zeros_like(p_res), p_res)
    return torch.cat([logp, _log_or_ninf(p_res)], -1), torch.cat([logq, logq_res], -1)


def kd_rows_topk_reference(student, indices, logprobs, target, *, temperature, soft_weight,
                           hard_weight, divergence, beta, t2_scale, ignore_index,
                           label_smoothing, weights=None, teacher_mixture="prob", uld_top=None):
    """Per-row KD loss ``[N]`` against a sparse top-k teacher (SPEC §1b): D over the k + 1
    buckets of :func:`topk_bucket_logprobs`, plus the hard CE term as in
    :func:`kd_rows_reference`. ``student`` ``[N, V]``, ``indices`` ``[N, k]`` int64 (-1: an
    empty slot), ``logprobs`` ``[N, k]``. Several top-k teachers: ``indices`` and ``logprobs``
    are lists (one ``[N, k_i]`` pair per teacher) and ``weights`` their normalised weights;
    the buckets are those of :func:`topk_mixture_bucket_logprobs`. Rows whose target is
    ``ignore_index`` are 0."""
    valid = checked_rows(student.detach(), [], target, ignore_index)
    keep = valid.unsqueeze(-1)
    s = torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))

    def kept(lp):  # ignored rows may hold anything: a valid stand-in there
        return torch.where(keep, lp, torch.full((), -math.log(lp.shape[-1]), dtype=lp.dtype,
                                                device=lp.device))

    if isinstance(indices, (list, tuple)):
        pairs = [(i, kept(lp)) for i, lp in zip(indices, logprobs)]
        logp, logq = topk_mixture_bucket_logprobs(s, pairs, weights, temperature)
    else:
        logp, logq = topk_bucket_logprobs(s, indices, kept(logprobs), temperature)
    soft_factor = soft_weight * (temperature ** 2 if t2_scale else 1.0)
    rows = soft_factor * divergence_rows(logp, logq, divergence, beta)
    return _with_hard_ce(rows, s.to(rows.dtype), target, valid, hard_weight, label_smoothing)


def _uld_sorted(prob, top):
    """``prob`` ``[N, V]`` sorted in decreasing order (stable: equal values keep their index
    order), only its ``top`` largest when ``top`` is not None."""
    srt = torch.sort(prob, dim=-1, descending=True, stable=True).values
    return srt if top is None else srt[:, :top]


def uld_rows_reference(student, teacher, target, *, temperature, soft_weight, hard_weight,
                       divergence="uld", beta=0.5, t2_scale=True, ignore_index=-100,
                       label_smoothing=0.0, teacher_mixture="prob", uld_top=None, weights=None):
    """Per-row Universal Logit Distillation loss (SPEC §1d), ``[N]``: the contract as code.

    ``student`` ``[N, V_s]`` and ``teacher`` ``[N, V_t]`` (any two vocabulary sizes; a list
    holding one teacher is accepted): ``p = softmax(t / T)`` and ``q = softmax(s / T)`` each
    sorted in decreasing order (only the ``uld_top`` largest when given), the shorter padded
    with zeros, ``D = sum_j |p_(j) - q_(j)|``; the row loss is ``soft_weight * (T**2 if
    t2_scale) * D + hard_weight * CE(softmax(s), target)`` (:func:`hard_ce_rows`), 0 on rows
    whose target is ``ignore_index``. Autograd differentiates through the sort as a
    permutation and takes ``sign(0) = 0`` in ``|x|``. ``divergence``, ``beta``,
    ``teacher_mixture`` and ``weights`` are accepted for the shared keyword arguments
    (``LogitKDConfig.reference_kwargs()``) and not used. Computes in float64 if an input is
    float64, else float32; raises ``ValueError`` like :func:`kd_rows_reference`.
    """
    if isinstance(teacher, (list, tuple)):
        if len(teacher) != 1:
            raise ValueError(f"divergence='uld' takes one teacher, got {len(teacher)}")
        teacher = teacher[0]
    dtype = work_dtype(student, teacher)
    valid = checked_rows(student.detach(), [teacher.detach()],
                         None if target is None else target.detach(), ignore_index)
    keep = valid.unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=student.device)
    s = torch.where(keep, student.to(dtype), zero)
    t = torch.where(keep, teacher.to(dtype), zero)
    q = _uld_sorted(torch.softmax(s / temperature, dim=-1), uld_top)
    p = _uld_sorted(torch.softmax(t / temperature, dim=-1), uld_top)
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    soft_factor = soft_weight * (temperature ** 2 if t2_scale else 1.0)
    rows = soft_factor * (p - q).abs().sum(-1)
    return _with_hard_ce(rows, s, target, valid, hard_weight, label_smoothing)
