"""Functional forms of the fastkd losses (``torch.nn.functional`` style)."""
from __future__ import annotations

from fastkd.feature import autograd as _feature
from fastkd.logit import autograd as _logit
from fastkd.relation import autograd as _relation

feature_kd_loss = _feature.feature_kd_loss
sp_loss = _relation.sp_loss
rkd_loss = _relation.rkd_loss
pkt_loss = _relation.pkt_loss


def kd_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, soft_weight=1.0,
            hard_weight=0.0, divergence="kl", beta=0.5, t2_scale=True, ignore_index=-100,
            label_smoothing=0.0, reduction="mean", teacher_weights=None, backend="auto"):
    r"""Fused logit distillation loss; see :class:`fastkd.KDLoss` for the formula.

    Args:
        student_logits: ``[*, V]`` float32/bfloat16/float16 (float64: reference backend only).
        teacher_logits: ``[*, V]`` tensor, or a list of them for several teachers.
        target: optional ``[*]`` integer class indices for the hard cross-entropy term.
        (the keyword arguments are those of :class:`fastkd.KDLoss`)

    Returns:
        float32 scalar (``"mean"``/``"sum"``) or ``[*]`` row losses (``"none"``).
    """
    return _logit.kd_loss(student_logits, teacher_logits, target, temperature=temperature,
                          soft_weight=soft_weight, hard_weight=hard_weight,
                          divergence=divergence, beta=beta, t2_scale=t2_scale,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          reduction=reduction, teacher_weights=teacher_weights, backend=backend)


__all__ = ["kd_loss", "feature_kd_loss", "sp_loss", "rkd_loss", "pkt_loss"]
