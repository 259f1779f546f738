"""scripts/gpu_check.sh without a GPU: its dry run passes (the real run's commands, case driver and
tools check out), and its orchestration — steps, per-step timeouts, the parallel phase, bench
time shares, the summary and the at-most-8-files OUTDIR — does what it says with every step's
command replaced by a stub (FASTKD_GPU_CHECK_STUB)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ["build", "gpu-tests", "memcheck", "racecheck", "synccheck", "mixed", "large",
         "bench-logit", "bench-fused-linear", "bench-feature", "bench-relation", "bench-topk"]
PARALLEL = {"gpu-tests", "memcheck", "racecheck", "synccheck", "mixed", "large"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and GNU timeout")


def _run(outdir, *args, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args, str(outdir)], cwd=ROOT, env=e, text=True,
                          capture_output=True, timeout=timeout)


def _plan(stdout):
    steps = re.findall(r"^plan: step (\S+)", stdout, re.M)
    files = re.findall(r"^plan: file (\S+)", stdout, re.M)
    return steps, files


def _summary_rows(outdir):
    rows = {}
    with open(os.path.join(outdir, "gpu-check-summary.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[0] in STEPS:
                rows[cells[0]] = cells
    return rows


def test_dry_run_passes_and_plans_every_step(tmp_path):
    out = tmp_path / "out"
    r = _run(out, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run (nothing runs on a GPU)" in r.stdout
    assert "dry run: 0 check(s) failed" in r.stdout, r.stdout
    for check in ("bash -n", "case driver builds", "every kernel in resources-cuda.json",
                  "bench command line", "pytest selection collects"):
        assert re.search(rf"^ok +{re.escape(check)}", r.stdout, re.M), (check, r.stdout)
    steps, files = _plan(r.stdout)
    assert steps == STEPS
    assert len(files) <= 8
    written = sorted(os.listdir(out))
    assert set(written) <= set(files) and len(written) <= 8, written
    rows = _summary_rows(out)
    assert list(rows) == STEPS and all(c[1] == "not run (dry run)" for c in rows.values())
    with open(out / "gpu-check-summary.json") as f:
        doc = json.load(f)
    assert [s["step"] for s in doc["steps"]] == STEPS
    with open(out / "gpu-check.log") as f:
        assert "ok      bash -n scripts/gpu_check.sh" in f.read()


def _stubs(d, *, hang=(), fail=(), extra_file=False):
    """One executable per step: prints what the real command would, hangs or fails on demand;
    the bench stub writes the bench files the real benchmark writes."""
    d.mkdir()
    lines = {
        "build": 'echo "built fastkd with CUDA kernels for sm_90"',
        "gpu-tests": 'echo "40 passed, 2 skipped in 12.00s"',
        "memcheck": 'echo "PASS cuda:0 c: ok"; echo "========= ERROR SUMMARY: 0 errors"',
        "racecheck": 'echo "PASS cuda:0 c: ok"; echo "========= ERROR SUMMARY: 0 errors"',
        "synccheck": 'echo "PASS cuda:0 c: ok"; echo "========= ERROR SUMMARY: 0 errors"',
        "mixed": 'echo "PASS cuda:0 mixed-v1000-bf16: ok"; echo "PASS cuda:0 m2: ok"',
        "large": 'echo "PASS large: N=32768 V=128256"',
        "bench": ('echo "| $1 | 1.0 |"; for x in json md png; do echo "$1" >> '
                  '"$OUTDIR/bench.$x"; done'),
    }
    for name, body in lines.items():
        if name in hang:
            body += "\nsleep 1000"
        if name in fail:
            body = body.replace("0 errors", "3 errors") + "\nexit 86"
        if extra_file and name == "large":
            body += '\necho x > "$OUTDIR/stray.txt"'
        p = d / name
        p.write_text("#!/usr/bin/env bash\n" + body + "\n")
        p.chmod(0o755)
    return d


def test_stubbed_run_times_out_hung_steps_and_reports_each(tmp_path):
    stub = _stubs(tmp_path / "stub", hang={"racecheck"}, fail={"synccheck"})
    out = tmp_path / "out"
    budget = 60
    t0 = time.monotonic()
    r = _run(out, env={"FASTKD_GPU_CHECK_STUB": str(stub), "FASTKD_GPU_CHECK_BUDGET": str(budget),
                       "FASTKD_GPU_CHECK_CAPS": "racecheck=4", "FASTKD_GPU_CHECK_BENCH_MIN": "1"})
    wall = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr  # a step failed, one timed out
    assert wall < budget, wall
    rows = _summary_rows(out)
    assert list(rows) == STEPS
    status = {k: v[1] for k, v in rows.items()}
    assert status["racecheck"] == "TIMEOUT"
    assert 3 <= int(rows["racecheck"][2]) <= 8  # killed at its cap, not at the budget
    assert status["synccheck"] == "FAIL" and rows["synccheck"][4].startswith("3 sanitizer errors")
    for s in STEPS:
        if s not in ("racecheck", "synccheck"):
            assert status[s] == "pass", (s, rows[s])
    assert rows["gpu-tests"][4] == "40 passed, 2 skipped in 12.00s"
    assert rows["mixed"][4].startswith("2 cases passed, 0 failed")
    # The parallel steps ran together: the hung one did not delay the others' start.
    with open(out / "gpu-check.log") as f:
        log = f.read()
    for s in STEPS:
        assert f"===== {s}:" in log, s
    assert sorted(os.listdir(out)) == sorted(_plan(r.stdout)[1])
    with open(out / "bench.json") as f:  # every suite ran, merged into one results file
        assert f.read().split() == ["logit", "fused-linear", "feature", "relation", "topk"]


def test_stubbed_run_passes_when_every_step_passes_and_rejects_stray_files(tmp_path):
    env = {"FASTKD_GPU_CHECK_BUDGET": "60", "FASTKD_GPU_CHECK_BENCH_MIN": "1"}
    r = _run(tmp_path / "ok", env={**env, "FASTKD_GPU_CHECK_STUB": str(_stubs(tmp_path / "s1"))})
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(v[1] == "pass" for v in _summary_rows(tmp_path / "ok").values())

    stub = _stubs(tmp_path / "s2", extra_file=True)
    r = _run(tmp_path / "stray", env={**env, "FASTKD_GPU_CHECK_STUB": str(stub)})
    assert r.returncode == 1
    assert "unplanned file in OUTDIR: stray.txt" in r.stdout


def test_bench_suite_over_its_share_keeps_partial_results(tmp_path):
    stub = _stubs(tmp_path / "stub")
    bench = stub / "bench"
    bench.write_text(bench.read_text() + '[ "$1" = logit ] && sleep 1000\nexit 0\n')
    r = _run(tmp_path / "out", env={"FASTKD_GPU_CHECK_STUB": str(stub),
                                    "FASTKD_GPU_CHECK_BUDGET": "70",
                                    "FASTKD_GPU_CHECK_BENCH_MIN": "1"})
    rows = _summary_rows(tmp_path / "out")
    assert rows["bench-logit"][1] == "partial (time share)"
    assert all(rows[f"bench-{s}"][1] == "pass"
               for s in ("fused-linear", "feature", "relation", "topk"))
    assert r.returncode == 0, r.stdout + r.stderr  # a time-share cut is not a failure


def test_refuses_a_non_empty_outdir(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    r = _run(tmp_path, "--dry-run")
    assert r.returncode == 2 and "not empty" in r.stderr
