"""Smoke run of examples/distill_llm.py (the README's "Distilling an LLM" example) at tiny sizes:
it must run end to end from a fresh clone and print finite losses."""
import math
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_distill_llm_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "distill_llm.py"), "--vocab", "97", "--seq",
         "8", "--batch", "4", "--steps", "3", "--teacher-steps", "3", "--topk", "5"],
        capture_output=True, text=True, timeout=300, check=True)
    ces = [float(x) for x in re.findall(r"student CE on fresh data ([0-9.naif]+)", out.stdout)]
    assert len(ces) == 2 and all(math.isfinite(c) for c in ces), out.stdout
