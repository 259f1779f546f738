"""Row-loss reduction shared by every row loss (SPEC §Common rules)."""
from __future__ import annotations

import torch


def count_rows(target, ignore_index: int, rows: int, device) -> torch.Tensor:
    """Number of rows that count (target != ignore_index), as a float32 device scalar >= 1.

    Clamped to 1 so that "mean" over no counted row is 0 with zero gradient, not NaN. Computed on
    the device without a host synchronisation.
    """
    if target is None:
        return torch.full((), float(max(rows, 1)), dtype=torch.float32, device=device)
    return (target != ignore_index).sum(dtype=torch.float32).clamp_min(1.0)


def reduce_rows(row_loss: torch.Tensor, reduction: str, lead_shape, count=None) -> torch.Tensor:
    """``"none"``: row losses in the leading shape; ``"sum"``; ``"mean"``: sum / count."""
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / count
