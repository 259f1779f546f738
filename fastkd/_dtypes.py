"""The dtype policy shared by every loss family.

Losses take float32, bfloat16, float16 and float64 tensors (:data:`FLOAT_DTYPES`). The fused
kernels take the first three (:data:`KERNEL_DTYPES`) and compute in float32; float64 runs on the
reference (:func:`fastkd._backend.select_backend`). The PyTorch paths compute in
:func:`work_dtype`.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def work_dtype(*tensors) -> torch.dtype:
    """float64 when one of ``tensors`` (None entries ignored) is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32
