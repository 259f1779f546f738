"""divergence="uld": Universal Logit Distillation across tokenizers (SPEC §1d).

The float64 reference is checked against an independent per-row computation and by gradcheck;
every fused backend (cpu, triton through the interpreter; cuda on a GPU) against the float64
reference; then reductions, num_items_in_batch, torch.compile, the kernel-table contract, bad
inputs, and parity with TRL's ``ULDLoss`` (skipped without trl).
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional import kd_loss
from fastkd.logit import uld
from fastkd.logit.config import LogitKDConfig
from fastkd.logit.reference import uld_rows_reference

from _helpers import assert_close_grad, assert_close_loss, backend_params

NEG = float("-inf")


def _cfg_kwargs(**kw):
    return LogitKDConfig(divergence="uld", **kw).reference_kwargs()


def _inputs(n, vs, vt, dtype=torch.float32, seed=0, masked=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vs, generator=g) * scale
    t = torch.randn(n, vt, generator=g) * scale
    y = torch.randint(0, vs, (n,), generator=g)
    if masked and n > 2:
        s[1, vs // 2:vs // 2 + 3] = NEG  # masked entries (-inf): probability 0
        t[2, :4] = NEG
        y[1] = 0  # a target on a finite entry
    return s.to(dtype), t.to(dtype), y


def _brute_row(s, t, y, T, sw, hw, t2, eps, top):
    """One row by plain Python lists: sort, truncate, pad, sum |p - q|; CE as F.cross_entropy
    (its smoothing sum over the finite entries, as SPEC §1)."""
    q = sorted(torch.softmax(s / T, -1).tolist(), reverse=True)
    p = sorted(torch.softmax(t / T, -1).tolist(), reverse=True)
    if top is not None:
        q, p = q[:top], p[:top]
    width = max(len(q), len(p))
    q += [0.0] * (width - len(q))
    p += [0.0] * (width - len(p))
    loss = sw * (T * T if t2 else 1.0) * sum(abs(a - b) for a, b in zip(p, q))
    if hw:
        logq = torch.log_softmax(s, -1)
        fin = s != NEG
        ce = -(1 - eps) * logq[y] - eps * logq[fin].sum() / s.shape[-1]
        loss += hw * float(ce)
    return loss


@pytest.mark.parametrize("vs,vt,top", [(7, 11, None), (11, 7, None), (9, 9, 4), (5, 8, 20)])
def test_reference_matches_brute_force(vs, vt, top):
    s, t, y = _inputs(4, vs, vt, torch.float64, masked=True)
    y[3] = -100
    kw = dict(temperature=1.7, soft_weight=0.8, hard_weight=0.3, t2_scale=True,
              label_smoothing=0.1, uld_top=top)
    rows = uld_rows_reference(s, t, y, **_cfg_kwargs(**kw))
    for r in range(4):
        want = 0.0 if r == 3 else _brute_row(s[r], t[r], y[r], 1.7, 0.8, 0.3, True, 0.1, top)
        assert abs(float(rows[r]) - want) <= 1e-12 * max(1.0, abs(want))


@pytest.mark.parametrize("top", [None, 3])
def test_reference_gradcheck(top):
    s, t, y = _inputs(2, 4, 6, torch.float64, masked=False, seed=3)
    s.requires_grad_()
    t.requires_grad_()
    kw = _cfg_kwargs(temperature=1.3, hard_weight=0.5, label_smoothing=0.2, uld_top=top)
    assert torch.autograd.gradcheck(lambda a, b: uld_rows_reference(a, b, y, **kw), (s, t))


def test_reference_gradient_is_the_documented_formula():
    # dD/ds_v = (1/T) q_v (g_v - sum q g), g_v = sign(q_(j) - p_(j)) at v's sorted position.
    s, t, _ = _inputs(2, 6, 9, torch.float64, masked=False, seed=5)
    s.requires_grad_()
    T = 1.5
    uld_rows_reference(s, t, None, **_cfg_kwargs(temperature=T, t2_scale=False)).sum().backward()
    q = torch.softmax(s.detach() / T, -1)
    p = torch.softmax(t / T, -1).sort(-1, descending=True).values
    qs, qi = q.sort(-1, descending=True)
    g = torch.zeros_like(q).scatter_(-1, qi, torch.sign(qs - p[:, :6]))
    want = q * (g - (q * g).sum(-1, keepdim=True)) / T
    assert torch.allclose(s.grad, want, rtol=1e-12, atol=1e-15)


def _run(backend, s, t, y, t_grad=True, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(t_grad)
    loss = kd_loss(s, t, y, divergence="uld", backend=backend, **kw)
    n = loss.numel()  # row losses get unequal weights (grad_output per row)
    weight = torch.linspace(0.5, 1.5, n) if n > 1 else torch.ones(())
    (loss * weight.to(loss.device).reshape(loss.shape)).sum().backward()
    return loss, s.grad, t.grad


def _check(backend, device, s, t, y, dtype, t_grad=True, **kw):
    ref = _run("reference", s.double(), t.double(), y, t_grad, **kw)
    out = _run(backend, s.to(device), t.to(device), None if y is None else y.to(device),
               t_grad, **kw)
    assert_close_loss(out[0], ref[0], dtype)
    assert_close_grad(out[1], ref[1], dtype, "grad student")
    if t_grad:
        assert_close_grad(out[2], ref[2], dtype, "grad teacher")
    return out


CASES = [
    pytest.param(37, 101, {}, id="37x101"),
    pytest.param(101, 37, dict(temperature=2.0, hard_weight=0.5, label_smoothing=0.1),
                 id="101x37-hard-smooth"),
    pytest.param(64, 64, dict(temperature=0.5, t2_scale=False, soft_weight=0.7), id="64x64-T"),
    pytest.param(37, 101, dict(uld_top=10, hard_weight=1.0), id="top10"),
    pytest.param(101, 37, dict(uld_top=50, temperature=3.0), id="top50-between"),
    pytest.param(20, 30, dict(uld_top=200), id="top-above-V"),
    pytest.param(1500, 1100, dict(hard_weight=0.2, uld_top=1200), id="1500x1100-blocks"),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("vs,vt,kw", CASES)
def test_backend_matches_reference_fp32(backend, device, vs, vt, kw):
    s, t, y = _inputs(6, vs, vt)
    y[4] = -100
    _check(backend, device, s, t, y, torch.float32, reduction="none", **kw)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_matches_reference_half(backend, device, dtype):
    # Equal logits (likely in 16 bits) sort in index order on both sides (stable sorts).
    s, t, y = _inputs(5, 53, 97, dtype)
    y[0] = -100
    _check(backend, device, s, t, y, dtype, temperature=1.5, hard_weight=0.5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_student_only(backend, device, reduction):
    s, t, y = _inputs(5, 40, 23)
    y[2] = -100
    out = _check(backend, device, s, t, y, torch.float32, t_grad=False, reduction=reduction,
                 hard_weight=0.5)
    assert out[0].dtype == torch.float32
    assert out[0].shape == ((5,) if reduction == "none" else ())
    if reduction == "none":
        assert float(out[0][2].detach()) == 0.0 and out[1][2].abs().max() == 0.0


@pytest.mark.parametrize("backend,device", backend_params())
def test_num_items_and_ignored_rows(backend, device):
    s, t, y = _inputs(6, 30, 45)
    y[1] = y[4] = -100
    s[1] = float("nan")  # ignored rows may hold anything
    t[4] = NEG
    _check(backend, device, s, t, y, torch.float32, num_items_in_batch=11, hard_weight=0.3)
    # No target: every row counts, no hard term; leading shape [2, 3].
    s, t, _ = _inputs(6, 30, 45, masked=False)
    _check(backend, device, s.reshape(2, 3, 30), t.reshape(2, 3, 45), None, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
def test_identical_distributions_give_zero_loss_and_gradient(backend, device):
    # Every |p_(j) - q_(j)| is at its kink: sign(0) = 0 gives a zero gradient.
    s = torch.randn(3, 17).to(device)
    t = torch.cat([s, torch.full((3, 5), NEG, device=device)], -1)
    loss, gs, gt = _run(backend, s, t, None)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert gs.abs().max() <= 1e-6 and gt.abs().max() <= 1e-6


@pytest.mark.parametrize("backend,device", backend_params())
def test_several_chunks(backend, device, monkeypatch):
    monkeypatch.setattr(uld, "_CHUNK_ELEMENTS", 200)  # 2 rows per chunk
    s, t, y = _inputs(7, 41, 59)
    y[3] = -100
    _check(backend, device, s, t, y, torch.float32, hard_weight=0.4, uld_top=30)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("bad", ["target", "student", "teacher"])
def test_data_errors(backend, device, bad):
    s, t, y = _inputs(4, 10, 12, masked=False)
    if bad == "target":
        y[2] = 10
    elif bad == "student":
        s[1] = NEG
    else:
        t[3] = NEG
    for b in (backend, "reference"):
        with pytest.raises(ValueError, match="outside|-inf everywhere"):
            kd_loss(s.to(device), t.to(device), y.to(device), divergence="uld", backend=b)


@pytest.mark.parametrize("backend,device", backend_params())
def test_kernel_table_contract(backend, device):
    s, t, y = _inputs(5, 33, 21)
    s, t, y = s.to(device).to(torch.bfloat16), t.to(device), y.to(device)
    y[0] = -100
    cfg = LogitKDConfig(divergence="uld", hard_weight=0.5, temperature=1.3)
    scale = torch.tensor([0.25], device=device)
    rows, gs, (gt,), flags = uld.ULD_KERNELS[backend](s, [t], y, [1.0], cfg, scale, True,
                                                      [True])
    assert rows.dtype == torch.float32 and rows.shape == (5,) and float(rows[0]) == 0.0
    assert gs.dtype == torch.bfloat16 and gt.dtype == torch.float32 and int(flags) == 0
    sr, tr = s.double().requires_grad_(), t.double().requires_grad_()
    ref = uld_rows_reference(sr, tr, y, **cfg.reference_kwargs())
    (ref.sum() * 0.25).backward()
    assert_close_loss(rows, ref, torch.float32)
    assert_close_grad(gs, sr.grad, torch.bfloat16)
    assert_close_grad(gt, tr.grad, torch.float32)
    y[1] = 99
    t[3] = NEG
    rows, gs, (gt,), flags = uld.ULD_KERNELS[backend](s, [t], y, [1.0], cfg, None, False,
                                                      [False])
    assert int(flags) == 1 | 4 and gs is None and gt is None
    assert float(rows[1]) == 0.0 and float(rows[3]) == 0.0


def test_compile_fullgraph():
    # The custom op fastkd::logit_uld and its checks trace without a graph break.
    backend = "cpu" if fastkd.available_backends()["cpu"]["available"] else "reference"
    s, t, y = _inputs(4, 19, 26)
    fn = torch.compile(lambda a, b, c: kd_loss(a, b, c, divergence="uld", backend=backend,
                                               hard_weight=0.5, uld_top=8),
                       fullgraph=True, backend="eager")
    sc, tc = s.clone().requires_grad_(), t.clone().requires_grad_()
    fn(sc, tc, y).backward()
    se, te = s.clone().requires_grad_(), t.clone().requires_grad_()
    want = kd_loss(se, te, y, divergence="uld", backend=backend, hard_weight=0.5, uld_top=8)
    want.backward()
    assert torch.allclose(sc.grad, se.grad) and torch.allclose(tc.grad, te.grad)


def test_module_and_bad_inputs():
    s, t, y = _inputs(3, 8, 12, masked=False)
    loss = fastkd.KDLoss(divergence="uld", backend="reference")(s, t, y)
    assert loss.shape == () and loss > 0
    with pytest.raises(ValueError, match="one teacher"):
        kd_loss(s, [t, t], y, divergence="uld")
    kd_loss(s, [t], y, divergence="uld")  # a list of one is one teacher
    idx = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_topk"):
        kd_loss(s, None, y, divergence="uld", teacher_topk=(idx, torch.full((3, 2), -1.0)))
    with pytest.raises(ValueError, match="uld_top"):
        kd_loss(s, t, y, divergence="kl", uld_top=4)
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="uld_top"):
            kd_loss(s, t, y, divergence="uld", uld_top=k)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        kd_loss(s, t[:2], y, divergence="uld")
    with pytest.raises(TypeError, match="teacher_logits"):
        kd_loss(s, t.long(), y, divergence="uld")
    with pytest.raises(ValueError, match="teacher_weights"):
        kd_loss(s, t, y, divergence="uld", teacher_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="teacher_logits is None"):
        kd_loss(s, None, y, divergence="uld")


# ----------------------------------------------------------------------------------------------
# TRL parity (benchmarks/results/uld-trl-parity.md)
# ----------------------------------------------------------------------------------------------
def _trl_uld_class():
    """TRL's ``ULDLoss``, compiled from its source file alone: importing the trainer module
    pulls in transformers, datasets and accelerate (~20 s); the loss needs torch only."""
    trl = pytest.importorskip("trl")
    path = Path(trl.__file__).parent / "experimental" / "gold" / "gold_trainer.py"
    if not path.is_file():
        pytest.skip(f"trl {trl.__version__} has no experimental/gold/gold_trainer.py")
    tree = ast.parse(path.read_text())
    cls = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ULDLoss"]
    if not cls:
        pytest.skip(f"trl {trl.__version__}: no ULDLoss")
    ns = {"torch": torch, "nn": torch.nn, "F": F, "GOLDConfig": object}
    exec(compile(ast.Module(body=cls, type_ignores=[]), str(path), "exec"), ns)
    return ns["ULDLoss"], trl.__version__


def trl_config(T, distillation_weight, crossentropy_weight=0.0):
    """The GOLDConfig fields ULDLoss reads, set where TRL's ULD is SPEC §1d's."""
    from types import SimpleNamespace
    return SimpleNamespace(
        uld_crossentropy_weight=crossentropy_weight, uld_distillation_weight=distillation_weight,
        uld_student_temperature=T, uld_teacher_temperature=T, uld_skip_student_eos=False,
        uld_skip_teacher_eos=False, use_extended_uld=False, uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=False, beta=1.0)


def trl_uld(cls, s, t, labels, T, w, ce_weight=0.0):
    """TRL's loss for logits ``[B, L, V]`` whose labels are all kept (one answer region)."""
    loss_fn = cls(trl_config(T, w, ce_weight))
    ids = labels.clamp_min(0)
    return loss_fn(s, t, labels, labels, ids, ids)


def test_trl_uld_parity():
    cls, _ = _trl_uld_class()
    B, L, vs, vt, T, w = 3, 5, 37, 101, 1.7, 0.6
    s, t, _ = _inputs(B * L, vs, vt, torch.float64, masked=False, seed=11)
    s, t = s.reshape(B, L, vs), t.reshape(B, L, vt)
    labels = torch.randint(0, vs, (B, L), generator=torch.Generator().manual_seed(1))
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    trl_uld(cls, s1, t1, labels, T, w).backward()
    # TRL: per sequence sum_rows D / L, mean over sequences; no T^2. Equal lengths: our mean.
    for backend, dtype in [("reference", torch.float64), ("cpu", torch.float32)]:
        if backend == "cpu" and not fastkd.available_backends()["cpu"]["available"]:
            continue
        ours = _run(backend, s.to(dtype), t.to(dtype), None, temperature=T, soft_weight=w,
                    t2_scale=False)
        ref = trl_uld(cls, s, t, labels, T, w)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert abs(float(ours[0].detach()) - float(ref)) <= tol
        assert (ours[1].double() - s1.grad).abs().max() <= tol
        assert (ours[2].double() - t1.grad).abs().max() <= tol
    # TRL's CE term is next-token CE on logits[:, :-1] against labels[:, 1:]: our hard term
    # (soft_weight=0) on those rows.
    ce = trl_uld(cls, s, t, labels, T, 0.0, ce_weight=0.9)
    ours = kd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], divergence="uld", soft_weight=0.0,
                   hard_weight=0.9, backend="reference")
    assert abs(float(ce) - float(ours)) <= 1e-12
