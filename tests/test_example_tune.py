"""examples/tune_kd.py (hyperparameter search for KD on digits): quick runs through both search
paths (Optuna, and the seeded random search used when Optuna is missing), checked for results
that come from the run's JSON alone, committed results included."""
from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
RESULTS = os.path.join(ROOT, "examples", "results", "tune_kd")

KEYS = {"command", "git", "date", "machine", "versions", "config", "sampler", "space", "default",
        "n_fit", "n_val", "n_test", "n_labelled", "teacher_val_accuracy",
        "teacher_test_accuracy", "search_seeds", "trials", "best", "best_trial",
        "best_val_accuracy", "default_val_accuracy", "per_seed", "test_summary", "paired_test",
        "timing_seed", "timing", "steps_per_trial", "hint_channels", "seconds"}


def _main(argv, without_optuna=False):
    import tune_kd as ex
    n = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        if without_optuna:
            mp.setitem(sys.modules, "optuna", None)     # `import optuna` raises ImportError
        try:
            return ex.main(argv)
        finally:
            torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    paths = {"random": ["--sampler", "auto"]}      # auto, with optuna hidden: the fallback
    try:
        import optuna  # noqa: F401
        paths["optuna"] = ["--sampler", "optuna"]
    except ImportError:
        pass
    for name, extra in paths.items():
        d = tmp_path_factory.mktemp(name)
        res = _main(["--quick", "--out", str(d)] + extra, without_optuna=name == "random")
        out[name] = (res, str(d / "tune_kd"))
    return out


def _check_rendered_from_json(stem):
    import tune_kd as ex
    with open(stem + ".json") as f:
        res = json.load(f)
    with open(stem + ".md") as f:
        md = f.read()
    assert md == ex.render_markdown(res)
    return res, md


@pytest.mark.parametrize("sampler", ["random", "optuna"])
def test_quick_run_writes_results_from_its_json(runs, sampler):
    import tune_kd as ex
    if sampler not in runs:
        pytest.skip("optuna is not installed")
    res, stem = runs[sampler]
    saved, md = _check_rendered_from_json(stem)
    assert set(saved) == KEYS
    assert saved["sampler"] == sampler
    assert (saved["versions"]["optuna"] is None) == (sampler == "random")
    assert json.loads(json.dumps(res)) == saved
    assert len(saved["trials"]) == ex.QUICK["trials"]
    # The numbers on the page are this run's: the per-seed accuracies, the statistics, the rates.
    for r in saved["per_seed"]:
        assert f"| {r['seed']} | {100 * r['default']:.2f} | {100 * r['best']:.2f} |" in md
    st = saved["paired_test"]
    diffs = [r["best"] - r["default"] for r in saved["per_seed"]]
    assert st["mean_diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert st["wins"] + st["ties"] + st["losses"] == len(diffs) == ex.QUICK["seeds"]
    if st["t_p"] is not None:
        from scipy import stats
        a = [r["best"] for r in saved["per_seed"]]
        b = [r["default"] for r in saved["per_seed"]]
        assert st["t_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    best = max(saved["trials"], key=lambda t: t["val_accuracy"])
    assert saved["best"] == best["setting"]
    for arm in ex.TIMING_ARMS:
        assert f"| {saved['timing'][arm]['trials_per_minute']:.1f} |" in md
    # The page changes with the JSON: nothing on it is fixed text posing as a result.
    other = copy.deepcopy(saved)
    other["per_seed"][0]["best"] = 0.123456
    other["timing"]["stock"]["median_seconds"] *= 2
    assert ex.render_markdown(other) != md


def test_random_search_is_seeded_and_stays_in_the_space(runs):
    import random

    import tune_kd as ex
    res, _ = runs["random"]
    rng = random.Random(res["config"]["search_seed"])
    for t in res["trials"]:
        assert t["setting"] == ex.sample_random(rng)
        for name, (lo, hi, _) in ex.SPACE.items():
            assert lo <= t["setting"][name] <= hi


def test_sampler_optuna_needs_optuna():
    import tune_kd as ex
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "optuna", None)
        assert ex.import_optuna() is None
        with pytest.raises(SystemExit):
            ex.parse_args(["--sampler", "optuna"])


def test_stock_and_fastkd_losses_agree():
    """The timing compares the same loss: values and gradients of the two implementations."""
    import tune_kd as ex
    setting = {"temperature": 3.0, "soft_weight": 0.7, "hard_weight": 1.3, "hint_weight": 2.0}
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    h0, th = torch.rand(16, 8, generator=g), torch.randn(16, 24, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    out = {}
    for impl in ("fastkd", "stock"):
        s, h = s0.clone().requires_grad_(), h0.clone().requires_grad_()
        fn, params = ex.make_loss(setting, 3, 8, 24, impl)
        loss = fn(s, t, y, h, th)
        loss.backward()
        out[impl] = [loss.detach(), s.grad, h.grad] + [p.grad for p in params]
    for a, b in zip(out["fastkd"], out["stock"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_committed_results_are_the_rendering_of_the_committed_json():
    if not os.path.exists(RESULTS + ".json"):
        pytest.skip("no committed results")
    res, _ = _check_rendered_from_json(RESULTS)
    assert not res["config"]["quick"]
    assert len(res["per_seed"]) >= 5
    assert res["sampler"] in ("optuna", "random")
