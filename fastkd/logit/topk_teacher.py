"""Sparse top-k teachers for offline distillation (SPEC §1b): :class:`TopKTeacher` and re-tempering.

A top-k teacher is the k most likely vocabulary entries of each row of a teacher's distribution
and their log-probabilities, ``indices [*, k]`` and ``logprobs [*, k]``, usually computed once and
stored (:mod:`fastkd.teacher_cache`). The losses compare it with the student over k + 1 buckets:
the listed entries and one residual bucket holding the mass ``1 - sum_i exp(logprobs_i)``.

The logprobs may have been taken at a temperature ``T_src`` other than the loss's temperature
``T``; :func:`retemper_logprobs` converts them (see its docstring for the assumption it makes and
the error measured on Zipf-like distributions).
"""
from __future__ import annotations

import math

import torch

from fastkd import _checks, _dynamic

__all__ = ["TopKTeacher", "retemper_logprobs", "resolve_teacher_topk", "merge_topk_teachers"]

# Listed log-probabilities may exceed 0, and their probabilities sum past 1, by rounding only
# (same tolerance as the loss's own check of teacher_topk).
_LOGPROB_TOL = 1e-3
# Float32 elements per row chunk in from_logits: bounds its temporaries to ~64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler's split at -ln 2):
    ``log(-expm1(x))`` near 0, where ``1 - exp(x)`` would cancel, ``log1p(-exp(x))`` below.
    ``x >= 0`` gives ``-inf`` (no mass left); NaN propagates."""
    x = x.clamp_max(0.0)
    near = x > -math.log(2.0)
    # Evaluate each branch only on inputs where it is finite, so neither produces warnings/NaN.
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -1.0), x)))
    return torch.where(near, a, b)


def retemper_logprobs(logprobs: torch.Tensor, vocab_size: int, source_temperature: float,
                      temperature: float, *, return_log_residual: bool = False,
                      listed: torch.Tensor | None = None):
    r"""Re-temper top-k teacher log-probabilities taken at ``source_temperature`` to ``temperature``.

    With :math:`a = T_{src} / T`, listed log-probabilities :math:`l_1..l_k` of a row and its
    residual :math:`r = 1 - \sum_i e^{l_i}`, the k + 1 bucket weights are

    .. math::
        w_i = e^{a\,l_i}, \qquad
        w_{res} = (V - k)\left(\frac{r}{V - k}\right)^{a}

    and the result is :math:`l'_i = \log w_i - \log(\sum_i w_i + w_{res})`, so that
    :math:`1 - \sum_i e^{l'_i}` is the re-tempered residual bucket.

    **Assumption.** Tempering the full distribution needs every unlisted probability, which a
    top-k teacher does not have; the residual mass is taken as spread evenly over the V - k
    unlisted entries. Real tails are not flat, and a flat tail is the one whose tempered mass
    shrinks most when sharpening and grows most when flattening, so the bucket is
    *under*-estimated when sharpening (T < T_src, a > 1) and *over*-estimated when flattening
    (T > T_src, a < 1). The relative weights of the listed entries are exact; only the bucket's
    share is off, so every listed probability is off by one factor per row, the "listed ratio"
    (approximate / exact listed mass). Measured on Zipf-like teachers
    (``p ∝ (rank + 2.7)^-s`` with log-normal noise, s in {1.0, 1.1, 1.3}, V = 32000 and
    152064, T_src = 1; ``benchmarks/results/topk_retemper_error.md``), worst cases over rows:

    ====  =============================  =============================  =============================
    T     k = 8: TV, listed ratio        k = 64                         k = 256
    ====  =============================  =============================  =============================
    0.5   0.32, 1.05 - 1.46              0.046, 1.00 - 1.05             0.011, 1.00 - 1.01
    2     0.015, 0.36 - 0.70             0.033, 0.49 - 0.77             0.041, 0.60 - 0.84
    4     0.0012, 0.53 - 0.79            0.0041, 0.62 - 0.84            0.0078, 0.70 - 0.88
    ====  =============================  =============================  =============================

    (TV: total variation between the approximate and the exact k + 1 bucket distributions; it
    is small at T = 4 only because the tempered bucket then holds over 96% of the mass.) For
    peaked teachers (s = 2, top-1 ≈ 0.3) sharpening is near exact from k = 64 on (TV < 1e-4)
    but flattening to T = 2 gives listed ratios 0.09 - 0.61. So: store logprobs at the highest
    temperature you will distill at and only sharpen; flattening is a rough approximation
    (still far better than using T_src logprobs as if taken at T).

    Exact cases: ``T == T_src`` returns ``logprobs`` itself (the same tensor, today's behaviour);
    ``k == V`` (no residual bucket) equals tempering the full distribution. ``r = 0`` (listed
    probabilities summing to 1, or past 1 by rounding) gives the bucket weight 0.

    Args:
        logprobs: ``[*, k]`` floating-point log-probabilities of the listed entries at
            ``source_temperature``.
        vocab_size: V, the size of the vocabulary (``k <= V``).
        source_temperature: ``T_src > 0``, the temperature the logprobs were taken at.
        temperature: ``T > 0``, the loss's temperature.
        return_log_residual: also return the log of the re-tempered residual bucket ``[*]``
            (``-inf`` when empty), computed directly rather than as ``log(1 - sum exp(l'))``,
            which cancels in float32 when the residual is tiny.
        listed: ``[*]`` integer count of the entries each row lists, for rows with empty slots
            (their logprobs must be ``-inf``); the residual is then spread over
            ``V - listed``. Default: every row lists k.

    Returns:
        ``[*, k]`` re-tempered log-probabilities: float32 (float64 for float64 input), detached
        (the teacher side is constant). With ``T == T_src``: ``logprobs`` unchanged.
        With ``return_log_residual``: a pair ``(logprobs', log_residual)``.
    """
    _checks.check_float_tensor("logprobs", logprobs)
    if logprobs.dim() < 1 or logprobs.shape[-1] < 1:
        raise ValueError(f"logprobs must have shape [*, k] with k >= 1, got {tuple(logprobs.shape)}")
    k = logprobs.shape[-1]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < k:
        raise ValueError(f"vocab_size must be an int >= k = {k}, got {vocab_size!r}")
    t_src = _checks.check_finite_number("source_temperature", source_temperature, positive=True)
    t = _dynamic.resolve("temperature", temperature, _checks.check_positive)
    # A tensor temperature (a schedule under torch.compile) is data: no branch on its value, the
    # general formula (exact at a = 1 up to rounding) runs.
    a = t_src / t.to(torch.float64) if isinstance(t, torch.Tensor) else t_src / t
    exact = not isinstance(a, torch.Tensor) and a == 1.0
    out_dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if exact and not return_log_residual:
        return logprobs
    # Float64 on the small [N, k] tensor: the residual 1 - sum p cancels when the listed entries
    # hold nearly all the mass, and the cost is negligible next to the loss over [N, V].
    lp = logprobs.detach().to(torch.float64)
    log_r = _log1mexp(torch.logsumexp(lp, -1, keepdim=True))
    if listed is None:
        rest = torch.full_like(log_r, float(vocab_size - k))
    else:
        rest = (vocab_size - listed.to(lp.device, torch.float64)).reshape(log_r.shape)
    ninf = torch.full_like(log_r, -math.inf)
    if exact:
        return logprobs, torch.where(rest > 0, log_r, ninf).squeeze(-1).to(out_dtype)
    logw = a * lp
    # log((V - k) (r / (V - k))^a); r = 0 gives -inf (a > 0): an empty bucket.
    log_wres = torch.where(rest > 0, a * log_r + (1.0 - a) * rest.clamp_min(1.0).log(), ninf)
    norm = torch.logsumexp(torch.cat([logw, log_wres], -1), -1, keepdim=True)
    # A row with no mass at all (every weight 0) stays all -inf instead of becoming NaN.
    norm = torch.where(norm == -math.inf, torch.zeros_like(norm), norm)
    out = (logw - norm).to(out_dtype)
    if return_log_residual:
        return out, (log_wres - norm).squeeze(-1).to(out_dtype)
    return out


class TopKTeacher:
    r"""A sparse teacher: its top-k vocabulary entries per row and their log-probabilities.

    Pass it as ``teacher_topk=`` to the logit losses in place of the ``(indices, logprobs)``
    tuple. Unlike the tuple it states the temperature the logprobs were taken at; when it differs
    from the loss's temperature the logprobs are re-tempered with :func:`retemper_logprobs`.

    Args:
        indices: ``[*, k]`` int64 or int32 vocabulary indices, distinct within a row; -1 marks
            an empty slot (a row that lists fewer than k entries; its logprob is ignored).
        logprobs: ``[*, k]`` floating-point log-probabilities of those entries (any float dtype;
            bf16/fp16 are fine for storage).
        temperature: ``T_src``, the temperature the logprobs were taken at (the teacher's
            ``log_softmax(logits / T_src)``); ``None`` (default) means the loss's temperature.
        check: validate the data too (indices >= -1; listed logprobs not NaN, <= 0 and their
            probabilities summing to at most 1, up to 1e-3 for rounding). One host
            synchronisation; pass ``False`` for data known to be valid.

    Example::

        >>> teacher = fastkd.TopKTeacher(indices, logprobs, temperature=1.0)
        >>> loss = fastkd.KDLoss(temperature=2.0)(student_logits, teacher_topk=teacher)
    """

    __slots__ = ("indices", "logprobs", "temperature")

    def __init__(self, indices: torch.Tensor, logprobs: torch.Tensor,
                 temperature: float | None = None, *, check: bool = True):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an int64 or int32 tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        _checks.check_float_tensor("logprobs", logprobs)
        if indices.shape != logprobs.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and logprobs "
                             f"{tuple(logprobs.shape)} must have the same shape [*, k]")
        if indices.dim() < 1 or indices.shape[-1] < 1:
            raise ValueError(f"indices and logprobs must have shape [*, k] with k >= 1, got "
                             f"{tuple(indices.shape)}")
        _checks.check_same_device(indices=indices, logprobs=logprobs)
        if temperature is not None:
            temperature = _checks.check_finite_number("temperature", temperature, positive=True)
        if check and indices.numel():
            _check_data(indices, logprobs)
        self.indices = indices
        self.logprobs = logprobs
        self.temperature = temperature

    @property
    def k(self) -> int:
        """Entries listed per row."""
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Leading shape ``*`` (rows), without k."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, logprobs)`` as stored (no re-tempering)."""
        return self.indices, self.logprobs

    def logprobs_at(self, temperature: float, vocab_size: int) -> torch.Tensor:
        """The listed log-probabilities re-tempered to ``temperature`` (see
        :func:`retemper_logprobs`); the stored logprobs themselves when ``self.temperature`` is
        ``None`` or equal to ``temperature``."""
        temperature = _dynamic.resolve("temperature", temperature, _checks.check_positive)
        if self.temperature is None or (not isinstance(temperature, torch.Tensor)
                                        and self.temperature == temperature):
            return self.logprobs
        used = self.indices >= 0
        lp = torch.where(used, self.logprobs, torch.full((), -math.inf, dtype=self.logprobs.dtype,
                                                          device=self.logprobs.device))
        return retemper_logprobs(lp, vocab_size, self.temperature, temperature,
                                 listed=used.sum(-1))

    def retemper(self, temperature: float, vocab_size: int) -> "TopKTeacher":
        """A new :class:`TopKTeacher` at ``temperature`` (same indices)."""
        return TopKTeacher(self.indices, self.logprobs_at(temperature, vocab_size),
                           temperature if self.temperature is not None else None, check=False)

    def to(self, device) -> "TopKTeacher":
        """Both tensors on ``device`` (``non_blocking`` copies are left to the caller)."""
        return TopKTeacher(self.indices.to(device), self.logprobs.to(device), self.temperature,
                           check=False)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0, *,
                    index_dtype: torch.dtype = torch.int64,
                    logprob_dtype: torch.dtype | None = None) -> "TopKTeacher":
        r"""The top-k of a dense teacher: ``topk(log_softmax(logits / temperature), k)``.

        Args:
            logits: ``[*, V]`` teacher logits (any float dtype; computed in float32, or float64
                for float64 logits, in row chunks so the temporaries stay bounded).
            k: entries kept per row, ``1 <= k <= V``.
            temperature: ``T_src > 0`` (default 1.0), recorded on the result.
            index_dtype: ``torch.int64`` (default) or ``torch.int32`` (half the bytes, for caches).
            logprob_dtype: dtype of the stored logprobs; default float32 (float64 for float64
                logits). ``torch.bfloat16``/``torch.float16`` halve the storage.

        Returns:
            A :class:`TopKTeacher` with ``indices``/``logprobs`` ``[*, k]``, sorted by decreasing
            probability, ``temperature=temperature``. No gradient is recorded.
        """
        _checks.check_float_tensor("logits", logits)
        if logits.dim() < 1:
            raise ValueError("logits must have shape [*, V], got a 0-d tensor")
        vocab = logits.shape[-1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
            raise ValueError(f"k must be an int with 1 <= k <= V = {vocab}, got {k!r}")
        t = _checks.check_finite_number("temperature", temperature, positive=True)
        if index_dtype not in (torch.int64, torch.int32):
            raise TypeError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if logprob_dtype is None:
            logprob_dtype = work
        if logprob_dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"logprob_dtype must be a floating-point dtype, got {logprob_dtype}")
        lead = logits.shape[:-1]
        rows = logits.detach().reshape(-1, vocab)
        n = rows.shape[0]
        idx = torch.empty(n, k, dtype=index_dtype, device=logits.device)
        lp = torch.empty(n, k, dtype=logprob_dtype, device=logits.device)
        step = max(1, _CHUNK_ELEMENTS // vocab)
        with torch.no_grad():
            for i in range(0, n, step):
                z = torch.log_softmax(rows[i:i + step].to(work) / t, dim=-1)
                val, ind = z.topk(k, dim=-1)
                idx[i:i + step] = ind
                lp[i:i + step] = val
        return cls(idx.reshape(*lead, k), lp.reshape(*lead, k), t, check=False)

    def __repr__(self) -> str:
        t = "None (the loss's)" if self.temperature is None else f"{self.temperature:g}"
        return (f"TopKTeacher(shape={tuple(self.shape)}, k={self.k}, temperature={t}, "
                f"indices={self.indices.dtype}, logprobs={self.logprobs.dtype}, "
                f"device={self.device})")


def _check_data(indices, logprobs):
    """Data checks of :class:`TopKTeacher` (one host synchronisation)."""
    used = indices >= 0
    lp = torch.where(used, logprobs.detach().float(), -math.inf)
    flags = torch.stack([
        (indices < -1).any(),
        lp.isnan().any(),
        (lp > _LOGPROB_TOL).any(),
        (lp.exp().sum(-1) > 1.0 + _LOGPROB_TOL).any(),
    ]).tolist()
    if flags[0]:
        raise ValueError("indices must be vocabulary indices (>= 0) or -1 (an empty slot)")
    if flags[1]:
        raise ValueError("logprobs contains NaN")
    if flags[2]:
        raise ValueError("logprobs must be log-probabilities (<= 0); got positive values")
    if flags[3]:
        raise ValueError("logprobs must be log-probabilities: the listed probabilities of a row "
                         "sum to more than 1")


def resolve_teacher_topk(teacher_topk, vocab_size: int, temperature: float):
    """What the loss code passes on as ``(indices, logprobs)``: a tuple/list is returned as is
    (its logprobs are at the loss's temperature); a :class:`TopKTeacher` is re-tempered from its
    temperature to ``temperature`` over a vocabulary of ``vocab_size`` (unchanged when its
    temperature is ``None`` or equal)."""
    if isinstance(teacher_topk, TopKTeacher):
        return teacher_topk.indices, teacher_topk.logprobs_at(temperature, vocab_size)
    return teacher_topk


def merge_topk_teachers(teachers, weights, vocab_size: int):
    r"""Several top-k teachers mixed into one sparse teacher over the union of their lists.

    Each teacher ``(indices [N, k_i], logprobs [N, k_i])`` (at the loss's temperature; -1 marks
    an empty slot) stands for the distribution that gives its listed entries their
    probabilities :math:`P_i(v)` and spreads its residual :math:`r_i = 1 - \sum P_i` evenly
    over its :math:`V - k_i` unlisted entries, :math:`\rho_i = r_i / (V - k_i)` each (the
    assumption of :func:`retemper_logprobs`). The mixture :math:`p = \sum_i w_i p_i` is then
    listed over the union U of the listed entries,

    .. math::
        p(v) = \sum_i w_i \rho_i + \sum_{i:\, v \in S_i} w_i (P_i(v) - \rho_i), \qquad v \in U,

    and its residual bucket :math:`1 - \sum_{v \in U} p(v) = \sum_i w_i \rho_i (V - |U|)` is
    what the kernels take as ``1 - sum exp(logprobs)``. With one teacher this is the teacher.

    Returns ``(indices [N, K], logprobs [N, K])`` with ``K = min(sum_i k_i, V)``: the distinct
    entries of U first (ascending), then empty slots (-1, logprob -inf); logprobs float32
    (float64 if any input is). Computed in float64 on the small ``[N, sum k_i]`` tensors. The
    inputs are assumed checked (:func:`fastkd.logit.topk.check_topk_data`)."""
    out_dtype = (torch.float64 if any(lp.dtype == torch.float64 for _, lp in teachers)
                 else torch.float32)
    slots, contrib = [], []
    base = None
    for (idx, lp), w in zip(teachers, weights):
        used = idx >= 0
        p = torch.where(used, lp.detach().to(torch.float64).exp(), 0.0)
        n_rest = vocab_size - used.sum(-1, keepdim=True)
        r = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
        rho = torch.where(n_rest > 0, r / n_rest.clamp_min(1), torch.zeros_like(r))
        base = w * rho if base is None else base + w * rho
        # Empty slots sort last (index V) and add nothing.
        slots.append(torch.where(used, idx.to(torch.int64), vocab_size))
        contrib.append(torch.where(used, w * (p - rho), 0.0))
    key, order = torch.cat(slots, -1).sort(dim=-1, stable=True)
    add = torch.cat(contrib, -1).gather(-1, order)
    first = torch.ones_like(key, dtype=torch.bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    keep = first & (key < vocab_size)
    # Sum each run of equal indices into its first slot.
    run = first.cumsum(-1) - 1
    run_sum = torch.zeros_like(add).scatter_add_(-1, run, add).gather(-1, run)
    prob = (base + run_sum).clamp_min(0.0)
    # The kept entries first (ascending), then the empty slots; at most V entries are distinct.
    width = min(key.shape[-1], vocab_size)
    pos = torch.where(keep, 0, 1).sort(dim=-1, stable=True).indices[:, :width]
    keep = keep.gather(-1, pos)
    indices = torch.where(keep, key.gather(-1, pos), -1)
    logprobs = torch.where(keep & (prob.gather(-1, pos) > 0), prob.gather(-1, pos).log(),
                           -math.inf).to(out_dtype)
    return indices, logprobs
