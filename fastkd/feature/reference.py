"""Pure-PyTorch reference of feature KD (SPEC §2): the contract written as code.

Literal rather than fast (it materialises the full ``N x teacher_dim`` projection), differentiable
by autograd, and exact in float64 when given float64 inputs: the tests compare every kernel
against it that way.
"""
from __future__ import annotations

import torch

LOSSES = ("mse", "cosine")
COSINE_EPS = 1e-8


def project_rows(student, weight, bias, channel_dim: int, dtype):
    """Student features -> rows ``[N, student_dim]`` (channel moved last) and ``y = x W^T + b``."""
    x = student.movedim(channel_dim, -1)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    if weight is None:
        return x2, lead
    y = x2 @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y, lead


def _aligned(student, teacher, weight, bias, channel_dim):
    tensors = [student, teacher] + [p for p in (weight, bias) if p is not None]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in tensors) else torch.float32
    y, lead = project_rows(student, weight, bias, channel_dim, dtype)
    t = teacher.movedim(channel_dim, -1)
    return y, t.reshape(-1, t.shape[-1]).to(dtype), lead


def cosine_rows(y, t):
    """``1 - y.t / max(|y| |t|, 1e-8)`` per row."""
    norms = torch.linalg.vector_norm(y, dim=-1) * torch.linalg.vector_norm(t, dim=-1)
    return 1.0 - (y * t).sum(-1) / norms.clamp_min(COSINE_EPS)


def feature_kd_reference(student, teacher, weight=None, bias=None, *, loss="mse", channel_dim=-1,
                         reduction="mean"):
    """SPEC §2 literally, for validated arguments (``reduction`` without the alias).

    ``y = x W^T + b`` over the channel dimension (``weight=None``: no adapter, ``y = x``).
    ``"mse"``: ``"mean"`` averages ``(y - t)^2`` over all ``N * teacher_dim`` elements, ``"sum"``
    sums them, ``"none"`` gives each row's mean over the teacher channels.
    ``"cosine"``: per row ``1 - cos``; ``"mean"`` over rows, ``"sum"``, ``"none"`` per row.
    ``"none"`` has the leading shape (all dimensions but ``channel_dim``). A mean over nothing is 0.
    Computes in float64 if any input is float64, else float32.
    """
    y, t, lead = _aligned(student, teacher, weight, bias, channel_dim)
    if loss == "mse":
        sq = (y - t).square()
        if reduction == "none":
            return sq.mean(-1).reshape(lead)
        total = sq.sum()
        return total if reduction == "sum" else total / max(sq.numel(), 1)
    if loss == "cosine":
        rows = cosine_rows(y, t)
        if reduction == "none":
            return rows.reshape(lead)
        total = rows.sum()
        return total if reduction == "sum" else total / max(rows.shape[0], 1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
