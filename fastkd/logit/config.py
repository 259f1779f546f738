"""Logit KD configuration and argument validation: the one place that knows the arguments.

:class:`LogitKDConfig` holds the nine scalar arguments shared by every logit loss (``KDLoss``,
``FusedLinearKDLoss``, top-k and vocabulary-parallel paths), validated once per call;
:func:`validate_inputs` checks the tensors (SPEC §Errors, the checks that need no device data),
:func:`match_vocab` applies the vocabulary rule of SPEC §1b and :func:`raise_flags` turns the
kernels' error bits into exceptions.
"""
from __future__ import annotations

import math

import torch

from fastkd import _checks, _dynamic
from fastkd.logit.reference import DIVERGENCES, jsd_endpoint

DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
MAX_TEACHERS = 8
FLAG_TARGET, FLAG_STUDENT_MASKED, FLAG_TEACHER_MASKED = 1, 2, 4
#: teacher_mixture="logprob": a counted row whose log mixture is -inf everywhere.
FLAG_MIXTURE_MASKED = 8
#: Accepted temperatures: 1/T and T**2 stay finite float32 numbers (SPEC §Guarantees: the
#: accuracy of SPEC §1 is tested for T in [0.05, 100] and holds to about T = 1e3).
TEMPERATURE_RANGE = (1e-30, 1e18)


TEACHER_MIXTURES = ("prob", "logprob")
VOCAB_MISMATCH = ("error", "truncate")

#: The configuration in a custom-op schema, in ``LogitKDConfig.__slots__`` order.
CONFIG_SCHEMA = ("float temperature, float soft_weight, float hard_weight, str divergence, "
                 "float beta, bool t2_scale, int ignore_index, float label_smoothing, "
                 "str reduction, str teacher_mixture, int? uld_top, Tensor? dynamic")
#: The hyperparameters that may be tensors (schedules under ``torch.compile``, see
#: :mod:`fastkd._dynamic`): in the op they arrive packed in ``dynamic``.
DYNAMIC_FIELDS = ("temperature", "soft_weight", "hard_weight")


def check_temperature(name: str, value) -> float:
    value = _checks.check_positive(name, value)
    if not TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        # The kernels use 1/T and T**2 in float32: outside this range one of them overflows
        # (NaN losses, or an OverflowError for T**2 in Python).
        raise ValueError(f"{name} must be in [{TEMPERATURE_RANGE[0]:g}, "
                         f"{TEMPERATURE_RANGE[1]:g}] (1/T and T**2 are float32 in the "
                         f"kernels), got {value}")
    return value


DYNAMIC_CHECKS = (check_temperature, _checks.check_nonnegative, _checks.check_nonnegative)


class LogitKDConfig:
    """Validated scalar arguments of one KD call (also what the kernels receive)."""

    __slots__ = ("temperature", "soft_weight", "hard_weight", "divergence", "beta", "t2_scale",
                 "ignore_index", "label_smoothing", "reduction", "teacher_mixture", "uld_top",
                 "dynamic")
    #: The user-facing arguments (``dynamic`` is derived: the tensor-valued ones, packed).
    ARGS = __slots__[:-1]

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="kl",
                 beta=0.5, t2_scale=True, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", teacher_mixture="prob", uld_top=None):
        # Floats, or (while torch.compile traces) one-element tensors checked in the op.
        self.temperature, self.soft_weight, self.hard_weight = (
            _dynamic.resolve(name, value, check) for name, value, check in
            zip(DYNAMIC_FIELDS, (temperature, soft_weight, hard_weight), DYNAMIC_CHECKS))
        _, self.dynamic = _dynamic.pack([self.temperature, self.soft_weight, self.hard_weight])
        self.divergence = _checks.check_choice("divergence", divergence, DIVERGENCES)
        self.beta = _checks.check_finite_number("beta", beta)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not isinstance(t2_scale, bool):
            raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
        self.t2_scale = t2_scale
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if not -2**63 <= ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64 (the target dtype), got "
                             f"{ignore_index}")
        self.ignore_index = ignore_index
        self.label_smoothing = _checks.check_finite_number("label_smoothing", label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        self.reduction = _checks.check_reduction(reduction)
        self.teacher_mixture = _checks.check_choice("teacher_mixture", teacher_mixture,
                                                    TEACHER_MIXTURES)
        if uld_top is not None:
            if isinstance(uld_top, bool) or not isinstance(uld_top, int) or uld_top < 1:
                raise ValueError(f"uld_top must be a positive int or None, got {uld_top!r}")
            if self.divergence != "uld":
                raise ValueError(f"uld_top applies to divergence='uld', not "
                                 f"{self.divergence!r}")
        self.uld_top = uld_top

    @classmethod
    def pick(cls, arguments: dict) -> "LogitKDConfig":
        """The configuration among ``arguments`` (e.g. a function's ``locals()``), validated."""
        return cls(**{key: arguments[key] for key in cls.ARGS})

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.ARGS}

    def as_args(self) -> tuple:
        """The fields in ``__slots__`` order: how the custom ops receive the configuration
        (tensor-valued hyperparameters as NaN placeholders, their values in ``dynamic``)."""
        if self.dynamic is None:
            return tuple(getattr(self, key) for key in self.__slots__)
        return tuple(math.nan if key in DYNAMIC_FIELDS else getattr(self, key)
                     for key in self.__slots__)

    @classmethod
    def from_args(cls, args) -> "LogitKDConfig":
        """Inverse of :meth:`as_args`, inside an op implementation: the values of ``dynamic``
        are checked here (they are data); the Python entry points validated the rest already,
        so the op does not validate them twice."""
        cfg = object.__new__(cls)
        for key, value in zip(cls.__slots__, args):
            object.__setattr__(cfg, key, value)
        if cfg.dynamic is not None:
            cfg.temperature, cfg.soft_weight, cfg.hard_weight = _dynamic.unpack(
                (), cfg.dynamic, DYNAMIC_FIELDS, DYNAMIC_CHECKS)
            cfg.dynamic = None
        return cfg

    def concrete(self) -> "LogitKDConfig":
        """This configuration with float hyperparameters (reads tensor-valued ones: a graph
        break under ``torch.compile``), for the paths that need them in Python."""
        return self if self.dynamic is None else LogitKDConfig.from_args(self.as_args())

    @property
    def soft_factor(self) -> float:
        return self.soft_weight * (self.temperature ** 2 if self.t2_scale else 1.0)

    @property
    def kernel_divergence(self) -> tuple[int, float]:
        """(divergence id, beta) with JSD at beta = 0 / 1 mapped to KL / reverse KL exactly.
        ``"uld"`` has no id: it never reaches the dense kernels."""
        return DIVERGENCE_IDS[jsd_endpoint(self.divergence, self.beta)], self.beta

    @property
    def log_mixture(self) -> bool:
        """Several teachers are mixed in log space (``teacher_mixture="logprob"``)."""
        return self.teacher_mixture == "logprob"

    def reference_kwargs(self) -> dict:
        """The keyword arguments of the reference's row functions (all but ``reduction``)."""
        kwargs = self.as_dict()
        del kwargs["reduction"]
        return kwargs


#: How many custom-op arguments the configuration takes (:meth:`LogitKDConfig.as_args`).
N_CONFIG = len(LogitKDConfig.__slots__)
#: The position of ``reduction`` among them.
REDUCTION_ARG = LogitKDConfig.__slots__.index("reduction")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[*, V] -> [N, V] with unit stride along V; any row stride is read as is (no copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def validate_inputs(student_logits, teacher_logits, target):
    """Checks of SPEC §Errors that need no device data. Returns (student, [teachers], target)."""
    _checks.check_float_tensor("student_logits", student_logits)
    many = isinstance(teacher_logits, (list, tuple))
    teachers = list(teacher_logits) if many else [teacher_logits]
    if len(teachers) == 0:
        raise ValueError("teacher_logits is an empty list: give at least one teacher")
    if len(teachers) > MAX_TEACHERS:
        raise ValueError(f"teacher_logits has {len(teachers)} teachers; at most {MAX_TEACHERS}")
    names = [f"teacher_logits[{i}]" if many else "teacher_logits" for i in range(len(teachers))]
    for name, t in zip(names, teachers):
        _checks.check_float_tensor(name, t)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must have a vocabulary dimension V >= 1, got shape "
                         f"{tuple(student_logits.shape)}")
    for name, t in zip(names, teachers):
        # Only the vocabulary may differ (SPEC §1b: the first min(V_s, V_t) entries are compared).
        if t.dim() != student_logits.dim() or t.shape[:-1] != student_logits.shape[:-1] \
                or t.shape[-1] < 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but student_logits has shape "
                             f"{tuple(student_logits.shape)}; they must match in every dimension "
                             f"but the last (vocabulary)")
    lead = student_logits.shape[:-1]
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor of class indices, got "
                            f"{type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor of class indices, got "
                            f"{target.dtype}")
        if target.shape != lead:
            raise ValueError(f"target has shape {tuple(target.shape)} but must equal the leading "
                             f"shape of student_logits {tuple(lead)}")
    dev_kwargs = {"student_logits": student_logits, "target": target}
    dev_kwargs.update(dict(zip(names, teachers)))
    _checks.check_same_device(**dev_kwargs)
    if len({t.dtype for t in teachers}) > 1:
        # The kernels take one teacher dtype. Teachers of different dtypes (e.g. bf16 and fp16)
        # are promoted to one that holds all of them exactly (float32; float64 if present),
        # never rounded to a narrower one. Autograd casts their gradients back.
        common = torch.float64 if any(t.dtype == torch.float64 for t in teachers) \
            else torch.float32
        teachers = [t.to(common) for t in teachers]
    return student_logits, teachers, target


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dimension (a copy only when it has none)."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def raise_flags(flags: int, ignore_index: int, vocab: int, many: bool) -> None:
    """Turn the kernel's error bits into the exceptions of SPEC §Errors."""
    if flags & FLAG_TARGET:
        raise ValueError(f"target has values outside [0, {vocab}) other than "
                         f"ignore_index={ignore_index}")
    if flags & FLAG_STUDENT_MASKED:
        raise ValueError("student_logits has a row that is -inf everywhere (no vocabulary entry "
                         "left)")
    if flags & FLAG_TEACHER_MASKED:
        name = "teacher_logits[i]" if many else "teacher_logits"
        raise ValueError(f"{name} has a row that is -inf everywhere (no vocabulary entry left)")
    if flags & FLAG_MIXTURE_MASKED:
        raise ValueError("teacher_logits: the log mixture of the teachers has a row that is -inf "
                         "everywhere (their unmasked entries do not overlap)")


def check_vocab_mismatch(vocab_mismatch) -> str:
    return _checks.check_choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)


def vocab_mismatch_error(vocab_s: int, vocab_t: int, teacher: str = "teacher") -> ValueError:
    """The error of SPEC §1b for different vocabulary sizes, with the two ways out."""
    return ValueError(
        f"student vocabulary V_s = {vocab_s} but {teacher} vocabulary V_t = {vocab_t}. If they "
        f"share a tokenizer and one is padded, pass vocab_mismatch='truncate' (the first "
        f"min(V_s, V_t) entries are compared); for teachers with another tokenizer use "
        f"divergence='uld'")


def match_vocab(student, teachers, vocab_mismatch="error"):
    """Vocabulary mismatch (SPEC §1b): ``"error"`` raises :func:`vocab_mismatch_error`;
    ``"truncate"`` keeps the first min(V) entries of every side.

    Slicing is the same as masking the extra entries with -inf before the softmax (they get
    probability 0 and a zero gradient) without reading them; the slices are views.
    """
    for i, t in enumerate(teachers):
        if t.shape[-1] != student.shape[-1] and vocab_mismatch != "truncate":
            raise vocab_mismatch_error(student.shape[-1], t.shape[-1],
                                       f"teacher_logits[{i}]" if len(teachers) > 1
                                       else "teacher_logits")
    vocab = min([student.shape[-1]] + [t.shape[-1] for t in teachers])
    if student.shape[-1] != vocab:
        student = student[..., :vocab]
    return student, [t if t.shape[-1] == vocab else t[..., :vocab] for t in teachers]
