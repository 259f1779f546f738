"""torch.library custom ops and torch.compile (issue #7).

- ``torch.library.opcheck`` on every fastkd op (schema, fake implementation, autograd
  registration, AOTAutograd tracing), on tiny inputs.
- ``torch.compile(fullgraph=True)`` of a student forward + a fastkd loss, then backward, for
  every loss family: loss and gradients equal eager. The fused backends run with inductor on
  CPU: ``cpu`` and ``triton`` (the Triton interpreter runs inside the opaque op, so inductor
  does not see it: it plays well). The ``reference`` backend (ordinary torch code, which inductor
  would compile into real kernels, slowly on 2 cores) is checked with the ``aot_eager`` backend:
  no graph break and the same AOTAutograd tracing, without the C++ code generation.

The first inductor compile of a process costs about a minute on CPU (one-time C++ setup); the
later ones a few seconds each.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import fastkd
from fastkd import functional as Fn
from fastkd.feature import ops as F
from fastkd.logit import ops as L
from fastkd.logit import reference as LR
from fastkd.relation import ops as R

from _helpers import backends_for

CPU_FUSED = backends_for("cpu")  # "cpu" (C++ extension), "triton" (interpreter) when present
FAMILIES = ("kd", "kd_none", "feature", "feature_none", "sp", "rkd", "pkt")


# (fused backend, device): the Triton interpreter on CPU; cuda and Triton on a GPU.
KERNELS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("triton", "cpu", id="triton-cpu"),
           pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
           pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)]


def _needs(backend, device="cpu"):
    if backend != "reference" and backend not in backends_for(device):
        pytest.skip(f"backend {backend!r} is not available on {device} here")


# ---------------------------------------------------------------------------------------- ops
def test_ops_registered():
    for name in ("logit_kd", "logit_checked_rows", "feature_kd", "feature_kd_backward",
                 "relation_sp", "relation_rkd", "relation_pkt"):
        assert hasattr(torch.ops.fastkd, name), name


@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck_logit(backend, device):
    _needs(backend, device)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g).to(device).requires_grad_()
    t1 = torch.randn(5, 7, generator=g).to(device).requires_grad_()
    t2 = torch.randn(5, 7, generator=g).to(device)
    y = torch.tensor([1, -100, 6, 0, 3], device=device)
    torch.library.opcheck(L.logit_kd_op, (s, [t1, t2], y, [0.25, 0.75], 2.0, 1.0, 0.5, "jsd", 0.3,
                                          True, -100, 0.1, "mean", "prob", None, None, True,
                                          [True, False], backend))
    torch.library.opcheck(L.logit_kd_op, (s, [t1], None, [1.0], 1.0, 1.0, 0.0, "kl", 0.5, True,
                                          -100, 0.0, "none", "prob", None, None, True, [True],
                                          backend))
    # A schedule under torch.compile: temperature and weights as data (fastkd._dynamic).
    dynamic = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    nan = float("nan")
    torch.library.opcheck(L.logit_kd_op, (s, [t1], y, [1.0], nan, nan, nan, "kl", 0.5, True,
                                          -100, 0.0, "mean", "prob", None, dynamic, True, [True],
                                          backend))
    num_items = torch.tensor(11, device=device).float()  # SPEC §1e: the step's count
    torch.library.opcheck(L.logit_kd_op, (s, [t1], y, [1.0], 1.5, 1.0, 0.5, "kl", 0.5, True,
                                          -100, 0.0, "mean", "prob", None, None, True, [True],
                                          backend, num_items))


def test_opcheck_logit_checked_rows():
    s = torch.randn(4, 6)
    s[1] = float("-inf")
    y = torch.tensor([0, -100, 5, 2])
    torch.library.opcheck(LR.checked_rows, (s, [torch.randn(4, 6)], y, -100))
    torch.library.opcheck(LR.checked_rows, (s[2:], [torch.randn(2, 6)], None, -100))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck_feature(backend, device):
    _needs(backend, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 3, generator=g).to(device).requires_grad_()  # NCHW, channel_dim 1
    t = torch.randn(2, 4, 3, 3, generator=g).to(device).requires_grad_()
    w = torch.randn(4, 5, generator=g).to(device).requires_grad_()
    b = torch.randn(4, generator=g).to(device).requires_grad_()
    for reduction in ("mean", "none"):
        torch.library.opcheck(F.feature_kd_op, (x, t, w, b, "mse", 1, reduction, 0, True, True,
                                                True, True, None, backend))
    # tokens without an adapter; the autocast GEMM dtype argument (the weight cast per call)
    x2 = torch.randn(6, 4, generator=g).to(device).requires_grad_()
    torch.library.opcheck(F.feature_kd_op, (x2, t.detach()[:, :, 0, 0].repeat(3, 1), None, None,
                                            "cosine", 1, "sum", 0, True, False, False, False,
                                            None, backend))
    torch.library.opcheck(F.feature_kd_op, (x, t, w, None, "cosine", 1, "mean", 0, True, False,
                                            True, False, torch.bfloat16, backend))
    torch.library.opcheck(F.feature_kd_backward_op, (
        torch.rand(2, 3, 3, generator=g).to(device), x.detach(), t.detach(), w.detach(),
        b.detach(), "mse",
        1, 0, True, True, True, True, None, backend))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck_relation(backend, device):
    _needs(backend, device)
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 4, generator=g).to(device).requires_grad_()
    t = torch.randn(6, 3, generator=g).to(device).requires_grad_()
    torch.library.opcheck(R.sp_op, (s, t, "mean", True, True, 0, backend))
    torch.library.opcheck(R.rkd_op, (s, t.detach(), 1.0, 2.0, None, "sum", True, False, 0, backend))
    weights = torch.tensor([0.5, 1.5], dtype=torch.float64)  # as data (fastkd._dynamic)
    torch.library.opcheck(R.rkd_op, (s, t, float("nan"), float("nan"), weights, "mean", True,
                                     True, 0, backend))
    torch.library.opcheck(R.pkt_op, (s, t, 1e-7, "mean", True, True, 0, backend))


# ------------------------------------------------------------------------------ torch.compile
class _Student(torch.nn.Module):
    """Features [N, 6] and logits [N, 11] of a tiny student."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 6)
        self.head = torch.nn.Linear(6, 11)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return h, self.head(h)


def _inputs(n, device="cpu"):
    g = torch.Generator().manual_seed(n)
    target = torch.randint(0, 11, (n,), generator=g)
    target[2] = -100
    return tuple(x.to(device) for x in (torch.randn(n, 8, generator=g),
                                        torch.randn(n, 11, generator=g),
                                        torch.randn(n, 5, generator=g), target))


def _setup(family, backend, device="cpu"):
    """(student, loss module, step(x, teacher_logits, teacher_feats, target) -> scalar)."""
    torch.manual_seed(0)
    net = _Student().to(device)
    weights = lambda out: out * torch.arange(out.shape[0], dtype=out.dtype,  # noqa: E731
                                             device=out.device)
    if family in ("kd", "kd_none"):
        red = "none" if family == "kd_none" else "mean"
        loss = fastkd.KDLoss(temperature=2.0, hard_weight=0.5, label_smoothing=0.1,
                             reduction=red, backend=backend)

        def step(x, t, tf, y):
            out = loss(net(x)[1], t, y)
            return out if red == "mean" else weights(out).sum()
        return net, loss, step
    if family in ("feature", "feature_none"):
        red = "none" if family == "feature_none" else "mean"
        loss = fastkd.FeatureKDLoss(6, 5, reduction=red, backend=backend, device=device)

        def step(x, t, tf, y):
            out = loss(net(x)[0], tf)
            return out if red == "mean" else weights(out).sum()
        return net, loss, step
    module = {"sp": fastkd.SPLoss, "rkd": fastkd.RKDLoss, "pkt": fastkd.PKTLoss}[family]
    loss = module(backend=backend)

    def step(x, t, tf, y):
        return 3.0 * loss(net(x)[0], tf)
    return net, loss, step


def _loss_and_grads(fn, net, loss_module, inputs):
    params = list(net.parameters()) + list(loss_module.parameters())
    for p in params:
        p.grad = None
    out = fn(*inputs)
    out.backward()
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def _check_compiled(family, backend, compiler, dynamic=None, sizes=(6,), on_size=None,
                    device="cpu"):
    torch._dynamo.reset()
    net, loss_module, step = _setup(family, backend, device)
    compiled = torch.compile(step, fullgraph=True, backend=compiler, dynamic=dynamic)
    for n in sizes:
        if on_size is not None:
            on_size(n)
        inputs = _inputs(n, device)
        ref_loss, ref_grads = _loss_and_grads(step, net, loss_module, inputs)
        for _ in range(2):  # the second call runs the cached graph
            got_loss, got_grads = _loss_and_grads(compiled, net, loss_module, inputs)
            torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert any(g is not None for g in ref_grads)
            for got, ref in zip(got_grads, ref_grads):
                assert (got is None) == (ref is None)
                if ref is not None:
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_inductor(family, backend, device):
    _needs(backend, device)
    _check_compiled(family, backend, "inductor", device=device)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_reference(family):
    _check_compiled(family, "reference", "aot_eager")


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_dynamic_shapes(family):
    """dynamic=True (symbolic batch size, symbolic float arguments): one graph, two sizes."""
    backend = "cpu" if "cpu" in CPU_FUSED else "reference"
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    counts = []
    _check_compiled(family, backend, counter, dynamic=True, sizes=(6, 9),
                    on_size=lambda n: counts.append(counter.frame_count))
    assert counts[1] == counter.frame_count > 0  # no recompilation for the second size


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_data_errors_raise(backend):
    """The data-dependent checks (read from kernel flags / inside the check op) still raise."""
    _needs(backend)
    torch._dynamo.reset()
    kd = fastkd.KDLoss(hard_weight=1.0, backend=backend)
    fn = torch.compile(lambda s, t, y: kd(s, t, y), fullgraph=True, backend="aot_eager")
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    fn(s, t, torch.tensor([0, 4, -100])).backward()
    with pytest.raises(ValueError, match="target"):
        fn(s, t, torch.tensor([0, 5, -100]))
    masked = s.detach().clone()
    masked[1] = float("-inf")
    with pytest.raises(ValueError, match="student_logits"):
        fn(masked, t, torch.tensor([0, 4, -100]))


def test_compiled_backward_scales_out_of_place():
    """Under compile the saved gradient is scaled out of place: a retained graph can be walked
    twice (eagerly that raises, see test_logit), and grad_output is applied each time."""
    backend = "cpu" if "cpu" in CPU_FUSED else pytest.skip("no cpu backend")
    torch._dynamo.reset()
    kd = fastkd.KDLoss(backend=backend)
    fn = torch.compile(lambda s, t: 2.0 * kd(s, t), fullgraph=True, backend="aot_eager")
    s, t = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9)
    eager = torch.autograd.grad(2.0 * kd(s, t), s)[0]
    loss = fn(s, t)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, eager)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * eager)


# ------------------------------------------------------------------------ eager fast path
def _eager_cases():
    g = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    y = torch.tensor([1, -100, 6, 0, 3])
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(5)])
    lp = torch.log_softmax(r(5, 7), -1).gather(-1, idx)
    ht, wt = r(5, 4), r(7, 4)
    return {
        "logit_kd": (lambda s, t: Fn.kd_loss(s, [t, t.detach() * 2], y, temperature=2.0,
                                            hard_weight=0.5, divergence="jsd"), (5, 7), (5, 7)),
        "logit_kd_none": (lambda s, t: Fn.kd_loss(s, t, y, reduction="none").sum(), (5, 7),
                          (5, 7)),
        "logit_uld": (lambda s, t: Fn.kd_loss(s, t, y, divergence="uld", hard_weight=0.3),
                      (5, 7), (5, 9)),
        "logit_kd_topk": (lambda s, t: Fn.kd_loss(s, teacher_topk=(idx, lp), temperature=1.5),
                          (5, 7), None),
        "fused_linear_kd": (lambda s, t: Fn.fused_linear_kd_loss(s, t, ht, wt, y),
                            (5, 3), (7, 3)),
        "feature_kd": (lambda s, t: Fn.feature_kd_loss(s, t, None, None, loss="cosine"),
                       (5, 6), (5, 6)),
        "relation_rkd": (lambda s, t: Fn.rkd_loss(s, t), (5, 6), (5, 4)),
        "relation_sp": (lambda s, t: Fn.sp_loss(s, t), (5, 6), (5, 4)),
    }, r


@pytest.mark.parametrize("case", ["logit_kd", "logit_kd_none", "logit_uld", "logit_kd_topk",
                                  "fused_linear_kd", "feature_kd", "relation_rkd",
                                  "relation_sp"])
def test_eager_path_matches_dispatcher(case, monkeypatch):
    """Eager calls run the op's implementation through one autograd.Function
    (``_custom_op.call``); the loss and every gradient equal the dispatched op's, and the fast
    path is really taken (its grad_fn)."""
    from fastkd import _custom_op
    cases, r = _eager_cases()
    fn, s_shape, t_shape = cases[case]
    s = r(*s_shape).requires_grad_()
    t = None if t_shape is None else r(*t_shape).requires_grad_()
    leaves = [x for x in (s, t) if x is not None]

    def run():
        for x in leaves:
            x.grad = None
        loss = fn(s, t)
        name = type(loss.grad_fn).__name__
        loss.backward()
        return loss.detach(), [x.grad for x in leaves], name

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(_custom_op, "_EAGER", {})
        slow = run()
    assert "EagerOp" in fast[2] or case.endswith("_none"), fast[2]
    assert "EagerOp" not in slow[2]
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0)
    for a, b in zip(fast[1], slow[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
