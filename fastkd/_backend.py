"""The one backend-selection mechanism shared by every fastkd loss, and its dtype policy.

``backend="auto"`` picks, for the device of the inputs: the CUDA extension on CUDA tensors if it
was built, else Triton on CUDA tensors, else the C++ CPU kernels on CPU tensors, else the pure
PyTorch reference. The fused kernels take float32, bfloat16 and float16
(:data:`fastkd._dtypes.KERNEL_DTYPES`); float64 inputs run on the reference under ``"auto"``. A forced backend that cannot serve the
inputs raises ``RuntimeError`` saying why; there is never a silent fallback.
"""
from __future__ import annotations

import os

import torch

from fastkd import _ext
from fastkd._dtypes import KERNEL_DTYPES

BACKENDS = ("cuda", "triton", "cpu", "reference")
_CHOICES = ("auto",) + BACKENDS


_TRITON_IMPORT = {}  # the cached answer of _triton_import_reason


@torch.compiler.assume_constant_result  # dynamo: evaluated at trace time, never traced
def _triton_import_reason() -> str | None:
    if "reason" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_IMPORT["reason"] = f"triton is not importable ({exc})"
        else:
            _TRITON_IMPORT["reason"] = None
    return _TRITON_IMPORT["reason"]


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on tensors of ``device``, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, but the inputs are on {device}"
        return _ext.cpu_ext_reason()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, but the inputs are on {device}"
        return _ext.cuda_ext_reason()
    if backend == "triton":
        why = _triton_import_reason()
        if why is not None:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpret():
            return None
        return (f"the 'triton' backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                f"set before triton is imported); the inputs are on {device}")
    raise AssertionError(backend)


def check_backend_name(backend) -> str:
    if not isinstance(backend, str) or backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device, implemented=BACKENDS) -> str:
    """Return the concrete backend that will run for inputs on ``device``.

    ``implemented`` lists the backends a particular loss provides (all four for the shipped
    losses); forcing one outside it is a ``RuntimeError`` too.
    """
    check_backend_name(backend)
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            if name in implemented and _reason(name, device) is None:
                return name
        return "reference"
    if backend not in implemented:
        raise RuntimeError(f"backend={backend!r} is not implemented for this loss "
                           f"(implemented: {', '.join(implemented)})")
    why = _reason(backend, device)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {why}")
    return backend


def select_backend(backend, device: torch.device, dtypes, *, what: str, ext_ops=()) -> str:
    """The backend that runs a loss call: :func:`resolve_backend`, then the dtype policy.

    ``dtypes``: the dtypes of the inputs; one outside ``KERNEL_DTYPES`` (float64) means the
    reference under ``"auto"`` and a ``RuntimeError`` for a forced fused backend (``what`` names
    the inputs in the message). ``ext_ops``: the functions of the compiled extension this loss
    needs; an extension built without them cannot serve ``cpu``/``cuda``.
    """
    backend = check_backend_name(backend)
    implemented = BACKENDS
    missing = [op for op in ext_ops if _ext._C is not None and not hasattr(_ext._C, op)]
    if missing:
        implemented = ("triton", "reference")
        if backend in ("cpu", "cuda"):
            raise RuntimeError(f"backend={backend!r} is unavailable: the compiled extension "
                               f"fastkd._C was built without {', '.join(missing)} (rebuild "
                               f"fastkd)")
    name = resolve_backend(backend, device, implemented)
    if name != "reference" and any(d not in KERNEL_DTYPES for d in dtypes):
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} takes float32, bfloat16 or float16 {what}; "
                               f"use backend='reference' for float64")
        name = "reference"
    return name


def available_backends() -> dict:
    """What was built and what can run here.

    Returns a dict ``{backend: {"available": bool, "reason": str}}`` for ``cuda``, ``triton``,
    ``cpu`` and ``reference``, plus ``"build"``: the build record written by ``setup.py``.
    ``available`` is judged for this process (CUDA devices present, ``TRITON_INTERPRET``).
    """
    has_gpu = torch.cuda.is_available()
    gpu = torch.device("cuda") if has_gpu else None
    out = {}
    for name in BACKENDS:
        if name == "cpu":
            why = _reason("cpu", torch.device("cpu"))
        elif name == "reference":
            why = None
        elif has_gpu:
            why = _reason(name, gpu)
        else:
            why = _ext.cuda_ext_reason() if name == "cuda" else _triton_import_reason()
            why = why or "no CUDA device is visible to torch"
            if name == "triton" and _triton_import_reason() is None and _triton_interpret():
                why = None  # the interpreter runs Triton kernels on CPU tensors
            elif name == "cuda" and _ext.cuda_ext_reason() is None:
                why = "CUDA kernels are built, but no CUDA device is visible to torch"
        out[name] = {"available": why is None, "reason": why or "ok"}
    out["build"] = dict(_ext.BUILD_INFO)
    return out
