"""What a results file records about the machine and the software it ran on."""
from __future__ import annotations

import os
import platform
import re
import subprocess

import torch


def _run(cmd, cwd=None, timeout=10) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": cpu_name(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=torch.cuda.get_device_name(idx),
                    capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count,
                    cuda_runtime=torch.version.cuda,
                    driver=_run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader", f"--id={idx}"]))
        try:
            info["memory_clock_khz"] = getattr(props, "memory_clock_rate", None)
        except Exception:  # pragma: no cover - attribute differs across torch versions
            pass
    else:
        info["name"] = info["cpu"]
        try:
            with open("/proc/meminfo") as f:
                info["memory_bytes"] = int(f.readline().split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return info


def slug(device: torch.device, info: dict) -> str:
    name = info.get("name") or device.type
    if device.type == "cpu" and not name.lower().startswith("cpu"):
        name = "cpu-" + name
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or device.type


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_info() -> dict:
    root = repo_root()
    if not os.path.exists(os.path.join(root, ".git")):
        return {"commit": None, "dirty": None, "note": "not a git checkout"}
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "note": "" if commit else "git rev-parse HEAD failed (no commit yet?)"}


def software_info() -> dict:
    import fastkd
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "fastkd": getattr(fastkd, "__version__", None),
           "fastkd_git": git_info()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = None
        out["triton_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from importlib.metadata import version
        out["liger_kernel"] = version("liger-kernel")
    except Exception:
        out["liger_kernel"] = None
    try:
        out["backends"] = fastkd.available_backends()
    except Exception as exc:  # the record must not fail because of one probe
        out["backends"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out
