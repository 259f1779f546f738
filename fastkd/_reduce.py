"""Row-loss reduction shared by every row loss (SPEC §Common rules)."""
from __future__ import annotations

import torch

from fastkd import _checks


def count_rows(target, ignore_index: int, rows: int, device) -> torch.Tensor:
    """Number of rows that count (target != ignore_index), as a float32 device scalar >= 1.

    Clamped to 1 so that "mean" over no counted row is 0 with zero gradient, not NaN. Computed on
    the device without a host synchronisation.
    """
    if target is None:
        return torch.full((), float(max(rows, 1)), dtype=torch.float32, device=device)
    return (target != ignore_index).sum(dtype=torch.float32).clamp_min(1.0)


def check_num_items(num_items, reduction: str, device) -> torch.Tensor | None:
    """``num_items_in_batch`` (SPEC §1e) as the float32 0-d denominator of ``"mean"`` on
    ``device``, clamped to 1 like :func:`count_rows`; None stays None.

    An int, a real number or a one-element tensor (e.g. the count of the whole step's tokens
    that the Hugging Face Trainer passes); only meaningful with ``reduction="mean"``.
    """
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the summed loss of reduction='mean'; it "
                         f"has no meaning with reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch must be a number or a one-element real tensor, "
                             f"got a {num_items.dtype} tensor of shape {tuple(num_items.shape)}")
        value = num_items.detach().reshape(()).to(device=device, dtype=torch.float32)
    else:
        value = torch.tensor(_checks.check_finite_number("num_items_in_batch", num_items,
                                                         nonnegative=True),
                             dtype=torch.float32, device=device)
    return value.clamp_min(1.0)


def mean_count(target, ignore_index: int, rows: int, device, num_items=None) -> torch.Tensor:
    """The denominator of ``"mean"``: ``num_items`` (from :func:`check_num_items`) when given,
    else this call's :func:`count_rows`."""
    if num_items is not None:
        return num_items
    return count_rows(target, ignore_index, rows, device)


def reduce_rows(row_loss: torch.Tensor, reduction: str, lead_shape, count=None) -> torch.Tensor:
    """``"none"``: row losses in the leading shape; ``"sum"``; ``"mean"``: sum / count."""
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / count
