"""Hostile inputs, table-driven: every public entry point (each module class and each functional)
against every bad input of SPEC §Errors, plus NaN/+-inf in logits and features, empty batches,
mismatched devices ('meta' is the second device on CPU) and dtypes, wrong ranks, 0-d tensors,
huge and tiny temperatures.

Each case must either raise the documented exception type with a message naming the argument,
or return what SPEC says: NaN in the affected rows only (NaN input, ``reduction="none"``), finite
values elsewhere, 0 for an empty batch. Nothing may crash the process: the whole table runs, once
per backend, in a child process (``python tests/test_hostile.py --child BACKEND``) that prints
one JSON line per case as it goes, so a segfault or abort fails the cases from the one that
crashed on instead of killing pytest. The children of all backends run in parallel.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NAN, INF = math.nan, math.inf
BACKENDS = ("cpu", "triton", "reference")  # (+ "cuda" when a GPU is visible)


# ------------------------------------------------------------------------------ expectations
@dataclasses.dataclass(frozen=True)
class Raises:
    """The call raises ``exc`` (or a subclass) and the message contains every word."""
    exc: type
    words: tuple = ()

    def check(self, rec):
        assert "raised" in rec, f"expected {self.exc.__name__} naming {self.words}, got {rec}"
        assert self.exc.__name__ in rec["mro"], \
            f"expected {self.exc.__name__}, got {rec['raised']}: {rec['msg']}"
        for w in self.words:
            assert w in rec["msg"], f"message does not name {w!r}: {rec['raised']}: {rec['msg']}"


@dataclasses.dataclass(frozen=True)
class Returns:
    """The call returns. ``nan_rows``: exactly these rows of the (flattened) loss are NaN (and
    the others finite); ``nonfinite_rows``: these are NaN or inf, the others finite; ``value``:
    the loss equals it; ``finite``: every loss value finite. ``grad_rows_finite``: the student
    gradient rows outside the affected rows are finite."""
    nan_rows: tuple | None = None
    nonfinite_rows: tuple | None = None
    value: float | None = None
    finite: bool = False
    nonfinite: bool = False

    def check(self, rec):
        assert "loss" in rec, f"expected a result, got {rec.get('raised')}: {rec.get('msg')}"
        loss = [float(x) for x in rec["loss"]]
        if self.nan_rows is not None or self.nonfinite_rows is not None:
            bad = set(self.nan_rows if self.nan_rows is not None else self.nonfinite_rows)
            for i, v in enumerate(loss):
                if i in bad:
                    ok = math.isnan(v) if self.nan_rows is not None else not math.isfinite(v)
                    assert ok, f"row {i} should be {'NaN' if self.nan_rows else 'non-finite'}: {loss}"
                else:
                    assert math.isfinite(v), f"row {i} should be finite: {loss}"
            grows = rec.get("grad_rows_finite")
            if grows is not None:
                for i, fin in enumerate(grows):
                    assert fin or i in bad, f"gradient row {i} is not finite: {grows}"
        if self.value is not None:
            assert all(v == self.value for v in loss), f"expected {self.value}, got {loss}"
            if rec.get("grad_zero") is not None:
                assert rec["grad_zero"], "expected a zero gradient"
        if self.finite:
            assert all(math.isfinite(v) for v in loss), f"expected finite values, got {loss}"
            if rec.get("grad_finite") is not None:
                assert rec["grad_finite"], "the gradient is not finite"
        if self.nonfinite:
            assert not all(math.isfinite(v) for v in loss), f"expected NaN/inf, got {loss}"


# ------------------------------------------------------------------------------------ runners
def _report(loss, grad_leaf=None, rows_dim=None):
    """Plain-data summary of a result: the loss values, and about the student gradient."""
    out = {"loss": loss.detach().float().reshape(-1).cpu().tolist(), "dtype": str(loss.dtype)}
    if grad_leaf is not None and loss.requires_grad:
        loss.backward(torch.ones_like(loss))
        g = grad_leaf.grad
        if g is not None:
            g = g.detach().float().cpu()
            out["grad_finite"] = bool(torch.isfinite(g).all())
            out["grad_zero"] = bool((g == 0).all())
            if rows_dim is not None and g.dim() > 0 and g.numel() > 0:
                rows = g.reshape(-1, g.shape[-1]) if rows_dim == -1 else g.reshape(g.shape[0], -1)
                out["grad_rows_finite"] = torch.isfinite(rows).all(1).tolist()
    return out


#: Where the child puts the inputs: "cpu", or "cuda" for the GPU backends (the child also makes it
#: torch's default device, so targets and module parameters follow).
DEVICE = "cpu"


def _t(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cpu") * scale).to(dtype).to(DEVICE)


def _with(x, index, value):
    x = x.clone()
    x[index] = value
    return x


# ---------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Case:
    entry: str      # the public entry point exercised
    name: str       # what is bad
    run: Callable   # run(backend) -> report dict (or raises)
    expect: object  # Raises | Returns | dict backend -> Raises | Returns

    @property
    def id(self):
        return f"{self.entry}:{self.name}"

    def expectation(self, backend):
        return self.expect.get(backend, self.expect.get("*")) if isinstance(self.expect, dict) \
            else self.expect


CASES: list[Case] = []


def add(entry, name, expect):
    def deco(fn):
        CASES.append(Case(entry, name, fn, expect))
        return fn
    return deco


def _native_only(exc, *words):
    """A forced native backend rejects it; the reference accepts it (float64)."""
    return {"reference": Returns(finite=True), "*": Raises(exc, words)}


# ---- logit KD: KDLoss and functional.kd_loss -------------------------------------------------
def _kd(entry, backend, s, t, target=None, **kw):
    import fastkd
    if entry == "KDLoss":
        return fastkd.KDLoss(backend=backend, **kw)(s, t, target)
    return fastkd.functional.kd_loss(s, t, target, backend=backend, **kw)


def _logit_cases(entry):
    S = lambda *shape, **k: _t(*shape, **k)  # noqa: E731
    bad_args = [
        ("temperature_zero", dict(temperature=0.0), Raises(ValueError, ("temperature",))),
        ("temperature_negative", dict(temperature=-1.0), Raises(ValueError, ("temperature",))),
        ("temperature_nan", dict(temperature=NAN), Raises(ValueError, ("temperature",))),
        ("temperature_inf", dict(temperature=INF), Raises(ValueError, ("temperature",))),
        ("temperature_huge_1e300", dict(temperature=1e300), Raises(ValueError, ("temperature",))),
        ("temperature_tiny_1e-300", dict(temperature=1e-300), Raises(ValueError, ("temperature",))),
        ("temperature_str", dict(temperature="2"), Raises(TypeError, ("temperature",))),
        ("temperature_tensor_2", dict(temperature=torch.ones(2)), Raises(ValueError, ("temperature",))),
        ("beta_negative", dict(divergence="jsd", beta=-0.1), Raises(ValueError, ("beta",))),
        ("beta_above_one", dict(divergence="jsd", beta=1.5), Raises(ValueError, ("beta",))),
        ("beta_nan", dict(divergence="jsd", beta=NAN), Raises(ValueError, ("beta",))),
        ("soft_weight_negative", dict(soft_weight=-1.0), Raises(ValueError, ("soft_weight",))),
        ("hard_weight_inf", dict(hard_weight=INF), Raises(ValueError, ("hard_weight",))),
        ("label_smoothing_2", dict(label_smoothing=2.0), Raises(ValueError, ("label_smoothing",))),
        ("divergence_unknown", dict(divergence="KL"), Raises(ValueError, ("divergence",))),
        ("reduction_unknown", dict(reduction="avg"), Raises(ValueError, ("reduction",))),
        ("backend_unknown", dict(backend="gpu"), Raises(ValueError, ("backend",))),
        ("t2_scale_int", dict(t2_scale=1), Raises(TypeError, ("t2_scale",))),
        ("ignore_index_float", dict(ignore_index=-100.0), Raises(TypeError, ("ignore_index",))),
        ("ignore_index_beyond_int64", dict(ignore_index=2**70), Raises(ValueError, ("ignore_index",))),
    ]
    for name, kw, expect in bad_args:
        def run(backend, kw=kw):
            kw = dict(kw)
            backend = kw.pop("backend", backend)
            return _report(_kd(entry, backend, S(3, 5), S(3, 5, seed=1), **kw))
        add(entry, name, expect)(run)

    inputs = [
        ("teacher_shape_mismatch", lambda: (S(3, 5), S(4, 5), None), Raises(ValueError, ("teacher_logits",))),
        ("teacher_wrong_rank", lambda: (S(3, 5), S(3, 1, 5), None), Raises(ValueError, ("teacher_logits",))),
        ("student_zero_dim", lambda: (torch.tensor(1.0), torch.tensor(1.0), None), Raises(ValueError, ("student_logits",))),
        ("vocab_zero", lambda: (S(3, 0), S(3, 0), None), Raises(ValueError, ("student_logits",))),
        ("student_int", lambda: (torch.ones(3, 5, dtype=torch.int32), S(3, 5), None), Raises(TypeError, ("student_logits",))),
        ("teacher_complex", lambda: (S(3, 5), torch.ones(3, 5, dtype=torch.complex64), None), Raises(TypeError, ("teacher_logits",))),
        ("student_none", lambda: (None, S(3, 5), None), Raises(TypeError, ("student_logits",))),
        ("student_numpy", lambda: (S(3, 5).cpu().numpy(), S(3, 5), None), Raises(TypeError, ("student_logits",))),
        ("teacher_list_empty", lambda: (S(3, 5), [], None), Raises(ValueError, ("teacher_logits",))),
        ("teacher_list_9", lambda: (S(3, 5), [S(3, 5)] * 9, None), Raises(ValueError, ("teacher_logits",))),
        ("teacher_list_with_none", lambda: (S(3, 5), [S(3, 5), None], None), Raises(TypeError, ("teacher_logits[1]",))),
        ("target_wrong_shape", lambda: (S(3, 5), S(3, 5), torch.tensor([0, 1, 2, 3])), Raises(ValueError, ("target",))),
        ("target_wrong_rank", lambda: (S(3, 5), S(3, 5), torch.tensor([[0], [1], [2]])), Raises(ValueError, ("target",))),
        ("target_float", lambda: (S(3, 5), S(3, 5), torch.zeros(3)), Raises(TypeError, ("target",))),
        ("target_bool", lambda: (S(3, 5), S(3, 5), torch.zeros(3, dtype=torch.bool)), Raises(TypeError, ("target",))),
        ("target_list", lambda: (S(3, 5), S(3, 5), [0, 1, 2]), Raises(TypeError, ("target",))),
        ("target_above_vocab", lambda: (S(3, 5), S(3, 5), torch.tensor([0, 5, 1])), Raises(ValueError, ("target",))),
        ("target_negative", lambda: (S(3, 5), S(3, 5), torch.tensor([0, -1, 1])), Raises(ValueError, ("target",))),
        ("target_huge", lambda: (S(3, 5), S(3, 5), torch.tensor([0, 2**62, 1])), Raises(ValueError, ("target",))),
        ("device_teacher_meta", lambda: (S(3, 5), S(3, 5).to("meta"), None), Raises(RuntimeError, ("teacher_logits", "meta"))),
        ("device_student_meta", lambda: (S(3, 5).to("meta"), S(3, 5), None), Raises(RuntimeError, ("teacher_logits", "meta"))),
        ("device_target_meta", lambda: (S(3, 5), S(3, 5), torch.zeros(3, dtype=torch.long, device="meta")), Raises(RuntimeError, ("target", "meta"))),
        ("student_row_all_neg_inf", lambda: (_with(S(3, 5), 1, -INF), S(3, 5), None), Raises(ValueError, ("student_logits", "-inf"))),
        ("teacher_row_all_neg_inf", lambda: (S(3, 5), _with(S(3, 5), 2, -INF), None), Raises(ValueError, ("teacher_logits", "-inf"))),
        ("float64_forced_native", lambda: (S(3, 5, dtype=torch.float64), S(3, 5, dtype=torch.float64), None), _native_only(RuntimeError, "backend")),
    ]
    for name, make, expect in inputs:
        def run(backend, make=make):
            s, t, y = make()
            return _report(_kd(entry, backend, s, t, y, hard_weight=0.5))
        add(entry, name, expect)(run)

    # Device data checks with hard_weight = 0 (target only decides which rows count).
    def run(backend):
        return _report(_kd(entry, backend, S(3, 5), S(3, 5), torch.tensor([0, 7, 1])))
    add(entry, "target_above_vocab_soft_only", Raises(ValueError, ("target",)))(run)

    # NaN / +-inf rows: NaN in exactly the affected row (reduction="none"), other rows finite.
    for div in ("kl", "reverse_kl", "jsd", "tvd"):
        for side, value, exp in (("student", NAN, "nan"), ("teacher", NAN, "nan"),
                                 ("student", INF, "nonfinite"), ("teacher", INF, "nonfinite")):
            def run(backend, div=div, side=side, value=value):
                s = S(4, 7).requires_grad_()
                t = S(4, 7, seed=1)
                if side == "student":
                    s = _with(s.detach(), (1, 3), value).requires_grad_()
                else:
                    t = _with(t, (1, 3), value)
                loss = _kd(entry, backend, s, t, divergence=div, reduction="none")
                return _report(loss, s, rows_dim=-1)
            exp_ = Returns(nan_rows=(1,)) if exp == "nan" else Returns(nonfinite_rows=(1,))
            tag = "nan" if value != value else "posinf"
            add(entry, f"{tag}_{side}_row_{div}", exp_)(run)

    for side in ("student", "teacher"):
        def run(backend, side=side):  # a row that is NaN everywhere is NaN, not "all -inf"
            s, t = S(3, 6), S(3, 6, seed=1)
            if side == "student":
                s = _with(s, 1, NAN)
            else:
                t = _with(t, 1, NAN)
            s.requires_grad_()
            return _report(_kd(entry, backend, s, t, torch.tensor([0, 1, 2]), hard_weight=0.5,
                               reduction="none"), s, rows_dim=-1)
        add(entry, f"nan_whole_{side}_row", Returns(nan_rows=(1,)))(run)

    def run(backend):  # NaN in the hard term only (soft_weight 0): the row is NaN
        s = _with(S(3, 5), (0, 2), NAN).requires_grad_()
        return _report(_kd(entry, backend, s, S(3, 5), torch.tensor([1, 2, 3]), soft_weight=0.0,
                           hard_weight=1.0, reduction="none"), s, rows_dim=-1)
    add(entry, "nan_student_row_hard_only", Returns(nan_rows=(0,)))(run)

    def run(backend):  # garbage in an ignored row never leaks
        s = _with(S(3, 5), 1, NAN).requires_grad_()
        t = _with(S(3, 5), 1, INF)
        y = torch.tensor([0, -100, 4])
        return _report(_kd(entry, backend, s, t, y, hard_weight=1.0), s)
    add(entry, "nan_in_ignored_row", Returns(finite=True))(run)

    def run(backend):  # an all -inf row that is ignored is no error
        y = torch.tensor([0, -100, 4])
        return _report(_kd(entry, backend, S(3, 5), _with(S(3, 5), 1, -INF), y, hard_weight=1.0))
    add(entry, "neg_inf_row_ignored", Returns(finite=True))(run)

    def run(backend):  # partial -inf masks (same entries in student and teacher) are fine
        s = S(3, 6)
        s[:, [0, 4]] = -INF
        t = S(3, 6, seed=2)
        t[:, [0, 4]] = -INF
        s.requires_grad_()
        return _report(_kd(entry, backend, s, t, torch.tensor([1, 2, 3]), hard_weight=1.0,
                           label_smoothing=0.1, divergence="jsd", reduction="none"), s)
    add(entry, "neg_inf_masked_entries", Returns(finite=True))(run)

    def run(backend):
        s = S(0, 5).requires_grad_()
        return _report(_kd(entry, backend, s, S(0, 5), torch.zeros(0, dtype=torch.long),
                           hard_weight=1.0), s)
    add(entry, "empty_batch_mean", Returns(value=0.0))(run)

    def run(backend):
        return _report(_kd(entry, backend, S(0, 5), S(0, 5), reduction="none"))
    add(entry, "empty_batch_none", Returns(finite=True))(run)

    def run(backend):
        s = S(2, 3, 5).requires_grad_()
        y = torch.full((2, 3), -100)
        return _report(_kd(entry, backend, s, S(2, 3, 5), y, hard_weight=1.0), s)
    add(entry, "all_rows_ignored", Returns(value=0.0))(run)

    for name, temp in (("temperature_large_1e6", 1e6), ("temperature_small_1e-6", 1e-6)):
        def run(backend, temp=temp):
            s = S(3, 5).requires_grad_()
            return _report(_kd(entry, backend, s, S(3, 5, seed=1), temperature=temp), s)
        add(entry, name, Returns(finite=True))(run)

    def run(backend):
        s = S(3, 5, scale=1e30).requires_grad_()
        return _report(_kd(entry, backend, s, S(3, 5, seed=1, scale=1e30), temperature=2.0), s)
    add(entry, "logits_1e30", Returns(finite=True))(run)

    def run(backend):  # two teachers of different dtypes
        s = S(3, 5).requires_grad_()
        return _report(_kd(entry, backend, s, [S(3, 5, seed=1, dtype=torch.bfloat16),
                                               S(3, 5, seed=2, dtype=torch.float16)]), s)
    add(entry, "teachers_mixed_dtypes", Returns(finite=True))(run)

    if entry == "KDLoss":
        for name, kw, expect in (
                ("ctor_temperature_zero", dict(temperature=0.0), Raises(ValueError, ("temperature",))),
                ("ctor_teacher_weights_negative", dict(teacher_weights=[1.0, -1.0]), Raises(ValueError, ("teacher_weights",))),
                ("ctor_backend_unknown", dict(backend="tpu"), Raises(ValueError, ("backend",)))):
            def run(backend, kw=kw):
                import fastkd
                fastkd.KDLoss(**kw)
                return {"loss": []}
            add(entry, name, expect)(run)

    for name, w in (("teacher_weights_negative", [1.0, -1.0]), ("teacher_weights_nan", [1.0, NAN]),
                    ("teacher_weights_count", [1.0]), ("teacher_weights_zero_sum", [0.0, 0.0])):
        def run(backend, w=w):
            return _report(_kd(entry, backend, S(3, 5), [S(3, 5), S(3, 5, seed=1)],
                               teacher_weights=w))
        add(entry, name, Raises(ValueError, ("teacher_weights",)))(run)


# ---- feature KD: FeatureKDLoss and functional.feature_kd_loss --------------------------------
def _feat(entry, backend, x, t, w=None, b=None, *, ds=None, dt=None, adapter=True, **kw):
    import fastkd
    if entry == "FeatureKDLoss":
        mod = fastkd.FeatureKDLoss(ds, dt, bias=b is not None, adapter=adapter, backend=backend,
                                   **kw)
        if adapter:
            with torch.no_grad():
                mod.weight.copy_(w)
                if b is not None:
                    mod.bias.copy_(b)
        return mod(x, t)
    return fastkd.functional.feature_kd_loss(x, t, w, b, backend=backend, **kw)


def _feature_cases(entry):
    S = _t
    W, B = S(3, 4, seed=5), S(3, seed=6)
    functional = entry == "feature_kd_loss"

    def simple(name, make, expect):
        def run(backend):  # modules: FeatureKDLoss(4, 3) with the weight W (and bias B)
            x, t, w, b = make()
            return _report(_feat(entry, backend, x, t, w, b, ds=4, dt=3))
        add(entry, name, expect)(run)

    simple("rows_mismatch", lambda: (S(3, 4), S(2, 3), W, B), Raises(ValueError, ("teacher_feat",)))
    simple("rank_mismatch", lambda: (S(3, 4), S(3, 3, 1), W, B), Raises(ValueError, ("teacher_feat",)))
    simple("student_zero_dim", lambda: (torch.tensor(1.0), torch.tensor(1.0), W, B), Raises(ValueError, ("student_feat",)))
    simple("student_int", lambda: (torch.ones(3, 4, dtype=torch.int64), S(3, 3), W, B), Raises(TypeError, ("student_feat",)))
    simple("teacher_complex", lambda: (S(3, 4), torch.ones(3, 3, dtype=torch.complex64), W, B), Raises(TypeError, ("teacher_feat",)))
    simple("student_none", lambda: (None, S(3, 3), W, B), Raises(TypeError, ("student_feat",)))
    simple("device_teacher_meta", lambda: (S(3, 4), S(3, 3).to("meta"), W, B), Raises(RuntimeError, ("teacher_feat", "meta")))
    simple("device_student_meta", lambda: (S(3, 4).to("meta"), S(3, 3), W, B), Raises(RuntimeError, ("meta",)))
    simple("float64_forced_native", lambda: (S(3, 4, dtype=torch.float64), S(3, 3, dtype=torch.float64), W.double(), B.double()), _native_only(RuntimeError, "backend"))
    if functional:
        simple("weight_wrong_shape", lambda: (S(3, 4), S(3, 3), W.t(), B), Raises(ValueError, ("weight",)))
        simple("bias_wrong_shape", lambda: (S(3, 4), S(3, 3), W, S(4)), Raises(ValueError, ("bias",)))
        simple("weight_int", lambda: (S(3, 4), S(3, 3), torch.ones(3, 4, dtype=torch.int64), None), Raises(TypeError, ("weight",)))
        simple("device_weight_meta", lambda: (S(3, 4), S(3, 3), W.to("meta"), None), Raises(RuntimeError, ("weight", "meta")))
        simple("bias_without_weight", lambda: (S(3, 3), S(3, 3), None, B), Raises(ValueError, ("bias",)))
        simple("no_adapter_channel_mismatch", lambda: (S(3, 4), S(3, 3), None, None), Raises(ValueError, ("channels",)))
        simple("zero_channels", lambda: (S(3, 0), S(3, 0), None, None), Raises(ValueError, ("channel",)))
    else:
        simple("student_channels_wrong", lambda: (S(3, 5), S(3, 3), W, B), Raises(ValueError, ("student_feat", "student_dim")))
        simple("teacher_channels_wrong", lambda: (S(3, 4), S(3, 2), W, B), Raises(ValueError, ("teacher_feat", "teacher_dim")))
        for name, kw, expect in (("ctor_student_dim_zero", dict(student_dim=0), Raises(ValueError, ("student_dim",))),
                                 ("ctor_teacher_dim_float", dict(teacher_dim=3.0), Raises(ValueError, ("teacher_dim",))),
                                 ("ctor_no_adapter_dims", dict(adapter=False, bias=False), Raises(ValueError, ("adapter",))),
                                 ("ctor_bias_not_bool", dict(bias=1), Raises(TypeError, ("bias",)))):
            def run(backend, kw=kw):
                import fastkd
                args = dict(student_dim=4, teacher_dim=3)
                args.update(kw)
                fastkd.FeatureKDLoss(**args)
                return {"loss": []}
            add(entry, name, expect)(run)

        def run(backend):
            import fastkd
            mod = fastkd.FeatureKDLoss(4, 3, backend=backend).to("meta")
            return _report(mod(S(3, 4), S(3, 3)))
        add(entry, "device_weight_meta", Raises(RuntimeError, ("weight", "meta")))(run)
    for name, kw, expect in (("channel_dim_out_of_range", dict(channel_dim=2), Raises(ValueError, ("channel_dim",))),
                             ("channel_dim_float", dict(channel_dim=1.0), Raises(TypeError, ("channel_dim",))),
                             ("loss_unknown", dict(loss="l1"), Raises(ValueError, ("loss",))),
                             ("reduction_unknown", dict(reduction="avg"), Raises(ValueError, ("reduction",))),
                             ("backend_unknown", dict(backend="gpu"), Raises(ValueError, ("backend",))),
                             ("chunk_size_zero", dict(chunk_size=0), Raises(ValueError, ("chunk_size",)))):
        def run(backend, kw=kw):
            kw = dict(kw)
            backend = kw.pop("backend", backend)
            return _report(_feat(entry, backend, S(3, 4), S(3, 3), W, B, ds=4, dt=3, **kw))
        add(entry, name, expect)(run)

    for loss in ("mse", "cosine"):
        for side, value in (("student", NAN), ("teacher", NAN), ("student", INF), ("teacher", -INF)):
            def run(backend, loss=loss, side=side, value=value):
                x, t = S(4, 4), S(4, 3, seed=1)
                if side == "student":
                    x = _with(x, (2, 1), value)
                else:
                    t = _with(t, (2, 1), value)
                x.requires_grad_()
                out = _feat(entry, backend, x, t, W, B, ds=4, dt=3, loss=loss, reduction="none")
                return _report(out, x, rows_dim=-1)
            exp = Returns(nan_rows=(2,)) if value != value or loss == "cosine" \
                else Returns(nonfinite_rows=(2,))
            tag = "nan" if value != value else ("posinf" if value > 0 else "neginf")
            add(entry, f"{tag}_{side}_row_{loss}", exp)(run)

    def run(backend):  # NCHW maps with a NaN pixel: only that position's row is NaN
        x = _with(S(2, 4, 3, 3), (1, 0, 2, 2), NAN).requires_grad_()
        out = _feat(entry, backend, x, S(2, 3, 3, 3, seed=1), W, B, ds=4, dt=3, channel_dim=1,
                    reduction="none")
        return _report(out)
    add(entry, "nan_pixel_nchw", Returns(nan_rows=(17,)))(run)

    for loss in ("mse", "cosine"):
        def run(backend, loss=loss):
            x = S(0, 4).requires_grad_()
            return _report(_feat(entry, backend, x, S(0, 3), W, B, ds=4, dt=3, loss=loss), x)
        add(entry, f"empty_batch_{loss}", Returns(value=0.0))(run)

    def run(backend):  # all-zero rows (cosine clamps the norms: no NaN)
        x = torch.zeros(3, 4, requires_grad=True)
        return _report(_feat(entry, backend, x, torch.zeros(3, 3), W, torch.zeros(3), ds=4,
                             dt=3, loss="cosine"), x)
    add(entry, "zero_rows_cosine", Returns(finite=True))(run)


# ---- relation KD: SPLoss / RKDLoss / PKTLoss and their functionals ---------------------------
def _rel(entry, backend, s, t, **kw):
    import fastkd
    if entry in ("SPLoss", "RKDLoss", "PKTLoss"):
        return getattr(fastkd, entry)(backend=backend, **kw)(s, t)
    return getattr(fastkd.functional, entry)(s, t, backend=backend, **kw)


def _relation_cases(entry):
    S = _t

    def simple(name, make, expect, **kw):
        def run(backend):
            s, t = make()
            kw2 = dict(kw)
            backend = kw2.pop("backend", backend)
            return _report(_rel(entry, backend, s, t, **kw2))
        add(entry, name, expect)(run)

    simple("batch_one", lambda: (S(1, 3), S(1, 3)), Raises(ValueError, ("student_features",)))
    simple("batch_zero", lambda: (S(0, 3), S(0, 3)), Raises(ValueError, ("student_features",)))
    simple("student_zero_dim", lambda: (torch.tensor(1.0), torch.tensor(1.0)), Raises(ValueError, ("student_features",)))
    simple("batch_mismatch", lambda: (S(4, 3), S(5, 3)), Raises(ValueError, ("teacher_features",)))
    simple("student_int", lambda: (torch.ones(4, 3, dtype=torch.int32), S(4, 3)), Raises(TypeError, ("student_features",)))
    simple("teacher_complex", lambda: (S(4, 3), torch.ones(4, 3, dtype=torch.complex64)), Raises(TypeError, ("teacher_features",)))
    simple("teacher_none", lambda: (S(4, 3), None), Raises(TypeError, ("teacher_features",)))
    simple("device_teacher_meta", lambda: (S(4, 3), S(4, 3).to("meta")), Raises(RuntimeError, ("teacher_features", "meta")))
    simple("float64_forced_native", lambda: (S(4, 3, dtype=torch.float64), S(4, 3, dtype=torch.float64)), _native_only(RuntimeError, "backend"))
    simple("reduction_none", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("reduction",)), reduction="none")
    simple("reduction_unknown", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("reduction",)), reduction="avg")
    simple("backend_unknown", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("backend",)), backend="gpu")
    if entry in ("RKDLoss", "rkd_loss"):
        simple("distance_weight_negative", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("distance_weight",)), distance_weight=-1.0)
        simple("angle_weight_nan", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("angle_weight",)), angle_weight=NAN)
        simple("angle_weight_str", lambda: (S(4, 3), S(4, 3)), Raises(TypeError, ("angle_weight",)), angle_weight="2")
    if entry in ("PKTLoss", "pkt_loss"):
        simple("eps_zero", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("eps",)), eps=0.0)
        simple("eps_nan", lambda: (S(4, 3), S(4, 3)), Raises(ValueError, ("eps",)), eps=NAN)
    for side, value in (("student", NAN), ("teacher", NAN), ("student", INF), ("teacher", -INF)):
        def run(backend, side=side, value=value):
            s, t = S(5, 3), S(5, 4, seed=1)
            if side == "student":
                s = _with(s, (2, 1), value)
            else:
                t = _with(t, (2, 1), value)
            s.requires_grad_()
            return _report(_rel(entry, backend, s, t), s)
        tag = "nan" if value != value else ("posinf" if value > 0 else "neginf")
        add(entry, f"{tag}_{side}", Returns(nonfinite=True))(run)
    for name, make in (("zero_features", lambda: (torch.zeros(4, 3), torch.zeros(4, 5))),
                       ("duplicate_rows", lambda: (torch.ones(4, 3), S(4, 5))),
                       ("zero_width", lambda: (S(4, 0), S(4, 2))),
                       ("one_d_features", lambda: (S(4), S(4, seed=1)))):
        def run(backend, make=make):
            s, t = make()
            s.requires_grad_()
            return _report(_rel(entry, backend, s, t), s)
        add(entry, name, Returns(finite=True))(run)


# ---- FusedLinearKDLoss (when present) --------------------------------------------------------
def _flkd(entry, backend, hs, ws, ht=None, wt=None, target=None, **kw):
    import fastkd
    if entry == "FusedLinearKDLoss":
        return fastkd.FusedLinearKDLoss(backend=backend, **kw)(hs, ws, ht, wt, target)
    return fastkd.functional.fused_linear_kd_loss(hs, ws, ht, wt, target, backend=backend, **kw)


def _fused_linear_cases(entry):
    S = _t

    def simple(name, make, expect, **kw):
        def run(backend):
            args = make()
            kw2 = dict(kw)
            backend = kw2.pop("backend", backend)
            return _report(_flkd(entry, backend, *args, **kw2))
        add(entry, name, expect)(run)

    ok = lambda: (S(3, 4), S(6, 4, seed=1), S(3, 5, seed=2), S(6, 5, seed=3))  # noqa: E731
    simple("temperature_zero", ok, Raises(ValueError, ("temperature",)), temperature=0.0)
    simple("temperature_huge_1e300", ok, Raises(ValueError, ("temperature",)), temperature=1e300)
    simple("divergence_unknown", ok, Raises(ValueError, ("divergence",)), divergence="x")
    simple("reduction_unknown", ok, Raises(ValueError, ("reduction",)), reduction="avg")
    simple("backend_unknown", ok, Raises(ValueError, ("backend",)), backend="gpu")
    simple("student_weight_wrong_hidden", lambda: (S(3, 4), S(6, 5), S(3, 5), S(6, 5)), Raises(ValueError, ("student_weight",)))
    simple("student_hidden_zero_dim", lambda: (torch.tensor(1.0), S(6, 4), S(3, 5), S(6, 5)), Raises(ValueError, ("student_hidden",)))
    simple("student_hidden_int", lambda: (torch.ones(3, 4, dtype=torch.int64), S(6, 4), S(3, 5), S(6, 5)), Raises(TypeError, ("student_hidden",)))
    simple("teacher_rows_mismatch", lambda: (S(3, 4), S(6, 4), S(2, 5), S(6, 5)), Raises(ValueError, ("teacher_hidden",)))
    simple("teacher_missing", lambda: (S(3, 4), S(6, 4), None, None), Raises(ValueError, ("teacher",)))
    simple("device_teacher_meta", lambda: (S(3, 4), S(6, 4), S(3, 5).to("meta"), S(6, 5).to("meta")), Raises(RuntimeError, ("meta",)))
    simple("target_out_of_range", lambda: (S(3, 4), S(6, 4), S(3, 5), S(6, 5), torch.tensor([0, 9, 1])), Raises(ValueError, ("target",)), hard_weight=1.0)
    simple("target_float", lambda: (S(3, 4), S(6, 4), S(3, 5), S(6, 5), torch.zeros(3)), Raises(TypeError, ("target",)))

    def run(backend):
        hs = _with(S(3, 4), 1, NAN).requires_grad_()
        return _report(_flkd(entry, backend, hs, S(6, 4, seed=1), S(3, 5, seed=2),
                             S(6, 5, seed=3), reduction="none"), hs, rows_dim=-1)
    add(entry, "nan_student_hidden_row", Returns(nan_rows=(1,)))(run)

    def run(backend):
        hs = S(0, 4).requires_grad_()
        return _report(_flkd(entry, backend, hs, S(6, 4), S(0, 5), S(6, 5)), hs)
    add(entry, "empty_batch", Returns(value=0.0))(run)


def build_table():
    CASES.clear()
    import fastkd
    for entry in ("KDLoss", "kd_loss"):
        _logit_cases(entry)
    for entry in ("FeatureKDLoss", "feature_kd_loss"):
        _feature_cases(entry)
    for entry in ("SPLoss", "sp_loss", "RKDLoss", "rkd_loss", "PKTLoss", "pkt_loss"):
        _relation_cases(entry)
    if hasattr(fastkd, "FusedLinearKDLoss"):
        _fused_linear_cases("FusedLinearKDLoss")
    if hasattr(fastkd.functional, "fused_linear_kd_loss"):
        _fused_linear_cases("fused_linear_kd_loss")
    return CASES


def public_entry_points():
    """Every public module class (fastkd.__all__) and functional (fastkd.functional.__all__)."""
    import fastkd
    mods = {n for n in fastkd.__all__
            if isinstance(getattr(fastkd, n), type) and issubclass(getattr(fastkd, n), torch.nn.Module)}
    return mods | set(fastkd.functional.__all__)


# --------------------------------------------------------------------------------- the child
MODULES = ("KDLoss", "FusedLinearKDLoss", "FeatureKDLoss", "SPLoss", "RKDLoss", "PKTLoss")
SKIP_INTERPRETED = ("the Triton CPU interpreter is slow: NaN/inf propagation through the module "
                    "classes (a thin wrapper over the functional) is run by the functional's "
                    "case here, and by both on cpu/reference (and on GPU)")


def _module_duplicate(case):
    return case.entry in MODULES and case.name.startswith(("nan_", "posinf_", "neginf_"))


def child_main(backend):
    """Run the whole table on ``backend``, one JSON line per case (flushed before the next)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import warnings
    warnings.simplefilter("ignore")
    import fastkd  # noqa: F401
    global DEVICE
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        DEVICE = "cuda"
        torch.set_default_device("cuda")
    out = sys.stdout
    for case in build_table():
        out.write(json.dumps({"start": case.id}) + "\n")
        out.flush()
        t0 = time.perf_counter()
        if backend == "triton" and not torch.cuda.is_available() and _module_duplicate(case):
            out.write(json.dumps({"id": case.id, "skipped": SKIP_INTERPRETED}) + "\n")
            continue
        try:
            rec = case.run(backend)
        except Exception as exc:  # noqa: BLE001 - the type is what the table checks
            rec = {"raised": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                   "msg": str(exc)[:500]}
        rec["id"] = case.id
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        out.write(json.dumps(rec) + "\n")
        out.flush()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    child_main(sys.argv[2])
    sys.exit(0)


# --------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402

from _helpers import backends_for  # noqa: E402


def _available():
    """cpu and reference, triton under the interpreter without a GPU; cuda and triton with one."""
    return [b for b in BACKENDS if b == "reference" or b in backends_for("cpu")] + \
        [b for b in ("cuda", "triton") if b in backends_for("cuda")]


_CHILDREN: dict = {}


def _start_children():
    if _CHILDREN:
        return
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1" if not torch.cuda.is_available() else "0")
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    for backend in _available():
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "test_hostile.py"), "--child",
                                 backend], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=os.path.dirname(HERE))
        _CHILDREN[backend] = {"proc": proc}


def _results(backend):
    """The child's records by case id, plus how it ended (runs all children in parallel)."""
    _start_children()
    ch = _CHILDREN[backend]
    if "records" not in ch:
        try:
            stdout, stderr = ch["proc"].communicate(timeout=600)
        except subprocess.TimeoutExpired:
            ch["proc"].kill()
            stdout, stderr = ch["proc"].communicate()
        records, started = {}, None
        for line in stdout.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in rec:
                started = rec["start"]
            else:
                records[rec["id"]] = rec
        ch["records"] = records
        ch["rc"] = ch["proc"].returncode
        ch["crashed_in"] = started if started not in records else None
        ch["stderr"] = stderr[-3000:]
    return ch


TABLE = build_table()


def test_table_covers_every_public_entry_point():
    """Every public module class and functional appears in the table, each with >= 10 cases."""
    entries = {}
    for c in TABLE:
        entries[c.entry] = entries.get(c.entry, 0) + 1
    missing = public_entry_points() - set(entries)
    assert not missing, f"public entry points without hostile-input cases: {sorted(missing)}"
    thin = {e: n for e, n in entries.items() if n < 10}
    assert not thin, f"entry points with fewer than 10 cases: {thin}"
    ids = [c.id for c in TABLE]
    assert len(ids) == len(set(ids)), "duplicate case ids"


@pytest.mark.parametrize("backend", _available())
def test_child_did_not_crash(backend):
    ch = _results(backend)
    assert ch["rc"] == 0 and ch["crashed_in"] is None, (
        f"the {backend} child died (rc={ch['rc']}) in case {ch['crashed_in']}:\n{ch['stderr']}")
    assert len(ch["records"]) == len(TABLE), (len(ch["records"]), len(TABLE))
    slow = sorted(((r.get("seconds", 0.0), k) for k, r in ch["records"].items()), reverse=True)
    print(f"\n[hostile] {backend}: {len(TABLE)} cases, slowest {slow[:3]}")


@pytest.mark.parametrize("backend", _available())
@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.id)
def test_hostile_input(backend, case):
    ch = _results(backend)
    rec = ch["records"].get(case.id)
    if rec is None:
        pytest.fail(f"no result: the {backend} child died (rc={ch['rc']}) in case "
                    f"{ch['crashed_in']}:\n{ch['stderr']}")
    if "skipped" in rec:
        pytest.skip(rec["skipped"])
    case.expectation(backend).check(rec)
