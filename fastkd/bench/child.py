"""Peak CPU memory of one (contender, config), measured in a fresh process.

Two ways to run (both print ``FASTKD_BENCH_RESULT {...}`` lines on stdout):

- ``python -m fastkd.bench.child --server`` (what :class:`fastkd.bench.core.MemoryServer` starts
  once per run): a clean process that imports torch, fastkd and the suites, never runs a tensor
  operation itself, and for each JSON spec line on stdin forks a fresh child that does the
  measurement and exits. This saves the interpreter + torch start-up (seconds) per measurement; the
  child's address space is a copy of the clean server, with none of the benchmark process's
  tensors, caches or compiled graphs.
- ``python -m fastkd.bench.child`` with one JSON spec on stdin: the same measurement in this
  process (used where ``os.fork`` is not available).

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
import os
import resource
import signal
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
    # One collection now (not between the measured calls: tensors are freed by reference
    # counting, and a collection walks every object torch has loaded).
    gc.collect()
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


def _safe_measure(spec: dict) -> dict:
    try:
        return measure(spec)
    except Exception as exc:
        return {"status": "OOM" if core.is_oom(exc) else "error",
                "error": core.describe_error(exc)}


def _forked(spec: dict) -> dict:
    """Measure ``spec`` in a forked child; a child killed by the kernel is reported as OOM."""
    timeout = int(spec.get("timeout", 900))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, send the result, exit without cleanup handlers
        try:
            os.close(rfd)
            os.dup2(2, 1)  # stray prints must not corrupt the result protocol on stdout
            signal.alarm(timeout)
            data = json.dumps(_safe_measure(spec)).encode()
            while data:
                data = data[os.write(wfd, data):]
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    with os.fdopen(rfd, "rb") as r:
        for chunk in iter(lambda: r.read(65536), b""):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            return {"status": "OOM", "error": "measuring process was killed (SIGKILL: out of "
                                               "memory?)"}
        if sig == signal.SIGALRM:
            return {"status": "error", "error": f"measuring process timed out after {timeout} s"}
        return {"status": "error", "error": f"measuring process died of signal {sig}"}
    code = os.waitstatus_to_exitcode(status)
    return {"status": "error", "error": f"measuring process exited with {code}"}


def serve() -> int:
    """The fork server: import once, then one forked measurement per spec line on stdin."""
    import fastkd
    import torch  # noqa: F401  (imported once here, shared by every forked child)
    for name in core.SUITE_MODULES:
        core.get_suite(name)
    fastkd.available_backends()  # its probes (e.g. importing triton) are cached for the children
    gc.collect()
    gc.freeze()  # the children's collections then skip everything imported here
    print(core.RESULT_TAG + json.dumps({"status": "ready"}), flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            out = _forked(json.loads(line))
        except Exception as exc:  # the server must answer every line
            out = {"status": "error", "error": core.describe_error(exc)}
        print(core.RESULT_TAG + json.dumps(out), flush=True)


def main() -> int:
    if "--server" in sys.argv[1:]:
        return serve()
    out = _safe_measure(json.loads(sys.stdin.read()))
    print(core.RESULT_TAG + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
