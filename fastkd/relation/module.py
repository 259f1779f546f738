"""The ``torch.nn`` modules of relation KD: :class:`SPLoss`, :class:`RKDLoss`, :class:`PKTLoss`.

Common to all three (SPEC §3):

- ``student_features`` ``[B, ...]`` and ``teacher_features`` ``[B, ...]`` are flattened to
  ``[B, ds]`` and ``[B, dt]``; ``ds`` and ``dt`` may differ, the batch sizes must match, B >= 2.
- The fused backends (cuda, cpu, triton) compute in float32 in blocks and never hold a B x B
  matrix for SP, RKD-distance and PKT (extra memory O(B d + B)); the RKD angle holds O(B^2)
  (never B x B x B or B x B x d). The loss is float32; gradients come in the input dtypes.
- Gradients flow to the student, and to the teacher when it requires grad; they are computed in
  the forward pass and scaled by ``grad_output`` in backward.
- ``reduction``: ``"mean"`` (default; ``"batchmean"`` is an alias) or ``"sum"`` (the same sums
  without the division). ``"none"`` is rejected: the loss couples all rows.
"""
from __future__ import annotations

import torch

from fastkd import _backend, _checks, _dynamic
from fastkd.relation import ops as _relation
from fastkd.relation.gather import gather_features


class _RelationLoss(torch.nn.Module):
    """What the three relation modules share: ``reduction``, ``backend`` and ``gather``, the
    gathering of the global batch in forward, and ``extra_repr``. A subclass names its
    functional (``_loss``) and its own options (``_options``)."""

    _options: tuple = ()
    loss_weight = _dynamic.DynamicFloat(_checks.check_nonnegative)

    def __init__(self, reduction, backend, gather, loss_weight):
        super().__init__()
        self.loss_weight = loss_weight
        self.reduction = _relation.check_relation_reduction(reduction)
        self.backend = _backend.check_backend_name(backend)
        self.gather = gather

    def _loss(self, student_features, teacher_features, **kwargs):
        raise NotImplementedError

    def forward(self, student_features, teacher_features):
        student_features, teacher_features = gather_features(
            student_features, teacher_features, self.gather)
        options = {name: _dynamic.module_value(self, name)
                   if isinstance(getattr(type(self), name, None), _dynamic.DynamicFloat)
                   else getattr(self, name) for name in self._options}
        loss = self._loss(student_features, teacher_features, reduction=self.reduction,
                          backend=self.backend, **options)
        return _dynamic.scale_loss(self, loss)

    def extra_repr(self) -> str:
        names = self._options + ("loss_weight", "reduction", "backend", "gather")
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names)


class SPLoss(_RelationLoss):
    r"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019).

    With row-flattened features :math:`e` of each side, :math:`G = e e^\top` (``[B, B]``) and
    :math:`\hat G` = :math:`G` with each row divided by :math:`\max(\|G_{i,:}\|_2, 10^{-12})`:

    .. math::
        \ell = \frac{1}{B^2} \|\hat G_t - \hat G_s\|_F^2 \qquad (\texttt{"sum"}: \text{without } 1/B^2)

    (the L2 row norm of the paper, RepDistiller and mdistiller; not torchdistill's L1).

    The fused kernels compute G in row tiles (a GEMM per tile): sweep 1 the row norms, sweep 2
    the loss and the gradient :math:`(W + W^\top) e` tile by tile. The gradient through the row
    norms, :math:`-(w \odot G e + G (w \odot e))` with
    :math:`w_i = 2 c\, a_i / \|G_i\|^2`, :math:`a_i = \sum_j (\hat G_s - \hat G_t)_{ij} \hat G_{s,ij}`
    (:math:`c = 1/B^2` or 1; :math:`w_i = 0` where the norm is clamped), is applied after the
    sweep as :math:`e (e^\top y)` products, O(d^2) memory (or :math:`(e e^\top) y` when d > B).

    Args:
        reduction (str): ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        loss_weight (float): :math:`w \ge 0`, the loss is :math:`w\,\ell` (schedulable, see
            :mod:`fastkd.schedules`). Default: 1.0.
        backend (str): ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.
        gather (bool or process group): ``True``: with an initialised ``torch.distributed``
            default group, compute the loss over the global batch (student and teacher features
            all-gathered with gradient; batch sizes may differ by rank), identical on every rank
            to one process holding the whole batch; without one, the local batch (as False). A
            process group: gather over that group. Each rank's gradient is its slice of the
            single-process gradient; under DDP/FSDP, which average gradients over the ranks,
            multiply this loss by the world size to train as one process would (see
            :mod:`fastkd.distributed`). Default: False.

    Shape:
        - student_features: :math:`(B, *)`; teacher_features: :math:`(B, *)`.
        - Output: scalar (float32).
    """

    def __init__(self, reduction="mean", backend="auto", gather=False, loss_weight=1.0):
        super().__init__(reduction, backend, gather, loss_weight)

    def _loss(self, student_features, teacher_features, **kwargs):
        return _relation.sp_loss(student_features, teacher_features, **kwargs)


class RKDLoss(_RelationLoss):
    r"""Relational knowledge distillation (Park et al., CVPR 2019): distance and angle terms.

    With :math:`d_{ij} = \sqrt{\max(\|e_i\|^2 + \|e_j\|^2 - 2 e_i\cdot e_j,\ 10^{-12})}` for
    :math:`i \ne j`, :math:`d_{ii} = 0`, per side :math:`\hat d = d / \mu`,
    :math:`\mu = \mathrm{mean}\{d_{ij} : d_{ij} > 0\}`:

    .. math::
        L_d = \frac{1}{B^2}\sum_{i,j} \mathrm{smooth\_l1}(\hat d_{s,ij} - \hat d_{t,ij}),\qquad
        L_a = \frac{1}{B^3}\sum_{j,i,k} \mathrm{smooth\_l1}(\psi_{s,jik} - \psi_{t,jik})

    with :math:`\psi_{jik} = u_{ji}\cdot u_{jk}`, :math:`u_{ji} = (e_i - e_j)/\|e_i - e_j\|`
    (the zero vector when i = j, and also when :math:`e_i` and :math:`e_j` coincide, i.e. their
    distance is clamped: there :math:`\psi` and its gradient are 0 instead of 0/0), smooth-L1
    with :math:`\beta = 1` as ``F.smooth_l1_loss``;
    :math:`\ell = w_d L_d + w_a L_a` (``"sum"``: the sums without :math:`1/B^2`, :math:`1/B^3`).
    A term whose weight is 0 is not computed.

    The gradient flows through the student's mean distance: with
    :math:`h = \mathrm{clamp}(\hat d_s - \hat d_t, -1, 1)` and :math:`N = B(B-1)`,
    :math:`\partial L/\partial d_{s,ij} = (c/\mu_s)(h_{ij} - A/N)`, :math:`A = \sum h \hat d_s`;
    the kernels contract both :math:`h/d` and :math:`1/d` with the features in the same sweep
    (the second is the row-reduction term of the mean) and combine them once A is known.

    Fused kernels: the features are centred first (both terms are translation invariant, and the
    float32 Gram expansion of distances is then accurate); pairs whose squared distance is below
    :math:`2^{-20}(\|e_i\|^2 + \|e_j\|^2)` (float32 rounding of that expansion) count as
    coincident, i.e. clamped. The distance term runs in row tiles with O(B d + B) memory; the
    angle term uses :math:`\langle e_i - e_j, e_k - e_j\rangle = G_{ik} - G_{ij} - G_{jk} + G_{jj}`
    on B x B matrices (O(B^2) memory, O(B^3) time) — it is the expensive part.

    Args:
        distance_weight (float): :math:`w_d \ge 0`. Default: 1.0.
        angle_weight (float): :math:`w_a \ge 0`. Default: 2.0.
        reduction (str): ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        loss_weight (float): :math:`w \ge 0`, the loss is :math:`w\,\ell`. Default: 1.0.
            (The three weights are schedulable, see :mod:`fastkd.schedules`.)
        backend (str): ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.
        gather (bool or process group): ``True``: with an initialised ``torch.distributed``
            default group, compute the loss over the global batch (student and teacher features
            all-gathered with gradient; batch sizes may differ by rank), identical on every rank
            to one process holding the whole batch; without one, the local batch (as False). A
            process group: gather over that group. Each rank's gradient is its slice of the
            single-process gradient; under DDP/FSDP, which average gradients over the ranks,
            multiply this loss by the world size to train as one process would (see
            :mod:`fastkd.distributed`). Default: False.

    Shape:
        - student_features: :math:`(B, *)`; teacher_features: :math:`(B, *)`.
        - Output: scalar (float32).
    """

    _options = ("distance_weight", "angle_weight")
    distance_weight = _dynamic.DynamicFloat(_checks.check_nonnegative)
    angle_weight = _dynamic.DynamicFloat(_checks.check_nonnegative)

    def __init__(self, distance_weight=1.0, angle_weight=2.0, reduction="mean", backend="auto",
                 gather=False, loss_weight=1.0):
        super().__init__(reduction, backend, gather, loss_weight)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def _loss(self, student_features, teacher_features, **kwargs):
        return _relation.rkd_loss(student_features, teacher_features, **kwargs)


class PKTLoss(_RelationLoss):
    r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

    Per side, :math:`\hat e_i = e_i / (\|e_i\| + \epsilon)`,
    :math:`c_{ij} = (\hat e_i\cdot\hat e_j + 1)/2`, :math:`P_{ij} = c_{ij} / \sum_k c_{ik}`:

    .. math::
        \ell = \frac{1}{B^2}\sum_{i,j} P_{t,ij}\,\log\frac{P_{t,ij} + \epsilon}{P_{s,ij} + \epsilon}
        \qquad (\texttt{"sum"}: \text{without } 1/B^2)

    The fused kernels compute the row sums of c in sweep 1 and the loss and gradient in sweep 2;
    the gradient through the row sums (a rank-one term per row,
    :math:`-\beta_i \sum_j \hat e_j - \sum_j \beta_j \hat e_j`,
    :math:`\beta_i = \sum_j (\partial L/\partial P_{ij}) P_{ij} / (2 \sum_k c_{ik})`) and through
    the normalisation are applied after the sweep. The log term is evaluated as
    ``log1p((P_t - P_s) / (P_s + eps))``.

    Args:
        eps (float): :math:`\epsilon > 0`. Default: 1e-7.
        reduction (str): ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        loss_weight (float): :math:`w \ge 0`, the loss is :math:`w\,\ell` (schedulable, see
            :mod:`fastkd.schedules`). Default: 1.0.
        backend (str): ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.
        gather (bool or process group): ``True``: with an initialised ``torch.distributed``
            default group, compute the loss over the global batch (student and teacher features
            all-gathered with gradient; batch sizes may differ by rank), identical on every rank
            to one process holding the whole batch; without one, the local batch (as False). A
            process group: gather over that group. Each rank's gradient is its slice of the
            single-process gradient; under DDP/FSDP, which average gradients over the ranks,
            multiply this loss by the world size to train as one process would (see
            :mod:`fastkd.distributed`). Default: False.

    Shape:
        - student_features: :math:`(B, *)`; teacher_features: :math:`(B, *)`.
        - Output: scalar (float32).
    """

    _options = ("eps",)

    def __init__(self, eps=1e-7, reduction="mean", backend="auto", gather=False,
                 loss_weight=1.0):
        super().__init__(reduction, backend, gather, loss_weight)
        self.eps = _checks.check_finite_number("eps", eps, positive=True)

    def _loss(self, student_features, teacher_features, **kwargs):
        return _relation.pkt_loss(student_features, teacher_features, **kwargs)
