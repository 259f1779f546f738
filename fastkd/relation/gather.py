"""Relation KD over the global batch of a ``torch.distributed`` group.

:func:`gather_rows` all-gathers features along the batch dimension with gradient, so that
``SPLoss/RKDLoss/PKTLoss(gather=True)`` see the global batch.

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

import torch
import torch.distributed as dist

from fastkd import _checks

__all__ = ["gather_rows", "gather_features", "resolve_gather_group"]


def _world(group) -> int:
    return dist.get_world_size(group)


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
