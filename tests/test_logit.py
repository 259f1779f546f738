"""Fused logit KD (SPEC §1, §1c, §Errors): every fused backend against the float64 reference."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import kd_loss
from _helpers import HALF, assert_close_grad, assert_close_loss, backend_params, backends_for

DIVS = ["kl", "reverse_kl", "jsd", "tvd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _vocab_sizes(backend):
    # Triton runs in the (slow) interpreter on CPU: small vocabularies only.
    if backend == "triton" and not torch.cuda.is_available():
        return [2, 7, 1000]
    return [2, 7, 1000, 32003]


def _case(n, vocab, dtype, device, *, n_teachers=1, scale=3.0, seed=0, mask=False, ignore=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    ts = [(torch.randn(n, vocab, generator=g) * scale).to(dtype) for _ in range(n_teachers)]
    y = torch.randint(0, vocab, (n,), generator=g)
    if ignore and n > 1:
        y[1] = -100
    if mask and vocab > 2:
        # Masked vocabulary entries, shared by student and teachers (never the target).
        cols = torch.tensor([0, vocab - 1])
        y[y == 0] = 1
        y[y == vocab - 1] = 1
        s[:, cols] = -math.inf
        for t in ts:
            t[:, cols] = -math.inf
    return s.to(device), [t.to(device) for t in ts], y.to(device)


def _run(backend, s, ts, y, *, teacher_grad=False, grad_out=None, **kw):
    """Loss and gradients on `backend` and on the float64 reference of the same rounded inputs."""
    out = {}
    for name in (backend, "reference"):
        sx = (s.double() if name == "reference" else s.clone()).requires_grad_()
        tx = [(t.double() if name == "reference" else t.clone()).requires_grad_(teacher_grad)
              for t in ts]
        loss = kd_loss(sx, tx if len(tx) > 1 else tx[0], y, backend=name, **kw)
        go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss)
        loss.backward(go)
        out[name] = (loss, sx.grad, [t.grad for t in tx])
    return out[backend], out["reference"]


def _check(got, ref, dtype):
    (loss, gs, gts), (rloss, rgs, rgts) = got, ref
    assert loss.dtype == torch.float32
    assert_close_loss(loss, rloss, dtype)
    assert_close_grad(gs, rgs, dtype, "student grad")
    for i, (g, r) in enumerate(zip(gts, rgts)):
        if r is not None:
            assert_close_grad(g, r, dtype, f"teacher[{i}] grad")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVS)
def test_matches_reference(backend, device, dtype, divergence):
    """Values and student gradients for every V, T, with and without target / hard CE."""
    temps = [0.5, 1.0, 4.0, 20.0]
    for k, (vocab, with_target) in enumerate(itertools.product(_vocab_sizes(backend),
                                                               [False, True])):
        n = 3 if backend == "triton" else 6
        s, ts, y = _case(n, vocab, dtype, device, seed=k)
        kw = dict(temperature=temps[k % 4], divergence=divergence, beta=0.3)
        if with_target:
            kw.update(hard_weight=0.5, label_smoothing=0.1 if k % 2 else 0.0)
        got, ref = _run(backend, s, ts, y if with_target else None, **kw)
        _check(got, ref, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("divergence", DIVS)
def test_teacher_grad_and_two_teachers(backend, device, divergence):
    """Gradients to teachers that require grad (mutual distillation), one and two teachers."""
    vocab = 7 if backend == "triton" else 1000
    for n_teachers, dtype in [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)]:
        s, ts, y = _case(4, vocab, dtype, device, n_teachers=n_teachers, seed=n_teachers)
        kw = dict(temperature=2.0, divergence=divergence, beta=0.7, hard_weight=0.3)
        if n_teachers == 2:
            kw["teacher_weights"] = [3.0, 1.0]
        got, ref = _run(backend, s, ts, y, teacher_grad=True, **kw)
        _check(got, ref, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_masked_vocab_and_extreme_logits(backend, device):
    """-inf entries (masked vocabulary) and logits of +-1e4 stay finite and exact."""
    vocab = 7 if backend == "triton" else 1003
    for divergence, dtype in itertools.product(DIVS, DTYPES):
        s, ts, y = _case(4, vocab, dtype, device, mask=True, seed=3)
        got, ref = _run(backend, s, ts, y, teacher_grad=True, divergence=divergence,
                        temperature=2.0, hard_weight=1.0, label_smoothing=0.2)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
        _check(got, ref, dtype)
        s, ts, y = _case(4, vocab, dtype, device, scale=1e4, seed=4)
        for temp in (0.5, 1.0, 20.0):
            got, ref = _run(backend, s, ts, y, divergence=divergence, temperature=temp,
                            hard_weight=0.5)
            assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
            _check(got, ref, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_two_teachers_masked_vocab(backend, device):
    """Several teachers sharing a masked vocabulary: finite gradients for every teacher."""
    vocab = 7 if backend == "triton" else 501
    for divergence in DIVS:
        s, ts, y = _case(4, vocab, torch.float32, device, n_teachers=2, mask=True, seed=9)
        got, ref = _run(backend, s, ts, y, teacher_grad=True, divergence=divergence,
                        teacher_weights=[0.6, 0.4], temperature=2.0, hard_weight=0.5)
        assert all(torch.isfinite(g).all() for g in got[2])
        _check(got, ref, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_reductions_and_grad_output(backend, device, reduction):
    """grad_output != 1 (scalar and per row) scales the saved gradient; leading dims kept."""
    vocab = 7 if backend == "triton" else 257
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, vocab, generator=g).to(device)
    t = torch.randn(2, 3, vocab, generator=g).to(device)
    y = torch.randint(0, vocab, (2, 3), generator=g).to(device)
    y[0, 1] = -100
    lead = (2, 3)
    go = torch.randn(lead, generator=g) if reduction == "none" else torch.tensor(-2.5)
    got, ref = _run(backend, s, [t], y, grad_out=go.to(device), reduction=reduction,
                    temperature=1.5, hard_weight=1.0)
    if reduction == "none":
        assert got[0].shape == lead and got[0][0, 1] == 0
    else:
        assert got[0].shape == ()
    _check(got, ref, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
def test_ignore_index_rows_and_all_ignored(backend, device):
    vocab = 7 if backend == "triton" else 100
    s, ts, y = _case(5, vocab, torch.float32, device)
    y[:] = -100
    for reduction in ("mean", "sum", "none"):
        sx = s.clone().requires_grad_()
        loss = kd_loss(sx, ts[0], y, hard_weight=1.0, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert torch.all(loss == 0) and torch.all(sx.grad == 0)
    # a custom ignore_index
    y = torch.tensor([3, 3, 1, 3, 0], device=device)
    got, ref = _run(backend, s, ts, y, ignore_index=3, hard_weight=1.0)
    _check(got, ref, torch.float32)
    # Garbage (NaN, -inf everywhere) in ignored rows must not leak into the result.
    s2 = s.clone()
    s2[0] = float("nan")
    s2[1] = -math.inf
    got, ref = _run(backend, s2, ts, y, ignore_index=3)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    _check(got, ref, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
def test_noncontiguous_inputs(backend, device):
    vocab = 7 if backend == "triton" else 300
    g = torch.Generator().manual_seed(7)
    big_s = torch.randn(6, 2 * vocab, generator=g).to(device)
    big_t = torch.randn(vocab, 6, generator=g).to(device)
    s = big_s[:, ::2]            # vocabulary stride 2
    t = big_t.t()                # transposed
    s_rows = big_s[::2, :vocab]  # row stride, unit vocabulary stride: read in place
    y = torch.randint(0, vocab, (6,), generator=g).to(device)
    got, ref = _run(backend, s, [t], y, hard_weight=0.5, temperature=2.0)
    _check(got, ref, torch.float32)
    got, ref = _run(backend, s_rows, [t[:3]], y[:3], temperature=2.0)
    _check(got, ref, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
def test_nan_propagates_to_its_row(backend, device):
    vocab = 7 if backend == "triton" else 64
    s, ts, y = _case(4, vocab, torch.float32, device, ignore=False)
    s[2, 3] = float("nan")
    loss = kd_loss(s, ts[0], y, reduction="none", hard_weight=1.0, backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_data_dependent_errors(backend, device):
    vocab = 7
    s, ts, y = _case(3, vocab, torch.float32, device, ignore=False)
    with pytest.raises(ValueError, match="target"):
        kd_loss(s, ts[0], torch.tensor([0, vocab, 1], device=device), backend=backend)
    with pytest.raises(ValueError, match="target"):
        kd_loss(s, ts[0], torch.tensor([0, -3, 1], device=device), backend=backend)
    bad = s.clone()
    bad[1] = -math.inf
    with pytest.raises(ValueError, match="student_logits"):
        kd_loss(bad, ts[0], backend=backend)
    bad = ts[0].clone()
    bad[2] = -math.inf
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(s, bad, backend=backend)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] == "cpu"])
def test_large_vocab_cpu(backend, device):
    """V = 131,072 in one call (SPEC: up to 262,144)."""
    for dtype in (torch.float32, torch.bfloat16):
        s, ts, y = _case(3, 131072, dtype, device)
        got, ref = _run(backend, s, ts, y, temperature=2.0, hard_weight=0.5)
        _check(got, ref, dtype)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 4])
    for divergence in ["kl", "reverse_kl", "jsd"]:
        fn = lambda a, b, c: kd_loss(a, [b, c], y, divergence=divergence, temperature=1.7,  # noqa
                                     hard_weight=0.4, label_smoothing=0.1, beta=0.4,
                                     teacher_weights=[0.25, 0.75], backend="reference")
        assert torch.autograd.gradcheck(fn, (s, t, t2))
    # TVD is piecewise smooth: check away from p == q ties (random inputs have none).
    fn = lambda a, b: kd_loss(a, b, divergence="tvd", backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))


def test_reference_matches_stock_formula():
    """KDLoss(T, hard_weight=1) is the stock KL*T^2 + CE line it replaces."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(8, 50, generator=g, dtype=torch.float64)
    t = torch.randn(8, 50, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (8,), generator=g)
    temp = 4.0
    stock = F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1),
                     reduction="batchmean") * temp * temp + F.cross_entropy(s, y, label_smoothing=0.1)
    ours = fastkd.KDLoss(temperature=temp, hard_weight=1.0, label_smoothing=0.1,
                         backend="reference")(s, t, y)
    torch.testing.assert_close(ours, stock)
    # beta = 0 / 1 of JSD are exactly KL / reverse KL
    for beta, div in [(0.0, "kl"), (1.0, "reverse_kl")]:
        a = kd_loss(s, t, divergence="jsd", beta=beta, backend="reference")
        b = kd_loss(s, t, divergence=div, backend="reference")
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", backend_params())
def test_module_and_second_backward(backend, device):
    s, ts, y = _case(4, 16, torch.float32, device)
    m = fastkd.KDLoss(temperature=2.0, hard_weight=0.5, backend=backend)
    assert "temperature=2.0" in repr(m)
    sx = s.clone().requires_grad_()
    loss = m(sx, ts[0], y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ---- SPEC §Errors: one test per bad input ---------------------------------------------------
S = torch.randn(4, 10)
T = torch.randn(4, 10)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(soft_weight=-1.0), ValueError, "soft_weight"),
    (dict(hard_weight=float("nan")), ValueError, "hard_weight"),
    (dict(divergence="kld"), ValueError, "divergence"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kd_loss(S, T, **kwargs)
    ctor = {k: v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        fastkd.KDLoss(**ctor)


@pytest.mark.parametrize("args,exc,match", [
    ((S, torch.randn(4, 1, 10)), ValueError, "teacher_logits"),
    ((S, torch.randn(5, 10)), ValueError, "teacher_logits"),
    ((S, T, torch.zeros(3, dtype=torch.long)), ValueError, "target"),
    ((S, T, torch.zeros(4)), TypeError, "target"),
    ((S.long(), T), TypeError, "student_logits"),
    ((S, T.to(torch.complex64)), TypeError, "teacher_logits"),
    ((torch.randn(4, 0), torch.randn(4, 0)), ValueError, "V >= 1"),
    ((S, []), ValueError, "teacher_logits"),
    ((S, [T, T.int()]), TypeError, r"teacher_logits\[1\]"),
])
def test_bad_tensors(args, exc, match):
    with pytest.raises(exc, match=match):
        kd_loss(*args)


def test_bad_teacher_weights():
    with pytest.raises(ValueError, match="teacher_weights"):
        kd_loss(S, [T, T], teacher_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="teacher_weights"):
        kd_loss(S, [T, T], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="teacher_weights"):
        kd_loss(S, [T, T], teacher_weights=[1.0, float("inf")])


def test_device_mismatch():
    if not torch.cuda.is_available():
        meta_t = T.to("meta")
        with pytest.raises(RuntimeError, match="same device"):
            kd_loss(S, meta_t)
    else:
        with pytest.raises(RuntimeError, match="same device"):
            kd_loss(S, T.cuda())


def test_forced_unavailable_backend_is_an_error():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            kd_loss(S, T, backend="cuda")
    info = fastkd.available_backends()
    assert set(info) >= {"cuda", "triton", "cpu", "reference", "build"}
    for name in ("cuda", "triton", "cpu", "reference"):
        assert isinstance(info[name]["available"], bool) and info[name]["reason"]


def test_fp64_needs_reference():
    if "cpu" in backends_for("cpu"):
        with pytest.raises(RuntimeError, match="float64"):
            kd_loss(S.double(), T.double(), backend="cpu")
    # auto falls back to the exact reference for float64
    assert kd_loss(S.double(), T.double()).dtype == torch.float64


def test_empty_batch():
    s = torch.randn(0, 10, requires_grad=True)
    loss = kd_loss(s, torch.randn(0, 10))
    loss.backward()
    assert loss.item() == 0 and s.grad.shape == (0, 10)
