#!/usr/bin/env python
"""Resource tables of every Triton kernel configuration, compiled ahead of time for sm_80/sm_90.

    python scripts/triton_resources.py [--out benchmarks/results/resources-triton]
                                       [--workers 2] [--cache DIR] [--family logit ...]

Enumerates the configurations the dispatchers pick at the benchmark sizes
(:func:`fastkd._triton_aot.enumerate_launches`), compiles each for sm_80 and sm_90 without a GPU
and writes ``OUT.json`` (every row) and ``OUT.md`` (summary per kernel, then the full table).
Exits 1 if any configuration fails to compile. Needs no GPU; about 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastkd import _triton_aot as aot  # noqa: E402

MD_HEADER = """# Triton kernels: resources per configuration (ahead-of-time compile, sm_80 / sm_90)

Written by `scripts/triton_resources.py` ({when}, triton {triton}, torch {torch}). Every
configuration the dispatchers pick at the benchmark sizes (`fastkd/bench/suite_*.py`, cuda
"full" grids; plus teacher counts 1/2/4, hard CE on/off, teacher gradients on/off, fp16, NCHW
feature maps, `reduction="none"`, bf16 features with a float32 adapter, TF32) is compiled with
`triton.compile`'s pipeline for `GPUTarget("cuda", 80|90, 32)`; registers and spills come from
ptxas' `-v` log. {nconf} distinct configurations, {ncomp} compiles, {nerr} failures.

Columns: regs = registers per thread; spill = spill stores / loads (bytes per thread);
stack = stack frame bytes; smem = shared memory (bytes, dynamic + static); blk/SM = resident
blocks per SM from registers, threads and shared memory (A100: 108 SMs, H100: 132 SMs);
grid = blocks of the smallest / largest launch at the benchmark sizes; SMs busy = share of the
SMs the smallest launch occupies; TC = tensor-core instructions in the PTX (mma / wgmma);
maxnreg = the register budget passed to ptxas (`-` = its own choice). `_feature_fwd_kernel`
PHASE=1 without gradients (cosine loss of `reduction="none"`) is one program per 64 rows that
reads three floats per row.
"""


def _fmt_grid(row):
    g = row.get("grid_blocks")
    if not g:
        return "-"
    return str(g[0]) if g[0] == g[1] else f"{g[0]}-{g[1]}"


def summary(rows):
    """Per kernel and target: ranges of registers, spills, occupancy, grid."""
    groups = collections.OrderedDict()
    for r in rows:
        # the forward feature kernel's two phases are different programs (grid, work)
        phase = r["constexprs"].get("PHASE")
        name = r["kernel"] if phase is None else f"{r['kernel']} PHASE={phase}"
        groups.setdefault((name, r["target"]), []).append(r)
    lines = ["| kernel | target | configs | warps | regs | max spill (st/ld) | max stack | "
             "smem | blk/SM | smallest grid | SMs busy | TC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, target), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {kernel} | {target} | {len(rs)} | compile failed ||||||||")
            continue

        def rng(key):
            lo, hi = min(r[key] for r in ok), max(r[key] for r in ok)
            return str(lo) if lo == hi else f"{lo}-{hi}"
        warps = "/".join(str(w) for w in sorted({r["num_warps"] for r in ok}))
        smem = rng("shared")
        spill = max(ok, key=lambda r: (r["spill_stores"], r["spill_loads"]))
        grids = [r["grid_blocks"][0] for r in ok if r.get("grid_blocks")]
        busy = [r["sm_fill"] for r in ok if "sm_fill" in r]
        tcs = "/".join(sorted({r["tensor_cores"] for r in ok}))
        lines.append(f"| {kernel} | {target} | {len(rs)} | {warps} | {rng('regs')} | "
                     f"{spill['spill_stores']}/{spill['spill_loads']} | "
                     f"{max(r['stack'] for r in ok)} | {smem} | {rng('blocks_per_sm')} | "
                     f"{min(grids) if grids else '-'} | {min(busy) if busy else '-'} | {tcs} |")
    return lines


def full_table(rows):
    lines = ["| # | kernel | target | constexprs | pointer dtypes | warps | stages | maxnreg | "
             "regs | spill st/ld | stack | smem | blk/SM | grid | SMs busy | TC | selected by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        const = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        labels = "; ".join(r["labels"][:3]) + (f"; +{len(r['labels']) - 3}"
                                               if len(r["labels"]) > 3 else "")
        if "error" in r:
            err = r["error"].strip().splitlines()[-1][:120]
            lines.append(f"| {i} | {r['kernel']} | {r['target']} | {const} | "
                         f"{r['pointer_dtypes']} | FAILED: {err} |||||||||| {labels} |")
            continue
        lines.append(
            f"| {i} | {r['kernel']} | {r['target']} | {const} | {r['pointer_dtypes']} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['maxnreg'] or '-'} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | "
            f"{r['shared'] + r['static_smem']} | {r['blocks_per_sm']} | {_fmt_grid(r)} | "
            f"{r.get('sm_fill', '-')} | {r['tensor_cores']} | {labels} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "resources-triton"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=None, help="result cache directory (keyed by source hash)")
    ap.add_argument("--family", action="append", choices=sorted(aot.FAMILIES))
    ap.add_argument("--only", action="append", default=None,
                    help="keep configurations whose kernel name or a label contains this text")
    ap.add_argument("--preamble", default=None,
                    help="a markdown file whose text is placed under the header")
    args = ap.parse_args(argv)

    import torch
    import triton
    t0 = time.perf_counter()
    configs = aot.enumerate_launches(tuple(args.family or aot.FAMILIES))
    if args.only:
        configs = [c for c in configs
                   if any(o in c.name or any(o in lab for lab in c.labels) for o in args.only)]
    t_enum = time.perf_counter() - t0
    print(f"{len(configs)} configurations ({t_enum:.1f} s); compiling for "
          f"{', '.join(f'sm_{a}' for a in aot.TARGETS)} with {args.workers} workers",
          flush=True)

    def progress(done, total, cfg, arch, res):
        if "error" in res:
            print(f"[{done}/{total}] sm_{arch} {cfg.name} {aot.describe(cfg)}: FAILED\n"
                  f"{res['error']}", flush=True)
        elif done % 25 == 0 or done == total:
            print(f"[{done}/{total}] {time.perf_counter() - t0:.0f} s", flush=True)

    results = aot.compile_all(configs, workers=args.workers, cache_dir=args.cache,
                              progress=progress)
    wall = time.perf_counter() - t0
    rows = aot.rows(configs, results)
    nerr = sum("error" in r for r in rows)
    meta = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "torch": torch.__version__,
            "source_hash": aot.source_hash(),
            "configurations": len(configs), "compiles": len(rows), "failures": nerr,
            "wall_seconds": round(wall, 1), "workers": args.workers,
            "limits": {f"sm_{a}": vars(lim) for a, lim in aot.LIMITS.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = [MD_HEADER.format(when=meta["generated"][:10], triton=meta["triton"],
                           torch=meta["torch"], nconf=len(configs), ncomp=len(rows), nerr=nerr)]
    if args.preamble:
        with open(args.preamble) as f:
            md.append(f.read().rstrip() + "\n")
    md += ["## Summary per kernel", ""] + summary(rows)
    md += ["", "## Every configuration", ""] + full_table(rows)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.json/.md: {len(rows)} compiles, {nerr} failed, {wall:.0f} s")
    return 1 if nerr else 0


if __name__ == "__main__":
    sys.exit(main())
