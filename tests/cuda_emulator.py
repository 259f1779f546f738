"""Builds and drives the host CUDA emulator (csrc/emu/README.md) for the tests.

The kernel files of ``csrc/cuda/`` are compiled by the host C++ compiler against
``csrc/emu/include`` (a mock CUDA runtime and device API) with ``-fsanitize=thread``
instrumentation, whose hooks the emulator defines to check every memory access; the result is a
plain shared library loaded with ctypes. ``emulated_cuda()`` then routes CPU tensors of the
``cpu`` backend through the emulated CUDA launchers (the torch glue takes the library's kernel
table), so the whole production path — glue, launcher, kernel — runs with CUDA's launch
configuration on the CPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = [CSRC / "cuda" / "logit_kd.cu", CSRC / "cuda" / "logit_topk.cu",
                  CSRC / "cuda" / "feature_kd.cu", CSRC / "cuda" / "relation_kd.cu"]
RUNTIME_SOURCES = [CSRC / "emu" / "runtime.cpp", CSRC / "emu" / "describe.cpp",
                   CSRC / "emu" / "kernel_table.cpp"]
#: Test-only kernels with planted bugs (each must make the emulator fire).
PLANTED_SOURCE = ROOT / "tests" / "emu" / "planted_bugs.cu"
BUILD_DIR = ROOT / "build" / "emu"
DEVICES = "a100,h100"  # device 0 and 1 of the mock runtime


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def unavailable_reason() -> str | None:
    if compiler() is None:
        return "no host C++ compiler (g++) for the CUDA emulator"
    return None


def _flags() -> tuple[list[str], list[str]]:
    common = ["-std=c++20", "-O2", "-fPIC", "-g0", "-DFASTKD_CUDA_EMULATION=1",
              f"-I{CSRC / 'emu' / 'include'}", f"-I{CSRC / 'emu'}", f"-I{CSRC / 'include'}",
              f"-I{CSRC / 'cuda'}"]
    kernel = common + ["-fsanitize=thread", "-include", "describe.h", "-x", "c++"]
    return kernel, common


def _digest(sources: list[Path]) -> str:
    h = hashlib.sha256()
    deps = sorted(set(sources) | set((CSRC / "emu").rglob("*.h")) | set((CSRC / "emu").rglob("*.cpp"))
                  | set((CSRC / "cuda").glob("*.cuh")) | set((CSRC / "include").rglob("*.h")))
    for p in deps:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    h.update(json.dumps(_flags()).encode())
    return h.hexdigest()[:16]


def build(kernel_sources: list[Path] | None = None, *, name: str = "fastkd_cuda_emu") -> Path:
    """Compiles (or reuses) the emulator library; returns its path. Raises on a compile error."""
    ksrc = list(KERNEL_SOURCES if kernel_sources is None else kernel_sources)
    if PLANTED_SOURCE.exists() and PLANTED_SOURCE not in ksrc:
        ksrc.append(PLANTED_SOURCE)
    out_dir = BUILD_DIR / _digest(ksrc)
    lib = out_dir / f"lib{name}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    kflags, rflags = _flags()
    jobs = [([cxx, *kflags, "-c", str(src), "-o", str(out_dir / (src.stem + ".k.o"))], src)
            for src in ksrc]
    jobs += [([cxx, *rflags, "-c", str(src), "-o", str(out_dir / (src.stem + ".o"))], src)
             for src in RUNTIME_SOURCES]

    def run(job):
        cmd, src = job
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build of {src.name} failed:\n{r.stderr[-6000:]}")

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        list(pool.map(run, jobs))
    objs = [str(p) for p in sorted(out_dir.glob("*.o"))]
    tmp = out_dir / f"lib{name}.so.tmp{os.getpid()}"
    r = subprocess.run([cxx, "-shared", "-o", str(tmp), *objs, "-lpthread"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulator link failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, lib)
    return lib


class Emulator:
    """The loaded emulator library (one per process: its launchers keep per-process state, as a
    real CUDA program does)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = lib = ctypes.CDLL(str(path))
        lib.fastkd_emu_configure.argtypes = [ctypes.c_char_p]
        lib.fastkd_emu_set_device.argtypes = [ctypes.c_int]
        lib.fastkd_emu_set_execute.argtypes = [ctypes.c_int]
        lib.fastkd_emu_set_resources.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.fastkd_emu_take_launch_log.restype = ctypes.c_char_p
        lib.fastkd_emu_last_error.restype = ctypes.c_char_p
        lib.fastkd_emu_kernels.restype = ctypes.c_void_p
        if lib.fastkd_emu_configure(DEVICES.encode()) != len(DEVICES.split(",")):
            raise RuntimeError("fastkd_emu_configure refused the device list")
        self._load_resources()

    def _load_resources(self):
        """Registers and static shared memory per kernel from the committed ptxas table, so the
        mock runtime refuses what the real one would (registers per block, opt-in limits)."""
        table = ROOT / "benchmarks" / "results" / "resources-cuda.json"
        if not table.exists():
            return
        data = json.loads(table.read_text())
        for arch, kernels in data.items():
            if not arch.startswith("sm_") or not isinstance(kernels, dict):
                continue
            for kname, res in kernels.items():
                self.lib.fastkd_emu_set_resources(f"{kname}@{arch}".encode(), int(res["regs"]),
                                                  int(res["static_smem"]))

    def set_device(self, index: int):
        rc = self.lib.fastkd_emu_set_device(index)
        if rc != 0:
            raise ValueError(f"no emulated device {index}")

    def set_execute(self, on: bool):
        self.lib.fastkd_emu_set_execute(1 if on else 0)

    def take_launch_log(self) -> list[dict]:
        text = self.lib.fastkd_emu_take_launch_log().decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def last_error(self) -> str:
        return self.lib.fastkd_emu_last_error().decode()

    def kernel_table(self) -> int:
        return int(self.lib.fastkd_emu_kernels())


_EMULATOR: Emulator | None = None


def emulator() -> Emulator:
    global _EMULATOR
    if _EMULATOR is None:
        _EMULATOR = Emulator(build())
    return _EMULATOR


@contextlib.contextmanager
def emulated_cuda(device: int = 0, execute: bool = True):
    """CPU tensors of the ``cpu`` backend run the emulated CUDA kernels inside this block, on mock
    device ``device`` (0: A100, 1: H100)."""
    from fastkd import _ext

    emu = emulator()
    emu.set_device(device)
    emu.set_execute(execute)
    _ext._C.set_cuda_emulation(emu.kernel_table())
    try:
        yield emu
    finally:
        _ext._C.set_cuda_emulation(0)
        emu.set_execute(True)
        emu.set_device(0)
