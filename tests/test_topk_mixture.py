"""Several sparse top-k teachers (SPEC §1c for top-k teachers): the merge of their lists into
one sparse teacher over the union, checked against the dense float64 mixture reference, on every
backend, through KDLoss and FusedLinearKDLoss, under torch.compile, and its errors."""
from __future__ import annotations

import math

import pytest
import torch

from _helpers import assert_close_grad, assert_close_loss

import fastkd
from fastkd.logit import topk
from fastkd.logit import topk_teacher as tt
from fastkd.logit.reference import (divergence_rows, topk_bucket_logprobs,
                                    topk_mixture_bucket_logprobs)
from fastkd.logit.topk_teacher import TopKTeacher, merge_topk_teachers

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton interpreter selects

DIVS = ["kl", "reverse_kl", "jsd", "tvd"]


def _teacher(n, vocab, k, seed, *, holes=0.0, dtype=torch.float32, temperature=1.0):
    """Top k of a random teacher at ``temperature`` in a shuffled order; a fraction ``holes``
    of the slots emptied (-1)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.5
    lp, idx = torch.log_softmax(t / temperature, -1).topk(k, -1)
    perm = torch.argsort(torch.rand(n, k, generator=g), -1)
    idx, lp = idx.gather(-1, perm), lp.gather(-1, perm)
    if holes:
        idx = torch.where(torch.rand(n, k, generator=g) < holes, -1, idx)
    return idx, lp.to(dtype)


def _rows_d(logp, logq, div):
    return divergence_rows(logp, logq, div, 0.4)


@pytest.mark.parametrize("vocab,ks", [(40, (5, 8, 3)), (25, (25, 25)), (60, (1, 20))])
def test_merge_matches_dense_mixture(vocab, ks):
    """The merged sparse teacher gives the dense mixture's divergence on every row (float64),
    and sum_i k_i > V (two full lists) still fits in V slots."""
    n = 6
    teachers = [_teacher(n, vocab, k, seed=i, holes=0.2 if k < vocab else 0.0,
                         dtype=torch.float64) for i, k in enumerate(ks)]
    weights = [0.6, 0.3, 0.1][:len(ks)]
    weights = [w / sum(weights) for w in weights]
    idx, lp = merge_topk_teachers(teachers, weights, vocab)
    assert idx.shape == (n, min(sum(ks), vocab)) and lp.dtype == torch.float64
    used = idx >= 0
    # Distinct entries first, ascending; empty slots last.
    assert (used.long().diff(dim=-1) <= 0).all()
    big = torch.where(used, idx, vocab + torch.arange(idx.shape[-1]))
    assert (big.diff(dim=-1) > 0).all()
    s = torch.randn(n, vocab, dtype=torch.float64) * 2
    merged = topk_bucket_logprobs(s, idx, lp, 1.0)
    dense = topk_mixture_bucket_logprobs(s, teachers, weights, 1.0)
    for div in DIVS:
        torch.testing.assert_close(_rows_d(*merged, div), _rows_d(*dense, div), rtol=1e-10,
                                   atol=1e-12)


def test_merge_check_can_fail():
    """The comparison above catches a merge that forgets the other teachers' spread residual
    (the planted bug: each listed entry gets only the teachers that list it)."""
    vocab, n = 40, 4
    teachers = [_teacher(n, vocab, k, seed=i, dtype=torch.float64) for i, k in enumerate((5, 8))]
    idx, lp = merge_topk_teachers(teachers, [0.5, 0.5], vocab)
    s = torch.randn(n, vocab, dtype=torch.float64)
    dense = _rows_d(*topk_mixture_bucket_logprobs(s, teachers, [0.5, 0.5], 1.0), "kl")
    assert torch.allclose(_rows_d(*topk_bucket_logprobs(s, idx, lp, 1.0), "kl"), dense)
    pad = [(i, torch.where(i >= 0, lp_, -math.inf)) for i, lp_ in teachers]
    with_bug = merge_topk_teachers([(pad[0][0], pad[0][1]), (pad[1][0], pad[1][1])],
                                   [0.5, 0.5], vocab * 1000)  # rho ~ 0: the residual term lost
    bad = _rows_d(*topk_bucket_logprobs(s, with_bug[0], with_bug[1], 1.0), "kl")
    assert not torch.allclose(bad, dense, rtol=1e-4)


def _backends():
    out = ["reference", "chunked"]
    if "cpu" in topk.FUSED_KERNELS:
        out.append("cpu")
    try:
        import triton  # noqa: F401
        out.append("triton")
    except ImportError:
        pass
    return out


def _kd(backend, s, teachers, weights, **cfg):
    if backend == "chunked":  # the chunked PyTorch path (no fused kernel)
        saved = topk.FUSED_KERNELS.pop("triton", None)
        try:
            return _kd_call("triton", s, teachers, weights, **cfg)
        finally:
            if saved is not None:
                topk.FUSED_KERNELS["triton"] = saved
    return _kd_call(backend, s, teachers, weights, **cfg)


def _kd_call(backend, s, teachers, weights, target=None, **cfg):
    return fastkd.KDLoss(teacher_weights=weights, backend=backend, **cfg)(
        s, target=target, teacher_topk=teachers)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "reference"])
@pytest.mark.parametrize("divergence", DIVS)
def test_kdloss_several_topk_teachers(backend, divergence):
    """KDLoss(teacher_topk=[...], teacher_weights=...) on each backend against the reference
    backend's dense float64 mixture: T = 2 with a TopKTeacher taken at T_src = 1 (re-tempered
    before mixing), a teacher with empty slots, a zero weight, hard CE and an ignored row."""
    n, vocab = 5, 70
    teachers = [_teacher(n, vocab, 6, seed=1),
                _teacher(n, vocab, 9, seed=2, holes=0.3, dtype=torch.bfloat16),
                TopKTeacher(*_teacher(n, vocab, 4, seed=3), temperature=1.0)]
    weights = [0.5, 0.0, 0.5] if divergence == "tvd" else [0.2, 0.5, 0.3]
    y = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(4))
    y[2] = -100
    cfg = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.4, target=y)
    s = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(5)) * 3)
    sd = s.double().requires_grad_()
    ref = _kd("reference", sd, teachers, weights, **cfg)
    ref_grad, = torch.autograd.grad(ref, sd)
    sf = s.clone().requires_grad_()
    out = _kd(backend, sf, teachers, weights, **cfg)
    grad, = torch.autograd.grad(out, sf)
    assert_close_loss(out, ref, torch.float32)
    assert_close_grad(grad, ref_grad, torch.float32)


def test_one_teacher_in_a_list_is_that_teacher():
    n, vocab = 4, 30
    pair = _teacher(n, vocab, 5, seed=9)
    s = torch.randn(n, vocab)
    a = fastkd.KDLoss(temperature=2.0, backend="reference")(s, teacher_topk=pair)
    b = fastkd.KDLoss(temperature=2.0, backend="reference", teacher_weights=[3.0])(
        s, teacher_topk=[pair])
    torch.testing.assert_close(a, b)


def test_fused_linear_several_topk_teachers():
    """FusedLinearKDLoss takes the list too; it matches KDLoss on the materialised logits."""
    n, h, vocab = 6, 8, 50
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(vocab, h, generator=g, requires_grad=True)
    teachers = [_teacher(n, vocab, 7, seed=1), _teacher(n, vocab, 3, seed=2, holes=0.3)]
    weights = [0.7, 0.3]
    fl = fastkd.FusedLinearKDLoss(temperature=1.5, teacher_weights=weights)(
        hs, w, teacher_topk=teachers)
    g_fl = torch.autograd.grad(fl, [hs, w])
    kd = fastkd.KDLoss(temperature=1.5, teacher_weights=weights, backend="reference")(
        hs.double() @ w.double().T, teacher_topk=teachers)
    g_kd = torch.autograd.grad(kd, [hs, w])
    assert_close_loss(fl, kd, torch.float32)
    for a, b in zip(g_fl, g_kd):
        assert_close_grad(a, b, torch.float32)


def test_several_topk_teachers_compile_fullgraph():
    n, vocab = 4, 40
    teachers = [_teacher(n, vocab, 5, seed=1), _teacher(n, vocab, 8, seed=2)]
    loss = fastkd.KDLoss(temperature=2.0, teacher_weights=[0.5, 0.5])
    s = torch.randn(n, vocab, requires_grad=True)
    eager = loss(s, teacher_topk=teachers)
    compiled = torch.compile(lambda x: loss(x, teacher_topk=teachers), fullgraph=True,
                             backend="eager")(s)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_several_topk_teachers_errors(backend):
    """Each teacher's data is checked and named; teacher_weights must match their count."""
    if backend == "cpu" and "cpu" not in topk.FUSED_KERNELS:
        pytest.skip("fastkd._C is not built with the top-k kernel")
    n, vocab = 3, 20
    good = _teacher(n, vocab, 4, seed=1)
    s = torch.randn(n, vocab)
    loss = fastkd.KDLoss(backend=backend)
    dup = (good[0].clone(), good[1])
    dup[0][1, 1] = dup[0][1, 0]
    with pytest.raises(ValueError, match=r"teacher_topk\[1\] indices must be distinct"):
        loss(s, teacher_topk=[good, dup])
    far = (good[0].clone(), good[1])
    far[0][0, 0] = vocab
    with pytest.raises(ValueError, match=r"teacher_topk\[0\] indices must lie in"):
        loss(s, teacher_topk=[far, good])
    with pytest.raises(ValueError, match="teacher_weights has 3 entries but 2 teachers"):
        fastkd.KDLoss(backend=backend, teacher_weights=[1, 1, 1])(s, teacher_topk=[good, good])
    with pytest.raises(ValueError, match=r"teacher_topk\[1\] tensors have shape"):
        loss(s, teacher_topk=[good, (good[0][:2], good[1][:2])])
    with pytest.raises(TypeError, match="holds only"):
        loss(s, teacher_topk=[good, good[0]])


def test_ragged_rows_retemper_like_their_listed_entries():
    """Re-tempering a row with empty slots spreads its residual over V - (listed entries),
    exactly as the same row without the empty slots."""
    vocab = 50
    idx, lp = _teacher(4, vocab, 10, seed=3, dtype=torch.float64)
    holes = torch.zeros_like(idx, dtype=torch.bool)
    holes[:, 7:] = True
    ragged = TopKTeacher(torch.where(holes, -1, idx), torch.where(holes, 0.0, lp), 1.0)
    short = TopKTeacher(idx[:, :7], lp[:, :7], 1.0)
    a = ragged.logprobs_at(3.0, vocab)[:, :7]
    b = short.logprobs_at(3.0, vocab)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="or -1"):
        TopKTeacher(torch.where(holes, -2, idx), lp)
    assert tt.retemper_logprobs(lp, vocab, 1.0, 1.0) is lp
