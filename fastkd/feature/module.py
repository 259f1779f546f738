"""The ``torch.nn`` module of feature KD: :class:`FeatureKDLoss`."""
from __future__ import annotations

import math

import torch

from fastkd import _backend, _checks, _dynamic
from fastkd.feature import ops as _feature


def _check_dim(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class FeatureKDLoss(torch.nn.Module):
    r"""Feature distillation through a learned linear adapter (FitNets-style hint loss), fused.

    The module owns the adapter that maps the student's channels to the teacher's:
    :math:`y = x W^T + b` over ``channel_dim`` (for ``channel_dim=1`` on NCHW maps this is a 1x1
    convolution); every other dimension is a row and must match between student and teacher.

    - ``loss="mse"``: :math:`\ell = \frac{1}{N\,D_t}\sum_{r,c} (y_{rc} - t_{rc})^2`
      (``reduction="sum"``: the sum; ``"none"``: per row, the mean over the teacher channels).
    - ``loss="cosine"``: per row :math:`1 - \frac{y_r\cdot t_r}{\max(\|y_r\|\|t_r\|,\,10^{-8})}`,
      mean over rows (``"sum"``: sum; ``"none"``: per row). All-zero rows give no NaN.

    Replaces ``F.mse_loss(nn.Linear(D_s, D_t)(x), t)`` (or a 1x1 ``nn.Conv2d`` for maps) with
    ``FeatureKDLoss(D_s, D_t)(x, t)``. The fused kernels compute the projection chunk by chunk and
    reduce each chunk against the teacher at once; the gradients for the student, the weight and
    the bias (and the teacher, when it requires grad) come out of the same pass, with ``grad_W``
    and ``grad_b`` accumulated in float32. No ``N x D_t`` float32 tensor is kept between forward
    and backward. See :func:`fastkd.functional.feature_kd_loss` for precision (TF32 /
    bf16 tensor cores on GPU), the ``"none"`` recompute, and memory.

    ``torch.compile(fullgraph=True)`` traces the module without a graph break (the fused pass is
    one custom op). Under ``torch.autocast`` the adapter parameters stay float32 and receive
    float32 gradients; the loss is float32 and is computed as outside autocast, except that on
    CUDA with student features already in the autocast dtype the adapter GEMMs run in that dtype
    (as ``nn.Linear`` would; see :func:`fastkd.functional.feature_kd_loss`).

    Args:
        student_dim (int): :math:`D_s`, channels of the student features.
        teacher_dim (int): :math:`D_t`, channels of the teacher features.
        bias (bool): learn an additive bias. Default: True.
        loss (str): ``"mse"`` | ``"cosine"``. Default: ``"mse"``.
        channel_dim (int): dimension holding the channels (``1`` for NCHW). Default: ``-1``.
        reduction (str): ``"mean"`` | ``"sum"`` | ``"none"`` (``"batchmean"`` = ``"mean"``).
        adapter (bool): if False there is no projection (``y = x``; requires
            ``student_dim == teacher_dim``) and the module has no parameters. Default: True.
        backend (str): ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.
        chunk_size (int, optional): rows per chunk of the fused pass (None: automatic).
        device, dtype: of the parameters, as in ``nn.Linear``.
        loss_weight (float): :math:`w \ge 0`, multiplies the loss (schedulable without
            recompilation, see :mod:`fastkd.schedules`). Default: 1.0.

    Attributes:
        weight: ``[teacher_dim, student_dim]``, initialised like ``nn.Linear``
            (:math:`\mathcal{U}(-1/\sqrt{D_s}, 1/\sqrt{D_s})` via Kaiming-uniform, ``a=sqrt(5)``).
        bias: ``[teacher_dim]``, :math:`\mathcal{U}(-1/\sqrt{D_s}, 1/\sqrt{D_s})`, or None.

    Loading existing adapters: the parameter names and shapes are those of ``nn.Linear``, so
    ``m.load_state_dict(linear.state_dict())`` works as is. A 1x1 ``nn.Conv2d`` state
    (weight ``[D_t, D_s, 1, 1]``) is accepted too: ``load_state_dict`` views the weight as
    ``[D_t, D_s]`` (the same as ``m.weight.data.copy_(conv.weight.view(D_t, D_s))``).

    Shape:
        - student_feat: :math:`(*, D_s, *)` with the channels at ``channel_dim``.
        - teacher_feat: :math:`(*, D_t, *)`, the same other dimensions.
        - Output: scalar float32, or the shape without ``channel_dim`` with ``"none"``.

    Example::

        >>> kd = fastkd.FeatureKDLoss(256, 1024)              # tokens [N, 256] -> [N, 1024]
        >>> loss = kd(student_hidden, teacher_hidden.detach())
        >>> kd2 = fastkd.FeatureKDLoss(64, 256, channel_dim=1)  # NCHW maps, a 1x1 conv adapter
        >>> loss = kd2(s_map, t_map)
    """

    loss_weight = _dynamic.DynamicFloat(_checks.check_nonnegative)

    def __init__(self, student_dim, teacher_dim, bias=True, loss="mse", channel_dim=-1,
                 reduction="mean", adapter=True, backend="auto", chunk_size=None, device=None,
                 dtype=None, loss_weight=1.0):
        super().__init__()
        self.loss_weight = loss_weight
        self.student_dim = _check_dim("student_dim", student_dim)
        self.teacher_dim = _check_dim("teacher_dim", teacher_dim)
        self.loss = _checks.check_choice("loss", loss, _feature.LOSSES)
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.reduction = _checks.check_reduction(reduction)
        self.backend = _backend.check_backend_name(backend)
        _feature.check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        if not isinstance(adapter, bool):
            raise TypeError(f"adapter must be a bool, got {type(adapter).__name__}")
        self.adapter = adapter
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if adapter:
            factory = {"device": device, "dtype": dtype}
            self.weight = torch.nn.Parameter(torch.empty(teacher_dim, student_dim, **factory))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(teacher_dim, **factory))
            else:
                self.register_parameter("bias", None)
            self.reset_parameters()
        else:
            if student_dim != teacher_dim:
                raise ValueError(f"adapter=False needs student_dim == teacher_dim, got "
                                 f"{student_dim} and {teacher_dim}")
            if bias:
                raise ValueError("adapter=False has no bias: pass bias=False")
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        if self.weight is None:
            return
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.student_dim)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A 1x1 convolution's weight [D_t, D_s, 1, 1] is the same adapter: view it as [D_t, D_s].
        key = prefix + "weight"
        w = state_dict.get(key)
        if (self.weight is not None and isinstance(w, torch.Tensor) and w.dim() == 4
                and tuple(w.shape) == (self.teacher_dim, self.student_dim, 1, 1)):
            state_dict[key] = w.reshape(self.teacher_dim, self.student_dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, student_feat, teacher_feat):
        if isinstance(student_feat, torch.Tensor) and isinstance(teacher_feat, torch.Tensor) \
                and student_feat.dim() == teacher_feat.dim() and student_feat.dim() >= 1:
            cd = _feature.check_channel_dim(self.channel_dim, student_feat.dim())
            if student_feat.shape[cd] != self.student_dim:
                raise ValueError(f"student_feat has {student_feat.shape[cd]} channels along "
                                 f"channel_dim={self.channel_dim} but this FeatureKDLoss has "
                                 f"student_dim={self.student_dim}")
            if teacher_feat.shape[cd] != self.teacher_dim:
                raise ValueError(f"teacher_feat has {teacher_feat.shape[cd]} channels along "
                                 f"channel_dim={self.channel_dim} but this FeatureKDLoss has "
                                 f"teacher_dim={self.teacher_dim}")
        loss = _feature.feature_kd_loss(student_feat, teacher_feat, self.weight, self.bias,
                                        loss=self.loss, channel_dim=self.channel_dim,
                                        reduction=self.reduction, backend=self.backend,
                                        chunk_size=self.chunk_size)
        return _dynamic.scale_loss(self, loss)

    def extra_repr(self) -> str:
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
                f"bias={self.bias is not None}, loss={self.loss!r}, "
                f"channel_dim={self.channel_dim}, reduction={self.reduction!r}, "
                f"loss_weight={self.loss_weight}, "
                f"adapter={self.adapter}, backend={self.backend!r}")
