"""Command line of ``python -m fastkd.bench`` (see ``--help``)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time

import torch

from fastkd.bench import core, envinfo, report

SUITE_ORDER = ("logit", "fused-linear", "feature", "relation")
LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 1e-2}
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
BACKENDS = ("cuda", "triton", "cpu", "reference")


def _csv(value: str) -> list:
    return [v.strip() for v in value.split(",") if v.strip()]


# -- command line ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _resolve_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastkd.bench",
        description="Time and memory of fastkd against stock PyTorch, torch.compile, "
                    "Liger-Kernel and the physical floor, side by side in one process "
                    "(how and why: docs/BENCHMARKING.md).")
    _add_selection_args(p)
    _add_measurement_args(p)
    _add_output_args(p)
    return p


def _add_selection_args(parser: argparse.ArgumentParser) -> None:
    """What runs: suites, sizes, device, dtypes, backends, contenders, divergences."""
    p = parser.add_argument_group("what runs")
    p.add_argument("--suite", default="logit",
                   help="logit | fused-linear | feature | relation | topk | all, or a comma "
                        "list (default: logit; all = every suite but topk, what "
                        "scripts/bench.sh runs; suites whose fastkd "
                        "class is missing are skipped with a line saying so)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32, bfloat16, float16 (default: per suite and "
                        "device, e.g. float32 on CPU; bfloat16,float32 for logit KD on CUDA)")
    p.add_argument("--sizes", choices=("demo", "quick", "full"), default="quick",
                   help="demo (one config per suite, two for relation: `--suite all --sizes "
                        "demo` shows every loss family in about 2 minutes on 2 CPU cores), "
                        "quick (two or more "
                        "configs per suite, a few minutes) or full (the sizes of "
                        "docs/BENCHMARKING.md; meant for a GPU)")
    p.add_argument("--backends", default=None,
                   help="comma list of fastkd backends to run (default: cpu,reference on CPU; "
                        "cuda,triton,reference on CUDA)")
    p.add_argument("--contenders", default=",".join(core.KINDS),
                   help=f"comma list of kinds to run among {','.join(core.KINDS)} (default: all)")
    p.add_argument("--divergence", default=None,
                   help="comma list of divergences for the logit and fused-linear suites: kl, "
                        "reverse_kl, jsd, tvd (default: kl for logit, jsd for fused-linear)")


def _add_measurement_args(parser: argparse.ArgumentParser) -> None:
    """How each contender is measured."""
    p = parser.add_argument_group("how it is measured")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default: 5 on CPU, 50 on CUDA; a "
                        "measurement also stops after 4 s / 10 s once 3 / 5 calls are done)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed forward+backward calls first (default: 1 on CPU, 3 on CUDA; "
                        "at least 1)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (on CPU: no child processes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    """Where the results go, or --dry-run for none."""
    p = parser.add_argument_group("results")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="directory of the .json/.md/.png results (default: benchmarks/results)")
    p.add_argument("--name", default=None,
                   help="file stem of the results (default: <device-slug>-<YYYYMMDD>)")
    p.add_argument("--merge", action="store_true",
                   help="merge into an existing results file of the same name (same device): "
                        "configs run now replace those with the same label, the others are kept "
                        "(e.g. a GPU run split into several commands)")
    p.add_argument("--no-plot", action="store_true", help="do not write the .png")
    p.add_argument("--dry-run", action="store_true",
                   help="list the configs and contenders, run nothing")


def _resolve_args(args: argparse.Namespace) -> None:
    """Check the values argparse cannot and add the parsed lists; ValueError says what is wrong."""
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    # every registered suite can be named; `all` is SUITE_ORDER (topk runs only when named)
    args.suites = (list(SUITE_ORDER) if args.suite == "all" else
                   _known(args.suite, tuple(core.SUITE_MODULES), "suite", " or all"))
    args.dtypes = [core.parse_dtype(d) for d in _csv(args.dtype)] if args.dtype else None
    args.kinds = _known(args.contenders, core.KINDS, "contender kind")
    args.divergences = _known(args.divergence, DIVERGENCES, "divergence") if args.divergence \
        else None
    args.backend_list = _known(args.backends, BACKENDS, "backend") if args.backends else None
    args.device = _resolve_device(args.device)


def _known(value: str, allowed, what: str, alternatives: str = "") -> list:
    items = _csv(value)
    for item in items:
        if item not in allowed:
            raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(allowed)}"
                             + alternatives)
    return items


def _resolve_device(requested):
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return requested


# -- plan -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class SuitePlan:
    """One suite of the run: its configs and contenders, or why it cannot run (``reason``)."""
    suite: object
    reason: str | None
    configs: list
    contenders: list

    @property
    def notes(self) -> list:
        return [] if self.reason else list(getattr(self.suite, "notes", []))


def _plan(args, device: torch.device, backends: list) -> list:
    plan = []
    for name in args.suites:
        suite = core.get_suite(name)
        reason = suite.unavailable()
        if reason:
            plan.append(SuitePlan(suite, reason, [], []))
            continue
        configs = suite.configs(device.type, args.sizes, args.dtypes,
                                {"divergence": args.divergences})
        contenders = [c for c in suite.contenders(device, backends) if c.kind in args.kinds]
        plan.append(SuitePlan(suite, None, configs, contenders))
    return plan


def _print_plan(plan: list) -> None:
    for p in plan:
        if p.reason:
            print(f"[{p.suite.name}] skipped: {p.reason}")
            continue
        for note in p.notes:
            print(f"[{p.suite.name}] {note}")
        print(f"[{p.suite.name}] contenders: " + ", ".join(
            c.name + (f" (skipped: {c.skip})" if c.skip else "") for c in p.contenders))
        for cfg in p.configs:
            print(f"[{p.suite.name}]   {cfg.label}")


# -- results document -----------------------------------------------------------------------------

@dataclasses.dataclass
class OutputPaths:
    json: str
    md: str
    png: str | None  # None: --no-plot


def _output_paths(args, device: torch.device, info: dict) -> OutputPaths:
    stem = args.name or f"{envinfo.slug(device, info)}-{datetime.date.today():%Y%m%d}"
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, stem)
    return OutputPaths(base + ".json", base + ".md", None if args.no_plot else base + ".png")


def _new_document(args, argv, device: torch.device, info: dict, timing, backends: list) -> dict:
    return {
        "schema": 1,
        "date": f"{datetime.date.today():%Y-%m-%d}",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m fastkd.bench"] + [
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
        "device": info,
        "software": envinfo.software_info(),
        "settings": _settings(args, device, timing, backends),
        # Other processes' load distorts CPU timings: it is recorded so a reader can judge.
        "load_average": {"start": _loadavg(), "end": None},
        "rates": None,
        "suites": {},
        "wall_s": 0.0,
    }


def _settings(args, device: torch.device, timing, backends: list) -> dict:
    cuda = device.type == "cuda"
    return {
        "sizes": args.sizes, "suites": args.suites, "dtypes": args.dtypes,
        "backends": backends, "contenders": args.kinds, "divergences": args.divergences,
        "repeats": timing.repeats, "warmup": max(1, timing.warmup),
        "max_seconds_per_measurement": timing.max_seconds, "seed": args.seed,
        "timer": ("CUDA events per call, L2 flushed before each call"
                  if cuda else "time.perf_counter per call"),
        "fwd": "forward of a training step (inputs require grad), no backward",
        "memory": ("off" if args.no_memory else
                   "max_memory_allocated minus memory held before the call" if cuda else
                   "peak RSS of a fresh child process per (contender, config) above its "
                   "RSS with the inputs (VmHWM reset after warm-up)"),
        "rotation": f"{core.N_ROTATE} input sets when one set is < "
                    f"{core.ROTATE_BELOW_BYTES >> 20} MiB",
    }


def _merge_earlier(doc: dict, json_path: str) -> bool:
    """--merge: take over the suites of an earlier results file; False if it is another device's."""
    with open(json_path) as f:
        old = json.load(f)
    old_device, device = old.get("device", {}).get("name"), doc["device"].get("name")
    if old_device != device:
        print(f"--merge: {json_path} was measured on {old_device!r}, not on {device!r}; "
              "use another --name", file=sys.stderr)
        return False
    doc["suites"] = old.get("suites", {})
    prev = {k: old.get(k) for k in ("command", "created", "wall_s")}
    prev["fastkd_git"] = old.get("software", {}).get("fastkd_git")
    doc["merged_runs"] = old.get("merged_runs", []) + [prev]
    if prev["fastkd_git"] != doc["software"]["fastkd_git"]:
        print("--merge: the earlier results come from another fastkd commit or tree state",
              file=sys.stderr)
    return True


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _write_plot(paths: OutputPaths, doc: dict) -> list:
    """The files written: the .json, .md and, unless off or failed, the .png."""
    written = [paths.json, paths.md]
    if paths.png:
        try:
            if report.write_png(paths.png, doc):
                written.append(paths.png)
        except Exception as exc:  # a plotting problem must not lose the measurements
            print(f"plot failed: {core.describe_error(exc)}", file=sys.stderr)
    return written


# -- measuring ------------------------------------------------------------------------------------

def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr), tqdm.write
    except ImportError:  # tqdm is a soft dependency: fall back to plain prints
        class _Plain:
            def update(self, n=1):
                pass

            def set_description(self, s):
                pass

            def close(self):
                pass
        return _Plain(), print


def _check_losses(results: list, dtype: str, write) -> None:
    """Cross-check: fastkd and the compiled stock code must agree with the stock loss."""
    ref = next((r for r in results if r["kind"] == "stock" and r["loss"] is not None), None)
    for r in results:
        r["loss_rel_diff_vs_stock"] = None
        if ref is None or r["loss"] is None or r["kind"] not in ("fastkd", "compile", "stock"):
            continue
        diff = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-6)
        r["loss_rel_diff_vs_stock"] = diff
        if diff > LOSS_TOLERANCE.get(dtype, 1e-3):
            msg = f"loss {r['loss']:.6g} differs from stock {ref['loss']:.6g} (rel {diff:.1e})"
            r["note"] = (r["note"] + "; " if r["note"] else "") + msg
            write(f"  WARNING {r['contender']}: {msg}")


@dataclasses.dataclass
class _Run:
    """What measuring the configs needs, shared by all of them."""
    device: torch.device
    opts: core.RunOptions
    rates: core.Rates
    doc: dict
    paths: OutputPaths
    t_start: float
    bar: object
    write: object

    def save(self) -> None:
        """Write the .json and .md of what is measured so far (after each config and at the end)."""
        self.doc["rates"] = self.rates.to_dict()
        self.doc["load_average"]["end"] = _loadavg()
        self.doc["wall_s"] = time.perf_counter() - self.t_start
        report.write_json(self.paths.json, self.doc)
        png = self.paths.png
        report.write_markdown(self.paths.md, self.doc, os.path.basename(png) if png else None)


def _announce(plan: list, run: _Run) -> None:
    """Say up front what will not run, and each suite's notes."""
    for p in plan:
        if p.reason:
            run.write(f"[{p.suite.name}] skipped: {p.reason}")
            if not run.doc["suites"].get(p.suite.name, {}).get("configs"):  # keep merged results
                run.doc["suites"][p.suite.name] = {"status": "skipped", "reason": p.reason,
                                                   "configs": []}
        for note in p.notes:
            run.write(f"[{p.suite.name}] {note}")


def _run_suite(p: SuitePlan, run: _Run) -> None:
    labels = {cfg.label for cfg in p.configs}
    # --merge: earlier configs that this run does not measure again are kept
    entries = [e for e in run.doc["suites"].get(p.suite.name, {}).get("configs", [])
               if e["config"]["label"] not in labels]
    run.doc["suites"][p.suite.name] = {"status": "ok", "reason": None, "notes": p.notes,
                                       "configs": entries}
    for cfg in p.configs:
        floor = run.rates.floor(p.suite.floor_work(cfg), cfg.dtype)
        results = _run_config(p.suite, cfg, p.contenders, run)
        core.add_ratios(results, floor)
        if hasattr(p.suite, "annotate"):  # suite-specific ratios (topk: top-k / dense time)
            p.suite.annotate(cfg, results)
        _check_losses(results, cfg.dtype, run.write)
        entries.append({"config": cfg.to_dict(), "floor": floor, "results": results})
        run.write(report.config_table(cfg, floor, results))
        run.save()


def _run_config(suite, cfg, contenders: list, run: _Run) -> list:
    """One result per contender on the inputs of ``cfg``."""
    try:
        sets = core.make_sets(suite, cfg, run.device, run.opts.seed)
    except Exception as exc:  # the inputs alone do not fit: every contender is OOM
        core.free_memory(run.device)
        run.bar.update(len(contenders))
        return _inputs_failed(contenders, exc)
    results = []
    for c in contenders:
        run.bar.set_description(f"{suite.name} {cfg.label} {c.name}")
        results.append(core.run_one(suite, cfg, c, sets, run.device, run.opts))
        run.bar.update(1)
    del sets
    core.free_memory(run.device)
    return results


def _inputs_failed(contenders: list, exc: Exception) -> list:
    status = "OOM" if core.is_oom(exc) else "error"
    return [core._empty_result(c, status, "inputs: " + core.describe_error(exc))
            if not c.skip else core._empty_result(c, "skipped", c.skip)
            for c in contenders]


def _run_plan(plan: list, run: _Run) -> None:
    """Measure every runnable suite, saving after each config; Ctrl-C keeps what is measured."""
    _announce(plan, run)
    try:
        for p in plan:
            if not p.reason:
                _run_suite(p, run)
    except KeyboardInterrupt:
        run.write("interrupted: writing what was measured so far")
    finally:
        run.bar.close()
        core.close_memory_server()


# -- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    timing = core.default_timing(device, args.repeats, args.warmup)
    backends = args.backend_list or core.default_backends(device)
    plan = _plan(args, device, backends)
    if args.dry_run:
        _print_plan(plan)
        return 0

    info = envinfo.device_info(device)
    paths = _output_paths(args, device, info)
    rates = core.Rates(device)
    doc = _new_document(args, argv, device, info, timing, backends)
    if args.merge and os.path.exists(paths.json) and not _merge_earlier(doc, paths.json):
        return 2

    bar, write = _progress(sum(len(p.configs) * len(p.contenders) for p in plan if not p.reason))
    write(f"fastkd.bench on {info.get('name')} ({device.type}), torch {torch.__version__}, "
          f"sizes={args.sizes}; results -> {paths.json}")
    opts = core.RunOptions(timing=timing, memory=not args.no_memory, seed=args.seed)
    run = _Run(device, opts, rates, doc, paths, t_start, bar, write)
    _run_plan(plan, run)
    run.save()
    written = _write_plot(paths, doc)
    print(f"wrote {', '.join(written)} in {time.perf_counter() - t_start:.0f} s")
    return 0
