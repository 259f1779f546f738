"""The ``topk`` benchmark suite (fastkd/bench/suite_topk.py): its contenders compute the same loss,
so that its timings compare like with like, and a tiny run through the command line works."""
from __future__ import annotations

import json

import pytest
import torch

from fastkd.bench import cli, core, suite_topk

CPU = torch.device("cpu")


def _inputs(n=24, v=300, k=8, dtype="float32", seed=3):
    suite = core.get_suite("topk")
    cfg = suite.make_config(dtype, {"N": n, "V": v, "k": k})
    return suite, cfg, suite.make_inputs(cfg, CPU, seed)


def _loss_and_grad(suite, cfg, inputs, name):
    c = next(c for c in suite.contenders(CPU, ["cpu", "reference"]) if c.name == name)
    if c.skip:
        pytest.skip(f"{name}: {c.skip}")
    step = c.build(cfg, inputs, CPU)
    loss, (grad,) = core.run_fwd_bwd(step, inputs)
    return loss.detach().double(), grad.double()


@pytest.mark.parametrize("k", [1, 8, 299])
def test_stock_equals_fastkd_reference(k):
    """The stock top-k formulation is the loss fastkd defines (SPEC §1b), gradient included."""
    suite, cfg, x = _inputs(k=k)
    ref, g_ref = _loss_and_grad(suite, cfg, x, "fastkd[reference]")
    got, g_got = _loss_and_grad(suite, cfg, x, "stock")
    assert abs(got - ref) <= 1e-5 * abs(ref)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


def test_every_contender_agrees():
    """Top-k and dense rows on each backend give the stock loss: the dense teacher is the
    top-k teacher's full distribution, so the dense KL equals the bucket KL."""
    suite, cfg, x = _inputs(k=16)
    stock, _ = _loss_and_grad(suite, cfg, x, "stock")
    for name in ("fastkd[reference]", "fastkd[reference dense]", "fastkd[cpu]",
                 "fastkd[cpu dense]"):
        c = next(c for c in suite.contenders(CPU, ["cpu", "reference"]) if c.name == name)
        if c.skip:
            continue  # the C++ extension is not built here
        got, _ = _loss_and_grad(suite, cfg, x, name)
        assert abs(got - stock) <= 1e-5 * abs(stock), name


def test_inputs_and_floor():
    suite, cfg, x = _inputs(n=4, v=50, k=5)
    assert x["indices"].dtype == torch.int64 and x["logprobs"].dtype == torch.float32
    assert x["indices"].shape == x["logprobs"].shape == (4, 5)
    # the dense teacher's softmax at T lists the top-k log-probabilities at the indices
    logp = torch.log_softmax(x["t"] / suite_topk.TEMPERATURE, -1)
    torch.testing.assert_close(logp.gather(-1, x["indices"]), x["logprobs"])
    work = suite.floor_work(cfg)
    assert work["fwd"] == (4 * 50 * 4 + 4 * 5 * 12, 0)
    assert work["fwd_bwd"] == (2 * 4 * 50 * 4 + 4 * 5 * 12, 0)
    # the memory child finds the dense contender from the backend its name carries
    from fastkd.bench.child import c_backend
    names = [c.name for c in suite.contenders(CPU, [c_backend("fastkd[cpu dense]")])]
    assert "fastkd[cpu dense]" in names


def test_cli_tiny_run(tmp_path, monkeypatch):
    """A real (tiny) run through the command line: the top-k / dense ratio is in the results."""
    monkeypatch.setitem(suite_topk.SIZES, ("cpu", "demo"), ([(32, 2000, 8)], ["float32"]))
    assert cli.main(["--suite", "topk", "--sizes", "demo", "--device", "cpu",
                     "--contenders", "fastkd,stock", "--repeats", "1", "--warmup", "1",
                     "--no-memory", "--no-plot", "--out", str(tmp_path), "--name", "t"]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    (entry,) = doc["suites"]["topk"]["configs"]
    rows = {r["contender"]: r for r in entry["results"]}
    assert rows["stock"]["status"] == "ok"
    for name, r in rows.items():
        if r["status"] == "ok":
            assert r["loss_rel_diff_vs_stock"] <= 1e-5, name
    ref = rows["fastkd[reference]"]
    assert ref["ratios"]["topk_vs_dense_fwd_bwd"] > 0
    assert "top-k / dense" in ref["note"]
    assert "top-k / dense" in (tmp_path / "t.md").read_text()
