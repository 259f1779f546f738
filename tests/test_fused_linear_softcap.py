"""FusedLinearKDLoss: softcap and logit scale (SPEC §1b), and low-precision accuracy.

The reference is the float64 loss of materialised logits ``c * tanh(a * (h W^T + b) / c)`` of
the (exact) inputs, differentiated by autograd.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.functional import fused_linear_kd_loss, kd_loss
from fastkd.logit import fused_linear
from _helpers import assert_close_grad, assert_close_loss, backend_params, rel_err

DIVS = ["kl", "reverse_kl", "jsd", "tvd"]
NAMES = ("hs", "ws", "bs", "ht", "wt", "bt")


def _inputs(n, h, v, dtype, seed=0):
    """Logits of a few units: with softcap 4 / scale 1.3 the tanh is far from linear."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = y[-1] = -100
    return {"hs": r(n, h), "ws": r(v, h, scale=2 / math.sqrt(h)), "bs": r(v),
            "ht": r(n, h + 3), "wt": r(v, h + 3, scale=3 / math.sqrt(h + 3)), "bt": r(v), "y": y}


def _capped(z, cap, scale):
    return scale * z if cap is None else cap * torch.tanh(scale * z / cap)


def _reference(x, caps, teacher_grad=True, **kw):
    """float64 loss and gradients (hs, ws, bs and, with ``teacher_grad``, ht, wt, bt)."""
    p = {k: x[k].double().requires_grad_(k[1] == "s" or teacher_grad) for k in NAMES}
    s = _capped(p["hs"] @ p["ws"].t() + p["bs"], *caps[0])
    t = _capped(p["ht"] @ p["wt"].t() + p["bt"], *caps[1])
    loss = kd_loss(s, t, x["y"], backend="reference", **kw)
    loss.sum().backward()
    return loss, {k: v.grad for k, v in p.items() if v.requires_grad}


def _fused(x, caps, backend, teacher_grad=True, chunk=None, **kw):
    p = {k: x[k].clone().requires_grad_(k[1] == "s" or teacher_grad) for k in NAMES}
    for side, (cap, scale) in zip(("student", "teacher"), caps):
        if (cap, scale) != (None, 1.0):  # (only then: the plain case runs on older fastkd too)
            kw.update({f"{side}_softcap": cap, f"{side}_logit_scale": scale})
    loss = fused_linear_kd_loss(p["hs"], p["ws"], p["ht"], p["wt"], x["y"], p["bs"], p["bt"],
                                backend=backend, chunk_size=chunk, **kw)
    loss.sum().backward()
    return loss, {k: v.grad for k, v in p.items() if v.requires_grad}


CAPS = {"both": ((4.0, 1.3), (6.0, 0.7)), "scale-only": ((None, 0.6), (None, 1.5)),
        "student-only": ((3.0, 1.0), (None, 1.0))}


@pytest.mark.parametrize("backend,device", backend_params() + [("reference", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVS + ["uld"])
def test_softcap_matches_materialised_logits(backend, device, dtype, divergence):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("triton interpreter: too slow for this grid")
    x = {k: v.to(device) for k, v in _inputs(29, 24, 301, dtype).items()}
    kw = dict(temperature=2.0, hard_weight=0.5, beta=0.3, divergence=divergence)
    for name, caps in CAPS.items():
        rloss, rgrads = _reference(x, caps, **kw)
        for chunk in (8, None):  # 29 rows: a tail chunk of 5; one chunk
            loss, grads = _fused(x, caps, backend, chunk=chunk, **kw)
            assert_close_loss(loss, rloss, dtype, f"{name} loss")
            assert set(grads) == set(rgrads)
            for k in rgrads:
                assert_close_grad(grads[k], rgrads[k], dtype, f"{name} chunk={chunk} grad {k}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_softcap_reduction_none_and_teacher_logits(backend, device):
    """``"none"`` recomputes the chunks in backward; a teacher given as logits takes the
    student's softcap only; module and functional agree."""
    x = {k: v.to(device) for k, v in _inputs(13, 16, 97, torch.float32, seed=1).items()}
    caps = ((2.5, 1.7), (None, 1.0))
    kw = dict(temperature=1.5, hard_weight=1.0, label_smoothing=0.1, divergence="jsd",
              reduction="none")
    rloss, rgrads = _reference(x, caps, teacher_grad=False, **kw)
    loss, grads = _fused(x, caps, backend, teacher_grad=False, chunk=4, **kw)
    assert_close_loss(loss, rloss, torch.float32)
    for k in rgrads:
        assert_close_grad(grads[k], rgrads[k], torch.float32, f"grad {k}")
    tl = (x["ht"] @ x["wt"].t() + x["bt"]).requires_grad_()
    hs = x["hs"].clone().requires_grad_()
    mod = fastkd.FusedLinearKDLoss(temperature=1.5, student_softcap=2.5, student_logit_scale=1.7,
                                   chunk_size=5, backend=backend)
    loss = mod(hs, x["ws"], target=x["y"], student_bias=x["bs"], teacher_logits=tl)
    loss.backward()
    rs = _capped(x["hs"].double() @ x["ws"].double().t() + x["bs"].double(), 2.5, 1.7)
    rs.requires_grad_()
    rt = tl.detach().double().requires_grad_()
    ref = kd_loss(rs, rt, x["y"], temperature=1.5, backend="reference")
    ref.backward()
    assert_close_loss(loss, ref, torch.float32)
    assert_close_grad(tl.grad, rt.grad, torch.float32, "teacher_logits grad")


def test_softcap_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    ht, wt = torch.randn(4, 6), torch.randn(10, 6)
    topk = (torch.tensor([[0, 1]] * 4), torch.full((4, 2), -2.0))
    f = fastkd.FusedLinearKDLoss
    cases = [
        (lambda: f(student_softcap=0.0), ValueError, "student_softcap must be > 0"),
        (lambda: f(teacher_softcap=-3), ValueError, "teacher_softcap must be > 0"),
        (lambda: f(student_softcap=math.inf), ValueError, "student_softcap must be finite"),
        (lambda: f(teacher_softcap=math.nan), ValueError, "teacher_softcap must be finite"),
        (lambda: f(student_softcap="30"), TypeError, "student_softcap"),
        (lambda: f(student_logit_scale=0), ValueError, "student_logit_scale must be > 0"),
        (lambda: f(teacher_logit_scale=math.inf), ValueError, "teacher_logit_scale"),
        (lambda: f(student_logit_scale=None), TypeError, "student_logit_scale"),
        (lambda: fused_linear_kd_loss(h, w, ht, wt, student_softcap=-1.0), ValueError,
         "student_softcap"),
        (lambda: f(teacher_softcap=5.0)(h, w, teacher_logits=torch.randn(4, 10)), ValueError,
         "teacher_softcap and teacher_logit_scale apply to a teacher given as teacher_hidden"),
        (lambda: f(teacher_logit_scale=2.0)(h, w, teacher_topk=topk), ValueError,
         "teacher_topk are taken as final"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    m = f(student_softcap=30, teacher_logit_scale=2)
    assert (m.student_softcap, m.student_logit_scale) == (30.0, 1.0)
    assert (m.teacher_softcap, m.teacher_logit_scale) == (None, 2.0)


# --- low precision: every gradient within 1.2x of the rounding floor --------------------------

def _floor_ratios(x, grads, ref):
    """{name: error / (error of rounding the exact float64 gradient to the input dtype)}."""
    dtype = x["hs"].dtype
    return {k: rel_err(grads[k], ref[k]) / rel_err(ref[k].to(dtype), ref[k]) for k in ref}


def _assert_at_floor(x, caps, backend, kw, what):
    _, ref = _reference(x, caps, **kw)
    _, got = _fused(x, caps, backend, chunk=48, **kw)  # two full chunks and a tail
    ratios = _floor_ratios(x, got, ref)
    bad = {k: round(r, 2) for k, r in ratios.items() if not r <= 1.2}
    assert not bad, f"{what}: error / rounding floor > 1.2: {bad}"


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_at_rounding_floor(backend, device, dtype):
    """The chunk's logits (and the logit gradient) stay float32: rounding them to bf16, as
    nn.Linear in bf16 would, puts the gradients at 2-7x the floor on these shapes."""
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("triton interpreter: too slow for V = 4000")
    x = {k: v.to(device) for k, v in _inputs(112, 64, 4000, dtype, seed=2).items()}
    for div in DIVS:
        for name, caps in (("plain", ((None, 1.0), (None, 1.0))), ("softcap", CAPS["both"])):
            kw = dict(temperature=2.0, divergence=div)
            _assert_at_floor(x, caps, backend, kw, f"{div} {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_gemm_scheme_on_cpu(monkeypatch, dtype):
    """The CUDA scheme (low-precision GEMM operands with float32 results; the float32 logit
    gradient rounded, or split into two terms, for the backward GEMMs; fp16: scaled first),
    run on CPU tensors."""
    if not fastkd.available_backends()["cpu"]["available"]:
        pytest.skip("no cpu kernels")
    monkeypatch.setattr(fused_linear, "_gemm_operand", lambda t: t)
    x = _inputs(112, 64, 4000, dtype, seed=3)
    for div in ("kl", "tvd"):
        _assert_at_floor(x, CAPS["both"], "cpu", dict(temperature=2.0, divergence=div),
                         f"emulated cuda {div}")
