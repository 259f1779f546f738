"""fastkd inside ``torch.distributed``: vocabulary-parallel logit KD and global-batch relation KD.

Two ways a distillation loss meets a process group (NCCL on GPU, gloo on CPU — any backend
with ``all_reduce`` and ``all_gather``); no engine of our own, only collectives of the group:

1. **Vocabulary parallelism** (Megatron-style tensor parallelism of the output layer): every rank
   of ``process_group`` holds the *same rows* and a contiguous *shard of the vocabulary* of the
   student and teacher logits, rank ``r`` the columns ``[sum(V_0..V_{r-1}), + V_r)``. Shards may
   differ in size; the sizes are exchanged in the first (tiny) collective of every call.
   :func:`vocab_parallel_kd_loss` (and ``KDLoss(process_group=pg)``) returns, on every rank,
   the loss of SPEC §1 on the full vocabulary and, in backward, the gradient of that loss with
   respect to the local shards. Communication per call is four ``all_reduce`` of O(N) floats
   (never O(N·V)): problem sizes, row maxima, row sums of exponentials, then per-row partial sums
   of the divergence, of the hard cross-entropy and of the gradient corrections.
   :func:`vocab_parallel_kd_forward` is the same computation with the calling convention of the
   fused kernels (row losses and gradients in one call): the building block for a chunked
   (fused-linear) caller.

2. **Global-batch relation KD**: :func:`gather_rows` all-gathers features along the batch
   dimension with gradient, so that ``SPLoss/RKDLoss/PKTLoss(gather=True)`` see the global batch.

Gradient convention of :func:`gather_rows` (and thus of ``gather=True``): every rank computes the
same global loss ``L``; backward hands each rank **its own slice of the single-process gradient**
``dL/dX_global`` (no communication in backward). Summed over ranks, the parameter gradients are
then exactly those of one process holding the whole batch. ``DistributedDataParallel`` (and FSDP)
*average* gradients over the ``P`` data-parallel ranks, i.e. divide that sum by ``P``; so to train
exactly as one process on the concatenated batch, multiply the gathered relation loss by the world
size in the loss you backpropagate::

    loss = ce(local) + kd(local) + dist.get_world_size() * sp(student_feat, teacher_feat)

(per-sample losses with ``reduction="mean"`` on equal local batches need no factor: DDP's
average of local means is the global mean).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastkd import _backend, _checks
from fastkd._reduce import count_rows, reduce_rows
from fastkd.logit import autograd as _logit

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_kd_forward", "gather_rows",
           "gather_features", "resolve_gather_group", "is_parallel"]

#: Elements of one ``[chunk, V_local]`` temporary (10 to 20 of them live at a time per chunk).
CHUNK_ELEMENTS = 1 << 21


# ------------------------------------------------------------------------------------ helpers
def _world(group) -> int:
    return dist.get_world_size(group)


def is_parallel(process_group) -> bool:
    """Whether ``process_group`` spans more than one rank (``None``: no)."""
    return process_group is not None and _world(process_group) > 1


def _chunks(rows: int, vocab_local: int, chunk_rows):
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(vocab_local, 1))
    chunk_rows = int(chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [(a, min(a + chunk_rows, rows)) for a in range(0, rows, chunk_rows)]


def _where0(cond, x):
    return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _where(cond, x, value: float):
    return torch.where(cond, x, torch.full((), value, dtype=x.dtype, device=x.device))


def _horner(x, coefs):
    acc = torch.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


# phi(x) = x e^x - e^x + 1 = sum_{n>=2} (n-1)/n! x^n; psi(x) = e^x - 1 - x = sum_{n>=2} x^n/n!
# (both >= 0); the series to n = 9 is exact to float32 rounding for |x| < 1/2, to float64
# rounding for |x| < 1/100 (the cut below which it replaces the direct, cancelling, form).
_PHI = [1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840, 1 / 5760, 1 / 45360]
_PSI = [1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320, 1 / 362880]


def _kl_terms(p, q, lr, cut):
    """Terms of KL(p || q) = sum_v q_v phi(lr_v), lr = log p - log q (sum_v p = sum_v q = 1): every
    term is >= 0, so a small divergence is not the difference of large sums; it is also
    insensitive to first order to an error in the row constant of lr. 0 log 0 = 0."""
    small = (lr.abs() < cut) & (q > 0)
    series = q * lr * lr * _horner(lr, _PHI)
    direct = _where0(p > 0, p * lr) - p + q
    return torch.where(small, series, direct)


def _reverse_kl_terms(p, q, lr, cut):
    """Terms of KL(q || p) = sum_v q_v psi(lr_v), as :func:`_kl_terms`."""
    small = lr.abs() < cut
    series = q * lr * lr * _horner(lr, _PSI)
    direct = (p - q) - _where0(q > 0, q * lr)
    return _where0(q > 0, torch.where(small, series, direct))


def _phi(x, cut):
    """phi(x) = x e^x - e^x + 1 for x in [-inf, log 1/beta]; phi(-inf) = 1."""
    direct = torch.where(x == -math.inf, torch.ones_like(x), x * torch.exp(x) - torch.expm1(x))
    return torch.where(x.abs() < cut, x * x * _horner(x, _PHI), direct)


def _shifted_diff(t, s, mt, ms, inv_t):
    """((t - mt) - (s - ms)) / T per entry, as ((t - s) - (mt - ms)) / T: for a teacher close to
    the student, t - s is small and exact. +inf / -inf / NaN where s or t is -inf."""
    return ((t - s) - (mt - ms)[:, None]) * inv_t


# --------------------------------------------------------------------- vocabulary parallelism
def vocab_parallel_kd_forward(student, teachers, target, weights, cfg, grad_scale, need_s, need_t,
                              *, process_group, chunk_rows=None):
    """Vocabulary-parallel logit KD with the calling convention of the fused kernels.

    Every rank of ``process_group`` must call this collectively with the same rows ``N``, the
    same ``target``, ``weights``, ``cfg``, ``grad_scale`` value, ``need_s``/``need_t`` and
    number of teachers; only the vocabulary shards differ (``V_r >= 1``, rank order = column
    order, sizes may differ by rank).

    Args:
        student: ``[N, V_r]`` local shard of the student logits (float16/bfloat16/float32/float64).
        teachers: list of ``[N, V_r]`` local shards of the teacher logits (the same columns).
        target: int64 ``[N]`` *global* vocabulary ids (or ``ignore_index``), or ``None``.
        weights: normalised teacher weights (floats summing to 1, zeros allowed).
        cfg: a :class:`fastkd.logit.autograd.LogitKDConfig` (``reduction`` is not used here).
        grad_scale: a one-element tensor multiplying every gradient (e.g. ``1 / count`` for
            ``"mean"``), or ``None`` (1).
        need_s: compute the gradient of the student shard.
        need_t: one bool per teacher: compute that teacher shard's gradient.
        process_group: the group over which the vocabulary is sharded.
        chunk_rows: rows per chunk of the local computation (default: ``CHUNK_ELEMENTS // V_r``);
            temporaries are O(chunk_rows · V_r).

    Returns:
        ``(row_loss, grad_student, grad_teachers, flags)`` exactly like the fused kernels:
        ``row_loss`` ``[N]`` — the full-vocabulary row losses of SPEC §1, identical on every rank
        (float32; float64 when an input is float64), 0 at ignored rows; ``grad_student``
        ``[N, V_r]`` in the student dtype (``d row_loss / d student_shard`` times ``grad_scale``,
        0 at ignored rows) or ``None``; ``grad_teachers`` a list with a ``[N, V_r]`` tensor or
        ``None`` per teacher; ``flags`` an int32 ``[1]`` zero tensor (errors of SPEC §Errors —
        target outside ``[0, V)``, a counted row ``-inf`` on every shard — are raised here, on
        every rank alike, since they are decided on all-reduced data).

    Communication: four ``all_reduce`` calls (MAX, MAX, SUM, SUM) of ``P + 2``,
    ``(1 + n_t)·N``, at most ``(3 + 2 n_t)·N`` and at most ``(6 + 3 n_t)·N`` values
    (``n_t`` teachers; float32, float64 for float64 inputs). Argument errors found on the local
    shards before the first collective (dtypes, shapes) raise on that rank only.
    """
    group = process_group
    rank, world = dist.get_rank(group), _world(group)
    n_rows, v_local = student.shape
    device = student.device
    wd = torch.float64 if any(x.dtype == torch.float64 for x in [student, *teachers]) \
        else torch.float32
    n_t = len(teachers)
    T = cfg.temperature
    inv_t = 1.0 / T
    hard = target is not None and cfg.hard_weight != 0.0
    eps = cfg.label_smoothing if hard else 0.0
    divergence, beta = cfg.divergence, cfg.beta
    if divergence == "jsd" and beta == 0.0:
        divergence = "kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"

    # Round 0 (MAX, P + 2 doubles): rows (checked equal on every rank) and the shard sizes.
    meta = torch.zeros(world + 2, dtype=torch.float64, device=device)
    meta[0], meta[1], meta[2 + rank] = n_rows, -n_rows, v_local
    dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=group)
    meta = meta.tolist()
    if meta[0] != -meta[1]:
        raise ValueError(f"vocabulary-parallel KD: the ranks of process_group hold different "
                         f"numbers of rows ({int(-meta[1])} to {int(meta[0])}); every rank must "
                         f"hold all rows and a shard of the vocabulary")
    sizes = [int(v) for v in meta[2:]]
    if min(sizes) < 1:
        raise ValueError(f"vocabulary-parallel KD: every rank must hold at least one vocabulary "
                         f"column, got shard sizes {sizes}")
    vocab = sum(sizes)
    start = sum(sizes[:rank])

    if target is not None:
        tgt = target.reshape(-1).to(torch.int64)
        valid = tgt != cfg.ignore_index
        bad = valid & ((tgt < 0) | (tgt >= vocab))
        if bool(bad.any()):
            raise ValueError(f"target has values outside [0, {vocab}) other than "
                             f"ignore_index={cfg.ignore_index}, e.g. {int(tgt[bad][0])}")
        local_tgt = tgt - start  # in [0, V_r) on the rank that owns the target column
    else:
        tgt = local_tgt = None
        valid = torch.ones(n_rows, dtype=torch.bool, device=device)
    keep = valid.unsqueeze(-1)
    chunks = _chunks(n_rows, v_local, chunk_rows)

    def load(x, a, b):
        # Ignored rows are replaced by zeros (as in the reference): no NaN or error leaks from them.
        return _where0(keep[a:b], x[a:b].to(wd))

    # Round 1 (MAX): row maxima of the raw logits (max of x/T is max(x)/T since T > 0).
    maxes = torch.empty(1 + n_t, n_rows, dtype=wd, device=device)
    for a, b in chunks:
        maxes[0, a:b] = load(student, a, b).amax(-1)
        for i, t in enumerate(teachers):
            maxes[1 + i, a:b] = load(t, a, b).amax(-1)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    dead = (maxes == -math.inf) & valid
    if bool(dead.any()):
        which = int(dead.any(-1).nonzero()[0])
        name = "student_logits" if which == 0 else (
            f"teacher_logits[{which - 1}]" if n_t > 1 else "teacher_logits")
        raise ValueError(f"{name} has a row that is -inf everywhere (no vocabulary entry left)")
    ms, mt = maxes[0], maxes[1:]

    # Round 2 (SUM): sums of exponentials at T (student Zs, teachers Zt_i); the differences
    # E_i = Zt_i - Zs summed term by term as exp(a) expm1(b - a) (a, b the shifted logits / T),
    # exact when a teacher is close to the student; at T = 1 for the hard term; the number of
    # finite student entries for label smoothing.
    sep_ce = hard and T != 1.0
    names2 = ["Zs"] + [f"Zt{i}" for i in range(n_t)] + [f"E{i}" for i in range(n_t)]
    names2 += ["Z1"] * sep_ce + ["nfin"] * (eps > 0)
    i2 = {name: j for j, name in enumerate(names2)}
    sums = torch.empty(len(names2), n_rows, dtype=wd, device=device)
    for a, b in chunks:
        s = load(student, a, b)
        ea = torch.exp((s - ms[a:b, None]) * inv_t)
        sums[0, a:b] = ea.sum(-1)
        for i, t in enumerate(teachers):
            t = load(t, a, b)
            eb = torch.exp((t - mt[i, a:b, None]) * inv_t)
            sums[i2[f"Zt{i}"], a:b] = eb.sum(-1)
            d = _shifted_diff(t, s, mt[i, a:b], ms[a:b], inv_t)
            sums[i2[f"E{i}"], a:b] = torch.where(d.abs() < 1.0, ea * torch.expm1(d),
                                                 eb - ea).sum(-1)
        if sep_ce:
            sums[i2["Z1"], a:b] = torch.exp(s - ms[a:b, None]).sum(-1)
        if eps > 0:
            sums[i2["nfin"], a:b] = (s != -math.inf).sum(-1).to(wd)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    z_s = sums[0]
    log_zs = z_s.log()
    log_zt = [sums[i2[f"Zt{i}"]].log() for i in range(n_t)]
    # log Zt_i - log Zs: from E_i when it is small against Zs (no cancellation of two logs).
    c_ts = [torch.where(e.abs() < 0.5 * z_s, torch.log1p(e / z_s), lzt - log_zs)
            for e, lzt in zip((sums[i2[f"E{i}"]] for i in range(n_t)), log_zt)]
    log_z1 = sums[i2["Z1"]].log() if sep_ce else log_zs
    n_finite = sums[i2["nfin"]] if eps > 0 else None
    c1 = ms + log_z1  # log q1 = s - c1 (softmax at T = 1)

    mixture = n_t > 1
    cut = 0.01 if wd == torch.float64 else 0.5  # see _PHI
    w_log = [math.log(w) if w > 0 else None for w in weights]
    need_t = [bool(x) for x in need_t]
    any_t = any(need_t)

    def dists(a, b):
        """Per chunk (all in wd): s, log q, q, [log p_i], log p, p and lr = log p - log q.

        lr is formed from the shifted logit differences (t - s) and the row constants c_ts, so
        that it stays accurate (relative to itself) when the teacher is close to the student.
        """
        s = load(student, a, b)
        logq = (s - ms[a:b, None]) * inv_t - log_zs[a:b, None]
        s_fin = s != -math.inf
        logps, lrs = [], []
        for i, t in enumerate(teachers):
            t = load(t, a, b)
            both = s_fin & (t != -math.inf)
            lr = _shifted_diff(t, s, mt[i, a:b], ms[a:b], inv_t) - c_ts[i][a:b, None]
            logp_i = torch.where(both, logq + lr,
                                 (t - mt[i, a:b, None]) * inv_t - log_zt[i][a:b, None])
            lrs.append(torch.where(both, lr, logp_i - logq))  # +-inf, or NaN where p = q = 0
            logps.append(logp_i)
        if mixture:
            keep_w = [j for j, lw in enumerate(w_log) if lw is not None]
            logp = torch.logsumexp(torch.stack([logps[j] + w_log[j] for j in keep_w]), 0)
            lr_mix = torch.logsumexp(torch.stack([lrs[j] + w_log[j] for j in keep_w]), 0)
            lr = torch.where(s_fin, lr_mix, logp - logq)
        else:
            logp, lr = logps[0], lrs[0]
        return s, logq, logq.exp(), logps, logp, logp.exp(), lr

    def jsd_logs(lr):
        """(log p - log m, log q - log m), m = beta p + (1 - beta) q, without cancellation."""
        lb, l1b = math.log(beta), math.log1p(-beta)
        g = torch.where(lr > -1.0, -torch.log1p((1.0 - beta) * torch.expm1(-lr)),
                        -torch.logaddexp(l1b - lr, torch.full_like(lr, lb)))
        fq = torch.where(lr < 1.0, -torch.log1p(beta * torch.expm1(lr)),
                         -torch.logaddexp(lb + lr, torch.full_like(lr, l1b)))
        return g, fq

    def p_minus_q(p, q, lr):
        return torch.where(q > 0, q * torch.expm1(lr), p)

    # Round 3 (SUM): per-row partial sums: divergence terms, gradient corrections, hard CE.
    layout = []  # names of the rows of `parts`
    if divergence == "kl":
        layout.append("D")
        layout += [f"c{i}" for i in range(n_t) if mixture and need_t[i]]
    elif divergence == "reverse_kl":
        layout.append("D")
        layout += [f"c{i}" for i in range(n_t) if need_t[i]]
    elif divergence == "jsd":
        layout += ["D", "Dp", "Dq"]
        layout += [f"c{i}" for i in range(n_t) if mixture and need_t[i]]
    else:  # tvd: the masses of q (and of each p_i) in the classes sign(q - p) = +1, -1, 0
        layout.append("D")
        if need_s:
            layout += ["Q+", "Q-", "Q0"]
        for i in range(n_t):
            if need_t[i]:
                layout += [f"P{i}+", f"P{i}-", f"P{i}0"]
    if hard:
        layout.append("nll")
        if eps > 0:
            layout.append("smooth")
    idx = {name: j for j, name in enumerate(layout)}
    parts = torch.zeros(len(layout), n_rows, dtype=wd, device=device)

    def put(name, a, b, value):
        parts[idx[name], a:b] = value.sum(-1)

    for a, b in chunks:
        s, logq, q, logps, logp, p, lr = dists(a, b)
        pos_p, pos_q = p > 0, q > 0
        if divergence == "kl":
            h = _where0(pos_p, lr)
            put("D", a, b, _kl_terms(p, q, lr, cut))
            for i in range(n_t):
                if mixture and need_t[i]:
                    put(f"c{i}", a, b, logps[i].exp() * h)
        elif divergence == "reverse_kl":
            put("D", a, b, _reverse_kl_terms(p, q, lr, cut))
            for i in range(n_t):
                if need_t[i]:  # sum_v p_i (q/p - 1)_v over p > 0
                    pi = logps[i].exp() if mixture else p
                    put(f"c{i}", a, b, _where0(pos_p, pi * torch.expm1(-lr)))
        elif divergence == "jsd":
            g, fq = jsd_logs(lr)
            # JSD = sum_v m_v (beta phi(log p/m) + (1 - beta) phi(log q/m)): terms >= 0.
            m = beta * p + (1.0 - beta) * q
            put("D", a, b, m * (beta * _phi(_where(pos_p, g, -math.inf), cut)
                                + (1.0 - beta) * _phi(_where(pos_q, fq, -math.inf), cut)))
            g = _where0(pos_p, g)
            put("Dp", a, b, p * g)
            put("Dq", a, b, q * _where0(pos_q, fq))
            for i in range(n_t):
                if mixture and need_t[i]:
                    put(f"c{i}", a, b, logps[i].exp() * g)
        else:
            pq = p_minus_q(p, q, lr)
            put("D", a, b, 0.5 * pq.abs())
            if need_s:  # classes of sign(q - p)
                put("Q+", a, b, _where0(pq < 0, q))
                put("Q-", a, b, _where0(pq > 0, q))
                put("Q0", a, b, _where0(pq == 0, q))
            for i in range(n_t):
                if need_t[i]:  # classes of sign(p - q)
                    pi = logps[i].exp()
                    put(f"P{i}+", a, b, _where0(pq > 0, pi))
                    put(f"P{i}-", a, b, _where0(pq < 0, pi))
                    put(f"P{i}0", a, b, _where0(pq == 0, pi))
        if hard:
            logq1 = s - c1[a:b, None]
            lt = local_tgt[a:b]
            own = valid[a:b] & (lt >= 0) & (lt < v_local)
            picked = logq1.gather(-1, _where0(own, lt).unsqueeze(-1)).squeeze(-1)
            parts[idx["nll"], a:b] = _where0(own, -picked)
            if eps > 0:
                put("smooth", a, b, -_where0(s != -math.inf, logq1))
    dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)

    def part(name, a, b):
        return parts[idx[name], a:b, None]

    row_loss = cfg.soft_factor * parts[idx["D"]]
    if hard:
        ce = parts[idx["nll"]]
        if eps > 0:
            ce = (1.0 - eps) * ce + eps / vocab * parts[idx["smooth"]]
        row_loss = row_loss + cfg.hard_weight * ce
    row_loss = _where0(valid, row_loss)

    def sign_class(sign, plus, minus, zero):
        """sign - sum_v mass_v sign_v for a distribution: 2 M- + M0, -(2 M+ + M0), M- - M+."""
        return torch.where(sign > 0, 2 * minus + zero,
                           torch.where(sign < 0, -(2 * plus + zero), minus - plus))

    # Pass 4 (local): gradients of the shards from the global statistics and sums.
    grad_s = torch.empty_like(student, memory_format=torch.contiguous_format) if need_s else None
    grad_t = [torch.empty_like(t, memory_format=torch.contiguous_format) if need_t[i] else None
              for i, t in enumerate(teachers)]
    if need_s or any_t:
        row_scale = valid.to(wd)
        if grad_scale is not None:
            row_scale = row_scale * grad_scale.to(device=device, dtype=wd).reshape(())
        soft = cfg.soft_factor * inv_t
        for a, b in chunks:
            s, logq, q, logps, logp, p, lr = dists(a, b)
            pos_p, pos_q = p > 0, q > 0
            rs = row_scale[a:b, None]
            if divergence == "jsd":
                g, fq = jsd_logs(lr)
            if divergence == "tvd":
                pq = p_minus_q(p, q, lr)
            if need_s:
                if divergence == "kl":
                    gs = -p_minus_q(p, q, lr)  # q - p, accurate when p ~ q
                elif divergence == "reverse_kl":
                    gs = q * (_where0(pos_q, -lr) - part("D", a, b))
                elif divergence == "jsd":
                    gs = (1.0 - beta) * q * (_where0(pos_q, fq) - part("Dq", a, b))
                else:
                    gs = 0.5 * q * sign_class(-pq, part("Q+", a, b), part("Q-", a, b),
                                              part("Q0", a, b))
                gs = soft * gs
                if hard:
                    q1 = torch.exp(s - c1[a:b, None])
                    lt = local_tgt[a:b]
                    own = valid[a:b] & (lt >= 0) & (lt < v_local)
                    onehot = torch.zeros_like(q1)
                    onehot.scatter_(-1, _where0(own, lt).unsqueeze(-1), own.to(wd).unsqueeze(-1))
                    gh = (1.0 - eps) * (q1 - onehot)
                    if eps > 0:
                        fin = (s != -math.inf).to(wd)
                        gh = gh + eps / vocab * (n_finite[a:b, None] * q1 - fin)
                    gs = gs + cfg.hard_weight * gh
                grad_s[a:b] = (gs * rs).to(grad_s.dtype)
            for i in range(n_t):
                if not need_t[i]:
                    continue
                pi = logps[i].exp() if mixture else p
                if divergence == "kl":
                    c = part(f"c{i}", a, b) if mixture else part("D", a, b)
                    gt = pi * (_where0(pos_p, lr) - c)
                elif divergence == "reverse_kl":
                    # p_i (sum_u p_i,u q_u/p_u - q/p) = p_i (c_i - (q/p - 1)), no cancellation
                    gt = _where0(pos_p, pi * (part(f"c{i}", a, b) - torch.expm1(-lr)))
                elif divergence == "jsd":
                    c = part(f"c{i}", a, b) if mixture else part("Dp", a, b)
                    gt = beta * pi * (_where0(pos_p, g) - c)
                else:
                    gt = 0.5 * pi * sign_class(pq, part(f"P{i}+", a, b), part(f"P{i}-", a, b),
                                               part(f"P{i}0", a, b))
                grad_t[i][a:b] = (soft * weights[i] * gt * rs).to(grad_t[i].dtype)
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    return row_loss, grad_s, grad_t, flags


class _VocabParallelKD(torch.autograd.Function):
    """Forward: global statistics + local gradients; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, cfg, weights, group, chunk_rows, lead_shape, target, student, *teachers):
        s2 = student.reshape(-1, student.shape[-1])
        t2 = [t.reshape(-1, t.shape[-1]) for t in teachers]
        tgt = None if target is None else target.reshape(-1).to(torch.int64)
        wd = torch.float64 if any(x.dtype == torch.float64 for x in [student, *teachers]) \
            else torch.float32
        count = count_rows(tgt, cfg.ignore_index, s2.shape[0], s2.device).to(wd)
        grad_scale = (1.0 / count) if cfg.reduction == "mean" else None
        need_s = bool(ctx.needs_input_grad[6])
        need_t = [bool(x) for x in ctx.needs_input_grad[7:]]
        row_loss, grad_s, grad_t, _ = vocab_parallel_kd_forward(
            s2, t2, tgt, weights, cfg, grad_scale, need_s, need_t, process_group=group,
            chunk_rows=chunk_rows)
        ctx.reduction = cfg.reduction
        ctx.shapes = [student.shape] + [t.shape for t in teachers]
        ctx.consumed = False
        ctx.save_for_backward(grad_s, *grad_t)
        return reduce_rows(row_loss, cfg.reduction, lead_shape, count)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "fastkd vocab-parallel KD loss: backward ran twice through the same graph (the "
                "gradient is computed in the forward pass and scaled in place); recompute the "
                "loss.")
        ctx.consumed = True
        if ctx.reduction == "none":
            scale = grad_output.reshape(-1, 1)
        else:
            scale = grad_output.reshape(1, 1)
        grads = []
        for g, shape in zip(ctx.saved_tensors, ctx.shapes):
            if g is None:
                grads.append(None)
                continue
            if not (grad_output.device.type == "cpu" and ctx.reduction != "none"
                    and grad_output.item() == 1.0):
                g = (g.to(torch.promote_types(g.dtype, torch.float32)) * scale).to(g.dtype)
            grads.append(g.view(shape))
        return (None,) * 6 + tuple(grads)


def vocab_parallel_kd_loss(student_logits, teacher_logits, target=None, *, process_group,
                           temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                           beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                           reduction="mean", teacher_weights=None, backend="auto",
                           chunk_rows=None):
    r"""Logit KD (SPEC §1, §1c) on logits whose vocabulary is sharded over ``process_group``.

    Rank ``r`` of the group passes the columns ``[V_0 + ... + V_{r-1}, + V_r)`` of the student
    logits ``[*, V_r]`` and of every teacher's logits (the same columns), the same rows on every
    rank, and the same ``target`` (``[*]``, *global* vocabulary ids) and arguments. Shard sizes may
    differ by rank (each ``V_r >= 1``); they are exchanged in the call. The result — a scalar, or
    the ``[*]`` row losses for ``reduction="none"`` — is the loss of :class:`fastkd.KDLoss` on the
    full vocabulary, the same on every rank, and backward gives every rank the gradient of that
    loss with respect to its shards (student; teachers that require grad), in their dtypes.

    The softmax statistics (row maxima and sums of exponentials at ``temperature`` and, for the
    hard term, at 1) and per-row partial sums are all-reduced: four collectives of O(N) floats per
    call. The local computation runs in PyTorch ops, ``chunk_rows`` rows at a time, in float32
    (float64 if an input is float64); ``backend`` applies only to the single-process path.

    As in any tensor-parallel output layer, inputs replicated over the group upstream of the
    shards (e.g. the hidden states fed to a column-parallel lm_head) receive one partial gradient
    per rank, which the model's tensor-parallel layer all-reduces in backward (Megatron's
    ``copy_to_tensor_model_parallel_region``); fastkd only returns the shard gradients.

    ``process_group=None`` or a group of one rank is exactly :func:`fastkd.functional.kd_loss`.
    Every rank must call collectively (it is a collective operation); a mismatch in the number of
    rows is detected and raised on every rank, a differing ``target`` is not (undefined result).
    """
    if not is_parallel(process_group):
        return _logit.kd_loss(student_logits, teacher_logits, target, temperature=temperature,
                              soft_weight=soft_weight, hard_weight=hard_weight,
                              divergence=divergence, beta=beta, t2_scale=t2_scale,
                              ignore_index=ignore_index, label_smoothing=label_smoothing,
                              reduction=reduction, teacher_weights=teacher_weights,
                              backend=backend)
    cfg = _logit.LogitKDConfig(temperature=temperature, soft_weight=soft_weight,
                               hard_weight=hard_weight, divergence=divergence, beta=beta,
                               t2_scale=t2_scale, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
    _backend.check_backend_name(backend)
    student, teachers, target = _logit.validate_inputs(student_logits, teacher_logits, target)
    for i, t in enumerate(teachers):
        if t.shape != student.shape:
            name = f"teacher_logits[{i}]" if len(teachers) > 1 else "teacher_logits"
            raise ValueError(f"{name} has shape {tuple(t.shape)} but student_logits has shape "
                             f"{tuple(student.shape)}: with a process_group the shards of "
                             f"student and teachers must cover the same vocabulary columns")
    weights = _checks.check_weights("teacher_weights", teacher_weights, len(teachers))
    lead_shape = student.shape[:-1]
    return _VocabParallelKD.apply(cfg, weights, process_group, chunk_rows, lead_shape, target,
                                  student, *teachers)


# ------------------------------------------------------------------- global-batch gathering
def resolve_gather_group(gather):
    """The process group that ``gather`` names, or ``None`` for no gathering.

    ``False``/``None``: no gathering. ``True``: the default group, if ``torch.distributed`` is
    available and initialised (else no gathering: the same script runs in one process).
    A ``ProcessGroup``: that group. A group of one rank means no gathering.
    """
    if gather is None or gather is False:
        return None
    if gather is True:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    else:
        group = gather
    return group if _world(group) > 1 else None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x):
        world, rank = _world(group), dist.get_rank(group)
        size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        sizes = [int(s) for s in torch.cat(sizes).tolist()]
        bmax = max(sizes)
        xc = x.contiguous()
        if xc.shape[0] < bmax:
            pad = xc.new_zeros((bmax - xc.shape[0],) + tuple(xc.shape[1:]))
            xc = torch.cat([xc, pad])
        out = [torch.empty_like(xc) for _ in range(world)]
        dist.all_gather(out, xc, group=group)
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad):
        return None, grad[ctx.start:ctx.start + ctx.size]


def gather_rows(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Concatenate ``x`` (``[B_r, ...]``) of every rank of ``process_group`` along dim 0, in rank
    order, with gradient.

    Batch sizes may differ by rank (they are all-gathered first); the trailing shape and dtype
    must match. Backward returns this rank's slice of the incoming gradient, without
    communication: when every rank computes the same loss of the gathered tensor, that is this
    rank's slice of the single-process gradient (see the module docstring for DDP).
    ``process_group=None`` is the default group.
    """
    group = dist.group.WORLD if process_group is None else process_group
    if _world(group) == 1:
        return x
    return _GatherRows.apply(group, x)


def gather_features(student_features, teacher_features, gather):
    """``(student, teacher)`` gathered over the group that ``gather`` names (relation losses)."""
    group = resolve_gather_group(gather)
    if group is None:
        return student_features, teacher_features
    for name, x in (("student_features", student_features), ("teacher_features", teacher_features)):
        _checks.check_float_tensor(name, x)
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(f"teacher_features has batch size {teacher_features.shape[0]} but "
                         f"student_features has {student_features.shape[0]}; the batch sizes "
                         f"must match (feature widths may differ)")
    return gather_rows(student_features, group), gather_rows(teacher_features, group)
