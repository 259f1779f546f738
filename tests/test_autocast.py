"""fastkd losses inside ``torch.autocast`` (issue #7), on CPU with bfloat16.

The documented behaviour (README, "torch.compile and autocast"): the losses are excluded from
autocast. Their inputs are consumed in the dtype they arrive in (bf16 logits / features produced
by autocast layers are not cast back, nor are float32 inputs cast down), all math is float32, the
loss is float32 and each gradient comes in its input's dtype (the adapter's float32 parameters get
float32 gradients). So a loss computed inside an autocast region equals the same loss computed
outside it on the same inputs, for every backend. The one exception (CUDA only, tested on a GPU):
FeatureKDLoss on the cuda/triton backends runs its adapter GEMMs in the autocast dtype when the
student features have it, so there the result is close to, not equal to, the float32 one.
"""
from __future__ import annotations

import pytest
import torch

import fastkd

from _helpers import backends_for, rel_err

BF16 = torch.bfloat16


def _params():
    """(backend, device, autocast dtype): bf16 on CPU; bf16 and fp16 on a GPU."""
    out = [pytest.param(b, "cpu", BF16, id=f"{b}-cpu") for b in backends_for("cpu") + ["reference"]]
    out += [pytest.param(b, "cuda", dt, id=f"{b}-cuda-{str(dt)[6:]}", marks=pytest.mark.gpu)
            for b in ("cuda", "triton", "reference") for dt in (BF16, torch.float16)]
    return out


def _needs(backend, device):
    if backend != "reference" and backend not in backends_for(device):
        pytest.skip(f"backend {backend!r} is not available on {device} here")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _family(name, backend, device="cpu"):
    """(loss callable(student_out, teacher) -> scalar, student layer, teacher tensor)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 11 if name == "kd" else 6).to(device)
    if name == "kd":
        target = torch.tensor([1, 4, -100, 0, 10, 3], device=device)
        kd = fastkd.KDLoss(temperature=2.0, hard_weight=0.5, backend=backend)
        return (lambda s, t: kd(s, t, target)), kd, layer, torch.randn(6, 11, device=device)
    if name == "feature":
        module = fastkd.FeatureKDLoss(6, 5, backend=backend, device=device)
        return module, module, layer, torch.randn(6, 5, device=device)
    module = {"sp": fastkd.SPLoss, "rkd": fastkd.RKDLoss, "pkt": fastkd.PKTLoss}[name](
        backend=backend)
    return module, module, layer, torch.randn(6, 5, device=device)


@pytest.mark.parametrize("backend,device,dtype", _params())
@pytest.mark.parametrize("name", ["kd", "feature", "sp", "rkd", "pkt"])
@pytest.mark.parametrize("teacher_half", [False, True])
def test_loss_inside_autocast(name, backend, device, dtype, teacher_half):
    _needs(backend, device)
    loss_fn, module, layer, teacher = _family(name, backend, device)
    teacher = teacher.to(dtype if teacher_half else torch.float32)
    x = torch.randn(6, 8, device=device)

    def _autocast():
        return torch.autocast(device, dtype=dtype)

    with _autocast():
        student = layer(x)
        assert student.dtype == dtype  # produced by autocast
        loss = loss_fn(student, teacher)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert layer.weight.grad.dtype == torch.float32
    for p in module.parameters():  # the FeatureKDLoss adapter stays float32
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32

    # The same bf16 inputs inside and outside autocast give identical results.
    s = student.detach().requires_grad_()
    params = list(module.parameters())
    results = []
    for region in (_autocast, lambda: torch.autocast(device, enabled=False)):
        with region():
            out = loss_fn(s, teacher)
        grads = torch.autograd.grad(out, [s] + params)
        results.append((out.detach(), grads))
    (l_in, g_in), (l_out, g_out) = results
    assert g_in[0].dtype == dtype
    if name == "feature" and device == "cuda" and backend != "reference":
        # The adapter GEMMs follow autocast here (close, not equal; see the module docstring).
        for a, b in zip((l_in,) + g_in, (l_out,) + g_out):
            assert a.dtype == b.dtype and rel_err(a, b) < 3e-2
        return
    torch.testing.assert_close(l_in, l_out, rtol=0, atol=0)
    for a, b in zip(g_in, g_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["kd", "feature", "sp", "rkd", "pkt"])
def test_compile_inside_autocast(name):
    """A compiled student step with autocast inside the compiled region (the fastkd op is called
    under autocast at trace time and at run time) matches eager."""
    backend = backends_for("cpu")[0] if backends_for("cpu") else "reference"
    loss_fn, module, layer, teacher = _family(name, backend)
    x = torch.randn(6, 8)
    params = list(layer.parameters()) + list(module.parameters())

    def step(x, teacher):
        with torch.autocast("cpu", dtype=BF16):
            return loss_fn(layer(x), teacher)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        out = fn(x, teacher)
        results.append((out.detach(), torch.autograd.grad(out, params)))
    (l_e, g_e), (l_c, g_c) = results
    assert l_c.dtype == torch.float32
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
