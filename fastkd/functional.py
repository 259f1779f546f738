"""Functional forms of the fastkd losses (``torch.nn.functional`` style)."""
from __future__ import annotations

from fastkd.feature import ops as _feature
from fastkd.logit import fused_linear as _fused_linear
from fastkd.logit import ops as _logit
from fastkd.logit import vocab_parallel as _vocab_parallel
from fastkd.logit.config import LogitKDConfig
from fastkd.relation import ops as _relation
from fastkd.relation.gather import gather_features

feature_kd_loss = _feature.feature_kd_loss


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                         target=None, student_bias=None, teacher_bias=None, teacher_logits=None,
                         *, teacher_topk=None, chunk_size=None, temperature=1.0, soft_weight=1.0,
                         hard_weight=0.0, divergence="kl", beta=0.5, t2_scale=True,
                         ignore_index=-100, label_smoothing=0.0, reduction="mean",
                         teacher_weights=None, backend="auto", process_group=None,
                         num_items_in_batch=None, teacher_mixture="prob", uld_top=None,
                         vocab_mismatch="error", student_softcap=None, teacher_softcap=None,
                         student_logit_scale=1.0, teacher_logit_scale=1.0):
    r"""Logit KD with the lm_head fused in (no ``N x V`` logits held); see
    :class:`fastkd.FusedLinearKDLoss` for the arguments and formula (softcap and logit scale:
    logits ``c * tanh(a * (h W^T + b) / c)``)."""
    return _fused_linear.fused_linear_kd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias,
        teacher_bias, teacher_logits, cfg=LogitKDConfig.pick(locals()),
        teacher_topk=teacher_topk, teacher_weights=teacher_weights, backend=backend,
        chunk_size=chunk_size, process_group=process_group,
        num_items_in_batch=num_items_in_batch, vocab_mismatch=vocab_mismatch,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)


def sp_loss(student_features, teacher_features, *, reduction="mean", backend="auto",
            gather=False):
    r"""Similarity-preserving KD loss (Tung & Mori 2019); see :class:`fastkd.SPLoss`.

    ``gather``: ``True`` (the default ``torch.distributed`` group, when initialised) or a
    process group: compute the loss over the global batch, all-gathered with gradient (see
    :func:`fastkd.relation.gather.gather_rows`). Default: False.
    """
    s, t = gather_features(student_features, teacher_features, gather)
    return _relation.sp_loss(s, t, reduction=reduction, backend=backend)


def rkd_loss(student_features, teacher_features, *, distance_weight=1.0, angle_weight=2.0,
             reduction="mean", backend="auto", gather=False):
    r"""Relational KD loss (Park et al. 2019); see :class:`fastkd.RKDLoss`.

    ``gather``: as in :func:`sp_loss`.
    """
    s, t = gather_features(student_features, teacher_features, gather)
    return _relation.rkd_loss(s, t, distance_weight=distance_weight, angle_weight=angle_weight,
                              reduction=reduction, backend=backend)


def pkt_loss(student_features, teacher_features, *, eps=1e-7, reduction="mean", backend="auto",
             gather=False):
    r"""Probabilistic knowledge transfer loss (Passalis & Tefas 2018); see :class:`fastkd.PKTLoss`.

    ``gather``: as in :func:`sp_loss`.
    """
    s, t = gather_features(student_features, teacher_features, gather)
    return _relation.pkt_loss(s, t, eps=eps, reduction=reduction, backend=backend)


def kd_loss(student_logits, teacher_logits=None, target=None, *, temperature=1.0,
            soft_weight=1.0, hard_weight=0.0, divergence="kl", beta=0.5, t2_scale=True,
            ignore_index=-100, label_smoothing=0.0, reduction="mean", teacher_weights=None,
            backend="auto", teacher_topk=None, process_group=None, num_items_in_batch=None,
            teacher_mixture="prob", uld_top=None, vocab_mismatch="error"):
    r"""Fused logit distillation loss; see :class:`fastkd.KDLoss` for the formula.

    Args:
        student_logits: ``[*, V]`` float32/bfloat16/float16 (float64: reference backend only).
        teacher_logits: ``[*, V_t]`` tensor, or a list of them for several teachers
            (``V_t != V`` needs ``vocab_mismatch="truncate"`` or ``divergence="uld"``, see
            :class:`fastkd.KDLoss`).
        teacher_topk: ``(indices [*, k] int64, logprobs [*, k])`` or a
            :class:`fastkd.TopKTeacher`, in place of ``teacher_logits``: a sparse top-k teacher
            (see :class:`fastkd.KDLoss`).
        target: optional ``[*]`` integer class indices for the hard cross-entropy term.
        process_group: vocabulary-parallel KD over this ``torch.distributed`` group (the logits
            are this rank's vocabulary shard; see
            :func:`fastkd.logit.vocab_parallel.vocab_parallel_kd_loss`).
        num_items_in_batch: with ``reduction="mean"``, divide the summed row losses by this
            number (an int or a one-element tensor: e.g. the counted tokens of the whole
            optimizer step) instead of by this call's count (SPEC §1e).
        (the keyword arguments are those of :class:`fastkd.KDLoss`)

    Returns:
        float32 scalar (``"mean"``/``"sum"``) or ``[*]`` row losses (``"none"``).
    """
    cfg = LogitKDConfig.pick(locals())
    if _vocab_parallel.is_parallel(process_group):
        if teacher_topk is not None:
            raise ValueError("teacher_topk is not supported with a process_group "
                             "(vocabulary-parallel KD takes sharded teacher logits)")
        return _vocab_parallel.sharded_kd_loss(student_logits, teacher_logits, target, cfg,
                                               process_group=process_group,
                                               teacher_weights=teacher_weights, backend=backend,
                                               num_items_in_batch=num_items_in_batch,
                                               vocab_mismatch=vocab_mismatch)
    return _logit.kd_loss(student_logits, teacher_logits, target, cfg,
                          teacher_weights=teacher_weights, backend=backend,
                          teacher_topk=teacher_topk, num_items_in_batch=num_items_in_batch,
                          vocab_mismatch=vocab_mismatch)


__all__ = ["kd_loss", "fused_linear_kd_loss", "feature_kd_loss", "sp_loss", "rkd_loss", "pkt_loss"]
