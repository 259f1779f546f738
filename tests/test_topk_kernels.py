"""Fused kernels of the sparse top-k teacher (SPEC §1b), Triton, C++ CPU and CUDA (on a GPU; the
emulated CUDA kernel is checked in tests/test_cuda_emulated.py), against the float64 reference ``kd_rows_topk_reference`` (row losses; the student gradient by autograd).

Without a GPU the Triton kernel runs in the interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1): small shapes, and small ``block_v`` / ``block_k`` so that the chunked
sweeps, the partial last chunk (V = 300 is no multiple of 64) and the k blocks all run. The CPU
kernel ignores the launch options (its vectors are 8 floats wide: V = 300 has a partial one).
"""
from __future__ import annotations

import math

import pytest
import torch

from _helpers import assert_close_grad, assert_close_loss

from fastkd import _ext
from fastkd.logit import topk
from fastkd.logit.config import FLAG_STUDENT_MASKED, FLAG_TARGET, LogitKDConfig
from fastkd.logit.reference import kd_rows_topk_reference

# The interpreter evaluates both sides of every select (inf / NaN on the side not taken).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

class Kernel:
    """A backend's fused top-k kernel and the device of its tensors."""

    def __init__(self, fn, device):
        self.fn, self.device = fn, device

    def __call__(self, s, idx, lp, y, cfg, scale, need, **launch):
        dev = lambda x: None if x is None else x.to(self.device)  # noqa: E731
        return self.fn(dev(s), dev(idx), dev(lp), dev(y), cfg, dev(scale), need, **launch)


@pytest.fixture(params=["triton", "cpu", "cuda"])
def forward(request):
    if request.param == "triton":
        pytest.importorskip("triton")
        from fastkd.logit.triton_kernel import logit_topk_forward
        return Kernel(logit_topk_forward, "cuda" if torch.cuda.is_available() else "cpu")
    if request.param == "cuda" and (not torch.cuda.is_available()
                                    or _ext.cuda_ext_reason() is not None):
        pytest.skip("the CUDA top-k kernel needs a GPU and fastkd._C built with CUDA "
                    "(tests/test_cuda_emulated.py runs it emulated)")
    if request.param not in topk.FUSED_KERNELS:
        pytest.skip("fastkd._C is not built with the top-k kernel")
    return Kernel(lambda *args, **_launch: topk.FUSED_KERNELS[request.param](*args),
                  request.param)

DIVS = ["kl", "reverse_kl", "jsd", "tvd"]
V = 300


def _teacher(n, vocab, k, temperature, seed, dtype=torch.bfloat16):
    """(indices, logprobs) of a random teacher's top k at T, logprobs rounded to ``dtype``;
    the indices in a shuffled order (the kernel must not rely on the order)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, vocab, generator=g) * 3.0
    lp, idx = torch.log_softmax(t / temperature, -1).topk(k, -1)
    perm = torch.argsort(torch.rand(n, k, generator=g), -1)
    return idx.gather(-1, perm), lp.gather(-1, perm).to(dtype)


def _student(n, vocab, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.randn(n, vocab, generator=g) * scale).to(dtype)


def _run(forward, s, idx, lp, y, cfg, *, grad_scale=None, **launch):
    """Kernel loss and gradient, and the float64 reference's of the same (rounded) inputs."""
    scale = None if grad_scale is None else torch.tensor([grad_scale], dtype=torch.float32)
    rows, grad, flags = forward(s, idx, lp, y, cfg, scale, True, **launch)
    assert int(flags) == 0
    sd = s.double().requires_grad_()
    ref = kd_rows_topk_reference(sd, idx, lp.double(), y, **cfg.reference_kwargs())
    ref.backward(torch.full_like(ref, 1.0 if grad_scale is None else grad_scale))
    return rows.cpu(), grad.cpu(), ref.detach(), sd.grad


def _check(forward, s, idx, lp, y, cfg, *, what="", **kw):
    rows, grad, ref, ref_grad = _run(forward, s, idx, lp, y, cfg, **kw)
    assert rows.dtype == torch.float32 and grad.dtype == s.dtype
    assert torch.isfinite(ref).all(), "the case must have a finite reference"
    assert_close_loss(rows, ref, s.dtype, f"{what} loss")
    assert_close_grad(grad, ref_grad, s.dtype, f"{what} grad")
    return rows, grad


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVS)
def test_matches_reference(forward, divergence, temperature):
    """k = 1, 20, V (empty residual); bf16 logprobs; hard CE (with label smoothing at T = 2.5) and
    an ignored row; chunks of 64 over V = 300 and blocks of 8 (k = V: 32) over k."""
    for case, k in enumerate([1, 20, V]):
        idx, lp = _teacher(3, V, k, temperature, seed=case)
        s = _student(3, V, seed=case)
        y = torch.randint(0, V, (3,), generator=torch.Generator().manual_seed(case))
        y[1] = -100
        cfg = LogitKDConfig(temperature=temperature, divergence=divergence, beta=0.3,
                            hard_weight=0.5, label_smoothing=0.1 if temperature != 1.0 else 0.0)
        # k = V: the runs of listed indices span several k blocks per chunk.
        rows, grad = _check(forward, s, idx, lp, y, cfg, what=f"k={k}", grad_scale=0.25,
                            block_v=64, block_k=8 if k < V else 32)
        assert rows[1] == 0 and (grad[1] == 0).all()


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_student(forward, divergence, dtype):
    """Half-precision students (gradient written in their dtype); default launch options."""
    idx, lp = _teacher(3, 257, 20, 2.0, seed=7)
    s = _student(3, 257, seed=7, dtype=dtype)
    cfg = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.7, t2_scale=False)
    _check(forward, s, idx, lp, None, cfg)


@pytest.mark.parametrize("divergence", DIVS)
def test_jsd_endpoints_and_no_t2(forward, divergence):
    """JSD at beta 0 / 1 (the KLs exactly); soft_weight and t2_scale; float32 logprobs."""
    idx, lp = _teacher(3, 100, 10, 3.0, seed=3, dtype=torch.float32)
    s = _student(3, 100, seed=3)
    for beta in (0.0, 1.0):
        cfg = LogitKDConfig(temperature=3.0, divergence=divergence, beta=beta, soft_weight=0.7,
                            t2_scale=beta == 0.0)
        _check(forward, s, idx, lp, None, cfg, what=f"beta={beta}", block_v=32, block_k=4)


@pytest.mark.parametrize("divergence", DIVS)
def test_residual_zero(forward, divergence):
    """P_res = 0: listed mass 1 + 5e-4 (clamped, the excess counts in KL), and a student whose
    unlisted entries are all -inf (empty residual). Reverse KL of the first is infinite."""
    k = 12
    idx, lp = _teacher(3, 64, k, 1.0, seed=11, dtype=torch.float32)
    lp = (torch.log_softmax(lp.double(), -1) + math.log1p(5e-4)).float()
    s = _student(3, 64, seed=11)
    cfg = LogitKDConfig(divergence=divergence, beta=0.4)
    if divergence != "reverse_kl":
        _check(forward, s, idx, lp, None, cfg, what="excess", block_v=16, block_k=4)
    else:
        rows, _, ref, _ = _run(forward, s, idx, lp, None, cfg, block_v=16, block_k=4)
        assert torch.isinf(ref).all() and torch.isinf(rows).all()
    masked = torch.full_like(s, -math.inf).scatter(-1, idx, s.gather(-1, idx))
    _, lp2 = _teacher(3, 64, k, 1.0, seed=12)
    _check(forward, masked, idx, lp2, None, cfg, what="empty", block_v=16, block_k=4)


@pytest.mark.parametrize("divergence", DIVS)
def test_tiny_and_far_residual(forward, divergence):
    """The student's unlisted mass is ~1e-9 (1 - sum Q_j would round to 0 or less), and, with
    logits of +-1e4 at T = 1, ~e^-1e4 (summed relative to its own max)."""
    k = 16
    idx, lp = _teacher(4, 200, k, 1.0, seed=5)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 200, generator=g) - 25.0
    s.scatter_(-1, idx, torch.randn(4, k, generator=g))
    cfg = LogitKDConfig(divergence=divergence, beta=0.5, hard_weight=0.3)
    y = idx[:, 0].clone()
    _check(forward, s, idx, lp, y, cfg, what="tiny", block_v=64, block_k=8)
    far = s.clone()
    far[:, :] = -1e4 + torch.randn(4, 200, generator=g)
    far.scatter_(-1, idx, 1e4 + torch.randn(4, k, generator=g))
    far[0, idx[0, :4]] = -1e4  # listed entries far below the max too
    y[2] = int(torch.nonzero(~torch.zeros(200, dtype=torch.bool).scatter(0, idx[2], True))[0])
    _check(forward, far, idx, lp, y, cfg, what="far")


@pytest.mark.parametrize("divergence", DIVS)
def test_masked_student_entries(forward, divergence):
    """-inf student entries, unlisted and (where the divergence stays finite) listed; label
    smoothing skips them."""
    idx, lp = _teacher(4, 150, 20, 2.0, seed=9)
    s = _student(4, 150, seed=9)
    unlisted = torch.ones(4, 150, dtype=torch.bool).scatter(-1, idx, False)
    s[unlisted & (torch.arange(150) % 3 == 0)] = -math.inf
    if divergence != "kl":  # Q = 0 < P is infinite for KL(P || Q)
        s[0, idx[0, 3]] = -math.inf
    y = idx[:, 1].clone()
    cfg = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=1.0,
                        label_smoothing=0.2)
    _check(forward, s, idx, lp, y, cfg, block_v=64, block_k=8)


def test_loss_only_ignored_rows_and_flags(forward):
    """need_grad=False gives the same losses and no gradient; ignored rows are never read
    (NaN there stays out); a bad target and an all -inf counted row raise their flags."""
    idx, lp = _teacher(4, 50, 5, 1.0, seed=2)
    s = _student(4, 50, seed=2)
    s[2] = math.nan
    y = torch.tensor([3, 7, 5, 9])
    cfg = LogitKDConfig(hard_weight=1.0, label_smoothing=0.1, ignore_index=5)
    rows, grad, ref, _ = _run(forward, s, idx, lp, y, cfg)
    assert rows[2] == 0 and (grad[2] == 0).all() and torch.isfinite(grad).all()
    assert_close_loss(rows, ref, torch.float32)
    rows2, none, flags = forward(s, idx, lp, y, cfg, None, False)
    assert none is None and int(flags) == 0 and torch.equal(rows2.cpu(), rows)
    s[1] = -math.inf
    y[0] = 50
    rows3, grad3, flags = forward(s, idx, lp, y, cfg, None, True)
    assert int(flags) == FLAG_TARGET | FLAG_STUDENT_MASKED
    assert (rows3.cpu()[:3] == 0).all() and (grad3.cpu()[:3] == 0).all()


@pytest.mark.parametrize("divergence", DIVS)
def test_empty_slots(forward, divergence):
    """Index -1 marks an empty slot (ragged rows, merged teachers): its logprob is not read
    (NaN here), nothing is written for it, and the row equals the same row without the slot.
    A row of empty slots only is all residual on both sides (D = 0, only the hard CE)."""
    n, k = 4, 12
    idx, lp = _teacher(n, 90, k, 2.0, seed=21, dtype=torch.float32)
    lp = torch.log_softmax(lp, -1) + math.log(0.8)  # a residual of 0.2
    holes = torch.rand(n, k, generator=torch.Generator().manual_seed(5)) < 0.3
    holes[2] = True
    idx = torch.where(holes, -1, idx)
    lp = torch.where(holes, math.nan, lp)
    s = _student(n, 90, seed=21)
    y = torch.tensor([3, 5, 7, -100])
    cfg = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.6, hard_weight=0.5)
    rows, grad = _check(forward, s, idx, lp, y, cfg, what="holes", block_v=32, block_k=4)
    for r in range(2):
        keep = ~holes[r]
        r_rows, r_grad, _ = forward(s[r:r + 1], idx[r:r + 1, keep], lp[r:r + 1, keep],
                                    y[r:r + 1], cfg, None, True, block_v=32, block_k=4)
        torch.testing.assert_close(rows[r:r + 1], r_rows.cpu(), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(grad[r:r + 1], r_grad.cpu(), rtol=2e-5, atol=1e-7)
    soft_only = LogitKDConfig(temperature=2.0, divergence=divergence, beta=0.6)
    r_rows, r_grad, _ = forward(s[2:3], idx[2:3], lp[2:3], None, soft_only, None, True)
    assert r_rows.item() == 0.0 and r_grad.abs().max().item() < 1e-7
