"""The ``torch.nn`` modules of logit KD: :class:`KDLoss`, :class:`FusedLinearKDLoss`."""
from __future__ import annotations

import torch

from fastkd import _backend, _checks, _dynamic, functional
from fastkd.logit.config import (DYNAMIC_FIELDS, LogitKDConfig, check_temperature,
                                 check_vocab_mismatch)
from fastkd.logit.fused_linear import check_chunk_size, check_logit_transform


def _init_logit_module(module, args, n_teachers=None):
    """Validate the KD arguments eagerly (a bad one fails at construction, naming itself) and
    store them as attributes, as ``torch.nn`` loss modules do."""
    module._config = LogitKDConfig.pick(args).as_dict()
    weights = args["teacher_weights"]
    if weights is not None:
        n = len(weights) if n_teachers is None else n_teachers
        weights = _checks.check_weights("teacher_weights", weights, n)
    module.teacher_weights = weights
    module.backend = _backend.check_backend_name(args["backend"])
    module.vocab_mismatch = check_vocab_mismatch(args["vocab_mismatch"])
    module.process_group = args["process_group"]
    for key, value in module._config.items():
        setattr(module, key, value)


def _current_config(module) -> dict:
    """The KD arguments as the module holds them now (attributes may be changed between calls,
    e.g. by a schedule); the functional validates them."""
    return {key: _dynamic.module_value(module, key) if key in DYNAMIC_FIELDS
            else getattr(module, key) for key in module._config}


class _LogitLoss(torch.nn.Module):
    """The schedulable hyperparameters of the logit modules (``fastkd.schedules``): checked when
    set, and new values reach a compiled module without recompilation."""

    temperature = _dynamic.DynamicFloat(check_temperature)
    soft_weight = _dynamic.DynamicFloat(_checks.check_nonnegative)
    hard_weight = _dynamic.DynamicFloat(_checks.check_nonnegative)


class KDLoss(_LogitLoss):
    r"""Fused logit knowledge-distillation loss (Hinton et al. 2015), with optional hard-label CE.

    For every row (leading dimensions flattened), with student logits :math:`s`, teacher logits
    :math:`t` and temperature :math:`T`:

    .. math::
        p = \mathrm{softmax}(t/T),\quad q = \mathrm{softmax}(s/T)

        \ell = w_\text{soft}\,\tau\,D(p, q) + w_\text{hard}\,\mathrm{CE}(\mathrm{softmax}(s), y)

    where :math:`\tau = T^2` if ``t2_scale`` else 1, and :math:`D` is

    - ``"kl"``: :math:`\mathrm{KL}(p\|q) = \sum_v p_v(\log p_v - \log q_v)` (forward KL),
    - ``"reverse_kl"``: :math:`\mathrm{KL}(q\|p)`,
    - ``"jsd"``: :math:`\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)`,
      :math:`m = \beta p + (1-\beta) q`; ``beta=0`` is exactly ``"kl"``, ``beta=1`` exactly
      ``"reverse_kl"``,
    - ``"tvd"``: :math:`\tfrac12\sum_v |p_v - q_v|`,
    - ``"uld"``: Universal Logit Distillation (Boizard et al. 2024), for a teacher with another
      tokenizer: :math:`p` and :math:`q` each sorted in decreasing order, the shorter padded
      with zeros, :math:`\sum_j |p_{(j)} - q_{(j)}|` (with ``uld_top=k``: over the k largest
      of each); any :math:`V_t`, one teacher.

    With several teachers (``teacher_logits`` a list), :math:`p = \sum_i w_i\,\mathrm{softmax}(t_i/T)`
    with ``teacher_weights`` normalised to sum 1 (default: equal); with
    ``teacher_mixture="logprob"`` the normalised geometric mean
    :math:`\log p = \sum_i w_i \log\mathrm{softmax}(t_i/T) - \mathrm{logsumexp}_v(\cdot)`.

    The CE term is computed only when ``target`` is given and ``hard_weight != 0``; it is
    ``F.cross_entropy(s, y, label_smoothing=...)`` at temperature 1. Masked vocabulary entries
    (logit ``-inf``) have probability 0 and contribute 0; in the label-smoothing sum they are
    skipped (where ``F.cross_entropy`` would return inf). Rows whose target is ``ignore_index``
    contribute 0 and do not count in ``"mean"``; if no row counts the loss is 0 (zero gradient).
    A counted row that is ``-inf`` everywhere, or a target outside ``[0, V)``, raises
    ``ValueError``. NaN in a row gives NaN in that row's loss.

    Replaces ``F.kl_div(F.log_softmax(s/T, -1), F.softmax(t/T, -1), reduction="batchmean") * T*T
    + F.cross_entropy(s, y)`` with ``KDLoss(temperature=T, hard_weight=1.0)(s, t, y)``, without
    the ``N x V`` float32 temporaries: the fused kernels write the gradient in the forward pass
    (in the input dtype) and backward only scales it.

    Args:
        temperature (float): :math:`T > 0`. Default: 1.0.
        soft_weight (float): weight of the distillation term. Default: 1.0.
        hard_weight (float): weight of the hard-label CE term. Default: 0.0.
        divergence (str): ``"kl"`` | ``"reverse_kl"`` | ``"jsd"`` | ``"tvd"`` | ``"uld"``.
            Default: ``"kl"``.
        beta (float): JSD mixing weight in [0, 1]. Default: 0.5.
        t2_scale (bool): multiply the soft term by :math:`T^2`. Default: True.
        ignore_index (int): target value whose rows are skipped. Default: -100.
        label_smoothing (float): in [0, 1], as in ``F.cross_entropy``. Default: 0.0.
        reduction (str): ``"mean"`` | ``"sum"`` | ``"none"`` (``"batchmean"`` = ``"mean"``).
        teacher_weights (sequence of float, optional): mixing weights of several teachers.
        backend (str): ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.
        teacher_mixture (str): ``"prob"`` (mix probabilities) | ``"logprob"`` (mix
            log-probabilities, then normalise). Default: ``"prob"``.
        uld_top (int, optional): with ``divergence="uld"``, compare only the k largest
            probabilities of each side. Default: None (all).
        vocab_mismatch (str): ``"error"`` | ``"truncate"``: what a teacher whose vocabulary
            size differs from the student's does (see below). Default: ``"error"``.
        process_group (``torch.distributed`` group, optional): vocabulary parallelism. Every
            rank of the group holds the same rows and a contiguous shard of the vocabulary
            (rank order = column order, sizes may differ) of the student and teacher logits,
            and the same ``target`` (global ids); the loss is that of the full vocabulary, on
            every rank, and backward gives each rank the gradient of its shards. O(N) floats
            are all-reduced per call, never the logits. See
            :func:`fastkd.distributed.vocab_parallel_kd_loss`. Default: None (no parallelism;
            a group of one rank is the same).

    Vocabulary mismatch: if a teacher's last dimension :math:`V_t` differs from the student's
    :math:`V_s`, ``vocab_mismatch="error"`` raises ``ValueError`` naming both sizes; with
    ``"truncate"`` (a padded vocabulary of the same tokenizer) the first
    :math:`\min(V_s, V_t)` entries are compared and the extra entries of the longer side are
    masked out (as if ``-inf``) before both softmaxes, the hard CE included: they get zero
    gradient and ``target`` must lie in :math:`[0, \min(V_s, V_t))`. ``divergence="uld"``
    compares any two vocabularies (another tokenizer).

    Sparse teacher (offline KD): ``teacher_topk=(indices, logprobs)``, each :math:`(*, k)`, in
    place of ``teacher_logits``: the teacher's k listed vocabulary entries (distinct,
    :math:`1 \le k \le V`) and their log-probabilities at the distillation temperature. Logprobs
    taken at another temperature (e.g. from an inference engine, at 1) are given as
    ``teacher_topk=fastkd.TopKTeacher(indices, logprobs, temperature=T_src)`` and re-tempered to
    ``temperature``: the listed entries weigh :math:`e^{l_i a}` with :math:`a = T_{src}/T`, the
    residual mass :math:`r = 1 - \sum_i e^{l_i}` is taken as spread evenly over the
    :math:`V - k` unlisted entries and tempered the same way, and the :math:`k + 1` weights are
    renormalised (exact for :math:`T = T_{src}` and for :math:`k = V`; an approximation
    otherwise, accurate when lowering the temperature and biased when raising it, see
    :func:`fastkd.logit.topk_teacher.retemper_logprobs`). The divergence is computed over
    k + 1 buckets: the listed entries, with :math:`P_j` = ``exp(logprobs_j)`` and
    :math:`Q_j = q_{\text{indices}_j}`, and one residual bucket :math:`1 - \sum_j P_j` (clamped
    at 0) against the student's remaining mass :math:`1 - \sum_j Q_j`. With ``k == V`` the
    residual bucket is empty on both sides and the loss equals the dense one. ``logprobs`` get
    no gradient. An index of -1 is an empty slot (a row listing fewer than k entries; its
    logprob is ignored).

    Several sparse teachers: ``teacher_topk=[teacher_0, teacher_1, ...]`` (pairs or
    :class:`~fastkd.TopKTeacher`, each with its own k and temperature) mixed with
    ``teacher_weights``: each is re-tempered to ``temperature`` and taken as the distribution
    that spreads its residual evenly over its unlisted entries; the mixture
    :math:`p = \sum_i w_i p_i` is listed over the union U of the listed entries and its
    residual is the one bucket of the entries outside U (see
    :func:`fastkd.logit.topk_teacher.merge_topk_teachers`). The divergence is then computed
    over :math:`|U| + 1` buckets as above; one teacher in a list is that teacher.

    Normalising across calls: ``forward(..., num_items_in_batch=n)`` with ``reduction="mean"``
    divides the summed row losses by ``n`` (an int or a one-element tensor) instead of by this
    call's count of rows, so that the losses of the micro-batches of one optimizer step (or of
    data-parallel ranks) add up to the loss of their concatenation; pass the counted rows of the
    whole step, as the Hugging Face ``Trainer`` does with its ``num_items_in_batch``.

    Shape:
        - student_logits: :math:`(*, V)`; teacher_logits: :math:`(*, V_t)` or a list of them.
        - teacher_topk (instead of teacher_logits): ``(indices, logprobs)``, :math:`(*, k)` each,
          a :class:`~fastkd.TopKTeacher`, or a list of them.
        - target (optional): :math:`(*)`, integer class indices.
        - Output: scalar float32, or :math:`(*)` with ``reduction="none"``.

    Gradients flow to the student and, when they require grad, to the teachers (online/mutual
    distillation), each in its own dtype. Backward may run once per forward (no second backward
    through a retained graph).
    """

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                 beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", teacher_weights=None, backend="auto", process_group=None,
                 teacher_mixture="prob", uld_top=None, vocab_mismatch="error"):
        super().__init__()
        _init_logit_module(self, locals())

    def forward(self, student_logits, teacher_logits=None, target=None, *, teacher_topk=None,
                num_items_in_batch=None):
        return functional.kd_loss(student_logits, teacher_logits, target,
                                  teacher_weights=self.teacher_weights, backend=self.backend,
                                  teacher_topk=teacher_topk, process_group=self.process_group,
                                  num_items_in_batch=num_items_in_batch,
                                  vocab_mismatch=self.vocab_mismatch, **_current_config(self))

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class FusedLinearKDLoss(_LogitLoss):
    r"""Logit KD for large vocabularies with the lm_head fused in: the ``N x V`` logits are
    never held at once (SPEC §1b).

    Computes exactly :class:`KDLoss` (same arguments, same formula) on

    .. math::
        s = h_s W_s^\top + b_s,\qquad t = h_t W_t^\top + b_t \ \text{(or given teacher logits)}

    processing rows in chunks: per chunk, one GEMM per side gives the logits, the fused KD
    kernel gives the row losses and the logit gradients, and two GEMMs turn those into the
    chunk's ``grad student_hidden`` rows and its share of ``grad student_weight``. Extra memory:
    O(chunk * V + N), independent of N.

    Args:
        (those of :class:`KDLoss`), plus
        chunk_size (int, optional): rows per chunk. Default: None (auto: the chunk's logits and
            logit gradients take ~1/8 of the free GPU memory, clamped to [64 MiB, 1 GiB], or
            256 MiB on CPU).
        process_group (optional): vocabulary-parallel lm_head (Megatron-style tensor
            parallelism): each rank passes the same hidden states and its own contiguous shard
            of the vocabulary rows of ``student_weight`` (and ``teacher_weight`` /
            ``teacher_logits``, same columns, same widths); the softmax statistics are
            all-reduced per chunk (O(chunk) floats), and the loss equals the single-process
            loss on the full vocabulary. As in any column-parallel output layer, the hidden
            states receive this rank's partial gradient (the tensor-parallel layer upstream
            all-reduces it); the weight shards get their exact gradients. ``target`` holds
            global vocabulary ids. Not with ``teacher_topk``. Default: None.
        student_softcap (float, optional): :math:`c_s > 0`; the student logits become
            :math:`c_s \tanh(a_s (h_s W_s^\top + b_s) / c_s)` (Gemma-2 style logit soft-capping)
            inside each chunk, before the divergence and the hard CE. Default: None (no tanh:
            :math:`a_s (h_s W_s^\top + b_s)`).
        teacher_softcap (float, optional): :math:`c_t`, the same for a teacher given as
            ``teacher_hidden``/``teacher_weight`` (``teacher_logits`` and ``teacher_topk`` are
            taken as final: a ``ValueError`` if it is given with them). Default: None.
        student_logit_scale (float): :math:`a_s > 0`, multiplies the student logits (inside the
            tanh when capped). Default: 1.0.
        teacher_logit_scale (float): :math:`a_t > 0`, the same for the teacher (hidden/weight
            teacher only). Default: 1.0.

    Forward:
        ``fn(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
        target=None, student_bias=None, teacher_bias=None, teacher_logits=None, *,
        teacher_topk=None)`` with exactly one teacher: ``teacher_hidden`` + ``teacher_weight``
        (+ ``teacher_bias``), or ``teacher_logits``, or ``teacher_topk=(indices, logprobs)``
        (sparse top-k teacher, as in :class:`KDLoss`; also a list of several, mixed with
        ``teacher_weights``).

    Shape:
        - student_hidden: :math:`(*, H_s)`; student_weight: :math:`(V_s, H_s)`;
          student_bias: :math:`(V_s)`.
        - teacher_hidden: :math:`(*, H_t)`; teacher_weight: :math:`(V_t, H_t)`;
          teacher_bias: :math:`(V_t)`; or teacher_logits: :math:`(*, V_t)`; or teacher_topk:
          two :math:`(*, k)` tensors (or a list of such teachers).
        - target (optional): :math:`(*)`. Output: scalar float32, or :math:`(*)` with
          ``reduction="none"``.

    Vocabulary mismatch: with :math:`V_t \ne V_s` the first :math:`\min(V_s, V_t)` entries are
    compared and the extra entries of the longer side are masked out before the softmax (both
    terms, as in :class:`KDLoss`); the extra rows of the longer weight get zero gradient.
    With ``divergence="uld"`` each side keeps its own vocabulary (another tokenizer; one dense
    teacher, not ``teacher_topk``), as in :class:`KDLoss`.

    Gradients go to student_hidden, student_weight and student_bias (and to the teacher inputs
    that require grad), in their own dtypes; with the softcap, through
    :math:`\partial s / \partial z = a (1 - \tanh^2(a z / c))`. The hidden states and weight
    (and bias) of one side must share a dtype; under ``torch.autocast`` they are cast to the
    autocast dtype first, as ``F.linear`` would. With bf16/fp16 inputs the chunk's logits and
    logit gradients are float32 (the GEMMs take the low-precision operands and return float32;
    on CPU the operands are widened), so the gradients are rounded to the input dtype once;
    low-precision weight gradients are accumulated over chunks in float32 (a float32 buffer the
    size of the weight while the loss runs; on CPU also a float32 copy of each weight). For
    ``"mean"``/``"sum"`` the gradients are computed in the forward pass and backward only scales
    them (once: no second backward through a retained graph); ``"none"`` recomputes the chunks
    in backward.
    """

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                 beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", teacher_weights=None, backend="auto", chunk_size=None,
                 process_group=None, teacher_mixture="prob", uld_top=None,
                 vocab_mismatch="error", student_softcap=None, teacher_softcap=None,
                 student_logit_scale=1.0, teacher_logit_scale=1.0):
        super().__init__()
        _init_logit_module(self, locals())
        self.chunk_size = check_chunk_size(chunk_size)
        self.student_softcap, self.student_logit_scale = check_logit_transform(
            "student_softcap", student_softcap, "student_logit_scale", student_logit_scale)
        self.teacher_softcap, self.teacher_logit_scale = check_logit_transform(
            "teacher_softcap", teacher_softcap, "teacher_logit_scale", teacher_logit_scale)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                target=None, student_bias=None, teacher_bias=None, teacher_logits=None, *,
                teacher_topk=None, num_items_in_batch=None):
        return functional.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias,
            teacher_bias, teacher_logits, teacher_topk=teacher_topk,
            teacher_weights=self.teacher_weights, backend=self.backend,
            chunk_size=self.chunk_size, process_group=self.process_group,
            num_items_in_batch=num_items_in_batch, vocab_mismatch=self.vocab_mismatch,
            student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
            student_logit_scale=self.student_logit_scale,
            teacher_logit_scale=self.teacher_logit_scale, **_current_config(self))

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, "
                f"hard_weight={self.hard_weight}, reduction={self.reduction!r}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")
