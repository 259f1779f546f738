"""fastkd.schedules: the schedules' values, the Scheduler (targets, stages, state round-trip), and
scheduled hyperparameters reaching compiled modules without recompilation (fastkd._dynamic)."""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fastkd
from fastkd import functional as F
from fastkd.schedules import (Constant, Cosine, Linear, Piecewise, Scheduler, Stages, Step)


# ------------------------------------------------------------------------------- values
def test_schedule_values():
    assert [Constant(3)(t) for t in (0, 7)] == [3.0, 3.0]
    lin = Linear(4.0, 1.0, steps=3, begin=2)
    assert [lin(t) for t in range(7)] == [4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 1.0]
    cos = Cosine(8.0, 2.0, steps=4)
    assert cos(0) == 8.0 and cos(4) == 2.0 and cos(9) == 2.0
    assert cos(2) == pytest.approx(5.0) and cos(1) == pytest.approx(2 + 6 * (1 + math.cos(
        math.pi / 4)) / 2)
    assert all(cos(t) > cos(t + 1) for t in range(4))
    st = Step(1.0, 0.5, milestones=[4, 2])
    assert [st(t) for t in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    pw = Piecewise([(0, 0.0), (10, 1.0), (20, 0.0)])
    assert [pw(t) for t in (0, 5, 10, 15, 20, 30)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    pc = Piecewise([(5, 2.0), (10, 3.0)], interpolation="constant")
    assert [pc(t) for t in (0, 5, 9, 10, 99)] == [2.0, 2.0, 2.0, 3.0, 3.0]


def test_stages():
    stages = Stages(("warmup", "hints", "logits"), boundaries=[2, 5])
    assert [stages.at(t) for t in range(7)] == ["warmup"] * 2 + ["hints"] * 3 + ["logits"] * 2
    gate = stages.gate("hints", "logits", on=0.5, off=0.0)
    assert [gate(t) for t in range(7)] == [0.0, 0.0] + [0.5] * 5


@pytest.mark.parametrize("build, match", [
    (lambda: Linear(1.0, 0.0, steps=0), "steps"),
    (lambda: Cosine(math.inf, 0.0, steps=3), "start"),
    (lambda: Step(1.0, 0.5, milestones=[]), "milestones"),
    (lambda: Piecewise([(3, 1.0), (3, 2.0)]), "increase"),
    (lambda: Piecewise([(0, 1.0)], interpolation="cubic"), "interpolation"),
    (lambda: Stages(("a", "b"), boundaries=[]), "boundaries"),
    (lambda: Stages(("a", "a"), boundaries=[1]), "names"),
    (lambda: Stages(("a", "b"), boundaries=[1]).gate("c"), "stage names"),
    (lambda: Linear(1.0, 0.0, steps=3)(-1), "step"),
])
def test_schedule_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------- Scheduler
def _kd_scheduler(kd, hint, stages):
    return Scheduler({
        (kd, "temperature"): Cosine(8.0, 2.0, steps=6),
        (kd, "soft_weight"): stages.gate("logits"),
        (hint, "loss_weight"): stages.gate("hints"),
        "alpha": Linear(0.0, 1.0, steps=4),
    }, stages=stages)


def test_scheduler_applies_and_steps():
    kd, hint = fastkd.KDLoss(hard_weight=1.0), fastkd.FeatureKDLoss(4, 8)
    stages = Stages(("hints", "logits"), boundaries=[3])
    sched = _kd_scheduler(kd, hint, stages)
    seen = []
    for _ in range(5):
        seen.append((sched.step_count, kd.temperature, kd.soft_weight, hint.loss_weight,
                     sched["alpha"], sched.stage, sched.active("hints")))
        sched.step()
    cos = Cosine(8.0, 2.0, steps=6)
    assert seen == [(t, cos(t), float(t >= 3), float(t < 3), min(t / 4, 1.0),
                     "hints" if t < 3 else "logits", t < 3) for t in range(5)]
    assert sched.last_values["KDLoss.temperature"] == kd.temperature


def test_scheduler_state_round_trip(tmp_path):
    stages = Stages(("hints", "logits"), boundaries=[3])
    kd, hint = fastkd.KDLoss(), fastkd.FeatureKDLoss(4, 8)
    sched = _kd_scheduler(kd, hint, stages)
    for _ in range(4):
        sched.step()
    torch.save({"sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    kd2, hint2 = fastkd.KDLoss(), fastkd.FeatureKDLoss(4, 8)
    resumed = _kd_scheduler(kd2, hint2, stages)
    assert kd2.temperature == 8.0
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt")["sched"])
    assert resumed.step_count == 4 and resumed.stage == "logits"
    assert (kd2.temperature, kd2.soft_weight, hint2.loss_weight, resumed["alpha"]) == \
        (kd.temperature, kd.soft_weight, hint.loss_weight, sched["alpha"])
    sched.step(), resumed.step()
    assert kd2.temperature == kd.temperature


def test_scheduler_errors():
    kd = fastkd.KDLoss()
    with pytest.raises(AttributeError, match="tempreature"):
        Scheduler({(kd, "tempreature"): Constant(2.0)})
    with pytest.raises(TypeError, match="callable"):
        Scheduler({(kd, "temperature"): 2.0})
    # The module's own check runs on every scheduled value, naming the attribute.
    with pytest.raises(ValueError, match="temperature"):
        Scheduler({(kd, "temperature"): Linear(1.0, -1.0, steps=2)}, start_step=2)
    with pytest.raises(ValueError, match="soft_weight"):
        Scheduler({(kd, "soft_weight"): Constant(-0.5)})
    with pytest.raises(ValueError, match="gave nan"):
        Scheduler({"x": lambda step: math.nan})
    with pytest.raises(RuntimeError, match="no stages"):
        Scheduler({"x": Constant(1.0)}).stage
    with pytest.raises(KeyError, match="step"):
        Scheduler({"x": Constant(1.0)}).load_state_dict({})


def test_module_attributes_checked():
    kd = fastkd.KDLoss()
    with pytest.raises(ValueError, match="temperature"):
        kd.temperature = 0.0
    with pytest.raises(ValueError, match="hard_weight"):
        kd.hard_weight = math.inf
    kd.temperature = torch.tensor(3.0)  # a one-element tensor is read as its value
    assert kd.temperature == 3.0 and isinstance(kd.temperature, float)
    with pytest.raises(ValueError, match="loss_weight"):
        fastkd.RKDLoss(loss_weight=-1.0)
    with pytest.raises(ValueError, match="angle_weight"):
        fastkd.RKDLoss().angle_weight = -2.0


# ------------------------------------------------- compiled modules: no recompilation
def _run_compiled(module, args, set_value, reference, values=(1.0, 2.5, 4.0, 0.7)):
    """Compile ``module`` once (fullgraph), change a hyperparameter before each call and check
    the loss and the student's gradient against an eager ``reference(value)``; returns the
    number of frames compiled."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    student = args[0]
    for v in values:
        set_value(module, v)
        student.grad = None
        loss = compiled(*args)
        loss.backward()
        got = student.grad.clone()
        student.grad = None
        want = reference(v)
        want.backward()
        torch.testing.assert_close(loss, want.detach().to(loss.dtype), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got, student.grad, rtol=2e-5, atol=1e-6)
    return counter.frame_count


def _logits(n=6, v=37):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g).mul_(3).requires_grad_()
    t = torch.randn(n, v, generator=g).mul_(3)
    y = torch.randint(0, v, (n,), generator=g)
    return s, t, y


@pytest.mark.parametrize("divergence", ["kl", "jsd", "uld"])
def test_kd_loss_schedule_no_recompile(divergence):
    s, t, y = _logits()
    kd = fastkd.KDLoss(hard_weight=0.5, divergence=divergence)

    def set_value(m, v):
        m.temperature, m.soft_weight, m.hard_weight = v, 1.0 / v, v / 4

    def reference(v):
        return F.kd_loss(s, t, y, temperature=v, soft_weight=1.0 / v, hard_weight=v / 4,
                         divergence=divergence)

    assert _run_compiled(kd, (s, t, y), set_value, reference) == 1


@pytest.mark.parametrize("retempered", [False, True])
def test_topk_schedule_no_recompile(retempered):
    s, t, _ = _logits()
    teacher = fastkd.TopKTeacher.from_logits(t, 6, temperature=1.0)
    if not retempered:  # a pair: taken at the loss's temperature, whatever it is
        teacher = teacher.as_tuple()

    class Sparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kd = fastkd.KDLoss()

        def forward(self, student):
            return self.kd(student, teacher_topk=teacher)

    def set_value(m, v):
        m.kd.temperature = v

    def reference(v):
        return F.kd_loss(s, teacher_topk=teacher, temperature=v)

    assert _run_compiled(Sparse(), (s,), set_value, reference) == 1


def test_fused_linear_schedule_no_recompile():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(10, 8, generator=g).requires_grad_()
    ws, wt = torch.randn(29, 8, generator=g), torch.randn(29, 12, generator=g)
    ht = torch.randn(10, 12, generator=g)
    y = torch.randint(0, 29, (10,), generator=g)
    fl = fastkd.FusedLinearKDLoss(hard_weight=0.3, chunk_size=4)

    def set_value(m, v):
        m.temperature, m.hard_weight = v, v / 3

    def reference(v):
        return F.kd_loss(hs @ ws.T, ht @ wt.T, y, temperature=v, hard_weight=v / 3)

    assert _run_compiled(fl, (hs, ws, ht, wt, y), set_value, reference) == 1


@pytest.mark.parametrize("name", ["feature", "sp", "pkt", "rkd"])
def test_feature_relation_weights_no_recompile(name):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(9, 6, generator=g).requires_grad_()
    t = torch.randn(9, 10, generator=g)
    if name == "feature":
        module = fastkd.FeatureKDLoss(6, 10)
        w, b = module.weight.detach(), module.bias.detach()

        def reference(v):
            return v * torch.nn.functional.mse_loss(s @ w.T + b, t)
    elif name == "rkd":
        module = fastkd.RKDLoss()

        def reference(v):
            return (v / 2) * F.rkd_loss(s, t, distance_weight=v, angle_weight=2 * v)
    else:
        module = {"sp": fastkd.SPLoss, "pkt": fastkd.PKTLoss}[name]()
        base = {"sp": F.sp_loss, "pkt": F.pkt_loss}[name]

        def reference(v):
            return v * base(s, t)

    def set_value(m, v):
        m.loss_weight = v / 2 if name == "rkd" else v
        if name == "rkd":
            m.distance_weight, m.angle_weight = v, 2 * v

    assert _run_compiled(module, (s, t), set_value, reference) == 1


def test_counter_sees_recompilation():
    """The check above can fail: the same loop over a module that passes its temperature on as
    a Python float recompiles for every new value."""
    s, t, y = _logits()

    class FloatAttribute(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t = 1.0

        def forward(self, s, t, y):
            return F.kd_loss(s, t, y, temperature=self.t)

    def set_value(m, v):
        m.t = v

    frames = _run_compiled(FloatAttribute(), (s, t, y), set_value,
                           lambda v: F.kd_loss(s, t, y, temperature=v))
    assert frames == 4


def test_tensor_hyperparameters_functional():
    """The functionals take one-element tensors: read as floats in eager, checked in the op
    (they are data there) when compiled."""
    s, t, y = _logits()
    T = torch.tensor(2.0)
    torch.testing.assert_close(F.kd_loss(s, t, y, temperature=T, hard_weight=torch.tensor(0.5)),
                               F.kd_loss(s, t, y, temperature=2.0, hard_weight=0.5))
    fn = torch.compile(lambda s, t, T: F.kd_loss(s, t, temperature=T), backend="eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(s, t, T), F.kd_loss(s, t, temperature=2.0))
    with pytest.raises(ValueError, match="temperature"):
        fn(s, t, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="temperature"):
        F.kd_loss(s, t, temperature=torch.tensor([1.0, 2.0]))
    rkd = torch.compile(lambda a, b, w: F.rkd_loss(a, b, angle_weight=w), backend="eager",
                        fullgraph=True)
    with pytest.raises(ValueError, match="angle_weight"):
        rkd(s, t, torch.tensor(-2.0))
