"""Triton pass of Universal Logit Distillation (SPEC §1d): the fused step after the sort.

The host (:mod:`fastkd.logit.uld`) sorts each row chunk of student and teacher logits in
decreasing order (``torch.sort``, or ``torch.topk`` with ``uld_top``) and says which rows are
live. Sorting logits sorts the probabilities (softmax is monotone), so the kernel reads the
sorted logits and turns them into sorted probabilities itself. One program per row:

(1) statistics over the full rows: student max, Z at T, Z1 at T = 1 and the count of the
    finite entries (hard CE, label smoothing); teacher max and Z at T. With label smoothing, one
    more sweep sums the finite student logits.
(2) one loop over the sorted positions j < L = max(L_s, L_t): b_j = q_(j), a_j = p_(j) (0 past
    a side's length: the zero padding), D = sum |b - a|, g_j = sign(b_j - a_j) (sign(0) = 0) and
    the row sums c_q = sum_j b_j g_j, c_p = -sum_j a_j g_j.
(3) gradients: dD/ds_v = (1/T) q_v (g_v - c_q), with g_v = 0 for an entry outside the top-L_s;
    teacher dD/dt_v = (1/T) p_v (-g_v - c_p). With ``uld_top`` smaller than V a dense sweep
    writes the unlisted value (g_v = 0, plus the hard CE term) everywhere, then, after a block
    barrier, the listed entries are written over it at their sort indices (the permutation
    scatter); without it only the scatter runs (every entry is listed). Rows that are not live
    get zeros and loss 0.

The same code runs compiled on a GPU and under ``TRITON_INTERPRET=1`` on CPU tensors; the math
is float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.logit.triton_kernel import (MAX_REGISTERS, _hard_grad, _launch_rows, _load_row,
                                        _max_sumexp, _scale_arg, _sign, _student_stats)


@triton.jit
def _finite_sum(row_ptr, hi, m, BLOCK_V: tl.constexpr):
    """Sum of (s - m) over the finite entries (label smoothing), m the row max."""
    lane = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, hi, BLOCK_V):
        offs = start + lane
        x = _load_row(row_ptr, offs, offs < hi)
        acc += tl.where(x != float("-inf"), x - m, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _sorted_probs(sv_row, tv_row, jj, Ls, Lt, ms, lzs, mt, lzt, inv_t):
    """(b, a, g, sv, tv) at sorted positions ``jj``: q_(j), p_(j) (0 past each side's length),
    g = sign(b - a) = dD/dq_(j), and the sorted logits."""
    sv = _load_row(sv_row, jj, jj < Ls)
    tv = _load_row(tv_row, jj, jj < Lt)
    b = tl.exp((sv - ms) * inv_t - lzs)
    a = tl.exp((tv - mt) * inv_t - lzt)
    return b, a, _sign(b - a), sv, tv


@triton.jit
def _write_grad(g_row, x_row, xi_row, V, L, live, m, lz, c, sv_row, tv_row, Ls, Lt, ms, lzs,
                mt, lzt, inv_t, cf, y, lz1, c1, hw, eps, STUDENT: tl.constexpr,
                TOP: tl.constexpr, HARD: tl.constexpr, SMOOTH: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One side's gradient row: cf x_v (h_v - c) with x = softmax(row / T), h = g (student) or
    -g (teacher) at the listed entries and 0 elsewhere, plus the hard CE term (student, HARD).

    A dense sweep writes the unlisted value (TOP: only the L largest are listed) or zeros (a
    row that is not live); after a block barrier the listed entries are written over it at
    their sort indices (the permutation scatter)."""
    lane = tl.arange(0, BLOCK_V)
    dense_hi = tl.where(live, 0, V)
    if TOP:
        dense_hi = V
    for start in range(0, dense_hi, BLOCK_V):
        offs = start + lane
        x = _load_row(x_row, offs, (offs < V) & live)
        gv = -cf * c * tl.exp((x - m) * inv_t - lz)
        if HARD:
            gv += hw * _hard_grad(x, offs, y, m, lz1, c1, eps, V, SMOOTH)
        tl.store(g_row + offs, tl.where(live, gv, 0.0).to(g_row.dtype.element_ty),
                 mask=offs < V)
    tl.debug_barrier()  # every thread's dense stores land before the listed ones
    kl = tl.arange(0, BLOCK_K)
    for j0 in range(0, tl.where(live, L, 0), BLOCK_K):
        jj = j0 + kl
        b, a, g, sv, tv = _sorted_probs(sv_row, tv_row, jj, Ls, Lt, ms, lzs, mt, lzt, inv_t)
        idx = tl.load(xi_row + jj, mask=jj < L, other=0)
        if STUDENT:
            gv = cf * b * (g - c)
            if HARD:
                gv += hw * _hard_grad(sv, idx, y, m, lz1, c1, eps, V, SMOOTH)
        else:
            gv = cf * a * (-g - c)
        tl.store(g_row + idx, gv.to(g_row.dtype.element_ty), mask=jj < L)


@triton.jit
def _uld_kernel(
    s_ptr, s_stride, t_ptr, t_stride, sv_ptr, si_ptr, tv_ptr, ti_ptr, live_ptr, tgt_ptr,
    loss_ptr, gs_ptr, gt_ptr, scale_ptr,
    Vs, Vt, Ls, Lt, inv_t, soft_factor, hard_weight, eps,
    HARD: tl.constexpr, SMOOTH: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    HAS_SCALE: tl.constexpr, TOP_S: tl.constexpr, TOP_T: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2^31
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    sv_row = sv_ptr + row * Ls
    tv_row = tv_ptr + row * Lt
    live = tl.load(live_ptr + row) != 0
    y = tl.load(tgt_ptr + row)

    # ---- (1) statistics over the full rows (nothing read on rows that are not live) ----------
    hi_s = tl.where(live, Vs, 0)
    ms, zs, z1, nf = _student_stats(s_row, hi_s, inv_t, HARD, SMOOTH, BLOCK_V)
    mt, zt = _max_sumexp(t_row, tl.where(live, Vt, 0), inv_t, BLOCK_V)
    # Rows that are not live read nothing: neutral statistics keep their lanes free of NaN.
    ms = tl.where(live, ms, 0.0)
    mt = tl.where(live, mt, 0.0)
    lzs = tl.log(tl.where(live, zs, 1.0))
    lzt = tl.log(tl.where(live, zt, 1.0))
    lz1 = tl.log(tl.where(live & HARD, z1, 1.0))

    # ---- (2) the sorted, zero-padded comparison --------------------------------------------
    kl = tl.arange(0, BLOCK_K)
    acc_d = tl.zeros([BLOCK_K], tl.float32)
    acc_q = tl.zeros([BLOCK_K], tl.float32)
    acc_p = tl.zeros([BLOCK_K], tl.float32)
    for j0 in range(0, tl.where(live, tl.maximum(Ls, Lt), 0), BLOCK_K):
        b, a, g, _, _ = _sorted_probs(sv_row, tv_row, j0 + kl, Ls, Lt, ms, lzs, mt, lzt,
                                      inv_t)
        acc_d += tl.abs(b - a)
        acc_q += b * g
        acc_p += a * g
    d_row = tl.sum(acc_d, axis=0)
    c_q = tl.sum(acc_q, axis=0)  # sum_u q_u g_u
    c_p = -tl.sum(acc_p, axis=0)  # sum_u p_u (-g_u)

    # ---- (3) gradients -----------------------------------------------------------------------
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    cf = soft_factor * inv_t * scale
    hw = hard_weight * scale
    c1 = 1.0 - eps + eps * nf.to(tl.float32) / Vs
    if NEED_S:
        _write_grad(gs_ptr + row * Vs, s_row, si_ptr + row * Ls, Vs, Ls, live, ms, lzs, c_q,
                    sv_row, tv_row, Ls, Lt, ms, lzs, mt, lzt, inv_t, cf, y, lz1, c1, hw, eps,
                    True, TOP_S, HARD, SMOOTH, BLOCK_V, BLOCK_K)
    if NEED_T:
        _write_grad(gt_ptr + row * Vt, t_row, ti_ptr + row * Lt, Vt, Lt, live, mt, lzt, c_p,
                    sv_row, tv_row, Ls, Lt, ms, lzs, mt, lzt, inv_t, cf, y, lz1, c1, hw, eps,
                    False, TOP_T, False, False, BLOCK_V, BLOCK_K)

    loss = soft_factor * d_row
    if HARD:
        s_y = tl.load(s_row + y, mask=live, other=0.0).to(tl.float32)
        ce = lz1 - (s_y - ms)
        if SMOOTH:
            # sum over finite v of -log q1_v = nf log Z1 - sum (s_v - m)
            ls = _finite_sum(s_row, hi_s, ms, BLOCK_V)
            ce = (1.0 - eps) * ce + eps * (nf.to(tl.float32) * lz1 - ls) / Vs
        loss += hard_weight * ce
    tl.store(loss_ptr + row, tl.where(live, loss, 0.0))


def launch_config(vocab: int, width: int, on_cpu: bool) -> dict:
    """``BLOCK_V`` (dense sweeps over V), ``BLOCK_K`` (sorted positions), ``num_warps``:
    interpreter, one chunk of up to 1024 lanes per step (numpy vectorises it); GPU, 4 warps
    of 8 elements per thread."""
    bv = triton.next_power_of_2(max(vocab, 2))
    bk = triton.next_power_of_2(max(width, 2))
    if on_cpu:
        return {"BLOCK_V": min(bv, 1024), "BLOCK_K": min(bk, 1024), "num_warps": 1}
    bv, bk = min(bv, 1024), min(bk, 1024)
    return {"BLOCK_V": bv, "BLOCK_K": bk, "num_warps": max(1, min(4, max(bv, bk) // 256)),
            "maxnreg": MAX_REGISTERS}


def uld_pass(s, t, sv, si, tv, ti, live, tgt, cfg, grad_scale, grad_s, grad_t):
    """Launch the fused pass on one row chunk.

    ``s`` ``[n, V_s]``, ``t`` ``[n, V_t]`` (unit stride along V), ``sv``/``si`` ``[n, L_s]`` the
    student logits sorted in decreasing order and their indices (contiguous; ``tv``/``ti``
    likewise), ``live`` ``[n]`` bool, ``tgt`` ``[n]`` int64 target in range (any value where not
    live) or None, ``grad_scale`` a one-element float32 tensor or None, ``grad_s``/``grad_t``
    contiguous ``[n, V]`` outputs (or None). Returns the float32 row losses ``[n]``.
    """
    n, vs = s.shape
    vt = t.shape[1]
    ls, lt = sv.shape[1], tv.shape[1]
    rows = torch.empty(n, dtype=torch.float32, device=s.device)
    if n == 0:
        return rows
    hard = tgt is not None and cfg.hard_weight != 0.0
    scale = _scale_arg(grad_scale, s.device)
    meta = dict(HARD=hard, SMOOTH=hard and cfg.label_smoothing != 0.0,
                NEED_S=grad_s is not None, NEED_T=grad_t is not None,
                HAS_SCALE=scale is not None, TOP_S=ls < vs, TOP_T=lt < vt,
                **launch_config(max(vs, vt), max(ls, lt), s.device.type == "cpu"))
    # Unused pointer slots point at real tensors; constexpr flags keep the kernel off them.
    args = (s, s.stride(0), t, t.stride(0), sv, si, tv, ti, live.to(torch.int8),
            tgt if tgt is not None else si, rows,
            grad_s if grad_s is not None else s, grad_t if grad_t is not None else t,
            scale if scale is not None else rows,
            vs, vt, ls, lt, 1.0 / cfg.temperature, float(cfg.soft_factor),
            float(cfg.hard_weight), float(cfg.label_smoothing))
    _launch_rows(_uld_kernel, s.device, n, args, meta)
    return rows
