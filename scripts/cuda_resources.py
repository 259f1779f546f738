#!/usr/bin/env python3
"""Per-kernel resource table of fastkd's CUDA kernels (csrc/cuda/*.cu) for sm_80 and sm_90.

Each .cu file is compiled to a cubin with the nvcc flags that setup.py uses for the extension,
once per architecture, with ``-Xptxas -v``; ptxas's report gives, per kernel (entry function):
registers, spill store / load bytes, stack frame bytes, static shared memory bytes and barriers.
No GPU is needed. Writes

  <out-dir>/resources-cuda.json   {"nvcc": "13.0.88", "flags": [...],
                                   "sm_80": {"<kernel>": {"regs", "spill_stores", "spill_loads",
                                                          "stack", "static_smem", "barriers"}},
                                   "sm_90": {...}}
  <out-dir>/resources-cuda.md     the same as a table

Kernels are named by their demangled short name with template arguments, e.g.
``logit_kd_kernel<false, 512, 2>`` or ``rows_kernel<__half, float>``. The mock CUDA runtime reads
registers and static shared memory from the JSON to compute occupancy, so keep the schema.

  python scripts/cuda_resources.py [--out-dir benchmarks/results] [--jobs N]

nvcc is $CUDA_HOME/bin/nvcc, else nvcc on PATH, else /usr/local/cuda/bin/nvcc. The demangler is
cu++filt (next to nvcc or on PATH), else binutils' c++filt (both print the same Itanium names).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90")
# setup.py's nvcc flags and include directories (keep in step with it).
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
INCLUDES = ["csrc/include", "csrc"]
FIELDS = ("regs", "spill_stores", "spill_loads", "stack", "static_smem", "barriers")


class ToolError(RuntimeError):
    pass


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = [os.path.join(home, "bin", "nvcc")] if home else []
    which = shutil.which("nvcc")
    if which:
        cands.append(which)
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_demangler(nvcc: str) -> str | None:
    for c in (os.path.join(os.path.dirname(nvcc), "cu++filt"), shutil.which("cu++filt"),
              shutil.which("c++filt")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\bV(\d+\.\d+\.\d+)", out)
    if not m:
        raise ToolError(f"cannot read the nvcc version from:\n{out}")
    return m.group(1)


def sources() -> list[str]:
    """csrc/cuda/*.cu relative to the repository root, largest first (they take longest)."""
    files = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    files.sort(key=lambda f: (-os.path.getsize(f), f))
    return [os.path.relpath(f, ROOT) for f in files]


def compile_command(nvcc: str, src: str, arch: str, out: str) -> list[str]:
    inc = [f"-I{d}" for d in INCLUDES]
    return [nvcc, *NVCC_FLAGS, *inc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", src, "-o", out]


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BAR = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """{mangled entry name: resources} from ptxas -v output (one arch). Only entry functions
    (kernels) are kept; ptxas also reports the properties of non-inlined device functions."""
    out: dict[str, dict[str, int]] = {}
    entry = None      # the kernel whose "Compiling entry" line came last
    props_of = None   # the function whose "Function properties" block we are in
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry = m.group(1)
            out[entry] = {}
            props_of = None
            continue
        m = _PROPS.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _STACK.search(line)
        if m and entry is not None and props_of == entry:
            rec = out[entry]
            rec["stack"], rec["spill_stores"], rec["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and entry is not None:
            rec = out[entry]
            rec["regs"] = int(m.group(1))
            b = _BAR.search(line)
            rec["barriers"] = int(b.group(1)) if b else 0
            s = _SMEM.search(line)
            rec["static_smem"] = int(s.group(1)) if s else 0
            entry = None  # "Used" closes the entry's report
    for name, rec in out.items():
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise ToolError(f"ptxas report for {name} lacks {missing}:\n{text}")
    return out


def _split_top(s: str, sep: str) -> list[str]:
    """s split at `sep` outside <>, () and []."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        ch = s[i]
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<false, 512, 2>(P, C)' -> 'k<false, 512, 2>'."""
    s = demangled.strip().replace("(anonymous namespace)", "anon")
    # Drop the parameter list: the last top-level (...) group.
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ")":
                depth += 1
            elif s[i] == "(":
                depth -= 1
                if depth == 0:
                    s = s[:i]
                    break
    # Kernels return void; then drop the namespaces.
    if s.startswith("void "):
        s = s[len("void "):]
    return _split_top(s, "::")[-1]


def demangle(names: list[str], tool: str) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True).stdout.splitlines()
    if len(out) != len(names):
        raise ToolError(f"{tool} returned {len(out)} names for {len(names)}")
    return dict(zip(names, out))


def _compile_one(nvcc: str, src: str, arch: str, tmp: str) -> tuple[str, str, str, float]:
    cubin = os.path.join(tmp, f"{os.path.basename(src)}.{arch}.cubin")
    t0 = time.monotonic()
    proc = subprocess.run(compile_command(nvcc, src, arch, cubin), cwd=ROOT, capture_output=True,
                          text=True)
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        raise ToolError(f"nvcc failed on {src} for {arch} (exit {proc.returncode}):\n"
                        f"{proc.stdout}{proc.stderr}")
    return src, arch, proc.stdout + proc.stderr, secs


def collect(jobs: int | None = None, log=None) -> tuple[dict, dict]:
    """(table, extra): table is what resources-cuda.json holds; extra has the source file of each
    kernel and the compile seconds of each (file, arch), which vary from run to run."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise ToolError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    filt = find_demangler(nvcc)
    if filt is None:
        raise ToolError("no demangler found (cu++filt or c++filt)")
    srcs = sources()
    if not srcs:
        raise ToolError("no csrc/cuda/*.cu files")
    jobs = jobs or os.cpu_count() or 1
    raw: dict[str, dict[str, dict[str, int]]] = {a: {} for a in ARCHS}
    file_of: dict[str, str] = {}
    secs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fastkd-res-") as tmp, \
            cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = [pool.submit(_compile_one, nvcc, s, a, tmp) for s in srcs for a in ARCHS]
        for fut in cf.as_completed(futs):
            src, arch, text, t = fut.result()
            secs[f"{src} {arch}"] = round(t, 1)
            if log:
                log(f"{src} {arch}: {t:.1f} s")
            for mangled, rec in parse_ptxas(text).items():
                raw[arch][mangled] = rec
                file_of[mangled] = src
    names = demangle(sorted({m for a in ARCHS for m in raw[a]}), filt)
    table: dict = {"nvcc": nvcc_version(nvcc), "flags": NVCC_FLAGS + [f"-I{d}" for d in INCLUDES]}
    files: dict[str, str] = {}
    for arch in ARCHS:
        per: dict[str, dict[str, int]] = {}
        for mangled, rec in raw[arch].items():
            short = short_name(names[mangled])
            if short in per:
                raise ToolError(f"two kernels share the short name {short} on {arch}")
            per[short] = {f: rec[f] for f in FIELDS}
            files[short] = file_of[mangled]
        table[arch] = dict(sorted(per.items()))
    return table, {"files": files, "seconds": secs}


def to_markdown(table: dict, extra: dict) -> str:
    lines = [
        "# CUDA kernel resources (ptxas)",
        "",
        f"nvcc {table['nvcc']}, flags `{' '.join(table['flags'])}`, `-Xptxas -v`, one cubin per "
        "architecture. Generated by `python scripts/cuda_resources.py`; "
        "tests/test_cuda_resources.py fails when this table is stale.",
        "",
        "Columns: registers per thread; spill store / load bytes; stack frame bytes (local "
        "memory per thread, including arrays indexed at run time); static shared memory bytes "
        "per block (dynamic shared memory comes on top at launch); named barriers.",
        "",
        "| arch | file | kernel | regs | spill st | spill ld | stack | static smem | barriers |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in ARCHS:
        for name, rec in table[arch].items():
            f = os.path.basename(extra["files"].get(name, "?"))
            lines.append(f"| {arch} | {f} | `{name}` | {rec['regs']} | {rec['spill_stores']} | "
                         f"{rec['spill_loads']} | {rec['stack']} | {rec['static_smem']} | "
                         f"{rec['barriers']} |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, table: dict, extra: dict) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, "resources-cuda.json")
    mpath = os.path.join(out_dir, "resources-cuda.md")
    with open(jpath, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    with open(mpath, "w") as f:
        f.write(to_markdown(table, extra))
    return jpath, mpath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc runs (default: CPUs)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        table, extra = collect(args.jobs, log=lambda s: print(s, file=sys.stderr))
    except ToolError as e:
        print(f"cuda_resources.py: {e}", file=sys.stderr)
        return 2
    jpath, mpath = write(args.out_dir, table, extra)
    print(f"wrote {jpath} and {mpath} in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
