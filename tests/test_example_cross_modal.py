"""examples/distill_cross_modal.py (pixel teacher, projection-profile student): a --quick run,
checked for pairing and for a report whose numbers come from that run's JSON; and the committed
report checked against the rendering of the committed JSON."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
RESULTS = os.path.join(ROOT, "examples", "results", "cross_modal_digits")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import distill_cross_modal as ex
    out = str(tmp_path_factory.mktemp("xmodal"))
    threads = torch.get_num_threads()
    try:
        res = ex.main(["--quick", "--out", out])
    finally:
        torch.set_num_threads(threads)   # the example limits torch's threads
    with open(os.path.join(out, "cross_modal_digits.json")) as f:
        data = json.load(f)
    with open(os.path.join(out, "cross_modal_digits.md")) as f:
        md = f.read()
    return ex, res, data, md


def test_json_has_the_reported_fields(run):
    ex, res, data, _ = run
    for key in ("command", "settings", "setup", "teacher_accuracy", "tuning", "seeds",
                "per_seed", "summary", "paired", "environment", "seconds"):
        assert key in data, key
    assert data["settings"]["quick"] and data["seeds"] == [0, 1]
    assert set(data["summary"]) == set(ex.ARMS)
    assert set(data["paired"]) == {f"{a}-{b}" for a, b in ex.PAIRS}
    for d in data["paired"].values():
        assert {"mean_diff", "diffs", "std_diff", "t_p", "wilcoxon_p", "wins", "ties",
                "losses"} <= set(d)
    su = data["setup"]
    assert (su["student_dim"], su["teacher_dim"]) == (32, 128)   # FeatureKD crosses widths
    chosen = data["tuning"]["chosen"]
    assert chosen["all"]["feature"] > 0 and chosen["all"]["rkd"] > 0
    assert chosen["all"]["temperature"] == chosen["kd"]["temperature"]
    assert data == json.loads(json.dumps(res))      # what main() returned is what it wrote


def test_arms_are_paired(run):
    ex, _, data, _ = run
    for rec in data["per_seed"]:
        arms = rec["arms"]
        assert len({arms[a]["labelled_batches_sha256"] for a in ex.ARMS}) == 1
        assert arms["hard"]["pool_batches_sha256"] is None
        assert len({arms[a]["pool_batches_sha256"] for a in ex.ARMS if a != "hard"}) == 1
        for a in ex.ARMS:
            assert 0.0 <= arms[a]["test_accuracy"] <= 1.0
    a, b = data["per_seed"]
    assert a["init_sha256"] != b["init_sha256"]
    assert a["arms"]["hard"]["labelled_batches_sha256"] != \
        b["arms"]["hard"]["labelled_batches_sha256"]


def test_stats_and_markdown_come_from_the_json(run):
    from scipy import stats

    ex, _, data, md = run
    acc = {a: [r["arms"][a]["test_accuracy"] for r in data["per_seed"]] for a in ex.ARMS}
    for a in ex.ARMS:
        assert data["summary"][a]["test_mean"] == pytest.approx(sum(acc[a]) / len(acc[a]))
    d = data["paired"]["all-hard"]
    assert d["diffs"] == pytest.approx([u - v for u, v in zip(acc["all"], acc["hard"])])
    assert d["t_p"] == pytest.approx(stats.ttest_rel(acc["all"], acc["hard"]).pvalue)
    assert md == ex.render_markdown(data)
    # Every per-seed accuracy of the JSON is in the report, on its seed's row.
    for r in data["per_seed"]:
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {r['seed']} |"))
        cells = [float(c) for c in re.findall(r"[-+]?\d+\.\d+", row)]
        assert cells[:len(ex.ARMS)] == [round(100 * r["arms"][a]["test_accuracy"], 2)
                                        for a in ex.ARMS]
    assert f"{100 * d['mean_diff']:+.2f}" in md
    assert f"{100 * data['teacher_accuracy']['test']:.2f}%" in md


def test_committed_report_is_the_rendering_of_the_committed_json():
    import distill_cross_modal as ex
    with open(RESULTS + ".json") as f:
        data = json.load(f)
    with open(RESULTS + ".md") as f:
        assert f.read() == ex.render_markdown(data)
    assert len(data["seeds"]) >= 10 and not data["settings"]["quick"]
