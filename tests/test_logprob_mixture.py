"""teacher_mixture="logprob": several dense teachers mixed in log space (SPEC §1c), on the fused
kernels (cpu, triton; the CUDA kernel in tests/test_cuda_emulated.py), against the float64
reference ``kd_rows_reference(..., teacher_mixture="logprob")``.

The mixture log p = sum_i w_i log p_i - logsumexp(.) is log_softmax(y / T) of the logits
y = sum_i w_i t_i (teachers of weight 0 left out), which is how the kernels compute it; the
reference keeps the literal form, and the first test checks that the two agree.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastkd import KDLoss
from fastkd.functional import kd_loss
from fastkd.logit.reference import kd_rows_reference

from _helpers import HALF, assert_close_grad, assert_close_loss, backend_params

DIVS = ["kl", "reverse_kl", "jsd", "tvd"]


def _case(n, vocab, dtype, n_teachers, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    ts = [(torch.randn(n, vocab, generator=g) * scale + i).to(dtype) for i in range(n_teachers)]
    y = torch.randint(0, vocab, (n,), generator=g)
    if n > 1:
        y[1] = -100
    return s, ts, y


def _run(backend, s, ts, y, weights, *, teacher_grad=True, **kw):
    """Loss and gradients on `backend` and on the float64 reference of the same inputs; a
    teacher the reference leaves out of the graph (weight 0) has the gradient 0."""
    out = {}
    for name in (backend, "reference"):
        sx = (s.double() if name == "reference" else s.clone()).requires_grad_()
        tx = [(t.double() if name == "reference" else t.clone()).requires_grad_(teacher_grad)
              for t in ts]
        loss = kd_loss(sx, tx, y, backend=name, teacher_weights=weights,
                       teacher_mixture="logprob", **kw)
        loss.backward(torch.ones_like(loss))
        gts = [torch.zeros_like(t) if t.grad is None and teacher_grad else t.grad for t in tx]
        out[name] = (loss, sx.grad, gts)
    return out[backend], out["reference"]


def _check(got, ref, dtype, weights):
    (loss, gs, gts), (rloss, rgs, rgts) = got, ref
    assert loss.dtype == torch.float32
    assert_close_loss(loss, rloss, dtype)
    assert_close_grad(gs, rgs, dtype, "student grad")
    for i, (g, r) in enumerate(zip(gts, rgts)):
        if weights[i] == 0:  # left out of the mixture: exactly no gradient
            assert g is not None and g.dtype == dtype and not g.any(), f"teacher[{i}] grad"
        elif r is not None:
            assert_close_grad(g, r, dtype, f"teacher[{i}] grad")


def test_reference_is_softmax_of_weighted_logits():
    """The reference's literal log mixture equals log_softmax(sum_i w_i t_i / T), the form the
    kernels use, with a zero-weight teacher that is -inf where the others are not."""
    s, ts, _ = _case(4, 33, torch.float64, 3, seed=1)
    ts[2][:, :5] = -math.inf
    w = [0.7, 0.3, 0.0]
    kw = dict(temperature=2.5, soft_weight=1.0, hard_weight=0.0, divergence="kl", beta=0.5,
              t2_scale=True, ignore_index=-100, label_smoothing=0.0)
    got = kd_rows_reference(s, ts, None, weights=w, teacher_mixture="logprob", **kw)
    y = w[0] * ts[0] + w[1] * ts[1]
    want = kd_rows_reference(s, [y], None, weights=[1.0], **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# (vocabulary, dtype, teachers, weights, temperature, hard CE with label smoothing)
CASES = [
    (7, torch.float32, 2, [3.0, 1.0], 1.0, 0.0),
    (100, torch.bfloat16, 3, [1.0, 0.0, 2.0], 2.5, 0.1),
    (4099, torch.float32, 3, [0.2, 0.5, 0.3], 2.5, 0.0),
    (100, torch.float16, 2, [0.0, 1.0], 1.0, 0.2),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("divergence", DIVS)
def test_matches_reference(backend, device, divergence):
    """Values, student and teacher gradients: V off block multiples, 2-3 teachers (a zero
    weight among them), T in {1, 2.5}, every dtype, hard CE with an ignore_index row."""
    for k, (vocab, dtype, nt, w, temp, eps) in enumerate(CASES):
        if backend == "triton" and vocab > 1000 and divergence in ("jsd", "tvd"):
            continue  # the interpreter's time goes to the small cases; kl/rkl cover 4099
        s, ts, y = _case(3, vocab, dtype, nt, seed=10 * k + len(divergence))
        s, ts, y = s.to(device), [t.to(device) for t in ts], y.to(device)
        got, ref = _run(backend, s, ts, y, w, divergence=divergence, beta=0.3, temperature=temp,
                        hard_weight=0.5, label_smoothing=eps)
        _check(got, ref, dtype, w)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("divergence", DIVS)
def test_masked_entries(backend, device, divergence):
    """-inf in one positive-weight teacher is -inf in the mixture (p = 0 there); -inf in a
    zero-weight teacher changes nothing; entries masked everywhere stay out. Reverse KL needs
    the student masked wherever p is 0 (else it is infinite): it gets the union."""
    vocab = 100
    for dtype in (torch.float32, torch.bfloat16):
        s, ts, y = _case(3, vocab, dtype, 3, seed=7)
        w = [0.6, 0.4, 0.0]
        ts[0][:, 3] = -math.inf
        ts[1][:, 50:53] = -math.inf
        ts[2][:, 10:90] = -math.inf  # weight 0: left out
        for t in ts:
            t[:, vocab - 1] = -math.inf
        s[:, vocab - 1] = -math.inf
        if divergence == "reverse_kl":
            s[:, 3] = -math.inf
            s[:, 50:53] = -math.inf
        y[y >= 50] = 5
        s, ts, y = s.to(device), [t.to(device) for t in ts], y.to(device)
        got, ref = _run(backend, s, ts, y, w, divergence=divergence, temperature=2.5,
                        hard_weight=0.3)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
        _check(got, ref, dtype, w)


@pytest.mark.parametrize("backend,device", backend_params())
def test_disjoint_masks_raise(backend, device):
    """A counted row whose teachers' unmasked entries do not overlap has a mixture that is -inf
    everywhere: ValueError, as the reference; the same row ignored (ignore_index) is fine."""
    s, ts, y = _case(3, 9, torch.float32, 2, seed=3)
    ts[0][2, :4] = -math.inf
    ts[1][2, 4:] = -math.inf
    s, ts, y = s.to(device), [t.to(device) for t in ts], y.to(device)
    for name in (backend, "reference"):
        with pytest.raises(ValueError, match="log mixture"):
            kd_loss(s, ts, y, backend=name, teacher_mixture="logprob")
    y[2] = -100
    got = kd_loss(s, ts, y, backend=backend, teacher_mixture="logprob", reduction="none")
    assert got[2] == 0 and torch.isfinite(got).all()
    # Weight 0 on either teacher leaves the other's entries: no error.
    y[2] = 0
    kd_loss(s, ts, y, backend=backend, teacher_mixture="logprob", teacher_weights=[1.0, 0.0])


def test_kdloss_end_to_end_and_compile():
    """KDLoss(teacher_mixture="logprob") on the default backend, eager and under
    torch.compile(fullgraph=True), against the reference; [B, L, V] inputs, mean reduction."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 50, generator=g)
    ts = [torch.randn(2, 5, 50, generator=g) for _ in range(3)]
    y = torch.randint(0, 50, (2, 5), generator=g)
    y[0, 1] = -100
    kw = dict(temperature=2.0, hard_weight=0.5, teacher_weights=[0.5, 0.25, 0.25],
              teacher_mixture="logprob")
    ref_s = s.double().requires_grad_()
    ref = KDLoss(backend="reference", **kw)(ref_s, [t.double() for t in ts], y)
    ref.backward()
    loss_fn = KDLoss(**kw)
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        sx = s.clone().requires_grad_()
        loss = fn(sx, ts, y)
        loss.backward()
        assert_close_loss(loss, ref, torch.float32)
        assert_close_grad(sx.grad, ref_s.grad, torch.float32, "student grad")


@pytest.mark.parametrize("backend,device", backend_params())
def test_half_inputs_large_logits(backend, device):
    """Large logits (|t| ~ 1e3, T = 1) in half precision: y is summed in float32 from the
    widened inputs, so the loss and the student gradient are as accurate as with one teacher.
    (Saturated rows' teacher gradients are subnormal-sized, as with one teacher: not checked.)"""
    for dtype in HALF:
        s, ts, y = _case(2, 257, dtype, 2, seed=5, scale=300.0)
        s, ts, y = s.to(device), [t.to(device) for t in ts], y.to(device)
        got, ref = _run(backend, s, ts, y, [0.5, 0.5], teacher_grad=False, divergence="kl",
                        temperature=1.0)
        _check(got, ref, dtype, [0.5, 0.5])
