"""Shared code of the pytest-benchmark files in ``benchmarks/`` (``bench_*.py``).

They measure the same contenders as ``python -m fastkd.bench`` (built by the same suite
modules, so a pytest-benchmark row and a results-file row time the same code), at small sizes
for a quick statistical comparison with pytest-benchmark's tooling (``--benchmark-compare``,
histograms). Memory and the floor are only in ``python -m fastkd.bench``.
"""
from __future__ import annotations

import itertools

import torch

from fastkd.bench import core


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases(suite_name: str, shapes: list) -> list:
    """pytest params ``(suite_name, config_dict, contender_name)`` for every contender of the
    suite on this machine's device; ``shapes`` is a list of ``(dtype, shape, params)``.

    Contenders that cannot run (not installed, backend not built) are still listed so that the
    report says why they were skipped.
    """
    import pytest
    suite = core.get_suite(suite_name)
    dev = device()
    names = [c.name for c in suite.contenders(dev, core.default_backends(dev))]
    out = []
    for dtype, shape, params in shapes:
        cfg = suite.make_config(dtype, shape, params)
        for name in names:
            # ids usable in ``-k`` expressions (which reject "=", ">" and spaces)
            label = cfg.label.replace("=", "").replace(">", "").replace(" ", "-")
            out.append(pytest.param((suite_name, cfg.to_dict(), name), id=f"{label}-{name}"))
    return out


def run(benchmark, case, mode: str, rounds: int | None = None) -> None:
    """Benchmark ``mode`` ("fwd" or "fwd_bwd") of one case; skips what cannot run here."""
    import pytest
    suite_name, cfg_dict, name = case
    suite = core.get_suite(suite_name)
    why = suite.unavailable()
    if why:
        pytest.skip(why)
    dev = device()
    cfg = core.Config.from_dict(cfg_dict)
    found = [c for c in suite.contenders(dev, core.default_backends(dev)) if c.name == name]
    if not found:
        pytest.skip(f"no contender {name} on {dev.type}")
    c = found[0]
    if c.skip:
        pytest.skip(f"{name}: {c.skip}")
    fn = core.run_fwd if mode == "fwd" else core.run_fwd_bwd
    try:
        sets = core.make_sets(suite, cfg, dev, seed=0)
        step = c.build(cfg, sets[0], dev)
        counter = itertools.count()

        def call():
            out = fn(step, sets[next(counter) % len(sets)])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

        warm = 2 if c.kind == "compile" else 1  # the compile contender compiles on call 1
        for _ in range(warm):  # untimed: includes the backward graph's compilation
            core.run_fwd_bwd(step, sets[0])
        benchmark.extra_info.update(suite=suite_name, config=cfg.label, contender=name, mode=mode,
                                    device=dev.type)
        benchmark.pedantic(call, rounds=rounds or (20 if dev.type == "cuda" else 5),
                           iterations=1, warmup_rounds=1)
    except core.NotApplicable as exc:
        pytest.skip(f"{name}: {exc}")
    except Exception as exc:
        core.free_memory(dev)
        if core.is_oom(exc):
            pytest.skip(f"{name}: OOM ({core.describe_error(exc)})")
        if core.unsupported(exc):
            pytest.skip(f"{name}: {core.describe_error(exc)}")
        raise
