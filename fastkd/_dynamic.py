"""Float hyperparameters that change between calls without recompiling (``fastkd.schedules``).

``torch.compile`` bakes a Python float it reads (a module attribute or an argument passed on to a
custom op) into the graph as a constant and guards on it, so a temperature that changes every
step would recompile every step and soon fall back to eager. Here such a hyperparameter is also
kept as a 0-dim float64 CPU tensor that is updated in place: a compiled forward reads the tensor
(graph input, no value guard) and the op receives the values packed in one ``Tensor? dynamic``
argument, which its implementation unpacks into floats at run time. Eager calls pass plain floats
and ``dynamic=None`` (no tensor work).

- :class:`DynamicFloat`: the module attribute (validated when set; reads as a float).
- :func:`module_value`: what a module's ``forward`` passes on (a float, or the tensor while
  compiling).
- :func:`pack` / :func:`unpack`: the op-argument side.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

_STORE = "_fastkd_dynamic"


def compiling() -> bool:
    return torch.compiler.is_compiling()


def check_scalar_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must be a number or a one-element real tensor, got a tensor of "
                         f"shape {tuple(value.shape)} and dtype {value.dtype}")
    return value


class DynamicFloat:
    """A module's schedulable float hyperparameter: a data descriptor whose ``check(name, value)
    -> float`` validates every assignment (the error names the attribute). The value is held as
    a float and as a 0-dim float64 CPU tensor updated in place (never moved by ``module.to``)."""

    def __init__(self, check: Callable[[str, object], float]):
        self.check = check
        self.name = ""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj.__dict__[_STORE][self.name][0]

    def __set__(self, obj, value):
        if isinstance(value, torch.Tensor):
            value = check_scalar_tensor(self.name, value).item()
        value = self.check(self.name, value)
        store = obj.__dict__.setdefault(_STORE, {})
        if self.name in store:
            tensor = store[self.name][1]
            tensor.fill_(value)  # in place: a compiled forward sees it without recompiling
        else:
            tensor = torch.tensor(value, dtype=torch.float64)
        store[self.name] = (value, tensor)


def module_value(module, name: str):
    """The value of ``module``'s :class:`DynamicFloat` ``name`` to pass on: the float, or, while
    ``torch.compile`` traces, the tensor (read as data, so new values need no recompilation)."""
    value, tensor = module.__dict__[_STORE][name]
    return tensor if compiling() else value


def resolve(name: str, value, check: Callable[[str, object], float]):
    """An argument that may be a float or a one-element tensor: the checked float, or, while
    tracing, the tensor itself (its value is checked at run time by :func:`unpack`)."""
    if isinstance(value, torch.Tensor):
        check_scalar_tensor(name, value)
        if compiling():
            return value
        value = value.item()
    return check(name, value)


def pack(values: Sequence) -> tuple[tuple, torch.Tensor | None]:
    """``(floats, dynamic)`` for an op: with no tensor among ``values``, the floats and None;
    otherwise placeholders (NaN) and the values stacked into one float64 CPU tensor."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return tuple(values), None
    parts = [v.detach().reshape(()).to("cpu", torch.float64) if isinstance(v, torch.Tensor)
             else torch.tensor(v, dtype=torch.float64) for v in values]
    return (math.nan,) * len(values), torch.stack(parts)


def unpack(floats: Sequence[float], dynamic: torch.Tensor | None, names: Sequence[str],
           checks: Sequence[Callable[[str, object], float]]) -> list[float]:
    """Inside an op: the float values, from ``dynamic`` (checked here, where they are data)
    when it is given."""
    if dynamic is None:
        return list(floats)
    return [check(name, v) for name, v, check in zip(names, dynamic.tolist(), checks)]


def scale_loss(module, loss: torch.Tensor, name: str = "loss_weight") -> torch.Tensor:
    """``loss`` times ``module``'s weight ``name`` (in the loss's dtype; no op at 1.0 in eager)."""
    weight = module_value(module, name)
    if isinstance(weight, torch.Tensor):
        return loss * weight.to(loss.dtype)
    return loss if weight == 1.0 else loss * weight
