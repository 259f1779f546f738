"""Shared helpers of the fastkd tests: backends to test and SPEC tolerances."""
from __future__ import annotations

import pytest
import torch

import fastkd

HALF = (torch.bfloat16, torch.float16)


def backends_for(device: str):
    """Fused backends that can run on ``device`` here (reference is the ground truth)."""
    info = fastkd.available_backends()
    out = []
    if device == "cpu":
        if info["cpu"]["available"]:
            out.append("cpu")
        if info["triton"]["available"] and not torch.cuda.is_available():
            out.append("triton")  # interpreter
    elif torch.cuda.is_available():
        out += [b for b in ("cuda", "triton") if info[b]["available"]]
    return out


def backend_params():
    """pytest params (backend, device) for every fused backend present on this machine."""
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in backends_for("cpu")]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
               for b in backends_for("cuda")]
    if not params:
        params = [pytest.param("cpu", "cpu", marks=pytest.mark.skip("no fused backend built"))]
    return params


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64 (0 when both are 0)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm()
    num = (x - ref).norm()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def loss_tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-4


def grad_tol(dtype, ref: torch.Tensor) -> float:
    """SPEC: fp32 gradients 1e-4; bf16/fp16 1e-2, "the only error being the final rounding to the
    input dtype" - so where rounding the exact gradient to the dtype alone errs by more (fp16
    subnormals at tiny gradients), the bound is twice that rounding error."""
    if dtype == torch.float32:
        return 1e-4
    return max(1e-2, 2 * rel_err(ref.to(dtype), ref))


def assert_close_loss(x, ref, dtype, what="loss"):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    err = (x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
    assert err <= loss_tol(dtype) or (x - ref).abs().max() <= 1e-9, \
        f"{what}: rel err {err:.3g} > {loss_tol(dtype)} ({x} vs {ref})"


def assert_close_grad(g, ref, dtype, what="grad"):
    assert g is not None, f"{what} missing"
    assert g.dtype == dtype, f"{what} dtype {g.dtype} != {dtype}"
    err = rel_err(g, ref)
    assert err <= grad_tol(dtype, ref), f"{what}: rel err {err:.3g} > {grad_tol(dtype, ref):.3g}"
