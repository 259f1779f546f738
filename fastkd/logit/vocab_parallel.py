"""Vocabulary-parallel logit KD (Megatron-style tensor parallelism of the output layer).

Every rank of ``process_group`` holds the *same rows* and a contiguous *shard of the vocabulary*
of the student and teacher logits, rank ``r`` the columns ``[sum(V_0..V_{r-1}), + V_r)``. Shards
may differ in size; the sizes are exchanged in the first (tiny) collective of every call.
:func:`vocab_parallel_kd_loss` (and ``KDLoss(process_group=pg)``) returns, on every rank, the
loss of SPEC §1 on the full vocabulary and, in backward, the gradient of that loss with respect
to the local shards. Communication per call is four ``all_reduce`` of O(N) floats (never
O(N·V)): problem sizes, row maxima, row sums of exponentials, then per-row partial sums of the
divergence, of the hard cross-entropy and of the gradient corrections.
:func:`vocab_parallel_kd_forward` is the same computation with the calling convention of the
fused kernels (row losses and gradients in one call): the building block of the chunked
``FusedLinearKDLoss(process_group=)``.

The configuration, validation, vocabulary and β rules are those of the single-process path
(:mod:`fastkd.logit.config`, :func:`fastkd.logit.reference.jsd_endpoint`). What is particular
here is the accuracy of sums split over shards: every divergence is summed as terms that are
each >= 0 (``q φ(log p/q)`` and the like, with a series for small arguments), so a small
divergence is not the difference of large partial sums from different ranks.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastkd import _backend, _checks, _custom_op
from fastkd._dtypes import work_dtype
from fastkd._reduce import check_num_items, mean_count, reduce_rows
from fastkd.logit import ops
from fastkd.logit.config import LogitKDConfig, validate_inputs
from fastkd.logit.reference import jsd_endpoint

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_kd_forward", "is_parallel"]

#: Elements of one ``[chunk, V_local]`` temporary (10 to 20 of them live at a time per chunk).
CHUNK_ELEMENTS = 1 << 21


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


def _p_minus_q(p, q, lr):
    return torch.where(q > 0, q * torch.expm1(lr), p)


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
        cfg: a :class:`fastkd.logit.config.LogitKDConfig` (``reduction`` is not used here).
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
    rows = _ShardedRows(student, teachers, target, weights, cfg, need_s, need_t, process_group,
                        chunk_rows)
    rows.all_reduce_maxima()
    rows.all_reduce_sums()
    rows.all_reduce_partials()
    row_loss = rows.row_loss()
    grad_s, grad_t = rows.gradients(grad_scale)
    flags = torch.zeros(1, dtype=torch.int32, device=student.device)
    return row_loss, grad_s, grad_t, flags


def _sign_class(sign, plus, minus, zero):
    """sign - sum_v mass_v sign_v for a distribution: 2 M- + M0, -(2 M+ + M0), M- - M+."""
    return torch.where(sign > 0, 2 * minus + zero,
                       torch.where(sign < 0, -(2 * plus + zero), minus - plus))


class _Chunk:
    """The distributions of one row chunk ``[a, b)`` of the local shard (all in the working
    dtype): ``s``, ``logq``, ``q``, per-teacher ``logps``, the mixture ``logp``, ``p`` and
    ``lr = log p - log q``."""

    __slots__ = ("a", "b", "s", "logq", "q", "logps", "logp", "p", "lr", "jsd")


class _ShardedRows:
    """One call of :func:`vocab_parallel_kd_forward`: the local shards, the statistics gathered
    by the collective rounds, and the passes over the row chunks that use them."""

    def __init__(self, student, teachers, target, weights, cfg, need_s, need_t, group,
                 chunk_rows):
        self.student, self.teachers, self.weights, self.cfg = student, teachers, weights, cfg
        self.group = group
        self.n_rows, self.v_local = student.shape
        self.device = student.device
        self.wd = work_dtype(student, *teachers)
        self.n_t = len(teachers)
        self.inv_t = 1.0 / cfg.temperature
        self.hard = target is not None and cfg.hard_weight != 0.0
        self.eps = cfg.label_smoothing if self.hard else 0.0
        self.divergence, self.beta = jsd_endpoint(cfg.divergence, cfg.beta), cfg.beta
        self.mixture = self.n_t > 1
        self.cut = 0.01 if self.wd == torch.float64 else 0.5  # see _PHI
        self.w_log = [math.log(w) if w > 0 else None for w in weights]
        self.need_s = need_s
        self.need_t = [bool(x) for x in need_t]
        self.vocab, self.start = self._exchange_sizes()
        self._targets(target)
        self.chunks = _chunks(self.n_rows, self.v_local, chunk_rows)

    # -- round 0 and the targets
    def _exchange_sizes(self):
        """Round 0 (MAX, P + 2 doubles): rows (checked equal on every rank), shard sizes."""
        rank, world = dist.get_rank(self.group), _world(self.group)
        meta = torch.zeros(world + 2, dtype=torch.float64, device=self.device)
        meta[0], meta[1], meta[2 + rank] = self.n_rows, -self.n_rows, self.v_local
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=self.group)
        meta = meta.tolist()
        if meta[0] != -meta[1]:
            raise ValueError(f"vocabulary-parallel KD: the ranks of process_group hold different "
                             f"numbers of rows ({int(-meta[1])} to {int(meta[0])}); every rank "
                             f"must hold all rows and a shard of the vocabulary")
        sizes = [int(v) for v in meta[2:]]
        if min(sizes) < 1:
            raise ValueError(f"vocabulary-parallel KD: every rank must hold at least one "
                             f"vocabulary column, got shard sizes {sizes}")
        return sum(sizes), sum(sizes[:rank])

    def _targets(self, target):
        ignore = self.cfg.ignore_index
        if target is not None:
            tgt = target.reshape(-1).to(torch.int64)
            self.valid = tgt != ignore
            bad = self.valid & ((tgt < 0) | (tgt >= self.vocab))
            if bool(bad.any()):
                raise ValueError(f"target has values outside [0, {self.vocab}) other than "
                                 f"ignore_index={ignore}, e.g. {int(tgt[bad][0])}")
            self.local_tgt = tgt - self.start  # in [0, V_r) on the rank owning the column
        else:
            self.local_tgt = None
            self.valid = torch.ones(self.n_rows, dtype=torch.bool, device=self.device)
        self.keep = self.valid.unsqueeze(-1)

    def load(self, x, a, b):
        """Rows [a, b) of a shard in the working dtype; ignored rows are zeros (as in the
        reference): no NaN or error leaks from them."""
        return _where0(self.keep[a:b], x[a:b].to(self.wd))

    # -- round 1
    def all_reduce_maxima(self):
        """Round 1 (MAX): row maxima of the raw logits (max of x/T is max(x)/T since T > 0)."""
        maxes = torch.empty(1 + self.n_t, self.n_rows, dtype=self.wd, device=self.device)
        for a, b in self.chunks:
            maxes[0, a:b] = self.load(self.student, a, b).amax(-1)
            for i, t in enumerate(self.teachers):
                maxes[1 + i, a:b] = self.load(t, a, b).amax(-1)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group)
        dead = (maxes == -math.inf) & self.valid
        if bool(dead.any()):
            which = int(dead.any(-1).nonzero()[0])
            name = "student_logits" if which == 0 else (
                f"teacher_logits[{which - 1}]" if self.n_t > 1 else "teacher_logits")
            raise ValueError(f"{name} has a row that is -inf everywhere (no vocabulary entry "
                             f"left)")
        self.ms, self.mt = maxes[0], maxes[1:]

    # -- round 2
    def all_reduce_sums(self):
        """Round 2 (SUM): sums of exponentials at T (student Zs, teachers Zt_i); the differences
        E_i = Zt_i - Zs summed term by term as exp(a) expm1(b - a) (a, b the shifted logits / T),
        exact when a teacher is close to the student; at T = 1 for the hard term; the number of
        finite student entries for label smoothing."""
        n_t, ms, mt, inv_t = self.n_t, self.ms, self.mt, self.inv_t
        sep_ce = self.hard and self.cfg.temperature != 1.0
        names = ["Zs"] + [f"Zt{i}" for i in range(n_t)] + [f"E{i}" for i in range(n_t)]
        names += ["Z1"] * sep_ce + ["nfin"] * (self.eps > 0)
        row = {name: j for j, name in enumerate(names)}
        sums = torch.empty(len(names), self.n_rows, dtype=self.wd, device=self.device)
        for a, b in self.chunks:
            s = self.load(self.student, a, b)
            ea = torch.exp((s - ms[a:b, None]) * inv_t)
            sums[0, a:b] = ea.sum(-1)
            for i, t in enumerate(self.teachers):
                t = self.load(t, a, b)
                eb = torch.exp((t - mt[i, a:b, None]) * inv_t)
                sums[row[f"Zt{i}"], a:b] = eb.sum(-1)
                d = _shifted_diff(t, s, mt[i, a:b], ms[a:b], inv_t)
                sums[row[f"E{i}"], a:b] = torch.where(d.abs() < 1.0, ea * torch.expm1(d),
                                                      eb - ea).sum(-1)
            if sep_ce:
                sums[row["Z1"], a:b] = torch.exp(s - ms[a:b, None]).sum(-1)
            if self.eps > 0:
                sums[row["nfin"], a:b] = (s != -math.inf).sum(-1).to(self.wd)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        z_s = sums[0]
        self.log_zs = z_s.log()
        self.log_zt = [sums[row[f"Zt{i}"]].log() for i in range(n_t)]
        # log Zt_i - log Zs: from E_i when it is small against Zs (no cancellation of two logs).
        self.c_ts = [torch.where(e.abs() < 0.5 * z_s, torch.log1p(e / z_s), lzt - self.log_zs)
                     for e, lzt in zip((sums[row[f"E{i}"]] for i in range(n_t)), self.log_zt)]
        log_z1 = sums[row["Z1"]].log() if sep_ce else self.log_zs
        self.n_finite = sums[row["nfin"]] if self.eps > 0 else None
        self.c1 = ms + log_z1  # log q1 = s - c1 (softmax at T = 1)

    def chunk(self, a, b) -> _Chunk:
        """The distributions of rows [a, b). lr is formed from the shifted logit differences
        (t - s) and the row constants c_ts, so that it stays accurate (relative to itself) when
        the teacher is close to the student."""
        c = _Chunk()
        c.a, c.b = a, b
        ms, inv_t = self.ms[a:b, None], self.inv_t
        c.s = s = self.load(self.student, a, b)
        c.logq = logq = (s - ms) * inv_t - self.log_zs[a:b, None]
        s_fin = s != -math.inf
        logps, lrs = [], []
        for i, t in enumerate(self.teachers):
            t = self.load(t, a, b)
            both = s_fin & (t != -math.inf)
            lr = _shifted_diff(t, s, self.mt[i, a:b], self.ms[a:b], inv_t) \
                - self.c_ts[i][a:b, None]
            logp_i = torch.where(both, logq + lr,
                                 (t - self.mt[i, a:b, None]) * inv_t - self.log_zt[i][a:b, None])
            lrs.append(torch.where(both, lr, logp_i - logq))  # +-inf, or NaN where p = q = 0
            logps.append(logp_i)
        if self.mixture:
            keep_w = [j for j, lw in enumerate(self.w_log) if lw is not None]
            logp = torch.logsumexp(torch.stack([logps[j] + self.w_log[j] for j in keep_w]), 0)
            lr_mix = torch.logsumexp(torch.stack([lrs[j] + self.w_log[j] for j in keep_w]), 0)
            lr = torch.where(s_fin, lr_mix, logp - logq)
        else:
            logp, lr = logps[0], lrs[0]
        c.q, c.logps, c.logp, c.p, c.lr = logq.exp(), logps, logp, logp.exp(), lr
        c.jsd = None
        return c

    def jsd_logs(self, c):
        """(log p - log m, log q - log m), m = beta p + (1 - beta) q, without cancellation."""
        if c.jsd is None:
            c.jsd = self._jsd_logs(c.lr)
        return c.jsd

    def _jsd_logs(self, lr):
        beta = self.beta
        lb, l1b = math.log(beta), math.log1p(-beta)
        g = torch.where(lr > -1.0, -torch.log1p((1.0 - beta) * torch.expm1(-lr)),
                        -torch.logaddexp(l1b - lr, torch.full_like(lr, lb)))
        fq = torch.where(lr < 1.0, -torch.log1p(beta * torch.expm1(lr)),
                         -torch.logaddexp(lb + lr, torch.full_like(lr, l1b)))
        return g, fq

    def teacher_prob(self, c, i):
        return c.logps[i].exp() if self.mixture else c.p

    # -- round 3
    def _layout(self):
        """Names of the per-row partial sums of round 3 for this divergence and these needs."""
        n_t, need_t, mixture = self.n_t, self.need_t, self.mixture
        layout = ["D"]
        if self.divergence == "kl":
            layout += [f"c{i}" for i in range(n_t) if mixture and need_t[i]]
        elif self.divergence == "reverse_kl":
            layout += [f"c{i}" for i in range(n_t) if need_t[i]]
        elif self.divergence == "jsd":
            layout += ["Dp", "Dq"]
            layout += [f"c{i}" for i in range(n_t) if mixture and need_t[i]]
        else:  # tvd: the masses of q (and of each p_i) in the classes sign(q - p) = +1, -1, 0
            if self.need_s:
                layout += ["Q+", "Q-", "Q0"]
            for i in range(n_t):
                if need_t[i]:
                    layout += [f"P{i}+", f"P{i}-", f"P{i}0"]
        if self.hard:
            layout.append("nll")
            if self.eps > 0:
                layout.append("smooth")
        return layout

    def all_reduce_partials(self):
        """Round 3 (SUM): per-row partial sums: divergence terms, gradient corrections, hard
        CE."""
        self.index = {name: j for j, name in enumerate(self._layout())}
        self.parts = torch.zeros(len(self.index), self.n_rows, dtype=self.wd, device=self.device)
        for a, b in self.chunks:
            c = self.chunk(a, b)
            self._divergence_partials(c)
            if self.hard:
                self._hard_partials(c)
        dist.all_reduce(self.parts, op=dist.ReduceOp.SUM, group=self.group)

    def put(self, name, c, value):
        self.parts[self.index[name], c.a:c.b] = value.sum(-1)

    def part(self, name, c):
        return self.parts[self.index[name], c.a:c.b, None]

    def _divergence_partials(self, c):
        p, q, lr, beta, cut = c.p, c.q, c.lr, self.beta, self.cut
        pos_p, pos_q = p > 0, q > 0
        wanted = [i for i in range(self.n_t) if self.need_t[i]]
        if self.divergence == "kl":
            h = _where0(pos_p, lr)
            self.put("D", c, _kl_terms(p, q, lr, cut))
            for i in wanted if self.mixture else ():
                self.put(f"c{i}", c, c.logps[i].exp() * h)
        elif self.divergence == "reverse_kl":
            self.put("D", c, _reverse_kl_terms(p, q, lr, cut))
            for i in wanted:  # sum_v p_i (q/p - 1)_v over p > 0
                self.put(f"c{i}", c, _where0(pos_p, self.teacher_prob(c, i) * torch.expm1(-lr)))
        elif self.divergence == "jsd":
            g, fq = self.jsd_logs(c)
            # JSD = sum_v m_v (beta phi(log p/m) + (1 - beta) phi(log q/m)): terms >= 0.
            m = beta * p + (1.0 - beta) * q
            self.put("D", c, m * (beta * _phi(_where(pos_p, g, -math.inf), cut)
                                  + (1.0 - beta) * _phi(_where(pos_q, fq, -math.inf), cut)))
            g = _where0(pos_p, g)
            self.put("Dp", c, p * g)
            self.put("Dq", c, q * _where0(pos_q, fq))
            for i in wanted if self.mixture else ():
                self.put(f"c{i}", c, c.logps[i].exp() * g)
        else:
            pq = _p_minus_q(p, q, lr)
            self.put("D", c, 0.5 * pq.abs())
            if self.need_s:  # classes of sign(q - p)
                self.put("Q+", c, _where0(pq < 0, q))
                self.put("Q-", c, _where0(pq > 0, q))
                self.put("Q0", c, _where0(pq == 0, q))
            for i in wanted:  # classes of sign(p - q)
                pi = c.logps[i].exp()
                self.put(f"P{i}+", c, _where0(pq > 0, pi))
                self.put(f"P{i}-", c, _where0(pq < 0, pi))
                self.put(f"P{i}0", c, _where0(pq == 0, pi))

    def _own_target(self, c):
        """(local target column, whether this rank owns the row's target column)."""
        lt = self.local_tgt[c.a:c.b]
        return lt, self.valid[c.a:c.b] & (lt >= 0) & (lt < self.v_local)

    def _hard_partials(self, c):
        logq1 = c.s - self.c1[c.a:c.b, None]
        lt, own = self._own_target(c)
        picked = logq1.gather(-1, _where0(own, lt).unsqueeze(-1)).squeeze(-1)
        self.parts[self.index["nll"], c.a:c.b] = _where0(own, -picked)
        if self.eps > 0:
            self.put("smooth", c, -_where0(c.s != -math.inf, logq1))

    # -- results
    def row_loss(self):
        cfg, eps = self.cfg, self.eps
        loss = cfg.soft_factor * self.parts[self.index["D"]]
        if self.hard:
            ce = self.parts[self.index["nll"]]
            if eps > 0:
                ce = (1.0 - eps) * ce + eps / self.vocab * self.parts[self.index["smooth"]]
            loss = loss + cfg.hard_weight * ce
        return _where0(self.valid, loss)

    def gradients(self, grad_scale):
        """Pass 4 (local): gradients of the shards from the global statistics and sums."""
        grad_s = torch.empty_like(self.student, memory_format=torch.contiguous_format) \
            if self.need_s else None
        grad_t = [torch.empty_like(t, memory_format=torch.contiguous_format) if need else None
                  for t, need in zip(self.teachers, self.need_t)]
        if not (self.need_s or any(self.need_t)):
            return grad_s, grad_t
        row_scale = self.valid.to(self.wd)
        if grad_scale is not None:
            row_scale = row_scale * grad_scale.to(device=self.device, dtype=self.wd).reshape(())
        soft = self.cfg.soft_factor * self.inv_t
        for a, b in self.chunks:
            c = self.chunk(a, b)
            rs = row_scale[a:b, None]
            if self.need_s:
                grad_s[a:b] = (self._student_grad(c, soft) * rs).to(grad_s.dtype)
            for i in range(self.n_t):
                if self.need_t[i]:
                    gt = self._teacher_grad(c, i)
                    grad_t[i][a:b] = (soft * self.weights[i] * gt * rs).to(grad_t[i].dtype)
        return grad_s, grad_t

    def _student_grad(self, c, soft):
        p, q, lr, beta = c.p, c.q, c.lr, self.beta
        if self.divergence == "kl":
            gs = -_p_minus_q(p, q, lr)  # q - p, accurate when p ~ q
        elif self.divergence == "reverse_kl":
            gs = q * (_where0(q > 0, -lr) - self.part("D", c))
        elif self.divergence == "jsd":
            _, fq = self.jsd_logs(c)
            gs = (1.0 - beta) * q * (_where0(q > 0, fq) - self.part("Dq", c))
        else:
            gs = 0.5 * q * _sign_class(-_p_minus_q(p, q, lr), self.part("Q+", c),
                                       self.part("Q-", c), self.part("Q0", c))
        gs = soft * gs
        if self.hard:
            gs = gs + self.cfg.hard_weight * self._hard_grad(c)
        return gs

    def _hard_grad(self, c):
        eps = self.eps
        q1 = torch.exp(c.s - self.c1[c.a:c.b, None])
        lt, own = self._own_target(c)
        onehot = torch.zeros_like(q1)
        onehot.scatter_(-1, _where0(own, lt).unsqueeze(-1), own.to(self.wd).unsqueeze(-1))
        gh = (1.0 - eps) * (q1 - onehot)
        if eps > 0:
            fin = (c.s != -math.inf).to(self.wd)
            gh = gh + eps / self.vocab * (self.n_finite[c.a:c.b, None] * q1 - fin)
        return gh

    def _teacher_grad(self, c, i):
        p, lr, beta, mixture = c.p, c.lr, self.beta, self.mixture
        pos_p = p > 0
        pi = self.teacher_prob(c, i)
        if self.divergence == "kl":
            corr = self.part(f"c{i}", c) if mixture else self.part("D", c)
            return pi * (_where0(pos_p, lr) - corr)
        if self.divergence == "reverse_kl":
            # p_i (sum_u p_i,u q_u/p_u - q/p) = p_i (c_i - (q/p - 1)), no cancellation
            return _where0(pos_p, pi * (self.part(f"c{i}", c) - torch.expm1(-lr)))
        if self.divergence == "jsd":
            g, _ = self.jsd_logs(c)
            corr = self.part(f"c{i}", c) if mixture else self.part("Dp", c)
            return beta * pi * (_where0(pos_p, g) - corr)
        pq = _p_minus_q(p, c.q, lr)
        return 0.5 * pi * _sign_class(pq, self.part(f"P{i}+", c), self.part(f"P{i}-", c),
                                      self.part(f"P{i}0", c))


class _VocabParallelKD(torch.autograd.Function):
    """Forward: global statistics + local gradients; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, cfg, weights, group, chunk_rows, lead_shape, num_items, target, student,
                *teachers):
        s2 = student.reshape(-1, student.shape[-1])
        t2 = [t.reshape(-1, t.shape[-1]) for t in teachers]
        tgt = None if target is None else target.reshape(-1).to(torch.int64)
        count = mean_count(tgt, cfg.ignore_index, s2.shape[0], s2.device, num_items)
        count = count.to(work_dtype(student, *teachers))
        grad_scale = (1.0 / count) if cfg.reduction == "mean" else None
        need_s = bool(ctx.needs_input_grad[7])
        need_t = [bool(x) for x in ctx.needs_input_grad[8:]]
        row_loss, grad_s, grad_t, _ = vocab_parallel_kd_forward(
            s2, t2, tgt, weights, cfg, grad_scale, need_s, need_t, process_group=group,
            chunk_rows=chunk_rows)
        ctx.reduction = cfg.reduction
        ctx.shapes = [student.shape] + [t.shape for t in teachers]
        ctx.save_for_backward(grad_s, *grad_t)
        return reduce_rows(row_loss, cfg.reduction, lead_shape, count)

    @staticmethod
    def backward(ctx, grad_output):
        _custom_op.consume_once(ctx, "vocab-parallel KD loss")
        scale = grad_output.reshape(-1 if ctx.reduction == "none" else 1, 1)
        unit = (grad_output.device.type == "cpu" and ctx.reduction != "none"
                and grad_output.item() == 1.0)
        grads = []
        for g, shape in zip(ctx.saved_tensors, ctx.shapes):
            if g is not None and not unit:
                g = (g.to(torch.promote_types(g.dtype, torch.float32)) * scale).to(g.dtype)
            grads.append(None if g is None else g.view(shape))
        return (None,) * 7 + tuple(grads)


def vocab_parallel_kd_loss(student_logits, teacher_logits, target=None, *, process_group,
                           temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                           beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                           reduction="mean", teacher_weights=None, backend="auto",
                           chunk_rows=None, num_items_in_batch=None, teacher_mixture="prob",
                           uld_top=None, vocab_mismatch="error"):
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
    cfg = LogitKDConfig.pick(locals())
    return sharded_kd_loss(student_logits, teacher_logits, target, cfg,
                           process_group=process_group, teacher_weights=teacher_weights,
                           backend=backend, chunk_rows=chunk_rows,
                           num_items_in_batch=num_items_in_batch, vocab_mismatch=vocab_mismatch)


def sharded_kd_loss(student_logits, teacher_logits, target, cfg: LogitKDConfig, *,
                    process_group, teacher_weights=None, backend="auto", chunk_rows=None,
                    num_items_in_batch=None, vocab_mismatch="error"):
    """:func:`vocab_parallel_kd_loss` for a validated ``cfg``."""
    if not is_parallel(process_group):
        return ops.kd_loss(student_logits, teacher_logits, target, cfg,
                           teacher_weights=teacher_weights, backend=backend,
                           num_items_in_batch=num_items_in_batch, vocab_mismatch=vocab_mismatch)
    cfg = cfg.concrete()  # eager collectives: the hyperparameters as floats
    _backend.check_backend_name(backend)
    if cfg.divergence == "uld" or cfg.log_mixture:
        raise ValueError("with a process_group (vocabulary-parallel KD), divergence='uld' and "
                         "teacher_mixture='logprob' are not supported")
    student, teachers, target = validate_inputs(student_logits, teacher_logits, target)
    for i, t in enumerate(teachers):
        if t.shape != student.shape:
            name = f"teacher_logits[{i}]" if len(teachers) > 1 else "teacher_logits"
            raise ValueError(f"{name} has shape {tuple(t.shape)} but student_logits has shape "
                             f"{tuple(student.shape)}: with a process_group the shards of "
                             f"student and teachers must cover the same vocabulary columns")
    weights = _checks.check_weights("teacher_weights", teacher_weights, len(teachers))
    num_items = check_num_items(num_items_in_batch, cfg.reduction, student.device)
    return _VocabParallelKD.apply(cfg, weights, process_group, chunk_rows, student.shape[:-1],
                                  num_items, target, student, *teachers)
