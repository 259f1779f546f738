"""Relation KD (SPEC §3): SP, RKD, PKT against the float64 reference, on every available backend.

The cpu/cuda tests need the compiled extension with the relation kernels (skipped otherwise); the
Triton tests run on CUDA, or on CPU under TRITON_INTERPRET=1 with small batches only.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastkd import _backend
from fastkd.relation import ops as R
from fastkd.relation import reference as ref
from fastkd.relation.module import PKTLoss, RKDLoss, SPLoss

HAS_EXT = R.ext_has_relation_ops()
HAS_GPU = torch.cuda.is_available()
TRITON_OK = _backend._reason("triton", torch.device("cuda" if HAS_GPU else "cpu")) is None

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fastkd._C is not built with the relation kernels")


def _backend_params():
    out = [pytest.param("cpu", marks=needs_ext)]
    out.append(pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")))
    out.append(pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (HAS_GPU and HAS_EXT and _backend._reason("cuda", torch.device("cuda")) is None),
        reason="needs a CUDA device and the CUDA kernels")]))
    return out


def _device(backend):
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return "cuda"
    return "cpu"


def _max_batch(backend):
    # Triton under the CPU interpreter is slow: keep it to small batches.
    return 17 if backend == "triton" and not HAS_GPU else 1000


LOSSES = {
    "sp": (R.sp_loss, ref.sp_loss_reference, {}),
    "rkd": (R.rkd_loss, ref.rkd_loss_reference, {"distance_weight": 1.0, "angle_weight": 2.0}),
    "rkd_dist": (R.rkd_loss, ref.rkd_loss_reference, {"distance_weight": 1.0, "angle_weight": 0.0}),
    "pkt": (R.pkt_loss, ref.pkt_loss_reference, {"eps": 1e-7}),
}


def _reference(loss, s, t, reduction="mean"):
    _, fn, kw = LOSSES[loss]
    if loss.startswith("rkd"):
        return fn(s, t, kw["distance_weight"], kw["angle_weight"], reduction)
    if loss == "pkt":
        return fn(s, t, kw["eps"], reduction)
    return fn(s, t, reduction)


def _fused(loss, s, t, backend, reduction="mean"):
    fn, _, kw = LOSSES[loss]
    return fn(s, t, reduction=reduction, backend=backend, **kw)


def _input_rounding_spread(loss, s64, t64, reduction, want, trials=4):
    """max |L(x (1 + e)) - L(x)| over random relative perturbations e ~ 2^-24 of the inputs."""
    g = torch.Generator().manual_seed(0)
    out = 0.0
    for _ in range(trials):
        ps = s64 * (1 + torch.randn(s64.shape, generator=g, dtype=torch.float64) * 2.0 ** -24)
        pt = t64 * (1 + torch.randn(t64.shape, generator=g, dtype=torch.float64) * 2.0 ** -24)
        out = max(out, abs(_reference(loss, ps, pt, reduction).item() - want.item()))
    return out


def _compare(loss, xs, xt, backend, *, teacher_grad=True, reduction="mean", loss_tol=None,
             grad_tol=None):
    """Fused loss and gradients vs the float64 reference on the same (rounded) inputs."""
    low = xs.dtype != torch.float32 or xt.dtype != torch.float32
    loss_tol = loss_tol or (1e-4 if low else 1e-5)
    grad_tol = grad_tol or (1e-2 if low else 1e-4)
    s64 = xs.detach().double().requires_grad_()
    t64 = xt.detach().double().requires_grad_(teacher_grad)
    want = _reference(loss, s64, t64, reduction)
    want_grads = torch.autograd.grad(want, [s64, t64] if teacher_grad else [s64])
    s = xs.detach().clone().requires_grad_()
    t = xt.detach().clone().requires_grad_(teacher_grad)
    got = _fused(loss, s, t, backend, reduction)
    assert got.dtype == torch.float32 and got.dim() == 0
    got.backward()
    err = abs(got.item() - want.item())
    if err > loss_tol * abs(want.item()) + 1e-12:
        # A loss made of differences of O(1) normalised quantities (RKD on a few rows) can be
        # smaller than the float32 rounding of those quantities allows to resolve: then the
        # bound is how far the float64 loss itself moves when the inputs move by float32
        # rounding (the loss's own conditioning), not the relative SPEC tolerance.
        spread = _input_rounding_spread(loss, s64.detach(), t64.detach(), reduction, want)
        assert err <= loss_tol * abs(want.item()) + 4 * spread + 1e-12, \
            (got.item(), want.item(), spread)
    # A gradient that is ~0 by cancellation is held to float32 rounding of the larger one.
    floor = 1e-6 * max(w.norm().item() for w in want_grads) + 1e-10
    for g, w, x in zip([s.grad, t.grad], want_grads, [xs, xt]):
        assert g.dtype == x.dtype and g.shape == x.shape
        err = (g.double() - w).norm().item()
        assert err <= grad_tol * w.norm().item() + floor, (err, w.norm().item())
    if not teacher_grad:
        assert t.grad is None


def _features(b, d, dtype, device, *, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=gen) + offset).to(dtype).to(device)


# ------------------------------------------------------------------------- reference = paper code
def _stock_sp(fs, ft):
    b = fs.shape[0]
    gs = F.normalize(fs.reshape(b, -1) @ fs.reshape(b, -1).t())
    gt = F.normalize(ft.reshape(b, -1) @ ft.reshape(b, -1).t())
    return ((gt - gs) ** 2).sum() / (b * b)


def _stock_pdist(e):
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def _stock_rkd(s, t, wd, wa):
    ds, dt = _stock_pdist(s), _stock_pdist(t)
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
    loss_d = F.smooth_l1_loss(ds, dt)

    def angle(e):
        u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(u, u.transpose(1, 2)).reshape(-1)

    return wd * loss_d + wa * F.smooth_l1_loss(angle(s), angle(t))


def _stock_pkt(s, t, eps=1e-7):
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    ps, pt = (s @ s.t() + 1) / 2, (t @ t.t() + 1) / 2
    ps, pt = ps / ps.sum(1, keepdim=True), pt / pt.sum(1, keepdim=True)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def test_reference_matches_the_published_formulas():
    s = _features(23, 7, torch.float64, "cpu", offset=0.5)
    t = _features(23, 11, torch.float64, "cpu", seed=1)
    torch.testing.assert_close(ref.sp_loss_reference(s, t), _stock_sp(s, t))
    torch.testing.assert_close(ref.rkd_loss_reference(s, t, 1.0, 2.0), _stock_rkd(s, t, 1.0, 2.0))
    torch.testing.assert_close(ref.pkt_loss_reference(s, t, 1e-7), _stock_pkt(s, t))
    # "sum" is the same sum without the division.
    torch.testing.assert_close(ref.sp_loss_reference(s, t, "sum"), _stock_sp(s, t) * 23 ** 2)
    torch.testing.assert_close(ref.pkt_loss_reference(s, t, 1e-7, "sum"),
                               _stock_pkt(s, t) * 23 ** 2)


def test_reference_coincident_rows_have_zero_angle():
    e = torch.randn(5, 3, dtype=torch.float64)
    e[3] = e[1]
    u = ref.unit_differences(e)
    assert torch.all(u[1, 3] == 0) and torch.all(u[3, 1] == 0) and torch.all(u[2, 2] == 0)
    torch.testing.assert_close(u[0, 2].norm(), torch.tensor(1.0, dtype=torch.float64))
    d = ref.distances(e)
    assert d[1, 3].item() == pytest.approx(1e-6) and d[2, 2].item() == 0.0


# ------------------------------------------------------------------------------ fused vs reference
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
@pytest.mark.parametrize("b", [2, 3, 17, 130, 1000])
def test_matches_reference_fp32(backend, loss, b):
    if b > _max_batch(backend) or (b == 1000 and backend != "cpu"):
        pytest.skip("large batches only on the CPU backend")
    if loss == "rkd" and b == 1000:
        loss = "rkd_dist"  # the reference angle term is O(B^3) memory
    dev = _device(backend)
    xs = _features(b, 24, torch.float32, dev, offset=1.0)
    xt = _features(b, 40, torch.float32, dev, seed=1)
    _compare(loss, xs, xt, backend, teacher_grad=b in (3, 17))


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
def test_matches_reference_bf16(backend, loss):
    dev = _device(backend)
    b = min(_max_batch(backend), 130)
    xs = _features(b, 20, torch.bfloat16, dev, offset=0.5)
    xt = _features(b, 12, torch.bfloat16, dev, seed=1)
    _compare(loss, xs, xt, backend)
    # mixed dtypes: float32 student, bfloat16 teacher
    _compare(loss, xs.float(), xt, backend, teacher_grad=True)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
def test_sum_reduction_and_many_tiles(backend, loss, monkeypatch):
    # 7-row tiles over 45 rows: several full tiles and a partial one.
    monkeypatch.setattr(R, "TILE_ELEMS", 7 * 45)
    dev = _device(backend)
    b = min(_max_batch(backend), 45)
    xs = _features(b, 9, torch.float32, dev, offset=-0.3)
    xt = _features(b, 5, torch.float32, dev, seed=1)
    _compare(loss, xs, xt, backend, reduction="sum")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
def test_offset_features(backend, loss):
    """Non-negative (ReLU-like) student and a teacher with a large common offset: nearly
    parallel rows, where float32 cancellation would show (RKD centres, PKT drops the constant
    part of dL/dP)."""
    dev = _device(backend)
    b = min(_max_batch(backend), 150 if loss == "rkd" else 300)  # the reference angle is O(B^3)
    xs = torch.relu(_features(b, 32, torch.float32, dev))
    xt = _features(b, 16, torch.float32, dev, offset=4.0, seed=1)
    _compare(loss, xs, xt, backend)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
def test_duplicate_rows(backend, loss):
    """Duplicate rows give zero distances (clamped): no NaN, same values and gradients."""
    dev = _device(backend)
    b = min(_max_batch(backend), 33)
    xs = _features(b, 16, torch.float32, "cpu", offset=2.0)
    xt = _features(b, 8, torch.float32, "cpu", seed=1)
    xs[3] = xs[1]
    xs[7] = xs[1]
    xt[4] = xt[2]
    xt[9] = xt[10]
    _compare(loss, xs.to(dev), xt.to(dev), backend)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("loss", ["sp", "rkd", "pkt"])
def test_one_hot_and_collapsed_rows(backend, loss):
    """One-hot (orthogonal) student rows; a teacher whose rows are all equal; zero rows."""
    dev = _device(backend)
    b = min(_max_batch(backend), 12)
    xs = torch.eye(b, 16)[torch.randperm(b, generator=torch.Generator().manual_seed(0))] * 3.0
    xt = _features(b, 6, torch.float32, "cpu", seed=2)
    _compare(loss, xs.to(dev), xt.to(dev), backend)
    same = xt[:1].expand(b, -1).contiguous()
    _compare(loss, xt.to(dev), same.to(dev), backend)
    zero = xs.clone()
    zero[2] = 0.0
    _compare(loss, zero.to(dev), xt.to(dev), backend)


@pytest.mark.parametrize("backend", _backend_params())
def test_gradient_scaling_layout_and_no_grad(backend):
    dev = _device(backend)
    b = min(_max_batch(backend), 16)
    base_s = _features(b * 6, 2, torch.float32, dev, offset=0.2).reshape(b, 2, 2, 3)
    base_t = _features(b * 5, 1, torch.float32, dev, seed=3).reshape(b, 5)
    for fn in (R.sp_loss, R.rkd_loss, R.pkt_loss):
        s = base_s.detach().clone().requires_grad_()
        fn(s, base_t, backend=backend).backward()
        g1 = s.grad.clone()
        # grad_output is applied; a graph may be walked twice (retain_graph).
        s.grad = None
        loss = fn(s, base_t, backend=backend) * 3.0
        loss.backward(retain_graph=True)
        torch.testing.assert_close(s.grad, 3 * g1)
        loss.backward()
        torch.testing.assert_close(s.grad, 6 * g1)
        # non-contiguous input gives the same loss and gradient
        st = base_s.detach().transpose(1, 3).contiguous().transpose(1, 3).requires_grad_()
        assert not st.is_contiguous()
        fn(st, base_t.t().contiguous().t(), backend=backend).backward()
        torch.testing.assert_close(st.grad, g1)
        with torch.no_grad():
            torch.testing.assert_close(fn(base_s, base_t, backend=backend),
                                       fn(base_s.double(), base_t.double()).float(),
                                       rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("backend", _backend_params())
def test_teacher_only_gradient(backend):
    dev = _device(backend)
    b = min(_max_batch(backend), 10)
    xs = _features(b, 4, torch.float32, dev)
    for loss in ("sp", "rkd", "pkt"):
        t = _features(b, 6, torch.float32, dev, seed=1).requires_grad_()
        _fused(loss, xs, t, backend).backward()
        t64 = t.detach().double().requires_grad_()
        want, = torch.autograd.grad(_reference(loss, xs.double(), t64), [t64])
        torch.testing.assert_close(t.grad.double(), want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", _backend_params())
def test_nan_propagates(backend):
    dev = _device(backend)
    b = min(_max_batch(backend), 9)
    xs = _features(b, 4, torch.float32, dev)
    xs[2, 1] = float("nan")
    xt = _features(b, 3, torch.float32, dev, seed=1)
    for loss in ("sp", "rkd", "rkd_dist", "pkt"):
        assert math.isnan(_fused(loss, xs, xt, backend).item()), loss
    assert math.isnan(R.rkd_loss(xs, xt, distance_weight=0.0, backend=backend).item())


@needs_ext
def test_zero_width_features():
    for fn in (R.sp_loss, R.rkd_loss, R.pkt_loss):
        s = torch.zeros(5, 0, requires_grad=True)
        loss = fn(s, torch.randn(5, 0), backend="cpu")
        want = fn(s.detach(), torch.zeros(5, 0), backend="reference")
        assert loss.item() == pytest.approx(want.item(), abs=1e-7)
        loss.backward()
        assert s.grad.shape == (5, 0)


def test_reference_backend_and_float64():
    s = _features(6, 3, torch.float64, "cpu").requires_grad_()
    t = _features(6, 2, torch.float64, "cpu", seed=1)
    for fn in (R.sp_loss, R.rkd_loss, R.pkt_loss):
        out = fn(s, t)  # auto: float64 goes to the reference
        assert out.dtype == torch.float64
        out.backward()
        if HAS_EXT:
            with pytest.raises(RuntimeError, match="float64"):
                fn(s, t, backend="cpu")


def test_modules():
    s = _features(8, 5, torch.float32, "cpu")
    t = _features(8, 3, torch.float32, "cpu", seed=1)
    for mod, fn, kw in ((SPLoss(), R.sp_loss, {}),
                        (RKDLoss(distance_weight=0.5, angle_weight=1.5), R.rkd_loss,
                         {"distance_weight": 0.5, "angle_weight": 1.5}),
                        (PKTLoss(eps=1e-6, reduction="sum"), R.pkt_loss,
                         {"eps": 1e-6, "reduction": "sum"})):
        torch.testing.assert_close(mod(s, t), fn(s, t, **kw))
        assert "backend='auto'" in repr(mod)
    assert RKDLoss().angle_weight == 2.0 and PKTLoss().eps == 1e-7


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("fn", [R.sp_loss, R.rkd_loss, R.pkt_loss])
def test_bad_inputs(fn):
    good = torch.randn(4, 3)
    with pytest.raises(ValueError, match="student_features.*B < 2"):
        fn(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="student_features.*B < 2"):
        fn(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="teacher_features has batch size 5"):
        fn(good, torch.randn(5, 3))
    with pytest.raises(TypeError, match="student_features"):
        fn(torch.ones(4, 3, dtype=torch.int64), good)
    with pytest.raises(TypeError, match="teacher_features"):
        fn(good, torch.ones(4, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="student_features"):
        fn([[1.0]], good)
    with pytest.raises(ValueError, match="student_features"):
        fn(torch.tensor(1.0), good)
    with pytest.raises(RuntimeError, match="teacher_features"):
        fn(good, torch.randn(4, 3, device="meta"))
    with pytest.raises(ValueError, match="reduction"):
        fn(good, good, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        fn(good, good, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fn(good, good, backend="tpu")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        fn(good, good, backend="cuda")


def test_bad_hyperparameters():
    good = torch.randn(4, 3)
    for kw in ({"distance_weight": -1.0}, {"angle_weight": float("nan")},
               {"distance_weight": float("inf")}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            R.rkd_loss(good, good, **kw)
        with pytest.raises(ValueError, match=name):
            RKDLoss(**kw)
    with pytest.raises(TypeError, match="angle_weight"):
        RKDLoss(angle_weight="2")
    for eps in (0.0, -1e-7, float("inf")):
        with pytest.raises(ValueError, match="eps"):
            PKTLoss(eps=eps)
        with pytest.raises(ValueError, match="eps"):
            R.pkt_loss(good, good, eps=eps)
    with pytest.raises(ValueError, match="reduction"):
        SPLoss(reduction="none")
    with pytest.raises(ValueError, match="backend"):
        SPLoss(backend="gpu")
    with pytest.raises(TypeError):
        R.sp_loss(good, good, gather=True)  # not supported yet: no silent acceptance


def test_missing_relation_kernels_are_reported(monkeypatch):
    # An extension built before the relation kernels: auto falls back, a forced backend explains.
    from fastkd import _ext
    monkeypatch.setattr(_ext, "_C", object())
    monkeypatch.setattr(_backend, "_reason", lambda backend, device: None)
    assert not R.ext_has_relation_ops()
    s = torch.randn(4, 3)
    assert R.select_backend("auto", s, s) in ("triton", "reference")
    with pytest.raises(RuntimeError, match="built without relation_sp_forward"):
        R.select_backend("cpu", s, s)


# ------------------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from fastkd.relation import ops as R
    b, d = 16384, 64
    torch.manual_seed(0)
    s = torch.randn(b, d, requires_grad=True)
    t = torch.randn(b, d)
    R.sp_loss(s[:64], t[:64], backend="cpu").backward()  # warm up allocator and BLAS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in sys.argv[1:]:
        fn, kw = {"sp": (R.sp_loss, {}), "rkd": (R.rkd_loss, {"angle_weight": 0.0}),
                  "pkt": (R.pkt_loss, {})}[name]
        s.grad = None
        loss = fn(s, t, backend="cpu", **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
""")


def _peak_extra_bytes(*losses):
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *losses], capture_output=True,
                         text=True, timeout=900, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@needs_ext
def test_cpu_peak_memory_is_far_below_b_squared():
    """SP at B = 16384, d = 64: B^2 float32 = 1 GiB; the blocked kernels stay within a few tiles
    (measured as the growth of the peak RSS of a fresh process)."""
    extra = _peak_extra_bytes("sp")
    assert extra < 256 * 2 ** 20, f"peak RSS grew by {extra / 2 ** 20:.0f} MiB"


@needs_ext
@pytest.mark.slow
def test_cpu_peak_memory_rkd_distance_and_pkt():
    extra = _peak_extra_bytes("rkd", "pkt")
    assert extra < 256 * 2 ** 20, f"peak RSS grew by {extra / 2 ** 20:.0f} MiB"
