"""Ahead-of-time compilation of every Triton kernel configuration, for real GPUs, without one.

Three parts:

1. **Launch recording.** Every Triton launch of fastkd goes through
   :func:`fastkd._triton_launch.launch`. Inside :func:`fastkd._triton_launch.recording` it
   records ``(kernel, grid, arguments, meta)`` instead of launching, and ``sm_count`` reports
   the streaming-multiprocessor count of the GPU being modelled. The launchers accept ``meta``-device tensors (shapes, strides and dtypes without storage), so
   :func:`enumerate_launches` drives the real dispatch code at the benchmark sizes
   (``fastkd/bench/suite_*.py``) and gets exactly the configurations it would pick on a GPU.
2. **Compilation.** :func:`compile_all` compiles each distinct configuration for each target
   (``sm_80``, ``sm_90``) in worker processes started without ``TRITON_INTERPRET`` (under the
   interpreter ``@triton.jit`` returns interpreted functions at import time, which cannot be
   compiled). A worker binds the recorded arguments with ``JITFunction.warmup`` - the same
   specialisation (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16) as a real
   launch - under a stand-in driver that reports the target, so nothing touches a GPU.
3. **Resources.** From ptxas' ``-v`` log (``TRITON_DUMP_PTXAS_LOG``): registers per thread, spill
   stores/loads and stack frame bytes; from the kernel metadata: dynamic shared memory,
   ``num_warps``, ``num_stages``; from the PTX: whether ``tl.dot`` reached tensor cores
   (``mma``/``wgmma``). :func:`occupancy` turns them into resident blocks per SM for the A100
   (sm_80) and H100 (sm_90) limits.

Run ``python scripts/triton_resources.py`` for the tables; ``tests/test_triton_aot.py`` compiles
everything in CI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import traceback

import torch

from fastkd._triton_launch import _encode, recording

# ----------------------------------------------------------------------------------------------
# Target GPUs: the limits that decide occupancy (CUDA C Programming Guide, compute capabilities).
# ----------------------------------------------------------------------------------------------
TARGETS = (80, 90)


@dataclasses.dataclass(frozen=True)
class GPULimits:
    name: str
    sms: int                 # streaming multiprocessors
    regs_per_sm: int         # 32-bit registers per SM
    max_threads_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int         # shared memory per SM usable by blocks, bytes
    smem_per_block: int      # opt-in maximum per block, bytes
    smem_reserved: int       # reserved by the system per resident block, bytes


LIMITS = {
    80: GPULimits("A100 (sm_80)", 108, 65536, 2048, 32, 164 * 1024, 163 * 1024, 1024),
    90: GPULimits("H100 SXM (sm_90)", 132, 65536, 2048, 32, 228 * 1024, 227 * 1024, 1024),
}


def occupancy(arch: int, regs: int, num_warps: int, shared: int) -> int:
    """Resident blocks per SM: registers (allocated per warp in units of 256), threads, blocks
    and shared memory (plus the 1 KB the system reserves per block) each bound it."""
    lim = LIMITS[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (lim.regs_per_sm // per_warp) // num_warps
    by_threads = lim.max_threads_per_sm // (32 * num_warps)
    by_smem = lim.smem_per_sm // (shared + lim.smem_reserved)
    if shared > lim.smem_per_block:
        by_smem = 0
    return max(0, min(by_regs, by_threads, lim.max_blocks_per_sm, by_smem))


def _int_class(v: int):
    """What Triton specialises an int argument on: its type range, == 1, divisibility by 16."""
    width = 32 if -2 ** 31 <= v < 2 ** 31 else (64 if -2 ** 63 <= v < 2 ** 63 else 65)
    return ("int", width, v == 1, v % 16 == 0)


def _compile_key(spec):
    """A key that equal compile keys share: pointer dtypes and alignment, int classes, float
    and constexpr types (floats are runtime fp32 values)."""
    if isinstance(spec, dict) and "ptr" in spec:
        return ("ptr", spec["ptr"], spec["offset"] % 16 == 0)
    if isinstance(spec, dict) and "tuple" in spec:
        return ("tuple",) + tuple(_compile_key(v) for v in spec["tuple"])
    if isinstance(spec, bool) or spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, int):
        return _int_class(spec)
    if isinstance(spec, float):
        return "f32"
    raise TypeError(type(spec))


@dataclasses.dataclass
class Config:
    """One distinct compile configuration and the launches (labels, grids) that select it."""
    kernel: str
    args: list
    meta: dict
    labels: list = dataclasses.field(default_factory=list)
    grids: dict = dataclasses.field(default_factory=dict)  # sm count -> sorted list of grids

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    @property
    def family(self) -> str:
        return self.kernel.split(":")[0].split(".")[1]

    def key(self):
        return (self.kernel, _compile_key({"tuple": self.args}),
                tuple(sorted(self.meta.items())))

    def pointer_dtypes(self) -> str:
        """The distinct pointer dtypes, in argument order (e.g. ``bfloat16,float32``)."""
        out = []

        def walk(s):
            if isinstance(s, dict) and "ptr" in s:
                if s["ptr"] not in out:
                    out.append(s["ptr"])
            elif isinstance(s, dict):
                for v in s["tuple"]:
                    walk(v)
        for a in self.args:
            walk(a)
        return ",".join(out)


def collect(records_by_sm: dict) -> list:
    """Merge the recorded launches of every modelled GPU into distinct :class:`Config` s."""
    configs: dict = {}
    for sm, records in records_by_sm.items():
        for kernel, grid, args, meta, label in records:
            cfg = Config(kernel, args, meta)
            cfg = configs.setdefault(cfg.key(), cfg)
            if label not in cfg.labels:
                cfg.labels.append(label)
            grids = cfg.grids.setdefault(sm, [])
            if grid not in grids:
                grids.append(grid)
    for cfg in configs.values():
        for sm in cfg.grids:
            cfg.grids[sm].sort(key=lambda g: (math.prod(g), g))
    return list(configs.values())


# ----------------------------------------------------------------------------------------------
# Enumeration at the benchmark sizes
# ----------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGIT_DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
LOGIT_TEACHERS = (1, 2, 4)


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _logit_launches(rec):
    from fastkd.bench import suite_fused_linear, suite_logit
    from fastkd.logit import triton_kernel as lk
    from fastkd.logit.config import LogitKDConfig
    grid, _ = suite_logit.SIZES[("cuda", "full")]
    fl_grid, fl_dtypes = suite_fused_linear.SIZES[("cuda", "full")]
    cases = [(n, v, "bench") for n, v in grid] + [(bt, v, "fused-linear") for bt, _, v in fl_grid]
    for dname in ("float32", "bfloat16", "float16"):
        dt = _DTYPES[dname]
        for div in LOGIT_DIVERGENCES:
            for nt in LOGIT_TEACHERS:
                # Several teachers are also mixed in log space (teacher_mixture="logprob").
                mixtures = ("prob", "logprob") if nt > 1 else ("prob",)
                for hard, tgrad, mix in itertools.product((True, False), (False, True), mixtures):
                    cfg = LogitKDConfig(temperature=suite_logit.TEMPERATURE,
                                        hard_weight=1.0 if hard else 0.0, divergence=div,
                                        beta=suite_logit.BETA, teacher_mixture=mix)
                    for n, v, origin in cases:
                        if origin == "fused-linear" and (dname not in fl_dtypes or nt != 1):
                            continue
                        rec.label = (f"logit {dname} {div} teachers={nt}"
                                     f"{' logprob' if mix == 'logprob' else ''}"
                                     f"{' hard' if hard else ''}{' tgrad' if tgrad else ''}")
                        s = _meta((n, v), dt)
                        ts = [_meta((n, v), dt) for _ in range(nt)]
                        y = _meta((n,), torch.int64) if hard else None
                        scale = _meta((1,), torch.float32)
                        lk.logit_kd_forward(s, ts, y, [1.0 / nt] * nt, cfg, scale, True,
                                            [tgrad] * nt)
    _logit_topk_launches(rec, grid)


def _logit_topk_launches(rec, grid, k=64):
    """The sparse top-k teacher's kernel: logprobs in float32 (a TopKTeacher's re-tempered
    values) and, for bf16 students, as stored in bf16 caches."""
    from fastkd.bench import suite_logit
    from fastkd.logit import triton_kernel as lk
    from fastkd.logit.config import LogitKDConfig
    for dname in ("float32", "bfloat16", "float16"):
        dt = _DTYPES[dname]
        lp_dtypes = (torch.float32, torch.bfloat16) if dname == "bfloat16" else (torch.float32,)
        for lp_dt in lp_dtypes:
            for div in LOGIT_DIVERGENCES:
                for hard in (True, False):
                    cfg = LogitKDConfig(temperature=suite_logit.TEMPERATURE,
                                        hard_weight=1.0 if hard else 0.0, divergence=div,
                                        beta=suite_logit.BETA)
                    for n, v in grid:
                        rec.label = (f"logit topk {dname} logprobs {str(lp_dt)[6:]} {div} "
                                     f"k={k}{' hard' if hard else ''}")
                        lk.logit_topk_forward(_meta((n, v), dt), _meta((n, k), torch.int64),
                                              _meta((n, k), lp_dt),
                                              _meta((n,), torch.int64) if hard else None, cfg,
                                              _meta((1,), torch.float32), True)


# Feature KD dtype cases: (label, feature dtype, adapter weight dtype, float32 matmul precision).
FEATURE_CASES = (
    ("float32", "float32", "float32", "ieee"),
    ("float32 tf32", "float32", "float32", "tf32"),
    ("bfloat16", "bfloat16", "bfloat16", None),
    ("float16", "float16", "float16", None),
    ("bfloat16 x, float32 W", "bfloat16", "float32", "ieee"),
    ("bfloat16 x, float32 W, tf32", "bfloat16", "float32", "tf32"),
)


def _feature_launches(rec):
    from fastkd.bench import suite_feature
    from fastkd.feature import triton_kernel as fk
    grid = suite_feature.SIZES[("cuda", "full")][0]
    # NCHW conv maps ([B, C, H, W], channel_dim=1) read in place: rows (p, q), Q = H * W.
    conv = [(64, 512, 1024, 14 * 14)]
    for label, xd, wd, prec in FEATURE_CASES:
        for loss_id, loss in ((0, "mse"), (1, "cosine")):
            for layout in ("rows", "nchw"):
                shapes = ([(n, ds, dt, 1) for n, ds, dt in grid] if layout == "rows"
                          else [(b, ds, dt, q) for b, ds, dt, q in conv])
                for p, ds, dt, q in shapes:
                    x3 = _meta((p, ds, q), _DTYPES[xd])
                    t3 = _meta((p, dt, q), _DTYPES[xd])
                    w = _meta((dt, ds), _DTYPES[wd])
                    b = _meta((dt,), _DTYPES[wd])
                    base = f"feature {label} {loss} {layout}"
                    # training step (mean/sum): loss and every gradient in one pass
                    for need_t in (False, True):
                        rec.label = base + (" tgrad" if need_t else "")
                        fk.feature_kd_forward(x3, t3, w, b, loss_id, 1.0, None, True, True,
                                              True, True, need_t, 0, dot_precision=prec)
                    # reduction="none": forward row losses, backward with per-row weights
                    rec.label = base + " none"
                    fk.feature_kd_forward(x3, t3, w, b, loss_id, 1.0, None, True, False, False,
                                          False, False, 0, dot_precision=prec)
                    row_scale = _meta((p * q,), torch.float32)
                    fk.feature_kd_forward(x3, t3, w, b, loss_id, 1.0, row_scale, False, True,
                                          True, True, False, 0, dot_precision=prec)
                    if ds == dt or layout == "rows":
                        # no adapter: y = x (teacher and student widths equal)
                        rec.label = base + " no-adapter"
                        xe = _meta((p, dt, q), _DTYPES[xd])
                        fk.feature_kd_forward(xe, t3, None, None, loss_id, 1.0, None, True, True,
                                              False, False, False, 0, dot_precision=prec)


def _relation_launches(rec):
    from fastkd.bench import suite_relation
    from fastkd.relation import triton_kernel as rk
    batches, dims, _ = suite_relation.SIZES[("cuda", "full")]
    for dname in ("float32", "bfloat16"):
        dt = _DTYPES[dname]
        for d in dims:
            for need_t in (False, True):
                sfx = f" {dname} d={d}{' tgrad' if need_t else ''}"
                for b in batches["main"]:
                    xs, xt = _meta((b, d), dt), _meta((b, d), dt)
                    rec.label = "relation sp" + sfx
                    rk.sp_forward(xs, xt, True, need_t, scale=1.0 / (b * b))
                    rec.label = "relation rkd-distance" + sfx
                    rk.rkd_forward(xs, xt, True, need_t, distance_scale=1.0 / (b * b),
                                   angle_scale=0.0)
                    rec.label = "relation pkt" + sfx
                    rk.pkt_forward(xs, xt, True, need_t, eps=1e-7, scale=1.0 / (b * b))
                for b in batches["angle"]:
                    xs, xt = _meta((b, d), dt), _meta((b, d), dt)
                    rec.label = "relation rkd" + sfx
                    rk.rkd_forward(xs, xt, True, need_t, distance_scale=1.0 / (b * b),
                                   angle_scale=2.0 / (b * b * b))


FAMILIES = {"logit": _logit_launches, "feature": _feature_launches,
            "relation": _relation_launches}


def enumerate_launches(families=tuple(FAMILIES), targets=TARGETS) -> list:
    """Every distinct kernel configuration the dispatchers pick at the benchmark sizes, with the
    launch grids on each target's SM count. Needs no GPU and compiles nothing."""
    records = {}
    for arch in targets:
        sm = LIMITS[arch].sms
        with recording(sm) as rec:
            for fam in families:
                FAMILIES[fam](rec)
        records[sm] = rec.launches
    return collect(records)


# ----------------------------------------------------------------------------------------------
# 2. Compilation in workers
# ----------------------------------------------------------------------------------------------
class _Pointer:
    """A pointer argument for ``JITFunction.warmup``: a dtype and an address (its alignment)."""

    def __init__(self, dtype, addr):
        self.dtype = dtype
        self._addr = addr

    def data_ptr(self):
        return self._addr


def _decode(spec):
    if isinstance(spec, dict) and "ptr" in spec:
        # Base 4096: a fresh allocation (torch aligns them far beyond 16 bytes) plus the offset.
        return _Pointer(getattr(torch, spec["ptr"]), 4096 + spec["offset"])
    if isinstance(spec, dict):
        return tuple(_decode(v) for v in spec["tuple"])
    return spec


class _TargetDriver:
    """Stand-in for triton's active driver: the JIT asks it for the target, device and stream
    only; ``warmup`` then compiles without launching or loading anything."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 1000 + self.arch  # a separate binder cache per target

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"ahead-of-time compile: the driver call {name!r} needs a GPU")


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame, spill stores/loads and static shared memory of ptxas -v."""
    regs = _PTXAS_REGS.findall(log)
    frame = _PTXAS_FRAME.findall(log)
    if not regs or not frame:
        raise RuntimeError(f"no ptxas resource line in the log:\n{log[-2000:]}")
    smem = _PTXAS_SMEM.findall(log)
    return {"regs": int(regs[-1]), "stack": int(frame[-1][0]),
            "spill_stores": int(frame[-1][1]), "spill_loads": int(frame[-1][2]),
            "static_smem": int(smem[-1]) if smem else 0}


def _tensor_core_ops(ptx: str) -> str:
    ops = [op for op in ("wgmma", "mma") if re.search(rf"\b{op}\.", ptx)]
    return ops[0] if ops else "-"


def _compile_one(job: dict, cache_dir) -> dict:
    import triton
    from triton.runtime.jit import JITFunction
    module, name = job["kernel"].split(":")
    __import__(module)
    kernel = getattr(sys.modules[module], name)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{job['kernel']} is {type(kernel).__name__}, not a JITFunction "
                           f"(TRITON_INTERPRET set in the compile worker?)")
    key = hashlib.sha256(json.dumps([kernel.cache_key, job["args"], job["meta"], job["arch"],
                                     triton.__version__], sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir, key + ".json") if cache_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f), cached=True)
    triton.runtime.driver.set_active(_TargetDriver(job["arch"]))
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        ck = kernel.warmup(*_decode({"tuple": job["args"]}), grid=(1,), **job["meta"])
    res = parse_ptxas_log(log.getvalue())
    md = ck.metadata
    res.update(num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
               hash=md.hash, tensor_cores=_tensor_core_ops(ck.asm["ptx"]),
               seconds=round(time.perf_counter() - t0, 3))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, path)
    return res


def _worker_main(cache_dir):
    """Compile jobs read as JSON lines from stdin; answer one JSON line each."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (LLVM, triton) must not corrupt the protocol
    for line in sys.stdin:
        job = json.loads(line)
        try:
            res = _compile_one(job, cache_dir)
        except Exception:  # reported per job; the caller fails on it
            res = {"error": traceback.format_exc()}
        proto.write(json.dumps(res) + "\n")


def _worker_env(triton_cache):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_ALWAYS_COMPILE"] = "1"  # every compile runs ptxas, so every log is there
    env["TRITON_CACHE_DIR"] = triton_cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def compile_all(configs, targets=TARGETS, workers=2, cache_dir=None, progress=None) -> dict:
    """Compile every config for every target. Returns ``{(config index, arch): result}`` where
    a result holds the resources (see :func:`parse_ptxas_log`, plus ``num_warps``,
    ``num_stages``, ``shared``, ``hash``, ``tensor_cores``, ``seconds``) or ``error``.

    ``workers`` processes share a job queue; ``cache_dir`` (optional) keeps results keyed by the
    kernel's source hash (``JITFunction.cache_key``, which covers the functions it calls), the
    arguments, meta, target and triton version, so an unchanged kernel is not compiled again.
    """
    import tempfile
    jobs = queue.Queue()
    # Big kernels first, so that the two workers finish close together.
    order = sorted(range(len(configs)), key=lambda i: configs[i].family != "logit")
    for i in order:
        for arch in targets:
            jobs.put((i, arch))
    results = {}
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="fastkd-aot-") as tcache:
        env = _worker_env(tcache)
        cmd = [sys.executable, "-m", "fastkd._triton_aot", "--worker"]
        if cache_dir:
            cmd += ["--cache", os.path.abspath(cache_dir)]

        def run_worker():
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                    text=True, bufsize=1)
            try:
                while True:
                    try:
                        i, arch = jobs.get_nowait()
                    except queue.Empty:
                        return
                    c = configs[i]
                    job = {"kernel": c.kernel, "args": c.args, "meta": c.meta, "arch": arch}
                    try:
                        proc.stdin.write(json.dumps(job) + "\n")
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                    except OSError:
                        line = ""
                    res = json.loads(line) if line else {
                        "error": f"compile worker exited (code {proc.poll()})"}
                    with lock:
                        results[(i, arch)] = res
                        if progress:
                            progress(len(results), len(configs) * len(targets), c, arch, res)
                    if not line:
                        return
            finally:
                if proc.stdin:
                    proc.stdin.close()
                proc.wait()

        threads = [threading.Thread(target=run_worker) for _ in range(max(1, workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in order:  # jobs no worker took (every worker died)
        for arch in targets:
            results.setdefault((i, arch), {"error": "not compiled: no compile worker left"})
    return results


# ----------------------------------------------------------------------------------------------
# 3. Tables
# ----------------------------------------------------------------------------------------------
_SHOWN_META = ("num_warps", "num_stages", "maxnreg")


def describe(cfg: Config) -> str:
    """The constexpr arguments of a config, compactly (``NAME=value`` joined by spaces)."""
    return " ".join(f"{k}={v}" for k, v in cfg.meta.items() if k not in _SHOWN_META)


#: The sources of the kernels compiled here: a table of compile results is current while their
#: hash (with the Triton version) is the one it records.
KERNEL_SOURCES = ("fastkd/logit/triton_kernel.py", "fastkd/feature/triton_kernel.py",
                  "fastkd/relation/triton_kernel.py")


def source_hash() -> str:
    """SHA-256 of :data:`KERNEL_SOURCES` and the Triton version."""
    import triton
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(triton.__version__.encode())
    for rel in KERNEL_SOURCES:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()


def config_key(cfg: Config) -> str:
    """A config's identity as a string (the ``key`` column of the resource table)."""
    return json.dumps(cfg.key(), sort_keys=True, default=str)


def sample(configs) -> list:
    """The first and the last configuration of every kernel (enumeration order): what a quick
    check compiles to confirm a committed table."""
    picked = {}
    for c in configs:
        picked.setdefault(c.name, [c, c])[1] = c
    out = []
    for first, last in picked.values():
        out += [first] if first is last else [first, last]
    return out


def rows(configs, results, targets=TARGETS) -> list:
    """One dict per (config, target): the table rows of resources-triton.json."""
    out = []
    for i, cfg in enumerate(configs):
        for arch in targets:
            res = results.get((i, arch), {"error": "missing"})
            lim = LIMITS[arch]
            grids = cfg.grids.get(lim.sms, [])
            row = {"kernel": cfg.name, "key": config_key(cfg), "family": cfg.family,
                   "target": f"sm_{arch}",
                   "constexprs": {k: v for k, v in cfg.meta.items() if k not in _SHOWN_META},
                   "pointer_dtypes": cfg.pointer_dtypes(), "labels": cfg.labels,
                   "grids": [list(g) for g in grids]}
            if "error" in res:
                row["error"] = res["error"]
            else:
                blocks = occupancy(arch, res["regs"], res["num_warps"],
                                   res["shared"] + res["static_smem"])
                row["maxnreg"] = cfg.meta.get("maxnreg")
                row.update({k: res[k] for k in ("num_warps", "num_stages", "regs", "spill_stores",
                                                "spill_loads", "stack", "shared", "static_smem",
                                                "tensor_cores", "hash")})
                row["blocks_per_sm"] = blocks
                if grids:
                    smallest = math.prod(grids[0])
                    row["grid_blocks"] = [smallest, math.prod(grids[-1])]
                    # The smallest launch: share of the SMs it keeps busy, and of the resident
                    # block slots (blocks_per_sm x SMs) it fills in its first wave.
                    row["sm_fill"] = round(min(1.0, smallest / lim.sms), 3)
                    row["slot_fill"] = round(min(1.0, smallest / max(1, blocks * lim.sms)), 3)
            out.append(row)
    return out


if __name__ == "__main__":
    if "--worker" in sys.argv:
        cache = sys.argv[sys.argv.index("--cache") + 1] if "--cache" in sys.argv else None
        _worker_main(cache)
    else:
        sys.exit("usage: python -m fastkd._triton_aot --worker [--cache DIR] "
                 "(see scripts/triton_resources.py)")
