"""Peak CPU memory of one (contender, config), measured in a fresh process.

Run by :func:`fastkd.bench.core.cpu_peak_subprocess` as ``python -m fastkd.bench.child`` with a
JSON spec on stdin; prints one line ``FASTKD_BENCH_RESULT {...}`` on stdout.

Method (Linux): the child builds the inputs and the contender, runs forward + backward
``warmup`` times (first-call costs such as ``torch.compile``, OpenMP thread start-up and lazy
library loads stay out of the number), frees everything but the inputs, reads its resident set
size (``VmRSS``) as the baseline, resets the kernel's high-water mark (``echo 5 >
/proc/self/clear_refs``), runs one call and reads the high-water mark (``VmHWM``). The parent
sets ``MALLOC_MMAP_THRESHOLD_`` so that every tensor above 128 KiB is its own mapping returned to
the OS when freed; the resident set then follows the live tensors instead of keeping freed ones.
Peak extra = VmHWM - baseline, for the forward alone and for forward + backward (whose gradients
are part of the peak, as on CUDA).

Fallback where ``clear_refs`` cannot be written: no warm-up, and the peak is
``getrusage(RUSAGE_SELF).ru_maxrss`` after the call minus the baseline; when that high-water mark
did not rise above the one before the call (set by the import, or inherited through exec), the
peak is unknown and reported so.
"""
from __future__ import annotations

import gc
import json
import resource
import sys

from fastkd.bench import core

METHOD = ("fresh process; peak VmHWM (reset via /proc/self/clear_refs after inputs + warm-up) "
          "minus VmRSS of the inputs; glibc mmap threshold pinned to 128 KiB")
FALLBACK = ("fresh process; ru_maxrss after one cold call minus VmRSS of the inputs "
            "(clear_refs unavailable: includes first-call overheads)")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    # Only trust the reset if it took effect.
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


def _measure(fn, step, inputs, resettable: bool) -> int | None:
    gc.collect()
    base = _status_kib("VmRSS")
    if resettable:
        if not _reset_hwm():
            raise RuntimeError("clear_refs reset stopped working")
        result = fn(step, inputs)
        peak = _status_kib("VmHWM")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        result = fn(step, inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak <= before:
            del result
            return None
    del result
    gc.collect()
    return max(0, peak - base) * 1024


def measure(spec: dict) -> dict:
    import torch
    torch.set_num_threads(int(spec["threads"]))
    cfg = core.Config.from_dict(spec["config"])
    suite = core.get_suite(spec["suite"])
    device = torch.device("cpu")
    found = [c for c in suite.contenders(device, [c_backend(spec["contender"])])
             if c.name == spec["contender"]]
    if not found:
        return {"status": "error", "error": f"no contender {spec['contender']!r} in the child"}
    c = found[0]
    if c.skip is not None:
        return {"status": "skipped", "error": c.skip}
    inputs = suite.make_inputs(cfg, device, int(spec["seed"]))
    step = c.build(cfg, inputs, device)
    resettable = _reset_hwm()
    if resettable:
        for _ in range(max(1, int(spec["warmup"]))):
            out = core.run_fwd_bwd(step, inputs)
            del out
        out = core.run_fwd(step, inputs)
        del out
    fwd_bwd = _measure(core.run_fwd_bwd, step, inputs, resettable)
    # Without a reset the forward must come second: it cannot raise the high-water mark that
    # forward + backward set, so it is measured only where the reset works.
    fwd = _measure(core.run_fwd, step, inputs, resettable) if resettable else None
    return {"status": "ok", "fwd_bwd": fwd_bwd, "fwd": fwd,
            "method": METHOD if resettable else FALLBACK}


def c_backend(name: str) -> str:
    """The fastkd backend named in a contender name like ``fastkd[cpu]`` (else 'reference')."""
    if name.startswith("fastkd[") and name.endswith("]"):
        return name[len("fastkd["):-1]
    return "reference"


def main() -> int:
    spec = json.loads(sys.stdin.read())
    try:
        out = measure(spec)
    except Exception as exc:
        out = {"status": "OOM" if core.is_oom(exc) else "error", "error": core.describe_error(exc)}
    print(core.RESULT_TAG + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
