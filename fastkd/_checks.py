"""Argument checks shared by every loss (SPEC §Errors): each message names the argument."""
from __future__ import annotations

import math

import torch

from fastkd._dtypes import FLOAT_DTYPES

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction) -> str:
    """Validate ``reduction``; ``"batchmean"`` is accepted as an alias of ``"mean"``."""
    if reduction == "batchmean":
        return "mean"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none' (or 'batchmean'), "
                         f"got {reduction!r}")
    return reduction


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got dtype {t.dtype}")
    return t


def check_finite_number(name: str, value, *, positive=False, nonnegative=False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: they also work on torch.compile(dynamic=True) SymFloats.
    if value != value or value == math.inf or value == -math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """A finite number > 0."""
    return check_finite_number(name, value, positive=True)


def check_nonnegative(name: str, value) -> float:
    """A finite number >= 0 (e.g. a loss weight)."""
    return check_finite_number(name, value, nonnegative=True)


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors on one device; returns it."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise RuntimeError(f"{name} is on {t.device} but {first} is on {device}: "
                               f"all inputs must be on the same device")
    return device


def check_weights(name: str, weights, count: int) -> list[float]:
    """Non-negative finite weights, normalised to sum 1 (None: equal weights)."""
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().flatten().tolist()
    weights = [check_finite_number(f"{name}[{i}]", w, nonnegative=True)
               for i, w in enumerate(weights)]
    if len(weights) != count:
        raise ValueError(f"{name} has {len(weights)} entries but {count} teachers were given")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum, got {weights}")
    return [w / total for w in weights]
