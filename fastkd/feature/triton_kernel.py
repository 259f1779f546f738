"""Triton kernels of feature KD (SPEC §2).

Rows are processed in chunks (about 64 MB of float32 ``dL/dy`` per chunk on GPU). Per chunk:

1. ``_feature_fwd_kernel``: program (i, j) takes ``BM`` rows and the j-th range of teacher
   channels (:func:`column_splits`: a 4096-row chunk is 64 row blocks, so the channels are split
   until the grid has at least 4 blocks per SM) and sweeps it tile by tile; each ``[BM, BN]``
   tile of ``y = x W^T + b`` is produced by ``tl.dot`` over the student channels and immediately
   reduced against the teacher tile and turned into ``dL/dy`` (and ``dL/dt``). The row sums are
   written per split and added by the caller. MSE needs one launch; cosine stashes ``y`` in the
   chunk buffer in a first launch (partial y.t, y.y, t.t) and turns it into ``dL/dy`` in a
   second one, once the row totals are known.
2. ``_feature_dx_kernel``: ``grad_x[chunk] = dL/dy W`` (``tl.dot`` tiles).
3. ``_feature_dw_kernel``: ``grad_W += dL/dy^T x[chunk]`` and ``grad_b += colsum(dL/dy)``; each
   program owns one ``[BN, BK]`` tile of the float32 ``grad_W`` and walks down the chunk's rows,
   so there are no atomics and the result is deterministic.

Rows are addressed as ``(p, q)`` in a ``[P, C, Q]`` view, so channel-last features (``Q = 1``) and
NCHW maps (channel stride ``H*W``) are both read in place.

GEMM precision (:func:`gemm_operands`): features and weight are taken in their common dtype
(``torch.promote_types``), as ``F.linear`` on inputs cast to one dtype would compute. bf16/fp16
pairs run on tensor cores with float32 accumulation (``dL/dy`` is rounded to that dtype before
the two gradient GEMMs, as ``nn.Linear``'s backward does). Every other pair - float32, and e.g.
bf16 features with a float32 weight - is a float32 GEMM that follows torch's float32 matmul
setting like ``nn.Linear``: full IEEE float32 on the CUDA cores by default (no tensor cores),
TF32 tensor cores when ``torch.backends.cuda.matmul.allow_tf32`` /
``torch.set_float32_matmul_precision("high")`` allow it. Tiles per path: :func:`kernel_tiles`;
resources per configuration: ``benchmarks/results/resources-triton.md``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._triton_launch import launch, sm_count
from fastkd.feature.reference import COSINE_EPS

_DOT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _cast(v, DOT: tl.constexpr):
    """tl.dot operand: 0 float32, 1 bf16, 2 fp16, 3 bf16-rounded values held in float32."""
    if DOT == 1:
        return v.to(tl.bfloat16)
    elif DOT == 2:
        return v.to(tl.float16)
    elif DOT == 3:
        return v.to(tl.bfloat16).to(tl.float32)
    else:
        return v.to(tl.float32)


@triton.jit
def _row_offsets(r, Q, s_p, s_q):
    p = r // Q
    q = r - p * Q
    return p * s_p + q * s_q


@triton.jit
def _y_tile(x_ptr, x_row, sx_c, w_ptr, sw_n, sw_k, b_ptr, offs_n, n_mask, m_mask, Ds,
            ADAPTER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
            PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """[BM, BN] float32 tile of y = x W^T + b (or of x itself without an adapter)."""
    if ADAPTER:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, Ds, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_mask = offs_k < Ds
            xt = tl.load(x_ptr + x_row[:, None] + offs_k[None, :] * sx_c,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_n[None, :] * sw_n + offs_k[:, None] * sw_k,
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(_cast(xt, DOT), _cast(wt, DOT), acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        return acc
    else:
        return tl.load(x_ptr + x_row[:, None] + offs_n[None, :] * sx_c,
                       mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _feature_fwd_kernel(
        x_ptr, sx_p, sx_c, sx_q, w_ptr, sw_n, sw_k, b_ptr, t_ptr, st_p, st_c, st_q,
        part_ptr, stats_ptr, loss_ptr, rs_ptr, gyrs_ptr, g_ptr, gx_ptr, sgx_p, sgx_c, sgx_q,
        gt_ptr, sgt_p, sgt_c, sgt_q,
        r0, n_rows, Q, Ds, Dt, n_cols, n_part, scale, gy_scale, eps,
        LOSS: tl.constexpr, PHASE: tl.constexpr, ADAPTER: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RS: tl.constexpr, WRITE_LOSS: tl.constexpr,
        WRITE_G: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GT: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program (i, j): rows [i BM, (i + 1) BM) of the chunk, teacher channels
    [j n_cols, (j + 1) n_cols).

    PHASE 0: MSE: partial row sums of (y - t)^2 -> part[j, 0, row], and dL/dy, dL/dx (no
    adapter), dL/dt. Cosine: partial row sums of y.t, y.y, t.t -> part[j, k, row] (k = 0, 1, 2),
    and y stashed in the dL/dy buffer. PHASE 1 (cosine): from the totals stats[k, row] (the partials
    summed over j by the caller), the row loss (programs j = 0) and the gradients.
    """
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_lo = pid_n * n_cols
    n_hi = tl.minimum(n_lo + n_cols, Dt)
    offs_m = pid * BM + tl.arange(0, BM)
    m_mask = offs_m < n_rows
    r = offs_m.to(tl.int64) + r0
    x_row = _row_offsets(r, Q, sx_p, sx_q)
    t_row = _row_offsets(r, Q, st_p, st_q)
    gx_row = _row_offsets(r, Q, sgx_p, sgx_q)
    gt_row = _row_offsets(r, Q, sgt_p, sgt_q)
    g_row = offs_m.to(tl.int64) * Dt
    # s: the true gradient scale (dL/dx without adapter, dL/dt); sy: the scale of the dL/dy
    # buffer, kept O(1) for the half GEMMs (the rest is applied after them, see the caller).
    if HAS_RS:
        s = scale * tl.load(rs_ptr + r, mask=m_mask, other=0.0)
        sy = gy_scale * tl.load(gyrs_ptr + r, mask=m_mask, other=0.0)
    else:
        s = tl.zeros([BM], dtype=tl.float32) + scale
        sy = tl.zeros([BM], dtype=tl.float32) + gy_scale
    if PHASE == 0:
        acc0 = tl.zeros([BM], dtype=tl.float32)
        acc1 = tl.zeros([BM], dtype=tl.float32)
        acc2 = tl.zeros([BM], dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_mask = offs_n < n_hi
            tm = m_mask[:, None] & n_mask[None, :]
            y = _y_tile(x_ptr, x_row, sx_c, w_ptr, sw_n, sw_k, b_ptr, offs_n, n_mask, m_mask, Ds,
                        ADAPTER, HAS_BIAS, DOT, PREC, BM, BN, BK)
            tv = tl.load(t_ptr + t_row[:, None] + offs_n[None, :] * st_c, mask=tm,
                         other=0.0).to(tl.float32)
            if LOSS == 0:
                d = tl.where(tm, y - tv, 0.0)
                acc0 += tl.sum(d * d, axis=1)
                if WRITE_G:
                    tl.store(g_ptr + g_row[:, None] + offs_n[None, :], d * (2.0 * sy)[:, None],
                             mask=tm)
                if WRITE_GX or WRITE_GT:
                    g = d * (2.0 * s)[:, None]
                    if WRITE_GX:
                        tl.store(gx_ptr + gx_row[:, None] + offs_n[None, :] * sgx_c, g, mask=tm)
                    if WRITE_GT:
                        tl.store(gt_ptr + gt_row[:, None] + offs_n[None, :] * sgt_c, -g, mask=tm)
            else:
                y = tl.where(tm, y, 0.0)
                acc0 += tl.sum(y * tv, axis=1)
                acc1 += tl.sum(y * y, axis=1)
                acc2 += tl.sum(tv * tv, axis=1)
                if WRITE_G:  # stash y; phase 1 turns it into dL/dy
                    tl.store(g_ptr + g_row[:, None] + offs_n[None, :], y, mask=tm)
        if LOSS == 0:
            if WRITE_LOSS:
                tl.store(part_ptr + pid_n * n_part + offs_m, acc0, mask=m_mask)
        else:
            part = part_ptr + pid_n * 3 * n_part + offs_m
            tl.store(part, acc0, mask=m_mask)
            tl.store(part + n_part, acc1, mask=m_mask)
            tl.store(part + 2 * n_part, acc2, mask=m_mask)
    else:
        yt = tl.load(stats_ptr + offs_m, mask=m_mask, other=0.0)
        yy = tl.load(stats_ptr + n_part + offs_m, mask=m_mask, other=0.0)
        tt = tl.load(stats_ptr + 2 * n_part + offs_m, mask=m_mask, other=0.0)
        norm = tl.sqrt(yy) * tl.sqrt(tt)
        big = norm > eps
        # Clamp active (|y||t| <= eps): cos = y.t / eps and the norms get no derivative.
        inv = 1.0 / tl.where(big, norm, eps)
        cos = yt * inv
        ay = tl.where(big, cos / tl.where(big, yy, 1.0), 0.0)
        at = tl.where(big, cos / tl.where(big, tt, 1.0), 0.0) * s
        if WRITE_LOSS:
            tl.store(loss_ptr + r, 1.0 - cos, mask=m_mask & (pid_n == 0))
        for n0 in range(n_lo, n_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_mask = offs_n < n_hi
            tm = m_mask[:, None] & n_mask[None, :]
            if WRITE_G:
                y = tl.load(g_ptr + g_row[:, None] + offs_n[None, :], mask=tm, other=0.0)
            else:
                y = _y_tile(x_ptr, x_row, sx_c, w_ptr, sw_n, sw_k, b_ptr, offs_n, n_mask,
                            m_mask, Ds, ADAPTER, HAS_BIAS, DOT, PREC, BM, BN, BK)
            tv = tl.load(t_ptr + t_row[:, None] + offs_n[None, :] * st_c, mask=tm,
                         other=0.0).to(tl.float32)
            g = y * ay[:, None] - tv * inv[:, None]  # dL/dy before its scale
            if WRITE_G:
                tl.store(g_ptr + g_row[:, None] + offs_n[None, :], g * sy[:, None], mask=tm)
            if WRITE_GX:
                tl.store(gx_ptr + gx_row[:, None] + offs_n[None, :] * sgx_c, g * s[:, None],
                         mask=tm)
            if WRITE_GT:
                gt = tv * at[:, None] - y * (inv * s)[:, None]
                tl.store(gt_ptr + gt_row[:, None] + offs_n[None, :] * sgt_c, gt, mask=tm)


@triton.jit
def _feature_dx_kernel(g_ptr, w_ptr, sw_n, sw_k, gx_ptr, sgx_p, sgx_c, sgx_q, m_ptr,
                       r0, n_rows, Q, Ds, Dt, alpha,
                       HAS_M: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < n_rows
    r = offs_m.to(tl.int64) + r0
    gx_row = _row_offsets(r, Q, sgx_p, sgx_q)
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_mask = offs_k < Ds
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in range(0, Dt, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < Dt
        g = tl.load(g_ptr + offs_m[:, None] * Dt + offs_n[None, :],
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(_cast(g, DOT), _cast(w, DOT), acc, input_precision=PREC)
    acc = acc * alpha
    if HAS_M:
        acc = acc * tl.load(m_ptr)
    tl.store(gx_ptr + gx_row[:, None] + offs_k[None, :] * sgx_c, acc,
             mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _feature_dw_kernel(g_ptr, x_ptr, sx_p, sx_c, sx_q, gw_ptr, gb_ptr,
                       r0, n_rows, Q, Ds, Dt,
                       NEED_W: tl.constexpr, NEED_B: tl.constexpr, DOT: tl.constexpr,
                       PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < Dt
    offs_k = pid_k * BK + tl.arange(0, BK)
    k_mask = offs_k < Ds
    w_mask = n_mask[:, None] & k_mask[None, :]
    w_offs = offs_n[:, None] * Ds + offs_k[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    bacc = tl.zeros([BN], dtype=tl.float32)
    for m0 in range(0, n_rows, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_mask = offs_m < n_rows
        g = tl.load(g_ptr + offs_m[:, None] * Dt + offs_n[None, :],
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if NEED_W:
            r = offs_m.to(tl.int64) + r0
            x_row = _row_offsets(r, Q, sx_p, sx_q)
            xt = tl.load(x_ptr + x_row[:, None] + offs_k[None, :] * sx_c,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(_cast(g, DOT)), _cast(xt, DOT), acc, input_precision=PREC)
        if NEED_B:
            bacc += tl.sum(g, axis=0)
    if NEED_W:
        acc += tl.load(gw_ptr + w_offs, mask=w_mask, other=0.0)
        tl.store(gw_ptr + w_offs, acc, mask=w_mask)
    if NEED_B:
        if pid_k == 0:
            bacc += tl.load(gb_ptr + offs_n, mask=n_mask, other=0.0)
            tl.store(gb_ptr + offs_n, bacc, mask=n_mask)


def _auto_chunk_rows(teacher_dim: int, interpret: bool) -> int:
    if interpret:
        return 4096
    return max(256, (1 << 24) // max(teacher_dim, 1))


def fp32_dot_precision() -> str:
    """``"tf32"`` when torch lets float32 CUDA matmuls use TF32 (``allow_tf32``,
    ``set_float32_matmul_precision("high"/"medium")`` or ``fp32_precision = "tf32"``), else
    ``"ieee"`` (torch's default: full float32)."""
    mm = torch.backends.cuda.matmul
    prec = getattr(mm, "fp32_precision", None)
    if prec is None:  # torch before the fp32_precision API
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if prec == "none":  # inherits the global setting
        prec = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if prec == "tf32" else "ieee"


def gemm_operands(x_dtype, w_dtype, on_cpu: bool, precision=None):
    """``(DOT, PREC)``: the ``tl.dot`` operand type and float32 precision of the adapter GEMMs.

    The operands are cast to the common dtype of features and weight (``torch.promote_types``,
    what ``F.linear(x.to(c), W.to(c))`` would compute): bf16 with bf16 or fp16 with fp16 stay half
    (tensor cores, float32 accumulation); any other pair, e.g. bf16 features with a float32 weight,
    is float32 - exact for the half features. Float32 GEMMs follow torch's float32 matmul setting
    like ``nn.Linear`` (``precision`` overrides it): ``"ieee"`` (default) is full float32 on the
    CUDA cores, ``"tf32"`` uses TF32 tensor cores. Under autocast the caller has already cast the
    weight to the autocast dtype (:func:`fastkd.feature.ops.autocast_gemm_dtype`).
    """
    common = torch.promote_types(x_dtype, w_dtype)
    dot = _DOT_CODES.get(common, 0)
    prec = "tf32" if dot else (precision or fp32_dot_precision())
    if on_cpu and dot == 1:
        # The interpreter's tl.dot on bf16 operands is wrong (triton 3.x): emulate it exactly
        # (bf16 x bf16 products are exact in float32, accumulation is float32 either way).
        return 3, "ieee"
    return dot, prec


def kernel_tiles(dot: int, prec: str, on_cpu: bool) -> dict:
    """Tiles per kernel: ``{"fwd"|"dx"|"dw": (BM, BN, BK, num_warps, num_stages)}``.

    Tensor cores (half operands or TF32): 64 x 64 output tiles, k-steps of 32, 3 stages
    (``mma`` on sm_80, ``wgmma`` on sm_90); 4 warps for the two gradient GEMMs, 8 for the forward
    kernel, whose epilogue holds the y, t and gradient tiles and their addresses (at 4 warps it
    needed 200-255 registers and spilled up to 548 bytes). Full float32 (``"ieee"``) runs
    ``tl.dot`` as FMAs on the CUDA cores, where each thread keeps its rows of A and columns of B
    over the whole k-step in registers: k-steps of 8 (at 32, ``_feature_dw_kernel`` spilled
    about 4 KB per thread and ``_feature_dx_kernel`` about 90 bytes), 8 warps for the forward
    kernel and for dx (whose NCHW stores needed 246 registers at 4), 4 for dw. The k dimension
    is BK in ``fwd``, BN in ``dx`` (teacher channels) and BM in ``dw`` (rows). Interpreter: 64
    everywhere (its cost is per tile operation), 1 warp, 1 stage.
    """
    if on_cpu:
        t = (64, 64, 64, 1, 1)
        return {"fwd": t, "dx": t, "dw": t}
    if dot in (1, 2) or prec == "tf32":
        t = (64, 64, 32, 4, 3)
        return {"fwd": (64, 64, 32, 8, 3), "dx": t, "dw": t}
    return {"fwd": (64, 64, 8, 8, 2), "dx": (64, 8, 64, 8, 2), "dw": (8, 64, 64, 4, 2)}


def column_splits(row_blocks: int, teacher_dim: int, bn: int, sms: int):
    """``(splits, columns per split)`` of the forward grid ``(row_blocks, splits)``.

    A chunk of 4096 rows is 64 row blocks, under half of an H100's 132 SMs; the teacher channels
    are therefore split between programs, in equal numbers of ``bn`` tiles, aiming at 4 blocks
    per SM (at least 2, unless every program is down to one tile): 4096 rows x 4096 channels
    on 132 SMs -> 8 splits of 512 channels, 512 blocks. Each split re-reads its rows of x
    (from L2).
    """
    tiles = triton.cdiv(teacher_dim, bn)
    want = min(tiles, max(1, triton.cdiv(4 * sms, row_blocks)))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per * bn


def feature_kd_forward(x3, t3, weight, bias, loss_id: int, scale: float, row_scale,
                       compute_loss: bool, need_x: bool, need_w: bool, need_b: bool,
                       need_t: bool, chunk_rows: int = 0, dot_precision=None, col_splits=None):
    """Same contract as the extension's ``feature_kd_forward`` (see csrc/glue/feature.h).

    ``x3``: ``[P, Ds, Q]``, ``t3``: ``[P, Dt, Q]`` (any strides); ``weight`` ``[Dt, Ds]`` and
    ``bias`` ``[Dt]`` or None. Returns (raw row losses ``[P*Q]`` float32 or None, grad_x
    ``[P, Ds, Q]``, grad_w ``[Dt, Ds]`` float32, grad_b ``[Dt]`` float32, grad_t ``[P, Dt, Q]``).
    ``dot_precision``: ``"ieee"``/``"tf32"`` for float32 GEMMs (default: torch's setting, see
    :func:`gemm_operands`); ``col_splits``: teacher-channel splits of the forward grid (default:
    :func:`column_splits`).
    """
    P, Ds, Q = x3.shape
    Dt = t3.shape[1]
    rows = P * Q
    dev = x3.device
    f32 = dict(dtype=torch.float32, device=dev)
    row_loss = torch.empty(rows, **f32) if compute_loss else None
    grad_x = torch.empty((P, Ds, Q), dtype=x3.dtype, device=dev) if need_x else None
    grad_t = torch.empty((P, Dt, Q), dtype=t3.dtype, device=dev) if need_t else None
    grad_w = torch.zeros((Dt, Ds), **f32) if need_w else None
    grad_b = torch.zeros(Dt, **f32) if need_b else None
    if rows == 0:
        return row_loss, grad_x, grad_w, grad_b, grad_t
    adapter = weight is not None
    interpret = dev.type == "cpu"
    dot, prec = gemm_operands(x3.dtype, weight.dtype if adapter else x3.dtype, interpret,
                              dot_precision)
    tiles = kernel_tiles(dot, prec, interpret)
    bm, bn, bk, warps, stages = tiles["fwd"]
    chunk = chunk_rows if chunk_rows > 0 else _auto_chunk_rows(Dt, interpret)
    chunk = min(chunk, rows)
    need_gy = adapter and (need_x or need_w or need_b)
    gbuf = torch.empty((chunk, Dt), **f32) if need_gy else None
    rs = row_scale.to(torch.float32).contiguous() if row_scale is not None else None
    # The dL/dy buffer is kept at O(1) magnitude: without `scale` (1/(N*D) for an MSE mean) and
    # with the row scales divided by their largest magnitude (a device scalar, no host sync), so
    # that rounding it to float16 for tl.dot cannot underflow; both factors are applied to the
    # GEMM outputs instead.
    rs_max = rs_norm = None
    if rs is not None and need_gy:
        rs_max = rs.abs().amax().clamp_min(1e-30).reshape(1)
        rs_norm = rs / rs_max
    sms = sm_count(dev)
    plan = []  # (first row, rows, splits, columns per split) per chunk
    for r0 in range(0, rows, chunk):
        rc = min(chunk, rows - r0)
        if col_splits is not None:
            per = triton.cdiv(triton.cdiv(Dt, bn), max(1, int(col_splits))) * bn
            splits = triton.cdiv(Dt, per)
        else:
            splits, per = column_splits(triton.cdiv(rc, bm), Dt, bn, sms)
        plan.append((r0, rc, splits, per))
    # Row partials of the loss terms, one set per split (cosine: y.t, y.y, t.t).
    part = torch.empty((max(p[2] for p in plan), 3 if loss_id == 1 else 1, chunk), **f32)
    stats = torch.empty((3, chunk), **f32) if loss_id == 1 else part
    dummy = x3
    w = weight if adapter else dummy
    sw = (weight.stride(0), weight.stride(1)) if adapter else (0, 0)
    gx = grad_x if grad_x is not None else dummy
    sgx = grad_x.stride() if grad_x is not None else (0, 0, 0)
    gt = grad_t if grad_t is not None else dummy
    sgt = grad_t.stride() if grad_t is not None else (0, 0, 0)
    for r0, rc, splits, per in plan:
        row_blocks = triton.cdiv(rc, bm)
        args = (x3, *x3.stride(), w, *sw, bias if bias is not None else dummy,
                t3, *t3.stride(), part, stats, row_loss if row_loss is not None else dummy,
                rs if rs is not None else dummy,
                # (HAS_RS loads this row scale too: without a dL/dy buffer it is unused, but it
                # must be float32 - the interpreter cannot make the bf16 `other` of a bf16 dummy.)
                rs_norm if rs_norm is not None else (rs if rs is not None else dummy),
                gbuf if gbuf is not None else dummy,
                gx, *sgx, gt, *sgt, r0, rc, Q, Ds, Dt)
        flags = dict(LOSS=loss_id, ADAPTER=adapter, HAS_BIAS=bias is not None,
                     HAS_RS=rs is not None, WRITE_G=need_gy, WRITE_GX=need_x and not adapter,
                     WRITE_GT=need_t, DOT=dot, PREC=prec, BM=bm, BN=bn, BK=bk,
                     num_warps=warps, num_stages=stages)
        launch(_feature_fwd_kernel, (row_blocks, splits), *args, per, chunk, float(scale),
               1.0, COSINE_EPS, PHASE=0, WRITE_LOSS=compute_loss, **flags)
        if loss_id == 0:
            if compute_loss:
                row_loss[r0:r0 + rc] = part[:splits, 0, :rc].sum(0)
        else:
            stats[:, :rc] = part[:splits, :, :rc].sum(0)
            grads = need_gy or need_x or need_t
            # Without gradients phase 1 only writes the loss: one program per row block.
            s1, per1 = (splits, per) if grads else (1, 0)
            launch(_feature_fwd_kernel, (row_blocks, s1), *args, per1, chunk, float(scale),
                   1.0, COSINE_EPS, PHASE=1, WRITE_LOSS=compute_loss, **flags)
        if need_gy and need_x:
            bm_x, bn_x, bk_x, warps_x, stages_x = tiles["dx"]
            launch(_feature_dx_kernel, (triton.cdiv(rc, bm_x), triton.cdiv(Ds, bk_x)),
                   gbuf, weight, *sw, grad_x, *sgx, rs_max if rs_max is not None else dummy,
                   r0, rc, Q, Ds, Dt, float(scale), HAS_M=rs_max is not None, DOT=dot,
                   PREC=prec, BM=bm_x, BN=bn_x, BK=bk_x, num_warps=warps_x,
                   num_stages=stages_x)
        if need_gy and (need_w or need_b):
            bm_w, bn_w, bk_w, warps_w, stages_w = tiles["dw"]
            launch(_feature_dw_kernel,
                   (triton.cdiv(Dt, bn_w), triton.cdiv(Ds, bk_w) if need_w else 1),
                   gbuf, x3, *x3.stride(), grad_w if need_w else dummy,
                   grad_b if need_b else dummy, r0, rc, Q, Ds, Dt,
                   NEED_W=need_w, NEED_B=need_b, DOT=dot, PREC=prec, BM=bm_w, BN=bn_w,
                   BK=bk_w, num_warps=warps_w, num_stages=stages_w)
    for g in (grad_w, grad_b) if need_gy else ():
        if g is not None:
            g.mul_(scale)
            if rs_max is not None:
                g.mul_(rs_max)
    return row_loss, grad_x, grad_w, grad_b, grad_t
