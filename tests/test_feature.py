"""Feature KD (SPEC §2): every fused backend against the float64 reference, plus the module and
the errors of SPEC §Errors.

Backends that cannot run here are skipped with the reason: "cpu"/"cuda" need fastkd._C built with
the feature-KD ops, "cuda" a GPU, "triton" a GPU or TRITON_INTERPRET=1 (set before triton is
imported; the interpreter is slow, so its cases are a subset).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastkd import _backend
from fastkd.feature import ops as fa
from fastkd.feature.ops import feature_kd_loss
from fastkd.feature.module import FeatureKDLoss
from fastkd.feature.reference import feature_kd_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSSES = ["mse", "cosine"]
REDUCTIONS = ["mean", "sum", "none"]
HAS_CUDA = torch.cuda.is_available()


def _device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def _why_unavailable(backend: str, device: torch.device):
    if backend in ("cpu", "cuda") and not fa.ext_has_feature_ops():
        return "fastkd._C is not built with the feature-KD kernels"
    if backend == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    return _backend._reason(backend, device)


def _interpreted(backend, device) -> bool:
    return backend == "triton" and device.type == "cpu"


@pytest.fixture(params=["cpu", "triton", "cuda"])
def kernel(request):
    name = request.param
    device = _device_for(name)
    why = _why_unavailable(name, device)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name, device


def _tolerances(dtype, backend):
    """(loss, gradient) relative tolerances vs float64 on the same rounded inputs.

    float32: SPEC's 1e-5 / 1e-4 (the GEMMs run in full float32: TF32 is off by default).
    bf16/fp16: the loss is exact up to float32 accumulation (the GEMMs read the rounded inputs
    exactly and accumulate in float32), so 1e-4; gradients are rounded to the input dtype at the
    end (relative 2^-8 for bf16) and, on the GPU backends, dL/dy is also rounded to bf16/fp16
    before the two gradient GEMMs (as nn.Linear's backward does): two roundings of at most
    2^-9 relative each, about 3e-3 in norm, so 1e-2.
    """
    if dtype == torch.float32:
        return 1e-5, 1e-4
    return 1e-4, 1e-2


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    if den == 0.0:
        return a.norm().item()
    return (a - b).norm().item() / den


def _make(shape_s, shape_t, ds, dt, dtype, device, *, bias=True, teacher_grad=True, seed=0,
          wdtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape_s, generator=g).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randn(shape_t, generator=g).to(device=device, dtype=dtype)
    t.requires_grad_(teacher_grad)
    w = (torch.randn(dt, ds, generator=g) / math.sqrt(ds)).to(device=device,
                                                              dtype=wdtype or dtype)
    w.requires_grad_()
    b = (0.1 * torch.randn(dt, generator=g)).to(device=device, dtype=wdtype or dtype)
    b = b.requires_grad_() if bias else None
    return x, t, w, b


def _check(backend, x, t, w, b, *, loss, channel_dim, reduction, chunk_size=None,
           grad_scale=0.75, tol=None):
    """Forward + backward through `backend` and through the float64 reference; compare."""
    out = feature_kd_loss(x, t, w, b, loss=loss, channel_dim=channel_dim, reduction=reduction,
                          backend=backend, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    inputs = [v for v in (x, t, w, b) if v is not None and v.requires_grad]
    g = torch.Generator().manual_seed(1)
    if reduction == "none":
        go = torch.randn(out.shape, generator=g).to(out.device)
    else:
        go = torch.full((), grad_scale, device=out.device)
    grads = torch.autograd.grad(out, inputs, go)

    ref_in = [None if v is None else v.detach().double().requires_grad_(v.requires_grad)
              for v in (x, t, w, b)]
    ref = feature_kd_reference(*ref_in, loss=loss, channel_dim=channel_dim, reduction=reduction)
    ref_inputs = [r for r, v in zip(ref_in, (x, t, w, b)) if v is not None and v.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_inputs, go.double())

    tl_loss, tl_grad = tol or _tolerances(x.dtype, backend)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= tl_loss, (_rel(out, ref), tl_loss)
    for got, want, v in zip(grads, ref_grads, inputs):
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.isfinite(got).all()
        assert _rel(got, want) <= tl_grad, (_rel(got, want), tl_grad, tuple(v.shape))
    return out


# ---------------------------------------------------------------------------------------------
# Values and gradients vs the float64 reference

ROW_SHAPES = [(1, 3, 65), (37, 65, 257), (1000, 257, 3), (37, 65, 65)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,ds,dt", ROW_SHAPES)
def test_rows_match_reference(kernel, n, ds, dt, dtype, loss, reduction):
    backend, device = kernel
    if _interpreted(backend, device) and n == 1000 and dtype != torch.float32:
        pytest.skip("kept small under the Triton interpreter")
    x, t, w, b = _make((n, ds), (n, dt), ds, dt, dtype, device)
    _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction=reduction)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n", [1, 37])
def test_leading_dims_and_chunking(kernel, n, loss):
    """[B, L, C] tokens; small chunks so that several chunks (and a ragged last one) run."""
    backend, device = kernel
    x, t, w, b = _make((n, 3, 65), (n, 3, 257), 65, 257, torch.float32, device)
    chunks = (None, 16) if _interpreted(backend, device) else (None, 1, 16)
    for chunk in chunks:
        _check(backend, x, t, w, b, loss=loss, channel_dim=2, reduction="mean", chunk_size=chunk)
    out = _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction="none", chunk_size=7)
    assert out.shape == (n, 3)


# NCHW conv maps (channel_dim=1): [B, C, H, W] with H*W >= 32 read in place (one GEMM per image),
# H*W < 32 transposed to rows by the extension backends, and H*W == 1.
MAP_SHAPES = [(2, 65, 3, (6, 7)), (3, 3, 65, (2, 2)), (2, 5, 3, (1, 1)), (1, 3, 257, (5, 8))]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b_,ds,dt,hw", MAP_SHAPES)
def test_conv_maps_match_reference(kernel, b_, ds, dt, hw, dtype, loss, reduction):
    backend, device = kernel
    if _interpreted(backend, device) and dtype != torch.float32 and dt == 257:
        pytest.skip("kept small under the Triton interpreter")
    x, t, w, b = _make((b_, ds, *hw), (b_, dt, *hw), ds, dt, dtype, device)
    out = _check(backend, x, t, w, b, loss=loss, channel_dim=1, reduction=reduction)
    if reduction == "none":
        assert out.shape == (b_, *hw)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk", [5, 16, 50, 100])
def test_conv_maps_chunk_plans(kernel, chunk, loss):
    """Chunks smaller than one image (split positions), of one image, and of several images."""
    backend, device = kernel
    x, t, w, b = _make((3, 65, 6, 7), (3, 17, 6, 7), 65, 17, torch.float32, device)
    _check(backend, x, t, w, b, loss=loss, channel_dim=1, reduction="mean", chunk_size=chunk)
    _check(backend, x, t, w, b, loss=loss, channel_dim=-3, reduction="none", chunk_size=chunk)


@pytest.mark.parametrize("loss", LOSSES)
def test_conv1d_maps_middle_channel(kernel, loss):
    """[B, C, L] sequences with channel_dim=1 (L = 40 positions)."""
    backend, device = kernel
    x, t, w, b = _make((2, 65, 40), (2, 3, 40), 65, 3, torch.float32, device)
    _check(backend, x, t, w, b, loss=loss, channel_dim=1, reduction="sum")


@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous_inputs(kernel, loss):
    backend, device = kernel
    g = torch.Generator().manual_seed(3)
    # Student channel-last through a transpose (channel stride != 1); teacher expanded over rows.
    xs = torch.randn(65, 37, generator=g).to(device).t().requires_grad_()
    tb = torch.randn(1, 257, generator=g).to(device)
    t = tb.expand(37, 257)
    w = (torch.randn(257, 65, generator=g) / 8).to(device).t().contiguous().t()  # column-major
    w.requires_grad_()
    b = torch.randn(257, generator=g).to(device).requires_grad_()
    _check(backend, xs, t, w, b, loss=loss, channel_dim=-1, reduction="mean")
    # NCHW maps stored channels-last (memory_format) and a sliced teacher.
    xm = torch.randn(2, 65, 6, 7, generator=g).to(device)
    xm = xm.contiguous(memory_format=torch.channels_last).requires_grad_()
    tm = torch.randn(2, 9, 6, 14, generator=g).to(device)[..., ::2]
    wm = (torch.randn(9, 65, generator=g) / 8).to(device).requires_grad_()
    _check(backend, xm, tm, wm, None, loss=loss, channel_dim=1, reduction="none")


@pytest.mark.parametrize("loss", LOSSES)
def test_mixed_dtypes(kernel, loss):
    """bf16 student, fp16 teacher, float32 adapter."""
    backend, device = kernel
    x, t, w, b = _make((37, 65), (37, 33), 65, 33, torch.bfloat16, device, wdtype=torch.float32)
    t = t.detach().to(torch.float16).requires_grad_()
    _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction="mean", tol=(1e-4, 1e-2))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_no_adapter(kernel, loss, reduction):
    backend, device = kernel
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 65, generator=g).to(device).requires_grad_()
    t = torch.randn(37, 65, generator=g).to(device).requires_grad_()
    _check(backend, x, t, None, None, loss=loss, channel_dim=-1, reduction=reduction)
    xm = torch.randn(2, 5, 6, 7, generator=g).to(device).requires_grad_()
    tm = torch.randn(2, 5, 6, 7, generator=g).to(device)
    _check(backend, xm, tm, None, None, loss=loss, channel_dim=1, reduction=reduction)


@pytest.mark.parametrize("loss", LOSSES)
def test_only_some_inputs_need_grad(kernel, loss):
    backend, device = kernel
    x, t, w, b = _make((37, 65), (37, 33), 65, 33, torch.float32, device, teacher_grad=False)
    x.requires_grad_(False)
    _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction="mean")  # W, b only
    w.requires_grad_(False)
    _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction="none")  # b only
    t.requires_grad_(True)
    b.requires_grad_(False)
    _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction="sum")  # teacher only
    with torch.no_grad():
        out = feature_kd_loss(x, t, w, b, loss=loss, backend=backend)
    ref = feature_kd_reference(x.double(), t.double(), w.double(), b.double(), loss=loss)
    assert _rel(out, ref) < 1e-5 and not out.requires_grad


@pytest.mark.parametrize("loss", LOSSES)
def test_unit_grad_output(kernel, loss):
    """loss.backward() with the implicit gradient 1 (the CPU fast path skips the scaling)."""
    backend, device = kernel
    x, t, w, b = _make((37, 65), (37, 33), 65, 33, torch.float32, device)
    _check(backend, x, t, w, b, loss=loss, channel_dim=-1, reduction="mean", grad_scale=1.0)


def test_cosine_zero_rows(kernel):
    """All-zero rows (teacher, student, both) give finite losses and gradients, as the reference."""
    backend, device = kernel
    for dtype in DTYPES:
        if _interpreted(backend, device) and dtype != torch.float32:
            continue
        x, t, w, b = _make((6, 65), (6, 33), 65, 33, dtype, device)
        with torch.no_grad():
            x[2] = 0
            t[2] = 0
            b.zero_()  # so that y is 0 where x is 0
            if dtype != torch.float16:
                # One side zero: the clamp is active and the gradient of the other side is
                # (other) / 1e-8 -- legitimately beyond float16's range, so not for float16.
                t[0] = 0
                x[1] = 0
        for reduction in REDUCTIONS:
            _check(backend, x, t, w, b, loss="cosine", channel_dim=-1, reduction=reduction)
        g = torch.Generator().manual_seed(5)
        x0 = torch.zeros(4, 65, device=device, dtype=dtype).requires_grad_()
        t0 = torch.randn(4, 65, generator=g).to(device=device, dtype=dtype)
        t0[1] = 0
        out = feature_kd_loss(x0, t0, loss="cosine", reduction="none", backend=backend)
        assert torch.equal(out.cpu(), torch.ones(4))  # cos = 0 for a zero row
        out.sum().backward()
        assert not torch.isnan(x0.grad).any()
        # Both zero: d loss / d x is exactly 0 there.
        assert torch.equal(x0.grad[1].cpu(), torch.zeros(65, dtype=dtype))


def test_empty_rows(kernel):
    backend, device = kernel
    x, t, w, b = _make((0, 65), (0, 33), 65, 33, torch.float32, device)
    for loss in LOSSES:
        for reduction in ("mean", "sum"):
            out = feature_kd_loss(x, t, w, b, loss=loss, reduction=reduction, backend=backend)
            assert out.item() == 0.0
            gx, gw, gb = torch.autograd.grad(out, (x, w, b))
            assert gx.shape == x.shape and gw.abs().sum() == 0 and gb.abs().sum() == 0
        out = feature_kd_loss(x, t, w, b, loss=loss, reduction="none", backend=backend)
        assert out.shape == (0,)


def test_nan_propagates(kernel):
    backend, device = kernel
    x, t, w, b = _make((5, 65), (5, 33), 65, 33, torch.float32, device)
    with torch.no_grad():
        t[3, 4] = float("nan")
    for loss in LOSSES:
        rows = feature_kd_loss(x, t, w, b, loss=loss, reduction="none", backend=backend)
        assert torch.isnan(rows[3]) and torch.isfinite(rows[torch.arange(5) != 3]).all()
        assert torch.isnan(feature_kd_loss(x, t, w, b, loss=loss, backend=backend))


def test_backward_twice(kernel):
    backend, device = kernel
    x, t, w, b = _make((7, 65), (7, 33), 65, 33, torch.float32, device)
    out = feature_kd_loss(x, t, w, b, backend=backend)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.backward()
    # "none" recomputes in backward, so a second backward is fine and adds the same gradient.
    x.grad = None
    rows = feature_kd_loss(x, t, w, b, reduction="none", backend=backend)
    rows.sum().backward(retain_graph=True)
    first = x.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)


# ---------------------------------------------------------------------------------------------
# Agreement with the stock PyTorch code it replaces

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_matches_stock_pytorch(backend):
    torch.manual_seed(0)
    x = torch.randn(37, 65, requires_grad=True)
    t = torch.randn(37, 257)
    lin = torch.nn.Linear(65, 257)
    kd = FeatureKDLoss(65, 257, backend=backend)
    kd.load_state_dict(lin.state_dict())
    torch.testing.assert_close(kd(x, t), F.mse_loss(lin(x), t), rtol=1e-5, atol=0)
    kd_sum = FeatureKDLoss(65, 257, reduction="sum", backend=backend)
    kd_sum.load_state_dict(lin.state_dict())
    torch.testing.assert_close(kd_sum(x, t), F.mse_loss(lin(x), t, reduction="sum"),
                               rtol=1e-5, atol=0)
    kd_cos = FeatureKDLoss(65, 257, loss="cosine", backend=backend)
    kd_cos.load_state_dict(lin.state_dict())
    stock = (1 - F.cosine_similarity(lin(x), t, dim=-1)).mean()
    torch.testing.assert_close(kd_cos(x, t), stock, rtol=1e-5, atol=1e-6)

    # NCHW maps with a 1x1 convolution adapter.
    conv = torch.nn.Conv2d(65, 17, 1)
    xm = torch.randn(2, 65, 6, 7, requires_grad=True)
    tm = torch.randn(2, 17, 6, 7)
    kdm = FeatureKDLoss(65, 17, channel_dim=1, backend=backend)
    kdm.load_state_dict(conv.state_dict())  # weight [17, 65, 1, 1] is viewed as [17, 65]
    ours = kdm(xm, tm)
    stock = F.mse_loss(conv(xm), tm)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=0)
    g_ours = torch.autograd.grad(ours, (xm, kdm.weight, kdm.bias))
    g_stock = torch.autograd.grad(stock, (xm, conv.weight, conv.bias))
    torch.testing.assert_close(g_ours[0], g_stock[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_ours[1], g_stock[1].view(17, 65), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_ours[2], g_stock[2], rtol=1e-4, atol=1e-7)


def test_float64_auto_uses_reference():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = feature_kd_loss(x, t, w, None)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda a, b: feature_kd_loss(a, t, b, None, loss="cosine"), (x, w))


# ---------------------------------------------------------------------------------------------
# Module

def test_module_init_like_linear():
    torch.manual_seed(123)
    lin = torch.nn.Linear(65, 257)
    torch.manual_seed(123)
    kd = FeatureKDLoss(65, 257)
    torch.testing.assert_close(kd.weight, lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(kd.bias, lin.bias, rtol=0, atol=0)
    assert kd.weight.shape == (257, 65) and kd.bias.shape == (257,)
    kd_nb = FeatureKDLoss(65, 257, bias=False)
    assert kd_nb.bias is None and [n for n, _ in kd_nb.named_parameters()] == ["weight"]
    plain = FeatureKDLoss(65, 65, bias=False, adapter=False)
    assert list(plain.parameters()) == []
    x, t = torch.randn(4, 65), torch.randn(4, 65)
    torch.testing.assert_close(plain(x, t), F.mse_loss(x, t), rtol=1e-5, atol=0)
    half = FeatureKDLoss(8, 16, dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16
    assert "student_dim=65" in repr(kd)


def test_module_load_conv_state():
    conv = torch.nn.Conv2d(6, 10, kernel_size=1, bias=False)
    kd = FeatureKDLoss(6, 10, bias=False, channel_dim=1)
    kd.load_state_dict(conv.state_dict())
    torch.testing.assert_close(kd.weight, conv.weight.view(10, 6), rtol=0, atol=0)
    # The documented manual way.
    kd2 = FeatureKDLoss(6, 10, bias=False, channel_dim=1)
    with torch.no_grad():
        kd2.weight.copy_(conv.weight.view(10, 6))
    torch.testing.assert_close(kd2.weight, kd.weight, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        kd.load_state_dict({"weight": torch.zeros(10, 6, 3, 3)})  # a 3x3 conv is not an adapter


def test_module_errors():
    with pytest.raises(ValueError, match="student_dim"):
        FeatureKDLoss(0, 4)
    with pytest.raises(ValueError, match="teacher_dim"):
        FeatureKDLoss(4, 2.5)
    with pytest.raises(ValueError, match="loss"):
        FeatureKDLoss(4, 4, loss="l1")
    with pytest.raises(ValueError, match="reduction"):
        FeatureKDLoss(4, 4, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        FeatureKDLoss(4, 4, backend="gpu")
    with pytest.raises(ValueError, match="adapter=False"):
        FeatureKDLoss(4, 8, bias=False, adapter=False)
    with pytest.raises(ValueError, match="bias"):
        FeatureKDLoss(4, 4, adapter=False)
    with pytest.raises(TypeError, match="channel_dim"):
        FeatureKDLoss(4, 4, channel_dim=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        FeatureKDLoss(4, 4, chunk_size=0)
    kd = FeatureKDLoss(4, 8, channel_dim=1)
    with pytest.raises(ValueError, match="student_feat has 5 channels.*student_dim=4"):
        kd(torch.randn(2, 5, 3), torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="teacher_feat has 7 channels.*teacher_dim=8"):
        kd(torch.randn(2, 4, 3), torch.randn(2, 7, 3))


# ---------------------------------------------------------------------------------------------
# Errors (SPEC §Errors)

def _args(**over):
    base = dict(student_feat=torch.randn(4, 5), teacher_feat=torch.randn(4, 3),
                weight=torch.randn(3, 5), bias=torch.randn(3))
    base.update(over)
    return base


def _call(**over):
    kw = {k: over.pop(k) for k in list(over) if k in ("loss", "channel_dim", "reduction",
                                                        "backend", "chunk_size")}
    a = _args(**over)
    return feature_kd_loss(a["student_feat"], a["teacher_feat"], a["weight"], a["bias"], **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(loss="l2"), ValueError, "loss must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(channel_dim=2), ValueError, "channel_dim=2 is out of range"),
    (dict(channel_dim=True), TypeError, "channel_dim must be an int"),
    (dict(chunk_size=-3), ValueError, "chunk_size"),
    (dict(student_feat=torch.randint(0, 3, (4, 5))), TypeError, "student_feat must be a float"),
    (dict(teacher_feat=torch.randint(0, 3, (4, 3))), TypeError, "teacher_feat must be a float"),
    (dict(teacher_feat=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "teacher_feat"),
    (dict(weight=torch.ones(3, 5, dtype=torch.int32)), TypeError, "weight must be a float"),
    (dict(bias=torch.ones(3, dtype=torch.int64)), TypeError, "bias must be a float"),
    (dict(teacher_feat=[[1.0]]), TypeError, "teacher_feat must be a torch.Tensor"),
    (dict(teacher_feat=torch.randn(5, 3)), ValueError, "all dimensions other than channel_dim"),
    (dict(teacher_feat=torch.randn(4, 3, 1)), ValueError, "teacher_feat has 3 dimensions"),
    (dict(weight=torch.randn(3, 4)), ValueError, r"weight has shape \(3, 4\)"),
    (dict(weight=torch.randn(4, 5)), ValueError, r"weight has shape \(4, 5\)"),
    (dict(bias=torch.randn(4)), ValueError, r"bias has shape \(4,\)"),
    (dict(weight=None), ValueError, "bias was given without weight"),
    (dict(weight=None, bias=None), ValueError, "same number of channels"),
    (dict(teacher_feat=torch.randn(4, 0), weight=torch.randn(0, 5), bias=None), ValueError,
     "at least one channel"),
    (dict(student_feat=torch.tensor(1.0), teacher_feat=torch.tensor(1.0)), ValueError,
     "at least one dimension"),
    (dict(teacher_feat=torch.randn(4, 3, device="meta")), RuntimeError, "teacher_feat is on meta"),
    (dict(weight=torch.randn(3, 5, device="meta")), RuntimeError, "weight is on meta"),
    (dict(backend="cuda"), RuntimeError, "backend='cuda' is (unavailable|not implemented)"),
])
def test_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_float64_with_forced_kernel_backend():
    if not fa.ext_has_feature_ops():
        pytest.skip("fastkd._C is not built with the feature-KD kernels")
    with pytest.raises(RuntimeError, match="use backend='reference' for float64"):
        feature_kd_loss(torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3),
                        torch.randn(3, 5), None, backend="cpu")


def test_forced_triton_without_gpu_or_interpreter():
    why = _backend._reason("triton", torch.device("cpu"))
    if why is None:
        pytest.skip("Triton runs on CPU tensors here (TRITON_INTERPRET=1)")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        _call(backend="triton")


def test_extension_without_feature_ops_is_reported(monkeypatch):
    """An extension built before this family existed: auto falls back, forcing it says why."""
    from fastkd import _ext
    monkeypatch.setattr(_ext, "_C", object())
    monkeypatch.setattr(_ext, "EXT_ERROR", None)
    assert not fa.ext_has_feature_ops()
    with pytest.raises(RuntimeError, match="built without feature_kd_forward"):
        _call(backend="cpu")
    out = _call(backend="auto")  # the reference serves
    assert torch.isfinite(out)
