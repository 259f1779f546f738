"""examples/progressive_kd.py (KD schedules vs fixed KD, paired over seeds): a --quick run of
each task, checked for pairing, for schedules that were really applied, and for reports whose
numbers come from the run; the committed reports must be the rendering of the committed JSON."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
TASKS = ("digits", "llm")
KEYS = {"task", "command", "date", "versions", "machine", "config", "arms", "metric", "info",
        "per_seed", "summary", "paired", "total_seconds"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{task: (module, returned dict, JSON on disk, Markdown on disk)} of one --quick run each."""
    import progressive_kd as ex
    out = str(tmp_path_factory.mktemp("progressive"))
    threads = torch.get_num_threads()   # the example sets it; restore it for the session
    got = {}
    try:
        for task in TASKS:
            res = ex.main(["--task", task, "--quick", "--quiet", "--out", out])
            stem = os.path.join(out, f"progressive_kd_{task}")
            with open(stem + ".json") as f:
                saved = json.load(f)
            with open(stem + ".md") as f:
                md = f.read()
            got[task] = (ex, res, saved, md)
    finally:
        torch.set_num_threads(threads)
    return got


@pytest.mark.parametrize("task", TASKS)
def test_json_keys_and_pairing(runs, task):
    ex, res, saved, _ = runs[task]
    assert set(saved) == KEYS and saved == res
    assert saved["config"]["quick"] and len(saved["per_seed"]) == ex.QUICK[task]["seeds"]
    inits = []
    for r in saved["per_seed"]:
        assert list(r["arms"]) == list(ex.ARMS[task])
        recs = list(r["arms"].values())
        # Paired arms: the same initial weights and the same batches within a seed.
        assert len({rec["init_sha256"] for rec in recs}) == 1
        assert len({rec["batches_sha256"] for rec in recs}) == 1
        inits.append(recs[0]["init_sha256"])
    assert len(set(inits)) == len(inits)          # and a different start per seed


@pytest.mark.parametrize("task", TASKS)
def test_summary_follows_from_per_seed(runs, task):
    ex, _, saved, _ = runs[task]
    key = saved["metric"]
    vals = {a: [r["arms"][a][key] for r in saved["per_seed"]] for a in ex.ARMS[task]}
    for arm, v in vals.items():
        assert saved["summary"][arm]["values"] == v
        assert saved["summary"][arm]["mean"] == pytest.approx(sum(v) / len(v))
    for a, b in ex.PAIRS[task]:
        d = saved["paired"][f"{a}-{b}"]
        assert d["diffs"] == pytest.approx([x - y for x, y in zip(vals[a], vals[b])])
        assert d["wins"] + d["ties"] + d["losses"] == len(vals[a])


def test_schedules_were_applied(runs):
    ex, _, saved, _ = runs["digits"]
    t = saved["config"]["temperature"]
    arms = saved["per_seed"][0]["arms"]
    steps = arms["fixed"]["steps"]
    first, last = "0", str(steps - 1)
    anneal = arms["anneal_T"]["schedule_trace"]
    assert anneal[first]["KDLoss.temperature"] == 2 * t
    assert anneal[last]["KDLoss.temperature"] < t
    assert {v["KDLoss.temperature"] for v in arms["fixed"]["schedule_trace"].values()} == {t}
    staged = arms["hints_then_logits"]["schedule_trace"]
    assert staged[first] == {"KDLoss.temperature": t, "KDLoss.soft_weight": 0.0,
                             "hint": ex.HINT_WEIGHT}
    assert staged[last] == {"KDLoss.temperature": t, "KDLoss.soft_weight": 1.0, "hint": 0.0}
    llm_arms = runs["llm"][2]["per_seed"][0]["arms"]
    t = runs["llm"][2]["config"]["temperature"]
    assert llm_arms["anneal_T"]["schedule_trace"]["0"]["FusedLinearKDLoss.temperature"] == 2 * t


@pytest.mark.parametrize("task", TASKS)
def test_markdown_numbers_come_from_the_json(runs, task):
    ex, _, saved, md = runs[task]
    assert md == ex.render_markdown(saved)
    key = saved["metric"]
    scale, fmt = (100, "{:.2f}") if task == "digits" else (1, "{:.4f}")
    for r in saved["per_seed"]:
        row = f"| {r['seed']} | " + " | ".join(fmt.format(scale * r["arms"][a][key])
                                               for a in ex.ARMS[task]) + " |"
        assert row in md
    assert saved["command"] in md


@pytest.mark.parametrize("task", TASKS)
def test_committed_report_is_the_rendering_of_the_committed_json(task):
    import progressive_kd as ex
    stem = os.path.join(ROOT, "examples", "results", f"progressive_kd_{task}")
    with open(stem + ".json") as f:
        saved = json.load(f)
    with open(stem + ".md") as f:
        assert f.read() == ex.render_markdown(saved)
    assert saved["task"] == task and not saved["config"]["quick"]
    assert len(saved["per_seed"]) >= 10
