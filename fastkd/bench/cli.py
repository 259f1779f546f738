"""Command line of ``python -m fastkd.bench`` (see ``--help``)."""
from __future__ import annotations

import argparse
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


def _csv(value: str) -> list:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastkd.bench",
        description="Time and memory of fastkd against stock PyTorch, torch.compile, "
                    "Liger-Kernel and the physical floor, side by side in one process "
                    "(how and why: docs/BENCHMARKING.md).")
    p.add_argument("--suite", default="logit",
                   help="logit | fused-linear | feature | relation | all, or a comma list "
                        "(default: logit; scripts/bench.sh runs all; suites whose fastkd "
                        "class is missing are skipped with a line saying so)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32, bfloat16, float16 (default: per suite and "
                        "device, e.g. float32 on CPU; bfloat16,float32 for logit KD on CUDA)")
    p.add_argument("--sizes", choices=("demo", "quick", "full"), default="quick",
                   help="demo (one config per suite, two for relation: `--suite all --sizes "
                        "demo` shows every loss family in under 2 minutes on 2 CPU cores), "
                        "quick (two or more "
                        "configs per suite, a few minutes) or full (the sizes of "
                        "docs/BENCHMARKING.md; meant for a GPU)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="directory of the .json/.md/.png results (default: benchmarks/results)")
    p.add_argument("--name", default=None,
                   help="file stem of the results (default: <device-slug>-<YYYYMMDD>)")
    p.add_argument("--backends", default=None,
                   help="comma list of fastkd backends to run (default: cpu,reference on CPU; "
                        "cuda,triton,reference on CUDA)")
    p.add_argument("--contenders", default=",".join(core.KINDS),
                   help=f"comma list of kinds to run among {','.join(core.KINDS)} (default: all)")
    p.add_argument("--divergence", default=None,
                   help="comma list of divergences for the logit and fused-linear suites: kl, "
                        "reverse_kl, jsd, tvd (default: kl for logit, jsd for fused-linear)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default: 5 on CPU, 50 on CUDA; a "
                        "measurement also stops after 4 s / 10 s once 3 / 5 calls are done)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed forward+backward calls first (default: 1 on CPU, 3 on CUDA; "
                        "at least 1)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (on CPU: no child processes)")
    p.add_argument("--merge", action="store_true",
                   help="merge into an existing results file of the same name (same device): "
                        "configs run now replace those with the same label, the others are kept "
                        "(e.g. a GPU run split into several commands)")
    p.add_argument("--no-plot", action="store_true", help="do not write the .png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="list the configs and contenders, run nothing")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    suites = list(SUITE_ORDER) if args.suite == "all" else _csv(args.suite)
    for s in suites:
        if s not in core.SUITE_MODULES:
            p.error(f"unknown suite {s!r}; choose from {', '.join(SUITE_ORDER)} or all")
    args.suites = suites
    try:
        args.dtypes = [core.parse_dtype(d) for d in _csv(args.dtype)] if args.dtype else None
    except ValueError as exc:
        p.error(str(exc))
    args.kinds = _csv(args.contenders)
    for k in args.kinds:
        if k not in core.KINDS:
            p.error(f"unknown contender kind {k!r}; choose from {', '.join(core.KINDS)}")
    args.divergences = _csv(args.divergence) if args.divergence else None
    for d in args.divergences or []:
        if d not in ("kl", "reverse_kl", "jsd", "tvd"):
            p.error(f"unknown divergence {d!r}")
    if args.backends:
        args.backend_list = _csv(args.backends)
        for b in args.backend_list:
            if b not in ("cuda", "triton", "cpu", "reference"):
                p.error(f"unknown backend {b!r}; choose from cuda, triton, cpu, reference")
    else:
        args.backend_list = None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    return args


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


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


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    timing = core.default_timing(device, args.repeats, args.warmup)
    opts = core.RunOptions(timing=timing, memory=not args.no_memory, seed=args.seed)
    backends = args.backend_list or core.default_backends(device)

    plan = []  # (suite, reason_or_None, configs, contenders)
    for name in args.suites:
        suite = core.get_suite(name)
        reason = suite.unavailable()
        if reason:
            plan.append((suite, reason, [], []))
            continue
        configs = suite.configs(device.type, args.sizes, args.dtypes,
                                {"divergence": args.divergences})
        contenders = [c for c in suite.contenders(device, backends) if c.kind in args.kinds]
        plan.append((suite, None, configs, contenders))

    if args.dry_run:
        for suite, reason, configs, contenders in plan:
            if reason:
                print(f"[{suite.name}] skipped: {reason}")
                continue
            for note in getattr(suite, "notes", []):
                print(f"[{suite.name}] {note}")
            print(f"[{suite.name}] contenders: " + ", ".join(
                c.name + (f" (skipped: {c.skip})" if c.skip else "") for c in contenders))
            for cfg in configs:
                print(f"[{suite.name}]   {cfg.label}")
        return 0

    info = envinfo.device_info(device)
    stem = args.name or f"{envinfo.slug(device, info)}-{datetime.date.today():%Y%m%d}"
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, stem + ".json")
    md_path = os.path.join(args.out, stem + ".md")
    png_path = os.path.join(args.out, stem + ".png")
    rates = core.Rates(device)
    doc = {
        "schema": 1,
        "date": f"{datetime.date.today():%Y-%m-%d}",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m fastkd.bench"] + [
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
        "device": info,
        "software": envinfo.software_info(),
        "settings": {
            "sizes": args.sizes, "suites": args.suites, "dtypes": args.dtypes,
            "backends": backends, "contenders": args.kinds, "divergences": args.divergences,
            "repeats": timing.repeats, "warmup": max(1, timing.warmup),
            "max_seconds_per_measurement": timing.max_seconds, "seed": args.seed,
            "timer": ("CUDA events per call, L2 flushed before each call"
                      if device.type == "cuda" else "time.perf_counter per call"),
            "fwd": "forward of a training step (inputs require grad), no backward",
            "memory": ("off" if args.no_memory else
                       "max_memory_allocated minus memory held before the call"
                       if device.type == "cuda" else
                       "peak RSS of a fresh child process per (contender, config) above its "
                       "RSS with the inputs (VmHWM reset after warm-up)"),
            "rotation": f"{core.N_ROTATE} input sets when one set is < "
                        f"{core.ROTATE_BELOW_BYTES >> 20} MiB",
        },
        # Other processes' load distorts CPU timings: it is recorded so a reader can judge.
        "load_average": {"start": _loadavg(), "end": None},
        "rates": None,
        "suites": {},
        "wall_s": 0.0,
    }

    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if old.get("device", {}).get("name") != info.get("name"):
            print(f"--merge: {json_path} was measured on {old.get('device', {}).get('name')!r}, "
                  f"not on {info.get('name')!r}; use another --name", file=sys.stderr)
            return 2
        doc["suites"] = old.get("suites", {})
        prev = {k: old.get(k) for k in ("command", "created", "wall_s")}
        prev["fastkd_git"] = old.get("software", {}).get("fastkd_git")
        doc["merged_runs"] = old.get("merged_runs", []) + [prev]
        if prev["fastkd_git"] != doc["software"]["fastkd_git"]:
            print("--merge: the earlier results come from another fastkd commit or tree state",
                  file=sys.stderr)

    total = sum(len(cfgs) * len(conts) for _, r, cfgs, conts in plan if not r)
    bar, write = _progress(total)
    write(f"fastkd.bench on {info.get('name')} ({device.type}), torch {torch.__version__}, "
          f"sizes={args.sizes}; results -> {json_path}")

    def save():
        doc["rates"] = rates.to_dict()
        doc["load_average"]["end"] = _loadavg()
        doc["wall_s"] = time.perf_counter() - t_start
        report.write_json(json_path, doc)
        report.write_markdown(md_path, doc, os.path.basename(png_path) if not args.no_plot
                              else None)

    for suite, reason, configs, contenders in plan:  # say up front what will not run
        if reason:
            write(f"[{suite.name}] skipped: {reason}")
            if not doc["suites"].get(suite.name, {}).get("configs"):  # keep merged results
                doc["suites"][suite.name] = {"status": "skipped", "reason": reason,
                                             "configs": []}
        for note in getattr(suite, "notes", []) if not reason else []:
            write(f"[{suite.name}] {note}")
    try:
        for suite, reason, configs, contenders in plan:
            if reason:
                continue
            notes = list(getattr(suite, "notes", []))
            labels = {cfg.label for cfg in configs}
            # --merge: earlier configs that this run does not measure again are kept
            entry_list = [e for e in doc["suites"].get(suite.name, {}).get("configs", [])
                          if e["config"]["label"] not in labels]
            doc["suites"][suite.name] = {"status": "ok", "reason": None, "notes": notes,
                                         "configs": entry_list}
            for cfg in configs:
                floor = rates.floor(suite.floor_work(cfg), cfg.dtype)
                try:
                    sets = core.make_sets(suite, cfg, device, args.seed)
                except Exception as exc:  # the inputs alone do not fit: every contender is OOM
                    core.free_memory(device)
                    status = "OOM" if core.is_oom(exc) else "error"
                    results = [core._empty_result(c, status, "inputs: " + core.describe_error(exc))
                               if not c.skip else core._empty_result(c, "skipped", c.skip)
                               for c in contenders]
                    bar.update(len(contenders))
                else:
                    results = []
                    for c in contenders:
                        bar.set_description(f"{suite.name} {cfg.label} {c.name}")
                        results.append(core.run_one(suite, cfg, c, sets, device, opts))
                        bar.update(1)
                    del sets
                    core.free_memory(device)
                core.add_ratios(results, floor)
                _check_losses(results, cfg.dtype, write)
                entry_list.append({"config": cfg.to_dict(), "floor": floor, "results": results})
                write(report.config_table(cfg, floor, results))
                save()
    except KeyboardInterrupt:
        write("interrupted: writing what was measured so far")
    finally:
        bar.close()
        core.close_memory_server()
    save()
    written = [json_path, md_path]
    if not args.no_plot:
        try:
            if report.write_png(png_path, doc):
                written.append(png_path)
        except Exception as exc:  # a plotting problem must not lose the measurements
            print(f"plot failed: {core.describe_error(exc)}", file=sys.stderr)
    print(f"wrote {', '.join(written)} in {time.perf_counter() - t_start:.0f} s")
    return 0
