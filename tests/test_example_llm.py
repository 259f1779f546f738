"""Smoke run of examples/distill_llm.py (offline vs online distillation vs hard labels) at tiny
sizes: its results file must hold every arm of every seed, numbers that follow from the per-seed
values, arms that are truly paired (same initial weights, same batches) and a teacher cache of
the documented size."""
import hashlib
import importlib.util
import json
import math
import pathlib
import struct

import pytest
import torch

from fastkd.teacher_cache import load_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS, STEPS, BATCH, TRAIN_SEQS, SEQ, TOPK, VOCAB, HIDDEN = 2, 6, 4, 12, 8, 5, 97, 16


def _load():
    spec = importlib.util.spec_from_file_location("fastkd_example_distill_llm",
                                                  ROOT / "examples" / "distill_llm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run shared by the tests: (module, returned dict, JSON on disk, output dir)."""
    tmp = tmp_path_factory.mktemp("distill_llm")
    threads = torch.get_num_threads()  # the example sets it; restore it for the session
    try:
        mod = _load()
        res = mod.main(["--seeds", str(SEEDS), "--steps", str(STEPS), "--batch", str(BATCH),
                        "--train-seqs", str(TRAIN_SEQS), "--heldout-seqs", "8", "--seq",
                        str(SEQ), "--vocab", str(VOCAB), "--hidden", str(HIDDEN),
                        "--teacher-hidden", "32", "--teacher-steps", "3", "--topk", str(TOPK),
                        "--eval-every", "3", "--device", "cpu", "--cache-dir", str(tmp),
                        "--out", str(tmp / "res"), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp / "res.json").read_text())
    return mod, res, saved, tmp


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_every_arm_of_every_seed(run):
    mod, res, saved, tmp = run
    assert [r["seed"] for r in saved["per_seed"]] == list(range(SEEDS))
    for r in saved["per_seed"]:
        assert sorted(r["arms"]) == sorted(mod.ARMS) == ["hard", "offline", "online"]
        for rec in r["arms"].values():
            for key in ("heldout_ce", "heldout_kl_to_teacher", "heldout_ce_best_checkpoint",
                        "train_seconds", "final_train_loss"):
                assert math.isfinite(rec[key]), (key, rec)
            assert rec["heldout_ce_curve"][-1] == [STEPS, rec["heldout_ce"]]
            assert _close(rec["heldout_ce_best_checkpoint"],
                          min(ce for _, ce in rec["heldout_ce_curve"]))
    for key in ("config", "versions", "date", "cache", "language", "teacher", "total_seconds"):
        assert key in saved
    assert saved["config"]["steps"] == STEPS and saved["config"]["temperature"] == 2.0
    md = (tmp / "res.md").read_text()
    for r in saved["per_seed"]:
        assert f"\n| {r['seed']} | {r['arms']['hard']['heldout_ce']:.4f} |" in md


def test_arms_are_paired(run):
    """Within a seed every arm started from the seed's initial weights and consumed the seed's
    batch order; different seeds differ."""
    mod, res, saved, _ = run
    for r in saved["per_seed"]:
        arms = r["arms"].values()
        assert len({a["init_sha256"] for a in arms}) == 1, r["arms"]
        assert len({a["batches_sha256"] for a in arms}) == 1, r["arms"]
        # Recompute both from the seed, as the example documents them.
        torch.manual_seed(r["seed"])
        init = mod.TinyCausalLM(VOCAB, HIDDEN, 1, 2, SEQ)
        assert r["arms"]["hard"]["init_sha256"] == mod.param_hash(init)
        order = mod.batch_order(TRAIN_SEQS, STEPS, BATCH, r["seed"])
        h = hashlib.sha256()
        for ids in order:
            h.update(ids.numpy().astype("<i8").tobytes())
        assert r["arms"]["hard"]["batches_sha256"] == h.hexdigest()
    firsts = [r["arms"]["hard"] for r in saved["per_seed"]]
    assert len({a["init_sha256"] for a in firsts}) == SEEDS
    assert len({a["batches_sha256"] for a in firsts}) == SEEDS


def test_summary_follows_from_per_seed_values(run):
    mod, res, saved, _ = run
    per_seed = saved["per_seed"]
    for metric in ("heldout_ce", "heldout_kl_to_teacher", "heldout_ce_best_checkpoint"):
        vals = {a: [r["arms"][a][metric] for r in per_seed] for a in mod.ARMS}
        for a, v in vals.items():
            s = saved["summary"][metric][a]
            assert s["values"] == v
            assert _close(s["mean"], sum(v) / len(v))
            m = sum(v) / len(v)
            assert _close(s["std"], math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)))
        for a, b in mod.PAIRS:
            p = saved["paired"][metric][f"{a}-{b}"]
            d = [x - y for x, y in zip(vals[a], vals[b])]
            assert p["diffs"] == d and p["n"] == SEEDS
            assert _close(p["mean"], sum(d) / len(d))
            assert math.isclose(p["mean"], saved["summary"][metric][a]["mean"]
                                - saved["summary"][metric][b]["mean"], abs_tol=1e-9)
            if p["t"] is not None:
                assert _close(p["t"], p["mean"] / (p["std"] / math.sqrt(len(d))))
            assert (p["a_better"], p["a_worse"]) == (sum(x < 0 for x in d), sum(x > 0 for x in d))


def test_cache_file_has_the_documented_size(run):
    _, _, saved, tmp = run
    path = tmp / "teacher-cache.safetensors"
    assert path.is_file()
    size = path.stat().st_size
    cache = load_cache(path)
    tokens = TRAIN_SEQS * SEQ  # one row per predicted token
    assert (len(cache), cache.num_tokens, cache.k) == (TRAIN_SEQS, tokens, TOPK)
    assert cache.temperature == 1.0 and cache.logprob_dtype == "bf16"
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    # int32 index + bf16 logprob per entry, then the offsets (8 bytes per sequence + 1).
    assert size == 8 + header + tokens * TOPK * (4 + 2) + 8 * (TRAIN_SEQS + 1)
    c = saved["cache"]
    assert c["bytes"] == size and c["num_tokens"] == tokens
    assert c["data_bytes_per_token"] == TOPK * 6
    assert _close(c["bytes_per_token"], size / tokens)
