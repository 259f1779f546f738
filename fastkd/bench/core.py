"""The measuring core of ``python -m fastkd.bench``: contenders, timing, memory, floors, OOM.

Every suite (``suite_logit``, ``suite_feature``, ...) describes *what* to run: its configs, how to
make inputs and one :class:`Contender` per implementation. This module decides *how* it is
measured, the same way for all of them (docs/BENCHMARKING.md, "How time is measured" and "How
memory is measured"):

- time: warm-up, then the median of ``repeats`` calls of the forward alone and of forward +
  backward; inputs are random (never constant) and rotate among several sets when they are small
  enough to sit in cache. CUDA: CUDA events around each call, with the L2 cache flushed before
  each call (as ``triton.testing.do_bench`` does). CPU: ``time.perf_counter``.
- memory: peak memory above what the inputs already hold during one forward + backward (the
  gradients it returns included). CUDA: ``reset_peak_memory_stats`` / ``max_memory_allocated``
  in this process. CPU: a fresh process per (contender, config), see :mod:`fastkd.bench.child`.
- floor: bytes that must move / measured copy bandwidth and FLOPs / measured ``torch.mm`` rate,
  both measured on the same device in the same run; the floor is the larger of the two.
- out of memory (``torch.cuda.OutOfMemoryError``, ``MemoryError``, a ``RuntimeError`` saying
  "out of memory" / "can't allocate memory") is recorded as ``"OOM"`` and the run goes on;
  any other failure of one contender is recorded as ``"error"`` with its message.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

SUITE_MODULES = {
    "logit": "fastkd.bench.suite_logit",
    "fused-linear": "fastkd.bench.suite_fused_linear",
    "feature": "fastkd.bench.suite_feature",
    "relation": "fastkd.bench.suite_relation",
    "topk": "fastkd.bench.suite_topk",
}
KINDS = ("fastkd", "stock", "compile", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16"}
RESULT_TAG = "FASTKD_BENCH_RESULT "
# Input sets smaller than this (all tensors of one set) are rotated, so that a call does not find
# the previous call's inputs in cache (the H100 L2 is 50 MB; server CPU L3 slices are similar).
ROTATE_BELOW_BYTES = 64 << 20
N_ROTATE = 3


def get_suite(name: str):
    """The ``Suite`` object of suite ``name`` (imported lazily)."""
    if name not in SUITE_MODULES:
        raise ValueError(f"suite must be one of {sorted(SUITE_MODULES)}, got {name!r}")
    return importlib.import_module(SUITE_MODULES[name]).SUITE


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or fp32/bf16/fp16), got {name!r}")
    return name


# --------------------------------------------------------------------------------------------
# What a suite hands to the core
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    """One problem instance. ``shape`` holds the sizes (N, V, ...), ``params`` the other knobs."""

    suite: str
    label: str                 # short human label, e.g. "N=512 V=32000 float32 kl"
    dtype: str                 # a key of DTYPES
    shape: dict
    params: dict = dataclasses.field(default_factory=dict)
    size: float = 0.0          # x coordinate of the plots
    size_label: str = ""       # what ``size`` counts, e.g. "N*V elements"
    series: str = ""           # configs with the same series form one line in the plots

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**d)


@dataclasses.dataclass
class Step:
    """``loss(inputs)`` computes the loss; ``wrt(inputs)`` lists what backward differentiates."""

    loss: Callable[[dict], torch.Tensor]
    wrt: Callable[[dict], list]
    note: str = ""


class NotApplicable(Exception):
    """A contender that cannot serve this config (recorded as ``"n/a"`` with the message)."""


@dataclasses.dataclass
class Contender:
    """One implementation. ``build(cfg, inputs, device) -> Step``; ``skip`` says why it cannot run
    in this process at all (not installed, needs CUDA, backend not built)."""

    name: str
    kind: str                  # one of KINDS
    build: Callable | None = None
    backend: str | None = None
    skip: str | None = None
    note: str = ""


def compiled(stock: Contender) -> Contender:
    """The stock contender under ``torch.compile`` (static shapes, fresh Dynamo state per config).

    ``torch._dynamo.reset()`` per build: every config is a new shape, and Dynamo's per-code
    recompile limit would otherwise make later configs fall back to eager silently.
    """
    if stock.skip is not None:
        return Contender("stock+compile", "compile", skip=stock.skip)

    def build(cfg, inputs, device):
        import torch._dynamo
        torch._dynamo.reset()
        step = stock.build(cfg, inputs, device)
        return Step(torch.compile(step.loss, dynamic=False), step.wrt, step.note)

    return Contender("stock+compile", "compile", build=build, note=stock.note)


class Suite:
    """Base class of the suites. Subclasses set ``name``, ``needs`` (the fastkd attributes the
    suite benchmarks) and implement the methods below."""

    name = ""
    needs: tuple = ()

    def unavailable(self) -> str | None:
        """None when fastkd provides what this suite benchmarks, else the line to print."""
        import fastkd
        missing = [n for n in self.needs if not hasattr(fastkd, n)]
        if missing:
            return ", ".join(f"fastkd.{n}" for n in missing) + " not available yet"
        return None

    def make_config(self, dtype: str, shape: dict, params: dict | None = None) -> Config:
        """One config of this suite (``params`` override the suite's defaults)."""
        raise NotImplementedError

    def configs(self, device: str, sizes: str, dtypes: list | None, opts: dict) -> list:
        """The configs of ``--sizes`` on ``device`` ("cpu"/"cuda"); ``dtypes`` overrides the
        suite's default dtypes; ``opts``: {"divergence": list or None}."""
        raise NotImplementedError

    def make_inputs(self, cfg: Config, device: torch.device, seed: int) -> dict:
        raise NotImplementedError

    def contenders(self, device: torch.device, backends: list) -> list:
        raise NotImplementedError

    def floor_work(self, cfg: Config) -> dict:
        """``{"fwd": (bytes, flops), "fwd_bwd": (bytes, flops), "basis": str}``: the least data
        that must move and the least GEMM work that must be done."""
        raise NotImplementedError


def fastkd_contenders(device: torch.device, backends: list, build_for_backend) -> list:
    """One contender per fastkd backend in ``backends``; unavailable ones carry the reason."""
    import fastkd
    avail = fastkd.available_backends()
    out = []
    for b in backends:
        info = avail.get(b, {"available": False, "reason": f"unknown backend {b!r}"})
        skip = None if info["available"] else info["reason"]
        if skip is None and b == "cpu" and device.type != "cpu":
            skip = "the 'cpu' backend runs on CPU tensors"
        if skip is None and b == "cuda" and device.type != "cuda":
            skip = "needs CUDA"
        out.append(Contender(f"fastkd[{b}]", "fastkd", backend=b, skip=skip,
                             build=None if skip else build_for_backend(b)))
    return out


def default_backends(device: torch.device) -> list:
    """The fastkd backends that belong to ``device`` (Triton only on CUDA: on CPU it is the slow
    interpreter, run only when asked for with ``--backends triton``)."""
    return ["cuda", "triton", "reference"] if device.type == "cuda" else ["cpu", "reference"]


def liger_skip(device: torch.device) -> str | None:
    """Why Liger-Kernel cannot run here, or None."""
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return "not installed"
    if device.type != "cuda":
        return "needs CUDA"
    return None


def no_liger(what: str) -> Contender:
    return Contender("liger", "liger", skip=f"Liger-Kernel has no {what}")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return ("out of memory" in msg or "can't allocate memory" in msg
                or "cannot allocate memory" in msg)
    return False


def unsupported(exc: BaseException) -> bool:
    """fastkd's refusal of a forced backend that this loss or these inputs do not support."""
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("is not implemented for this loss" in msg
                                              or "is unavailable:" in msg)


def describe_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:300] if first else ''}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def set_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def make_sets(suite: Suite, cfg: Config, device: torch.device, seed: int) -> list:
    """One input set, or ``N_ROTATE`` different ones when a set is small enough to stay cached."""
    first = suite.make_inputs(cfg, device, seed)
    sets = [first]
    if set_bytes(first) < ROTATE_BELOW_BYTES:
        sets += [suite.make_inputs(cfg, device, seed + 1000 * k) for k in range(1, N_ROTATE)]
    return sets


def randn(shape, dtype, device, generator, scale=1.0) -> torch.Tensor:
    """Random normal tensor created directly in ``dtype`` (no float32 copy of a huge tensor)."""
    x = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    if scale != 1.0:
        x.mul_(scale)
    return x


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TimingOptions:
    repeats: int
    warmup: int
    max_seconds: float   # stop sampling one measurement after this long (once min_repeats done)
    min_repeats: int = 3


def default_timing(device: torch.device, repeats: int | None, warmup: int | None) -> TimingOptions:
    if device.type == "cuda":
        return TimingOptions(repeats or 50, 3 if warmup is None else warmup, max_seconds=10.0,
                             min_repeats=min(5, repeats or 5))
    return TimingOptions(repeats or 5, 1 if warmup is None else warmup, max_seconds=4.0,
                         min_repeats=min(3, repeats or 3))


def run_fwd(step: Step, inputs: dict):
    return step.loss(inputs)


def run_fwd_bwd(step: Step, inputs: dict):
    loss = step.loss(inputs)
    # autograd.grad rather than .backward(): no .grad accumulation (an extra add) between calls
    grads = torch.autograd.grad(loss, step.wrt(inputs))
    return loss, grads


class _L2Flush:
    """Writes a buffer larger than the L2 cache before each timed CUDA call."""

    def __init__(self, device):
        self.buf = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def __call__(self):
        self.buf.zero_()


def time_calls(fn: Callable[[int], object], device: torch.device, opts: TimingOptions,
               flush=None) -> list:
    """Milliseconds of each call ``fn(i)`` (i = call number, used to rotate input sets)."""
    times = []
    if device.type == "cuda":
        start_all = time.perf_counter()
        i = 0
        while i < opts.repeats:
            # Events in batches so that the time cap can stop a slow config early.
            batch = min(10, opts.repeats - i)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(batch)]
            for j in range(batch):
                if flush is not None:
                    flush()
                ev[j][0].record()
                fn(i + j)
                ev[j][1].record()
            torch.cuda.synchronize(device)
            times += [a.elapsed_time(b) for a, b in ev]
            i += batch
            if i >= opts.min_repeats and time.perf_counter() - start_all > opts.max_seconds:
                break
        return times
    spent = 0.0
    for i in range(opts.repeats):
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
        if i + 1 >= opts.min_repeats and spent > opts.max_seconds:
            break
    return times


def summarize(times: list) -> dict:
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[-1], "n": len(times)}


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def cuda_peak(step: Step, inputs: dict, device: torch.device) -> dict:
    """Peak bytes above what is allocated before the call, for forward and forward + backward."""
    out = {}
    for key, fn in (("fwd", run_fwd), ("fwd_bwd", run_fwd_bwd)):
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn(step, inputs)
        torch.cuda.synchronize(device)
        out[key] = int(torch.cuda.max_memory_allocated(device) - base)
        del result
    free_memory(device)
    out["method"] = "cuda max_memory_allocated - memory_allocated before the call"
    return out


def _child_env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Every tensor above 128 KiB gets its own mapping, unmapped when freed (glibc would otherwise
    # raise the threshold dynamically and keep freed tensors resident, hiding later peaks).
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env["MALLOC_TRIM_THRESHOLD_"] = str(128 * 1024)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


class MemoryServer:
    """CPU peak memory, one fresh process per (contender, config).

    Starts ``python -m fastkd.bench.child --server`` once; it imports torch and fastkd and forks
    a fresh child per measurement (see :mod:`fastkd.bench.child`). Without ``os.fork`` each
    measurement runs in its own ``python -m fastkd.bench.child`` instead.
    """

    def __init__(self, timeout: float = 900.0):
        self.timeout = timeout
        self.proc = None
        self.err = None

    def _start(self) -> None:
        self.close()
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastkd.bench.child", "--server"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=_child_env())
        ready = self._read()
        if ready.get("status") != "ready":
            raise RuntimeError(ready.get("error", "memory server did not start"))

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                return {"status": "error", "error": f"memory server exited with "
                                                    f"{self.proc.returncode}: {self._tail()}"}
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])

    def _tail(self) -> str:
        if self.err is None:
            return ""
        self.err.seek(0)
        lines = [ln for ln in self.err.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def measure(self, spec: dict) -> dict:
        spec = dict(spec, timeout=int(self.timeout))
        if not hasattr(os, "fork"):
            return self._one_process(spec)
        try:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
        except (OSError, RuntimeError) as exc:
            return {"status": "error", "error": f"memory server: {describe_error(exc)}"}
        return self._read()

    def _one_process(self, spec: dict) -> dict:
        try:
            proc = subprocess.run([sys.executable, "-m", "fastkd.bench.child"],
                                  input=json.dumps(spec), capture_output=True, text=True,
                                  env=_child_env(), timeout=self.timeout + 60)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"memory child timed out after {self.timeout} s"}
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
        if proc.returncode in (-9, 137):  # SIGKILL: almost always the kernel's OOM killer
            return {"status": "OOM", "error": "memory child was killed (SIGKILL: out of memory?)"}
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "error": f"memory child exited with {proc.returncode}: {tail}"}

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.err is not None:
            self.err.close()
            self.err = None


_SERVER = MemoryServer()


def cpu_peak(suite_name: str, contender: str, cfg: Config, seed: int, warmup: int) -> dict:
    """Peak extra CPU memory of one (contender, config), measured in a fresh process."""
    return _SERVER.measure({"suite": suite_name, "contender": contender,
                            "config": cfg.to_dict(), "seed": seed, "warmup": warmup,
                            "threads": torch.get_num_threads()})


def close_memory_server() -> None:
    _SERVER.close()


# --------------------------------------------------------------------------------------------
# Floors: copy bandwidth and GEMM rate, measured in this run
# --------------------------------------------------------------------------------------------
class Rates:
    """Measured once per run (lazily): device copy bandwidth and ``torch.mm`` rate per dtype."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_gbps = None
        self.copy_basis = ""
        self.mm_tflops = {}
        self.mm_basis = {}

    def _median_ms(self, fn, n):
        opts = TimingOptions(repeats=n, warmup=0, max_seconds=5.0, min_repeats=3)
        fn(0)
        fn(0)
        return statistics.median(time_calls(fn, self.device, opts))

    def copy(self) -> float:
        if self.copy_gbps is None:
            nbytes = (1 << 30) if self.device.type == "cuda" else (256 << 20)
            src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).uniform_()
            dst = torch.empty_like(src)
            ms = self._median_ms(lambda i: dst.copy_(src), 20 if self.device.type == "cuda" else 7)
            self.copy_gbps = 2 * nbytes / (ms * 1e-3) / 1e9  # read + write
            self.copy_basis = f"copy_ of {nbytes >> 20} MiB (read + write) in {ms:.3f} ms"
            del src, dst
            free_memory(self.device)
        return self.copy_gbps

    def mm(self, dtype: str) -> float:
        if dtype not in self.mm_tflops:
            cuda = self.device.type == "cuda"
            n = 8192 if cuda else (2048 if dtype == "float32" else 1024)
            g = generator(self.device, 0)
            a = randn((n, n), DTYPES[dtype], self.device, g)
            b = randn((n, n), DTYPES[dtype], self.device, g)
            label = dtype
            old = torch.backends.cuda.matmul.allow_tf32 if cuda else None
            if cuda and dtype == "float32":
                # the floor of a float32 GEMM on a tensor-core GPU is its TF32 rate
                torch.backends.cuda.matmul.allow_tf32 = True
                label = "tf32"
            try:
                ms = self._median_ms(lambda i: torch.mm(a, b), 20 if cuda else 5)
            finally:
                if cuda:
                    torch.backends.cuda.matmul.allow_tf32 = old
            self.mm_tflops[dtype] = 2 * n ** 3 / (ms * 1e-3) / 1e12
            self.mm_basis[dtype] = f"torch.mm {n}x{n}x{n} {label} in {ms:.3f} ms"
            del a, b
            free_memory(self.device)
        return self.mm_tflops[dtype]

    def floor(self, work: dict, dtype: str) -> dict:
        """Floor milliseconds: max(bytes / copy bandwidth, FLOPs / mm rate) for fwd and fwd+bwd."""
        out = {"basis": work["basis"], "copy_GBps": None, "mm_TFLOPs": None}
        for key in ("fwd", "fwd_bwd"):
            nbytes, flops = work[key]
            t_bytes = nbytes / (self.copy() * 1e9) * 1e3 if nbytes else 0.0
            t_flops = flops / (self.mm(dtype) * 1e12) * 1e3 if flops else 0.0
            out[f"{key}_ms"] = max(t_bytes, t_flops)
            out[f"{key}_bytes"] = int(nbytes)
            out[f"{key}_flops"] = int(flops)
            out[f"{key}_bound"] = "memory" if t_bytes >= t_flops else "compute"
            if nbytes:
                out["copy_GBps"] = self.copy_gbps
            if flops:
                out["mm_TFLOPs"] = self.mm_tflops[dtype]
        return out

    def to_dict(self) -> dict:
        return {"copy_GBps": self.copy_gbps, "copy_basis": self.copy_basis,
                "mm_TFLOPs": dict(self.mm_tflops), "mm_basis": dict(self.mm_basis)}


# --------------------------------------------------------------------------------------------
# One contender on one config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunOptions:
    timing: TimingOptions
    memory: bool = True
    seed: int = 0


def _empty_result(c: Contender, status: str, note: str = "") -> dict:
    return {"contender": c.name, "kind": c.kind, "backend": c.backend, "status": status,
            "note": note, "loss": None, "warmup_s": None,
            "fwd_ms": None, "fwd_bwd_ms": None, "fwd_stats": None, "fwd_bwd_stats": None,
            "peak_extra_bytes": None, "peak_extra_fwd_bytes": None, "mem_status": None,
            "mem_note": ""}


def run_one(suite: Suite, cfg: Config, c: Contender, sets: list, device: torch.device,
            opts: RunOptions) -> dict:
    """Time (and measure the memory of) contender ``c`` on ``cfg``; never raises for OOM or a
    failing contender: the result's ``status`` says what happened."""
    if c.skip is not None:
        return _empty_result(c, "skipped", c.skip)
    res = _empty_result(c, "ok", c.note)
    step = None
    try:
        t0 = time.perf_counter()
        step = c.build(cfg, sets[0], device)
        if step.note:
            res["note"] = step.note
        for w in range(max(1, opts.timing.warmup)):
            loss, grads = run_fwd_bwd(step, sets[w % len(sets)])
            if w == 0:
                res["loss"] = float(loss.detach().float())
            del loss, grads
        if c.kind == "compile":
            run_fwd(step, sets[0])  # the forward-only path may specialise differently
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        res["warmup_s"] = time.perf_counter() - t0
        flush = _L2Flush(device) if device.type == "cuda" else None
        k = len(sets)
        fwd = summarize(time_calls(lambda i: run_fwd(step, sets[i % k]), device, opts.timing,
                                   flush))
        fb = summarize(time_calls(lambda i: run_fwd_bwd(step, sets[i % k]), device, opts.timing,
                                  flush))
        del flush
        res.update(fwd_ms=fwd["median"], fwd_bwd_ms=fb["median"], fwd_stats=fwd, fwd_bwd_stats=fb)
    except NotApplicable as exc:
        step = None
        free_memory(device)
        return _empty_result(c, "n/a", str(exc))
    except Exception as exc:  # OOM or a failing contender: record it, go on with the others
        step = None
        free_memory(device)
        status = "OOM" if is_oom(exc) else ("n/a" if unsupported(exc) else "error")
        out = _empty_result(c, status, describe_error(exc))
        out["loss"], out["warmup_s"] = res["loss"], res["warmup_s"]
        out["fwd_ms"], out["fwd_stats"] = res["fwd_ms"], res["fwd_stats"]
        return out
    if opts.memory:
        res.update(measure_memory(suite, cfg, c, step, sets[0], device, opts))
    step = None
    free_memory(device)
    return res


def measure_memory(suite, cfg, c, step, inputs, device, opts) -> dict:
    if device.type == "cuda":
        try:
            m = cuda_peak(step, inputs, device)
            return {"peak_extra_bytes": m["fwd_bwd"], "peak_extra_fwd_bytes": m["fwd"],
                    "mem_status": "ok", "mem_note": m["method"]}
        except Exception as exc:
            free_memory(device)
            return {"mem_status": "OOM" if is_oom(exc) else "error",
                    "mem_note": describe_error(exc)}
    m = cpu_peak(suite.name, c.name, cfg, opts.seed, opts.timing.warmup)
    if m.get("status") != "ok":
        return {"mem_status": m.get("status", "error"), "mem_note": m.get("error", "")}
    if m["fwd_bwd"] is None:
        return {"mem_status": "unknown", "mem_note": m["method"] + "; the high-water mark did "
                "not rise above the one set before the call"}
    return {"peak_extra_bytes": m["fwd_bwd"], "peak_extra_fwd_bytes": m["fwd"],
            "mem_status": "ok", "mem_note": m["method"]}


# --------------------------------------------------------------------------------------------
# Ratios
# --------------------------------------------------------------------------------------------
def add_ratios(results: list, floor: dict | None) -> None:
    """speedup_vs_X_* = X's time / this time (> 1: this one is faster); mem_vs_X = this peak /
    X's peak; x_floor_* = this time / floor time (>= 1)."""
    by_kind = {}
    for r in results:
        if r["kind"] in ("stock", "compile", "liger") and r["status"] == "ok":
            by_kind[r["kind"]] = r
    for r in results:
        ratios = {}
        for ref_kind in ("stock", "compile", "liger"):
            ref = by_kind.get(ref_kind)
            for key in ("fwd", "fwd_bwd"):
                a = ref.get(f"{key}_ms") if ref else None
                b = r.get(f"{key}_ms")
                ratios[f"speedup_vs_{ref_kind}_{key}"] = (a / b) if a and b else None
            a = ref.get("peak_extra_bytes") if ref else None
            b = r.get("peak_extra_bytes")
            ratios[f"mem_vs_{ref_kind}"] = (b / a) if a and b is not None else None
        for key in ("fwd", "fwd_bwd"):
            f = floor.get(f"{key}_ms") if floor else None
            b = r.get(f"{key}_ms")
            ratios[f"x_floor_{key}"] = (b / f) if f and b else None
        r["ratios"] = ratios
