"""How fastkd launches its Triton kernels: every launch goes through :func:`launch`.

Inside :func:`recording`, ``launch`` records ``(kernel, grid, arguments, meta)`` instead of
launching and :func:`sm_count` reports the streaming-multiprocessor count of the GPU being
modelled; the ahead-of-time compiler (:mod:`fastkd._triton_aot`) drives the real launchers with
``meta``-device tensors that way. Outside it, ``launch`` is ``kernel[grid](*args, **meta)``.
"""
from __future__ import annotations

import contextlib

import torch


class _Recorder:
    def __init__(self, sm: int):
        self.sm = sm
        self.label = ""
        self.launches: list = []

    def add(self, kernel, grid, args, meta):
        fn = getattr(kernel, "fn", kernel)
        self.launches.append((f"{fn.__module__}:{fn.__name__}", tuple(int(g) for g in grid),
                              _encode(args)["tuple"], dict(meta), self.label))


_RECORDER: _Recorder | None = None


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, or record it inside :func:`recording`."""
    rec = _RECORDER
    if rec is None:
        return kernel[grid](*args, **meta)
    rec.add(kernel, grid, args, meta)
    return None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the modelled GPU's while recording; 1 on CPU)."""
    if _RECORDER is not None:
        return _RECORDER.sm
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None
                              else torch.cuda.current_device())
    return 1


_SM_CACHE: dict = {}


def _cuda_sm_count(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


@contextlib.contextmanager
def recording(sm: int):
    """Record launches (of launchers fed ``meta`` tensors) instead of running them."""
    global _RECORDER
    if _RECORDER is not None:
        raise RuntimeError("recording() does not nest")
    _RECORDER = _Recorder(sm)
    try:
        yield _RECORDER
    finally:
        _RECORDER = None


def _encode(x):
    """Launch arguments as JSON-able specs; tensors become pointer specs (dtype, byte offset)."""
    if isinstance(x, torch.Tensor):
        return {"ptr": str(x.dtype).replace("torch.", ""),
                "offset": x.storage_offset() * x.element_size()}
    if isinstance(x, (tuple, list)):
        return {"tuple": [_encode(v) for v in x]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot record a launch argument of type {type(x).__name__}")
