"""examples/distill_cross_tokenizer.py (ULD between a word-level teacher and a character-level
student): a small run, checked for pairing and for numbers that come from the run."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import distill_cross_tokenizer as ex
    out = str(tmp_path_factory.mktemp("xtok") / "res")
    res = ex.main(["--seeds", "2", "--steps", "12", "--teacher-steps", "10", "--words", "16",
                   "--sentence", "5", "--train-sentences", "16", "--heldout-sentences", "24",
                   "--batch", "8", "--threads", "1", "--out", out])
    return ex, res, out


def test_arms_are_paired_and_measured(run):
    ex, res, _ = run
    assert len(res["per_seed"]) == 2
    for rec in res["per_seed"]:
        hard, uld = rec["arms"]["hard"], rec["arms"]["uld"]
        assert hard["init_sha256"] == uld["init_sha256"]
        assert hard["batches_sha256"] == uld["batches_sha256"]
        # The ULD term changes training: the arms differ.
        assert hard["heldout_ce"] != uld["heldout_ce"]
    a, b = res["per_seed"]
    assert a["arms"]["hard"]["init_sha256"] != b["arms"]["hard"]["init_sha256"]


def test_summary_and_files_follow_from_per_seed_values(run):
    ex, res, out = run
    vals = {arm: [r["arms"][arm]["heldout_ce"] for r in res["per_seed"]] for arm in ex.ARMS}
    for arm in ex.ARMS:
        assert res["summary"]["heldout_ce"][arm]["mean"] == pytest.approx(
            sum(vals[arm]) / len(vals[arm]))
    diffs = [u - h for u, h in zip(vals["uld"], vals["hard"])]
    assert res["paired"]["heldout_ce"]["diffs"] == pytest.approx(diffs)
    with open(out + ".json") as f:
        assert json.load(f)["paired"]["heldout_ce"]["diffs"] == pytest.approx(diffs)
    with open(out + ".md") as f:
        md = f.read()
    assert f"{res['summary']['heldout_ce']['uld']['mean']:.4f}" in md


def test_char_view_pairs_word_starts():
    import torch
    import distill_cross_tokenizer as ex
    words = ["ab", "c", "dea"]
    text = ex.CharText(torch.tensor([[0, 2, 1]]), words)
    # "ab dea c": spaces at 2 and 6; the character after each is a word's first letter
    assert text.spaces.tolist() == [[2, 6]]
    assert text.chars[0].tolist() == [0, 1, ex.SPACE, 3, 4, 0, ex.SPACE, 2]
