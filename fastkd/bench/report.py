"""Console tables, and the ``.json`` / ``.md`` / ``.png`` files a run writes into ``--out``."""
from __future__ import annotations

import json
import os

RATIO_COLUMNS = (("vs stock", "speedup_vs_stock_fwd_bwd"),
                 ("vs compile", "speedup_vs_compile_fwd_bwd"),
                 ("vs liger", "speedup_vs_liger_fwd_bwd"),
                 ("x floor", "x_floor_fwd_bwd"))


def fmt_ms(x) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_mib(b) -> str:
    if b is None:
        return "-"
    mib = b / 2 ** 20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}"


def fmt_ratio(r) -> str:
    return "-" if r is None else (f"{r:.0f}x" if r >= 100 else f"{r:.2f}x")


def mem_cell(r) -> str:
    if r.get("mem_status") in (None, "ok"):
        return fmt_mib(r.get("peak_extra_bytes"))
    return r["mem_status"]


def status_text(r) -> str:
    note = r.get("note") or ""
    return f"{r['status']}: {note}" if note else r["status"]


# --------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------
def config_table(cfg, floor, results) -> str:
    head = f"[{cfg.suite}] {cfg.label}"
    if floor:
        head += (f"   floor: fwd {fmt_ms(floor['fwd_ms'])} ms, fwd+bwd "
                 f"{fmt_ms(floor['fwd_bwd_ms'])} ms ({floor['fwd_bwd_bound']}-bound)")
    cols = ["contender", "fwd ms", "fwd+bwd ms", "peak MiB"] + [c for c, _ in RATIO_COLUMNS]
    rows = []
    for r in results:
        if r["status"] not in ("ok",) and r["fwd_bwd_ms"] is None:
            rows.append([r["contender"], status_text(r)])
            continue
        ratios = r.get("ratios") or {}
        rows.append([r["contender"], fmt_ms(r["fwd_ms"]), fmt_ms(r["fwd_bwd_ms"]), mem_cell(r)]
                    + [fmt_ratio(ratios.get(k)) for _, k in RATIO_COLUMNS])
    widths = [max(len(cols[0]), *(len(row[0]) for row in rows))]
    full = [row for row in rows if len(row) == len(cols)]  # not the one-message rows
    for i in range(1, len(cols)):
        widths.append(max([len(cols[i])] + [len(row[i]) for row in full]))
    lines = [head, "  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(cols, widths)))]
    for row in rows:
        if len(row) == 2:  # skipped / failed: one message across the columns
            lines.append("  " + row[0].ljust(widths[0]) + "  " + row[1][:140])
        else:
            lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a run cut short leaves the previous complete file, never half of one


def markdown(doc: dict, png_name: str | None) -> str:
    dev, sw = doc["device"], doc["software"]
    git = sw.get("fastkd_git") or {}
    rates = doc.get("rates") or {}
    lines = [f"# fastkd benchmark: {dev.get('name')} ({doc['date']})", ""]
    lines.append(f"- device: {dev.get('name')}"
                 + (f", CUDA {dev.get('cuda_runtime')}, driver {dev.get('driver')}"
                    if dev.get("type") == "cuda" else
                    f", {dev.get('logical_cpus')} logical CPUs, torch threads "
                    f"{dev.get('torch_threads')}"))
    lines.append(f"- torch {sw.get('torch')}, triton {sw.get('triton')}, liger-kernel "
                 f"{sw.get('liger_kernel') or 'not installed'}, fastkd {sw.get('fastkd')} "
                 f"(commit {git.get('commit') or 'unknown'}"
                 f"{', uncommitted changes' if git.get('dirty') else ''})")
    if rates.get("copy_GBps"):
        mm = ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in (rates.get("mm_TFLOPs") or {}).items())
        lines.append(f"- measured: copy {rates['copy_GBps']:.1f} GB/s"
                     + (f"; torch.mm {mm}" if mm else ""))
    s = doc["settings"]
    lines.append(f"- sizes {s['sizes']}, timing: {s['timer']}; median of up to {s['repeats']} "
                 f"calls after {s['warmup']} warm-up; memory: {s['memory']}")
    lines.append("- times in ms; `vs X` = X's forward+backward time / this one's (> 1: faster "
                 "than X); `x floor` = this forward+backward time / the floor's; peak = extra "
                 "memory above the inputs during forward+backward (gradients included)")
    lines.append(f"- command: `{doc.get('command', '')}`; wall time {doc.get('wall_s', 0):.0f} s")
    load = doc.get("load_average") or {}
    if load.get("start"):
        lines.append(f"- load average (1, 5, 15 min) at start {load['start']}, at end "
                     f"{load.get('end')}: CPU timings are only comparable within one run")
    if png_name:
        lines += ["", f"![time and memory vs size]({png_name})"]
    for name, suite in doc["suites"].items():
        lines += ["", f"## {name}", ""]
        if suite.get("status") == "skipped":
            lines.append(f"Skipped: {suite.get('reason')}")
            continue
        notes = suite.get("notes") or []
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
        lines.append("| config | contender | fwd ms | fwd+bwd ms | peak MiB | vs stock | "
                     "vs compile | vs liger | x floor | mem / stock | note |")
        lines.append("|" + "---|" * 11)
        for entry in suite.get("configs", []):
            label = entry["config"]["label"]
            floor = entry.get("floor") or {}
            lines.append(f"| {label} | *floor* | {fmt_ms(floor.get('fwd_ms'))} | "
                         f"{fmt_ms(floor.get('fwd_bwd_ms'))} | | | | | | | "
                         f"{floor.get('fwd_bwd_bound', '')}-bound |")
            for r in entry["results"]:
                ratios = r.get("ratios") or {}
                note = "" if r["status"] == "ok" else status_text(r)
                if r["status"] == "ok" and r.get("note"):
                    note = r["note"]
                if r.get("mem_status") not in (None, "ok") and r.get("mem_note"):
                    note = (note + "; " if note else "") + "memory: " + r["mem_note"]
                lines.append(
                    f"| {label} | {r['contender']} | {fmt_ms(r['fwd_ms'])} | "
                    f"{fmt_ms(r['fwd_bwd_ms'])} | {mem_cell(r)} | "
                    + " | ".join(fmt_ratio(ratios.get(k)) for _, k in RATIO_COLUMNS)
                    + f" | {fmt_ratio(ratios.get('mem_vs_stock'))} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, doc: dict, png_name: str | None) -> None:
    with open(path, "w") as f:
        f.write(markdown(doc, png_name))


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
CONTENDER_COLORS = {"stock": "tab:red", "stock+compile": "tab:orange", "liger": "tab:purple",
                    "fastkd[cuda]": "tab:green", "fastkd[triton]": "tab:blue",
                    "fastkd[cpu]": "tab:green", "fastkd[reference]": "tab:gray"}
STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def write_png(path: str, doc: dict) -> bool:
    """Time (forward+backward) and peak memory vs size, one column of panels per suite.
    Returns False when there is nothing to plot."""
    suites = [(n, s) for n, s in doc["suites"].items() if s.get("configs")]
    if not suites:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_series = max(len({(r["contender"], e["config"]["series"]) for e in s["configs"]
                        for r in e["results"] if r["status"] != "skipped"})
                   + len({e["config"]["series"] for e in s["configs"]}) for _, s in suites)
    legend_h = 0.16 * ((n_series + 1) // 2)  # inches of legend under each panel
    fig, axes = plt.subplots(2, len(suites), figsize=(6.5 * len(suites), 8.0 + 2 * legend_h),
                             squeeze=False, gridspec_kw={"hspace": 0.25 + legend_h / 3.5})
    for col, (name, suite) in enumerate(suites):
        ax_t, ax_m = axes[0][col], axes[1][col]
        series = []
        for entry in suite["configs"]:
            if entry["config"]["series"] not in series:
                series.append(entry["config"]["series"])
        size_label = suite["configs"][0]["config"]["size_label"]
        lines = {}  # (contender, series) -> [(size, ms, bytes, status)]
        floors = {}
        for entry in suite["configs"]:
            cfg = entry["config"]
            floors.setdefault(cfg["series"], []).append(
                (cfg["size"], (entry.get("floor") or {}).get("fwd_bwd_ms")))
            for r in entry["results"]:
                if r["status"] == "skipped":
                    continue
                lines.setdefault((r["contender"], cfg["series"]), []).append(
                    (cfg["size"], r["fwd_bwd_ms"], r.get("peak_extra_bytes"), r["status"]))
        for (contender, ser), pts in lines.items():
            pts.sort()
            si = series.index(ser)
            color = CONTENDER_COLORS.get(contender, None)
            style = dict(color=color, linestyle=STYLES[si % len(STYLES)],
                         marker=MARKERS[si % len(MARKERS)], markersize=4, linewidth=1.3)
            n_oom = sum(1 for p in pts if p[3] == "OOM")
            label = f"{contender} | {ser}" + (f" (OOM at {n_oom})" if n_oom else "")
            t = [(p[0], p[1]) for p in pts if p[1] is not None]
            m = [(p[0], p[2] / 2 ** 20) for p in pts if p[2] is not None and p[2] > 0]
            if t:
                ax_t.plot(*zip(*t), label=label, **style)
            if m:
                ax_m.plot(*zip(*m), label=label, **style)
        for ser, pts in floors.items():
            pts = sorted(p for p in pts if p[1] is not None)
            if pts:
                si = series.index(ser)
                ax_t.plot(*zip(*pts), color="black", linestyle=STYLES[si % len(STYLES)],
                          linewidth=0.9, label=f"floor | {ser}")
        for ax, ylabel in ((ax_t, "forward+backward, ms (median)"),
                           (ax_m, "peak extra memory, MiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(size_label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                          frameon=False)
        ax_t.set_title(f"{name}: time")
        ax_m.set_title(f"{name}: memory")
    dev = doc["device"].get("name")
    fig.suptitle(f"fastkd benchmarks on {dev} ({doc['date']}, torch {doc['software']['torch']})",
                 fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
