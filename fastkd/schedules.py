r"""Schedules of KD hyperparameters: temperature and loss weights that change as training goes on
(progressive distillation), applied to fastkd modules without rebuilding them and without
recompiling them under ``torch.compile``.

A *schedule* maps a step :math:`t \ge 0` (an optimizer step, or an epoch: the training loop
decides) to a float:

- :class:`Constant` ``(value)``;
- :class:`Linear` ``(start, end, steps, begin=0)``: ``start`` until ``begin``, then a straight
  line to ``end`` at ``begin + steps``, then ``end``;
- :class:`Cosine` ``(start, end, steps, begin=0)``: the same ends, along a half cosine
  :math:`e + (s - e)(1 + \cos(\pi u))/2`, :math:`u = (t - \text{begin}) / \text{steps}`;
- :class:`Step` ``(start, gamma, milestones)``: :math:`\text{start} \cdot \gamma^m`, :math:`m` the
  number of milestones :math:`\le t` (as ``torch.optim.lr_scheduler.MultiStepLR``);
- :class:`Piecewise` ``(points, interpolation="linear")``: through the ``(step, value)`` points,
  linear between them (or ``"constant"``: each value holds until the next point), held flat
  before the first and after the last;
- :class:`Stages` ``(names, boundaries)``: named training stages (e.g. ``("hints", "logits")``
  with ``boundaries=[300]``: hints for steps 0-299, logits from 300); ``stages.gate("hints")``
  is the schedule that is 1.0 during the named stages and 0.0 elsewhere, and
  ``stages.at(t)`` names the stage of step ``t``.

:class:`Scheduler` binds schedules to targets and steps them, as a learning-rate scheduler does:

.. code-block:: python

    kd = fastkd.KDLoss(hard_weight=1.0)
    hint = fastkd.FeatureKDLoss(64, 256)
    stages = Stages(("hints", "logits"), boundaries=[300])
    sched = Scheduler({
        (kd, "temperature"): Cosine(8.0, 2.0, steps=1000),
        (kd, "soft_weight"): stages.gate("logits"),
        (hint, "loss_weight"): stages.gate("hints"),
    }, stages=stages)
    for batch in loader:
        loss = kd(s, t, y)
        if sched.active("hints"):          # skip a loss whose weight is 0 in this stage
            loss = loss + hint(fs, ft)
        loss.backward(); opt.step(); sched.step()
    torch.save({"model": model.state_dict(), "sched": sched.state_dict()}, path)

A target is ``(object, attribute)``, set with ``setattr`` at every step. The schedulable
attributes of the fastkd modules (``temperature``, ``soft_weight``, ``hard_weight`` of
:class:`~fastkd.KDLoss` and :class:`~fastkd.FusedLinearKDLoss`; ``loss_weight`` of
:class:`~fastkd.FeatureKDLoss`, :class:`~fastkd.SPLoss`, :class:`~fastkd.RKDLoss`,
:class:`~fastkd.PKTLoss`; ``distance_weight`` and ``angle_weight`` of :class:`~fastkd.RKDLoss`)
are validated when set and reach a compiled module as tensor data, so a new value each step
causes no recompilation. A target may also be a plain string: the value is only held, for a loss
the training loop writes itself (``sched["alpha"]``).
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "Step", "Piecewise", "Stages",
           "Scheduler"]


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _step(step) -> int:
    return _count("step", step, minimum=0)


class Schedule:
    """A value per step: ``schedule(step) -> float``, for ``step >= 0``."""

    def __call__(self, step: int) -> float:
        return self.value(_step(step))

    def value(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """``value`` at every step."""

    def __init__(self, value: float):
        self.constant = _number("value", value)

    def value(self, step: int) -> float:
        return self.constant


class _Ramp(Schedule):
    def __init__(self, start: float, end: float, steps: int, begin: int = 0):
        self.start, self.end = _number("start", start), _number("end", end)
        self.steps = _count("steps", steps, minimum=1)
        self.begin = _count("begin", begin, minimum=0)

    def _progress(self, step: int) -> float:
        return min(max((step - self.begin) / self.steps, 0.0), 1.0)


class Linear(_Ramp):
    """``start`` until ``begin``, linearly to ``end`` at ``begin + steps``, then ``end``."""

    def value(self, step: int) -> float:
        u = self._progress(step)
        return self.end if u >= 1.0 else self.start + (self.end - self.start) * u


class Cosine(_Ramp):
    """``start`` until ``begin``, along a half cosine to ``end`` at ``begin + steps``, then
    ``end``."""

    def value(self, step: int) -> float:
        u = self._progress(step)
        return self.end if u >= 1.0 else \
            self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * u))


class Step(Schedule):
    """``start * gamma ** m``, ``m`` the number of ``milestones`` at or before the step."""

    def __init__(self, start: float, gamma: float, milestones: Sequence[int]):
        self.start, self.gamma = _number("start", start), _number("gamma", gamma)
        self.milestones = sorted(_count("milestones[i]", m, minimum=0) for m in milestones)
        if not self.milestones:
            raise ValueError("milestones must hold at least one step")

    def value(self, step: int) -> float:
        return self.start * self.gamma ** bisect.bisect_right(self.milestones, step)


class Piecewise(Schedule):
    """Through ``points`` ``[(step, value), ...]`` (steps strictly increasing), linear between
    them (``interpolation="linear"``) or holding each value until the next point
    (``"constant"``); flat before the first point and after the last."""

    def __init__(self, points: Iterable[tuple[int, float]], interpolation: str = "linear"):
        pts = [(_count("points[i][0]", s, minimum=0), _number("points[i][1]", v))
               for s, v in points]
        if not pts:
            raise ValueError("points must hold at least one (step, value) pair")
        if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
            raise ValueError(f"the steps of points must increase strictly, got "
                             f"{[s for s, _ in pts]}")
        if interpolation not in ("linear", "constant"):
            raise ValueError(f"interpolation must be 'linear' or 'constant', got "
                             f"{interpolation!r}")
        self.points, self.interpolation = pts, interpolation

    def value(self, step: int) -> float:
        steps = [s for s, _ in self.points]
        i = bisect.bisect_right(steps, step)
        if i == 0:
            return self.points[0][1]
        if i == len(steps) or self.interpolation == "constant":
            return self.points[i - 1][1]
        (s0, v0), (s1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


class Stages:
    """Named consecutive stages: ``names[0]`` for steps ``[0, boundaries[0])``, ``names[i]`` for
    ``[boundaries[i-1], boundaries[i])``, the last from ``boundaries[-1]`` on."""

    def __init__(self, names: Sequence[str], boundaries: Sequence[int]):
        names = list(names)
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct strings, at least one, got {names!r}")
        bounds = [_count("boundaries[i]", b, minimum=1) for b in boundaries]
        if len(bounds) != len(names) - 1:
            raise ValueError(f"{len(names)} stages need {len(names) - 1} boundaries, got "
                             f"{len(bounds)}")
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"boundaries must increase strictly, got {bounds}")
        self.names, self.boundaries = names, bounds

    def at(self, step: int) -> str:
        """The name of the stage of ``step``."""
        return self.names[bisect.bisect_right(self.boundaries, _step(step))]

    def gate(self, *names: str, on: float = 1.0, off: float = 0.0) -> Schedule:
        """The schedule that is ``on`` during the stages ``names`` and ``off`` elsewhere."""
        unknown = [n for n in names if n not in self.names]
        if not names or unknown:
            raise ValueError(f"gate needs stage names among {self.names}, got {list(names)}")
        starts = [0] + self.boundaries
        chosen = set(names)
        return Piecewise([(s, on if n in chosen else off) for s, n in zip(starts, self.names)],
                         interpolation="constant")

    def __repr__(self) -> str:
        return f"Stages(names={self.names!r}, boundaries={self.boundaries!r})"


Target = Any  # (object, attribute name) or a str


def _target_name(target: Target) -> str:
    if isinstance(target, str):
        return target
    obj, attr = target
    return f"{type(obj).__name__}.{attr}"


class Scheduler:
    """Steps ``schedules`` (``{target: schedule}``) and applies their values to the targets.

    ``target`` is ``(obj, "attribute")`` (set with ``setattr``) or a string (the value is only
    held: ``scheduler["name"]``). A schedule is a :class:`Schedule` or any callable
    ``step -> float``. The values of step ``start_step`` (default 0) are applied at
    construction; :meth:`step` advances by one step and applies the next values, so a loop calls
    it once after each optimizer step. ``stages`` (optional :class:`Stages`) answers
    :meth:`active` and :attr:`stage` for the current step.

    :meth:`state_dict` holds the step (and the values applied, for inspection);
    :meth:`load_state_dict` restores the step and applies its values to the targets, so a
    training run resumed from a checkpoint continues the schedule where it stopped.
    """

    def __init__(self, schedules: Mapping[Target, Callable[[int], float]], *,
                 stages: Stages | None = None, start_step: int = 0):
        self._schedules = []
        names = set()
        for target, schedule in schedules.items():
            if not isinstance(target, str):
                if not (isinstance(target, tuple) and len(target) == 2
                        and isinstance(target[1], str)):
                    raise TypeError(f"a target must be (object, 'attribute') or a str, got "
                                    f"{target!r}")
                if not hasattr(target[0], target[1]):
                    raise AttributeError(f"{type(target[0]).__name__} has no attribute "
                                         f"{target[1]!r} to schedule")
            if not callable(schedule):
                raise TypeError(f"the schedule of {_target_name(target)} must be callable "
                                f"(step -> float), got {type(schedule).__name__}")
            name = _target_name(target)
            if name in names and isinstance(target, str):
                raise ValueError(f"the target {name!r} is given twice")
            names.add(name)
            self._schedules.append((target, schedule))
        if stages is not None and not isinstance(stages, Stages):
            raise TypeError(f"stages must be a fastkd.schedules.Stages, got "
                            f"{type(stages).__name__}")
        self.stages = stages
        self._held: dict[str, float] = {}
        self.last_values: dict[str, float] = {}
        self._step_count = _step(start_step)
        self._apply()

    @property
    def step_count(self) -> int:
        """The current step: the values applied are those of this step."""
        return self._step_count

    def step(self) -> None:
        """Advance one step and apply its values."""
        self._step_count += 1
        self._apply()

    def _apply(self) -> None:
        values = {}
        for target, schedule in self._schedules:
            v = schedule(self._step_count)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"the schedule of {_target_name(target)} gave {v!r} at step "
                                 f"{self._step_count}; a finite number is needed")
            v = float(v)
            if isinstance(target, str):
                self._held[target] = v
            else:
                setattr(target[0], target[1], v)  # the attribute's own check runs here
            values[_target_name(target)] = v
        self.last_values = values

    def __getitem__(self, name: str) -> float:
        """The current value of a string target."""
        if name not in self._held:
            raise KeyError(f"no string target {name!r}; string targets: {sorted(self._held)}")
        return self._held[name]

    @property
    def stage(self) -> str:
        """The name of the current stage (needs ``stages``)."""
        if self.stages is None:
            raise RuntimeError("this Scheduler has no stages")
        return self.stages.at(self._step_count)

    def active(self, name: str) -> bool:
        """Whether the current stage is ``name`` (needs ``stages``)."""
        if self.stages is not None and name not in self.stages.names:
            raise ValueError(f"unknown stage {name!r}; stages: {self.stages.names}")
        return self.stage == name

    def state_dict(self) -> dict:
        return {"step": self._step_count, "values": dict(self.last_values)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the step of :meth:`state_dict` and apply its values to the targets."""
        if "step" not in state:
            raise KeyError("state has no 'step' (not a Scheduler.state_dict())")
        self._step_count = _step(state["step"])
        self._apply()

    def __repr__(self) -> str:
        lines = [f"  {_target_name(t)}: {s!r}" for t, s in self._schedules]
        return f"Scheduler(step={self._step_count},\n" + "\n".join(lines) + "\n)"
