"""The ``torch.nn`` module of logit KD: :class:`KDLoss`."""
from __future__ import annotations

import torch

from fastkd import _backend, _checks
from fastkd.logit import autograd as _logit


class KDLoss(torch.nn.Module):
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
    - ``"tvd"``: :math:`\tfrac12\sum_v |p_v - q_v|`.

    With several teachers (``teacher_logits`` a list), :math:`p = \sum_i w_i\,\mathrm{softmax}(t_i/T)`
    with ``teacher_weights`` normalised to sum 1 (default: equal).

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
        divergence (str): ``"kl"`` | ``"reverse_kl"`` | ``"jsd"`` | ``"tvd"``. Default: ``"kl"``.
        beta (float): JSD mixing weight in [0, 1]. Default: 0.5.
        t2_scale (bool): multiply the soft term by :math:`T^2`. Default: True.
        ignore_index (int): target value whose rows are skipped. Default: -100.
        label_smoothing (float): in [0, 1], as in ``F.cross_entropy``. Default: 0.0.
        reduction (str): ``"mean"`` | ``"sum"`` | ``"none"`` (``"batchmean"`` = ``"mean"``).
        teacher_weights (sequence of float, optional): mixing weights of several teachers.
        backend (str): ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.

    Shape:
        - student_logits: :math:`(*, V)`; teacher_logits: :math:`(*, V)` or a list of them.
        - target (optional): :math:`(*)`, integer class indices.
        - Output: scalar float32, or :math:`(*)` with ``reduction="none"``.

    Gradients flow to the student and, when they require grad, to the teachers (online/mutual
    distillation), each in its own dtype. Backward may run once per forward (no second backward
    through a retained graph).
    """

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                 beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", teacher_weights=None, backend="auto"):
        super().__init__()
        # Validate eagerly so that a bad argument fails at construction, naming itself.
        self._config = dict(temperature=temperature, soft_weight=soft_weight,
                            hard_weight=hard_weight, divergence=divergence, beta=beta,
                            t2_scale=t2_scale, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction=reduction)
        _logit.LogitKDConfig(**self._config)
        if teacher_weights is not None:
            n = len(teacher_weights)
            teacher_weights = _checks.check_weights("teacher_weights", teacher_weights, n)
        self.teacher_weights = teacher_weights
        self.backend = _backend.check_backend_name(backend)
        for key, value in self._config.items():
            setattr(self, key, value)

    def forward(self, student_logits, teacher_logits, target=None):
        config = {key: getattr(self, key) for key in self._config}
        return _logit.kd_loss(student_logits, teacher_logits, target,
                              teacher_weights=self.teacher_weights, backend=self.backend, **config)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
