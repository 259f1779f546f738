"""Triton kernels of relation KD (SPEC §3), the same blocked algorithm as the CUDA/CPU kernels.

SP, RKD-distance, PKT: one program per block of BLOCK_M rows walks over the column blocks and
computes the Gram tiles on the fly with ``tl.dot`` (tensor cores for bfloat16/float16 features;
float32 features use IEEE float32 dots, so the 1e-5 accuracy holds). ``_stats_kernel`` (sweep 1)
reduces them to row statistics; ``_grad_kernel`` (sweep 2) forms the loss partials and the
weight tile W and accumulates W @ X for its BLOCK_D output columns, so dL/dG exists only as one
register tile. A program covers BLOCK_D gradient columns; wider features use more programs per
row block, each recomputing the Gram tiles (cheaper than holding a [BLOCK_M, d] accumulator).
While rows x gradient-column blocks are fewer than 4 per SM (B = 1024: 32 row blocks), the
column loop of both sweeps is split between programs (:func:`column_splits`) and the caller adds
the partial sums. Float32 features: the Gram dots run as IEEE FMAs in k-steps of 8, and the
W @ x dot over column tiles of 16, so that the float32 kernels do not spill.
The teacher-side gradient is a second launch with the roles of the two sides swapped (SP and
RKD are symmetric in them; PKT switches its formula with TEACHER).

RKD angle: the B x B Gram and inverse-distance matrices come from torch; ``_angle_t_kernel``
(program tile over (i, k), loop over anchors j) and ``_angle_r_kernel`` (tile over (j, i), loop
over k) produce the O(B^2) accumulators of csrc/include/fastkd/relation_kd.h.

The formulas and the final assembly are those of csrc/glue/relation.h (see the comments there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd._triton_launch import launch, sm_count
from fastkd.relation.reference import DIST_CLAMP
from fastkd.relation.reference import SP_NORM_CLAMP as NORM_CLAMP

SP, RKD, PKT = 0, 1, 2
COINCIDENT = 2.0 ** -20  # relative threshold of coincident rows, as kRelCoincident

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32
ANGLE_BLOCK = 32


@triton.jit
def _gram_steps(x_ptr, stride, rows_i, rows_j, mask_i, mask_j, D, acc, KS: tl.constexpr,
                IEEE: tl.constexpr):
    for k0 in range(0, D, KS):
        ks = k0 + tl.arange(0, KS)
        km = ks < D
        a = tl.load(x_ptr + rows_i[:, None] * stride + ks[None, :],
                    mask=mask_i[:, None] & km[None, :], other=0.0)
        b = tl.load(x_ptr + rows_j[None, :] * stride + ks[:, None],
                    mask=mask_j[None, :] & km[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gram(x_ptr, stride, rows_i, rows_j, mask_i, mask_j, D,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
          FK: tl.constexpr):
    """G[i, j] = x_i . x_j for a BM x BN tile, float32 accumulation. IEEE float32 dots run as
    FMAs, each thread holding its rows and columns over a whole k-step: steps of FK (8 on GPU;
    at 32 the fp32 kernels needed 168-242 registers on sm_80), else BK."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if IEEE:
        acc = _gram_steps(x_ptr, stride, rows_i, rows_j, mask_i, mask_j, D, acc, FK, True)
    else:
        acc = _gram_steps(x_ptr, stride, rows_i, rows_j, mask_i, mask_j, D, acc, BK, False)
    return acc


@triton.jit
def _distance(g, ni, nj):
    """(d, coincident) for i != j; NaN in g or n propagates to d."""
    q = ni + nj - 2.0 * g
    thr = tl.maximum((ni + nj) * 9.5367431640625e-07, 1e-12)
    coincident = q <= thr
    d = tl.where(coincident, 1e-6, tl.sqrt_rn(tl.where(coincident, 1.0, q)))
    return d, coincident


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x (Goldberg): log(u) * x / (u - 1) with u = 1 + x.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _smooth_l1(r):
    a = tl.abs(r)
    return tl.where(a < 1.0, 0.5 * r * r, a - 0.5)


@triton.jit
def _clamp_unit(r):
    return tl.where(r < -1.0, -1.0, tl.where(r > 1.0, 1.0, r))


@triton.jit
def _stats_kernel(xs_ptr, xt_ptr, stride_s, stride_t, B, DS, DT, aux_s_ptr, aux_t_ptr,
                  out_s_ptr, out_t_ptr, n_cols, LOSS: tl.constexpr, IEEE_S: tl.constexpr,
                  IEEE_T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  FK: tl.constexpr):
    """Sweep 1: SP row sums of G^2; RKD row sums of d (j != i); PKT row sums of c.

    Program (i, s) sums over the columns j in [s n_cols, (s + 1) n_cols) and writes its partial
    sums to out[s, rows] (``[splits, B]``)."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    j_lo = pid_s * n_cols
    j_hi = tl.minimum(j_lo + n_cols, B)
    rows_i = pid * BM + tl.arange(0, BM)
    mask_i = rows_i < B
    rows_i = rows_i.to(tl.int64)
    ai_s = tl.load(aux_s_ptr + rows_i, mask=mask_i, other=0.0)
    ai_t = tl.load(aux_t_ptr + rows_i, mask=mask_i, other=0.0)
    acc_s = tl.zeros((BM,), dtype=tl.float32)
    acc_t = tl.zeros((BM,), dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        rows_j = j0 + tl.arange(0, BN)
        mask_j = rows_j < j_hi
        rows_j = rows_j.to(tl.int64)
        gs = _gram(xs_ptr, stride_s, rows_i, rows_j, mask_i, mask_j, DS, BM, BN, BK, IEEE_S, FK)
        gt = _gram(xt_ptr, stride_t, rows_i, rows_j, mask_i, mask_j, DT, BM, BN, BK, IEEE_T, FK)
        valid = mask_i[:, None] & mask_j[None, :]
        aj_s = tl.load(aux_s_ptr + rows_j, mask=mask_j, other=0.0)
        aj_t = tl.load(aux_t_ptr + rows_j, mask=mask_j, other=0.0)
        if LOSS == 0:
            vs = gs * gs
            vt = gt * gt
        elif LOSS == 1:
            valid = valid & (rows_i[:, None] != rows_j[None, :])
            vs, cs = _distance(gs, ai_s[:, None], aj_s[None, :])
            vt, ct = _distance(gt, ai_t[:, None], aj_t[None, :])
        else:
            vs = 0.5 * (gs * ai_s[:, None] * aj_s[None, :] + 1.0)
            vt = 0.5 * (gt * ai_t[:, None] * aj_t[None, :] + 1.0)
        acc_s += tl.sum(tl.where(valid, vs, 0.0), axis=1)
        acc_t += tl.sum(tl.where(valid, vt, 0.0), axis=1)
    tl.store(out_s_ptr + pid_s * B + rows_i, acc_s, mask=mask_i)
    tl.store(out_t_ptr + pid_s * B + rows_i, acc_t, mask=mask_i)


@triton.jit
def _grad_kernel(xa_ptr, xb_ptr, stride_a, stride_b, B, DA, DB, aux_a_ptr, aux_b_ptr,
                 st_a_ptr, st_b_ptr, scale, eps, loss_ptr, red1_ptr, red2_ptr, red3_ptr,
                 w_out_ptr, u_out_ptr, n_cols, LOSS: tl.constexpr, TEACHER: tl.constexpr,
                 NEED_GRAD: tl.constexpr, IEEE_A: tl.constexpr, IEEE_B: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                 FK: tl.constexpr):
    """Sweep 2 for side a (the side whose gradient is formed; b is the other side).

    aux: SP inverse row norms of G, RKD squared norms, PKT 1/(||x|| + eps); st: RKD 1/mu (one
    float), PKT row sums of c (SP: unused). Writes the row loss partials and red1..3 (SP: a;
    RKD: a, rowsum V, rowsum U; PKT: b) from the programs with pid_d == 0, and W @ x_a (RKD
    also U @ x_a) for the BD gradient columns of this program. Program (m, d, s) sums over the
    columns j in [s n_cols, (s + 1) n_cols) only and writes its partial sums to split s of every
    output (``[splits, B]``, ``[splits, B, DA]``).
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    j_lo = pid_s * n_cols
    j_hi = tl.minimum(j_lo + n_cols, B)
    rows_i = pid_m * BM + tl.arange(0, BM)
    mask_i = rows_i < B
    rows_i = rows_i.to(tl.int64)
    cols = pid_d * BD + tl.arange(0, BD)
    mask_d = cols < DA
    ai = tl.load(aux_a_ptr + rows_i, mask=mask_i, other=0.0)
    bi = tl.load(aux_b_ptr + rows_i, mask=mask_i, other=0.0)
    if LOSS == 1:
        inv_mu_a = tl.load(st_a_ptr)
        inv_mu_b = tl.load(st_b_ptr)
    if LOSS == 2:
        sa_i = tl.load(st_a_ptr + rows_i, mask=mask_i, other=1.0)
        sb_i = tl.load(st_b_ptr + rows_i, mask=mask_i, other=1.0)
    acc_w = tl.zeros((BM, BD), dtype=tl.float32)
    acc_u = tl.zeros((BM, BD), dtype=tl.float32)
    loss = tl.zeros((BM,), dtype=tl.float32)
    red1 = tl.zeros((BM,), dtype=tl.float32)
    red2 = tl.zeros((BM,), dtype=tl.float32)
    red3 = tl.zeros((BM,), dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        rows_j = j0 + tl.arange(0, BN)
        mask_j = rows_j < j_hi
        rows_j = rows_j.to(tl.int64)
        ga = _gram(xa_ptr, stride_a, rows_i, rows_j, mask_i, mask_j, DA, BM, BN, BK, IEEE_A, FK)
        gb = _gram(xb_ptr, stride_b, rows_i, rows_j, mask_i, mask_j, DB, BM, BN, BK, IEEE_B, FK)
        valid = mask_i[:, None] & mask_j[None, :]
        aj = tl.load(aux_a_ptr + rows_j, mask=mask_j, other=0.0)
        bj = tl.load(aux_b_ptr + rows_j, mask=mask_j, other=0.0)
        if LOSS == 0:
            d_ij = ga * ai[:, None] - gb * bi[:, None]
            elem = d_ij * d_ij
            red1 += tl.sum(tl.where(valid, d_ij * ga * ai[:, None], 0.0), axis=1)
            d_ji = ga * aj[None, :] - gb * bj[None, :]
            w = 2.0 * scale * (ai[:, None] * d_ij + aj[None, :] * d_ji)
            u = w
        elif LOSS == 1:
            valid = valid & (rows_i[:, None] != rows_j[None, :])
            da, ca = _distance(ga, ai[:, None], aj[None, :])
            db, cb = _distance(gb, bi[:, None], bj[None, :])
            r = da * inv_mu_a - db * inv_mu_b
            elem = _smooth_l1(r)
            h = _clamp_unit(r)
            u = tl.where(ca, 0.0, 1.0 / da)  # outside `valid` it is masked below
            w = h * u
            red1 += tl.sum(tl.where(valid, h * da * inv_mu_a, 0.0), axis=1)
            red2 += tl.sum(tl.where(valid, w, 0.0), axis=1)
            red3 += tl.sum(tl.where(valid, u, 0.0), axis=1)
        else:
            sa_j = tl.load(st_a_ptr + rows_j, mask=mask_j, other=1.0)
            sb_j = tl.load(st_b_ptr + rows_j, mask=mask_j, other=1.0)
            ca = 0.5 * (ga * ai[:, None] * aj[None, :] + 1.0)
            cb = 0.5 * (gb * bi[:, None] * bj[None, :] + 1.0)
            pa = ca / sa_i[:, None]
            pb = cb / sb_i[:, None]
            pa_j = ca / sa_j[None, :]  # P_ji
            pb_j = cb / sb_j[None, :]
            if TEACHER:  # a = teacher, b = student
                lg = _log1p((pa - pb) / (pb + eps))
                elem = pa * lg
                f = scale * (lg - eps / (pa + eps))  # dL/dPt - scale
                f_j = scale * (_log1p((pa_j - pb_j) / (pb_j + eps)) - eps / (pa_j + eps))
                red1 += tl.sum(tl.where(valid, f * pa, 0.0), axis=1)
                w = 0.5 * (f / sa_i[:, None] + f_j / sa_j[None, :]) * aj[None, :]
            else:  # a = student, b = teacher
                lg = _log1p((pb - pa) / (pa + eps))
                elem = pb * lg
                g = scale * (pa - pb + eps) / (pa + eps)  # dL/dPs + scale
                g_j = scale * (pa_j - pb_j + eps) / (pa_j + eps)
                red1 += tl.sum(tl.where(valid, g * pa, 0.0), axis=1)
                w = 0.5 * (g / sa_i[:, None] + g_j / sa_j[None, :]) * aj[None, :]
            u = w
        loss += tl.sum(tl.where(valid, elem, 0.0), axis=1)
        if NEED_GRAD:
            xj = tl.load(xa_ptr + rows_j[:, None] * stride_a + cols[None, :],
                         mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc_w = tl.dot(tl.where(valid, w, 0.0), xj, acc_w, input_precision="ieee")
            if LOSS == 1:
                acc_u = tl.dot(tl.where(valid, u, 0.0), xj, acc_u, input_precision="ieee")
    first = mask_i & (pid_d == 0)
    part = pid_s * B + rows_i
    tl.store(loss_ptr + part, loss, mask=first)
    tl.store(red1_ptr + part, red1, mask=first)
    if LOSS == 1:
        tl.store(red2_ptr + part, red2, mask=first)
        tl.store(red3_ptr + part, red3, mask=first)
    if NEED_GRAD:
        out = part[:, None] * DA + cols[None, :]
        omask = mask_i[:, None] & mask_d[None, :]
        tl.store(w_out_ptr + out, acc_w, mask=omask)
        if LOSS == 1:
            tl.store(u_out_ptr + out, acc_u, mask=omask)


@triton.jit
def _psi(gik, gjk, gij, gjj, rji, rjk):
    return ((gik - gjk) + (gjj - gij)) * rji * rjk


@triton.jit
def _angle_t_kernel(gs_ptr, gt_ptr, rds_ptr, rdt_ptr, ts_ptr, tt_ptr, B, scale,
                    NEED_S: tl.constexpr, NEED_T: tl.constexpr, BI: tl.constexpr,
                    BK: tl.constexpr):
    """t[i][k] = sum_j H_jik for a BI x BK tile of (i, k)."""
    ri = tl.program_id(0) * BI + tl.arange(0, BI)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mi = ri < B
    mk = rk < B
    m2 = mi[:, None] & mk[None, :]
    off = ri[:, None] * B + rk[None, :]
    gs_ik = tl.load(gs_ptr + off, mask=m2, other=0.0)
    gt_ik = tl.load(gt_ptr + off, mask=m2, other=0.0)
    acc_s = tl.zeros((BI, BK), dtype=tl.float32)
    acc_t = tl.zeros((BI, BK), dtype=tl.float32)
    for j in range(0, B):
        row = j * B
        gs_jj = tl.load(gs_ptr + row + j)
        gt_jj = tl.load(gt_ptr + row + j)
        gs_ji = tl.load(gs_ptr + row + ri, mask=mi, other=0.0)
        gt_ji = tl.load(gt_ptr + row + ri, mask=mi, other=0.0)
        rs_ji = tl.load(rds_ptr + row + ri, mask=mi, other=0.0)
        rt_ji = tl.load(rdt_ptr + row + ri, mask=mi, other=0.0)
        gs_jk = tl.load(gs_ptr + row + rk, mask=mk, other=0.0)
        gt_jk = tl.load(gt_ptr + row + rk, mask=mk, other=0.0)
        rs_jk = tl.load(rds_ptr + row + rk, mask=mk, other=0.0)
        rt_jk = tl.load(rdt_ptr + row + rk, mask=mk, other=0.0)
        ps = _psi(gs_ik, gs_jk[None, :], gs_ji[:, None], gs_jj, rs_ji[:, None], rs_jk[None, :])
        pt = _psi(gt_ik, gt_jk[None, :], gt_ji[:, None], gt_jj, rt_ji[:, None], rt_jk[None, :])
        h = _clamp_unit(ps - pt)
        acc_s += h * rs_ji[:, None] * rs_jk[None, :]
        acc_t -= h * rt_ji[:, None] * rt_jk[None, :]
    if NEED_S:
        tl.store(ts_ptr + off, scale * acc_s, mask=m2)
    if NEED_T:
        tl.store(tt_ptr + off, scale * acc_t, mask=m2)


@triton.jit
def _angle_r_kernel(gs_ptr, gt_ptr, rds_ptr, rdt_ptr, rs_ptr, es_ptr, rt_ptr, et_ptr, loss_ptr,
                    B, scale, NEED_S: tl.constexpr, NEED_T: tl.constexpr, BJ: tl.constexpr,
                    BI: tl.constexpr):
    """r[j][i], e[j][i] and the loss partials for a BJ x BI tile of (j, i)."""
    rj = tl.program_id(0) * BJ + tl.arange(0, BJ)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    mj = rj < B
    mi = ri < B
    m2 = mj[:, None] & mi[None, :]
    off = rj[:, None] * B + ri[None, :]
    gs_ji = tl.load(gs_ptr + off, mask=m2, other=0.0)
    gt_ji = tl.load(gt_ptr + off, mask=m2, other=0.0)
    rs_ji = tl.load(rds_ptr + off, mask=m2, other=0.0)
    rt_ji = tl.load(rdt_ptr + off, mask=m2, other=0.0)
    gs_jj = tl.load(gs_ptr + rj * B + rj, mask=mj, other=0.0)
    gt_jj = tl.load(gt_ptr + rj * B + rj, mask=mj, other=0.0)
    acc_rs = tl.zeros((BJ, BI), dtype=tl.float32)
    acc_es = tl.zeros((BJ, BI), dtype=tl.float32)
    acc_rt = tl.zeros((BJ, BI), dtype=tl.float32)
    acc_et = tl.zeros((BJ, BI), dtype=tl.float32)
    acc_l = tl.zeros((BJ, BI), dtype=tl.float32)
    for k in range(0, B):
        row = k * B  # row k of the symmetric matrices: g[k][i] = g_ik, g[k][j] = g_jk
        gs_ki = tl.load(gs_ptr + row + ri, mask=mi, other=0.0)
        gt_ki = tl.load(gt_ptr + row + ri, mask=mi, other=0.0)
        gs_kj = tl.load(gs_ptr + row + rj, mask=mj, other=0.0)
        gt_kj = tl.load(gt_ptr + row + rj, mask=mj, other=0.0)
        rs_kj = tl.load(rds_ptr + row + rj, mask=mj, other=0.0)
        rt_kj = tl.load(rdt_ptr + row + rj, mask=mj, other=0.0)
        ps = _psi(gs_ki[None, :], gs_kj[:, None], gs_ji, gs_jj[:, None], rs_ji, rs_kj[:, None])
        pt = _psi(gt_ki[None, :], gt_kj[:, None], gt_ji, gt_jj[:, None], rt_ji, rt_kj[:, None])
        d = ps - pt
        acc_l += _smooth_l1(d)
        h = _clamp_unit(d)
        acc_rs += h * rs_kj[:, None]
        acc_es += h * ps
        acc_rt += h * rt_kj[:, None]
        acc_et += h * pt
    if NEED_S:
        tl.store(rs_ptr + off, scale * rs_ji * acc_rs, mask=m2)
        tl.store(es_ptr + off, scale * acc_es, mask=m2)
    if NEED_T:
        tl.store(rt_ptr + off, -scale * rt_ji * acc_rt, mask=m2)
        tl.store(et_ptr + off, -scale * acc_et, mask=m2)
    part = tl.sum(tl.where(m2, acc_l, 0.0), axis=0)
    tl.store(loss_ptr + tl.program_id(0) * B + ri, part, mask=mi)


# --------------------------------------------------------------------------- host-side drivers
def _ieee(x):
    # float32 features: IEEE float32 dots (TF32 would break the 1e-5 accuracy). bfloat16/float16
    # use native dots (tensor cores, exact products, float32 sums), except under the CPU
    # interpreter, whose bf16 tl.dot misreads its operands (triton 3.8): there they are upcast.
    return x.dtype == torch.float32 or x.device.type == "cpu"


def _fma_k(device):
    # k-step of the IEEE float32 Gram dots; the interpreter's cost is per tile operation
    return BLOCK_K if device.type == "cpu" else 8


def _block_d(d):
    return min(128, max(16, triton.next_power_of_2(max(d, 1))))


def column_splits(other_blocks: int, b: int, sms: int):
    """``(splits, columns per split)``: the j loop of ``_stats_kernel`` / ``_grad_kernel`` is
    split between programs, in equal numbers of column tiles, aiming at 4 blocks per SM (at
    least 2, unless every program is down to one tile) for the grid ``other_blocks`` (row
    blocks x gradient-column blocks) x splits, e.g. B = 1024 on 132 SMs: 32 row blocks -> 16
    splits of 64 columns (512 blocks). The partial sums (``[splits, B]``, and ``[splits, B,
    d]`` for W @ x) are added by the caller; they stay under about 17 MB, as splitting only
    happens while B x d is small."""
    tiles = triton.cdiv(b, BLOCK_N)
    want = min(tiles, max(1, triton.cdiv(4 * sms, other_blocks)))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per * BLOCK_N


def _stats(loss_id, xs, xt, aux_s, aux_t):
    b = xs.shape[0]
    row_blocks = triton.cdiv(b, BLOCK_M)
    splits, n_cols = column_splits(row_blocks, b, sm_count(xs.device))
    out = torch.empty(2, splits, b, dtype=torch.float32, device=xs.device)
    launch(_stats_kernel, (row_blocks, splits), xs, xt, xs.stride(0), xt.stride(0), b,
           xs.shape[1], xt.shape[1], aux_s, aux_t, out[0], out[1], n_cols, LOSS=loss_id,
           IEEE_S=_ieee(xs), IEEE_T=_ieee(xt), BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
           FK=_fma_k(xs.device))
    sums = out.sum(1) if splits > 1 else out[:, 0]
    return sums[0], sums[1]


def _sweep2(loss_id, xa, xb, aux_a, aux_b, st_a, st_b, scale, eps, need_grad, teacher):
    """Returns (row_loss, red1, red2, red3, W @ xa or None, U @ xa or None)."""
    b, da = xa.shape
    f32 = dict(dtype=torch.float32, device=xa.device)
    bd = _block_d(da)
    row_blocks = triton.cdiv(b, BLOCK_M)
    d_blocks = triton.cdiv(da, bd) if need_grad and da > 0 else 1
    splits, n_cols = column_splits(row_blocks * d_blocks, b, sm_count(xa.device))
    # float32 features on GPU: column tiles of 16, as W @ x_a is an FMA dot over them (at 32,
    # the float32 kernels spilled 8-32 bytes at 128 registers).
    bn = BLOCK_N // 2 if xa.device.type != "cpu" and (_ieee(xa) or _ieee(xb)) else BLOCK_N
    rows = torch.empty(4, splits, b, **f32)  # row loss, red1, red2, red3 per split
    w_out = torch.empty(splits, b, da, **f32) if need_grad else rows
    u_out = torch.empty(splits, b, da, **f32) if need_grad and loss_id == RKD else rows
    st_a = rows if st_a is None else st_a
    st_b = rows if st_b is None else st_b
    launch(_grad_kernel, (row_blocks, d_blocks, splits), xa, xb, xa.stride(0), xb.stride(0), b,
           da, xb.shape[1], aux_a, aux_b, st_a, st_b, float(scale), float(eps), rows[0],
           rows[1], rows[2], rows[3], w_out, u_out, n_cols, LOSS=loss_id, TEACHER=teacher,
           NEED_GRAD=need_grad, IEEE_A=_ieee(xa), IEEE_B=_ieee(xb), BM=BLOCK_M, BN=bn,
           BK=BLOCK_K, BD=bd, FK=_fma_k(xa.device),
           num_warps=8)  # 8 warps: no register spills at BD = 128 (sm_90)

    def total(x):
        return x.sum(0) if splits > 1 else x[0]
    row_loss, red1, red2, red3 = total(rows.transpose(0, 1))
    if not need_grad:
        return row_loss, red1, red2, red3, None, None
    return (row_loss, red1, red2, red3, total(w_out),
            total(u_out) if loss_id == RKD else None)


def _features(x):
    """Row-major features the kernels can read with one row stride."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _gram_apply(x, y):
    """(x x^T) y without forming x x^T when d <= B."""
    if x.shape[1] <= x.shape[0]:
        return x @ (x.t() @ y)
    return (x @ x.t()) @ y


def sp_forward(student, teacher, need_s, need_t, *, scale):
    """(loss, grad_student or None, grad_teacher or None) of SP; see csrc/glue/relation.h."""
    xs, xt = _features(student), _features(teacher)
    unused = torch.zeros(xs.shape[0], dtype=torch.float32, device=xs.device)
    sq_s, sq_t = _stats(SP, xs, xt, unused, unused)
    norm_s, norm_t = sq_s.sqrt(), sq_t.sqrt()
    inv_s = norm_s.clamp_min(NORM_CLAMP).reciprocal()
    inv_t = norm_t.clamp_min(NORM_CLAMP).reciprocal()
    row_loss = None
    grads = []
    for side, need in ((0, need_s), (1, need_t)):
        if not need:
            grads.append(None)
            continue
        xa, xb, inv_a, inv_b, norm_a = (xs, xt, inv_s, inv_t, norm_s) if side == 0 else \
            (xt, xs, inv_t, inv_s, norm_t)
        row_loss, a, _, _, g, _ = _sweep2(SP, xa, xb, inv_a, inv_b, None, None, scale, 0.0,
                                          True, side == 1)
        x32 = xa.float()
        w = (a * inv_a * inv_a * (2.0 * scale)).masked_fill(norm_a < NORM_CLAMP, 0.0)[:, None]
        both = _gram_apply(x32, torch.cat([x32, w * x32], 1))
        d = x32.shape[1]
        g -= w * both[:, :d] + both[:, d:]
        grads.append(g.to(xa.dtype))
    if row_loss is None:
        row_loss = _sweep2(SP, xs, xt, inv_s, inv_t, None, None, scale, 0.0, False, False)[0]
    loss = (row_loss.sum(dtype=torch.float64) * scale).float()
    return loss, grads[0], grads[1]


def _inv_dist(g, n):
    nn = n[:, None] + n[None, :]
    q = nn - 2.0 * g
    coincident = q <= (nn * COINCIDENT).clamp_min(DIST_CLAMP)
    rd = q.rsqrt().masked_fill(coincident, 0.0)
    rd.fill_diagonal_(0.0)
    return rd


def rkd_forward(student, teacher, need_s, need_t, *, distance_scale, angle_scale):
    """(loss, grad_student or None, grad_teacher or None) of RKD; see csrc/glue/relation.h."""
    xs = student.float()
    xt = teacher.float()
    xs = (xs - xs.mean(0, keepdim=True)).contiguous()
    xt = (xt - xt.mean(0, keepdim=True)).contiguous()
    nrm_s, nrm_t = (xs * xs).sum(1), (xt * xt).sum(1)
    b = xs.shape[0]
    pairs = float(b) * float(b - 1)
    loss = torch.zeros((), dtype=torch.float64, device=xs.device)
    g32 = [torch.zeros_like(xs) if need_s else None, torch.zeros_like(xt) if need_t else None]
    if distance_scale != 0.0:
        dsum_s, dsum_t = _stats(RKD, xs, xt, nrm_s, nrm_t)
        inv_mu_s = (pairs / dsum_s.sum(dtype=torch.float64)).float().reshape(1)
        inv_mu_t = (pairs / dsum_t.sum(dtype=torch.float64)).float().reshape(1)
        row_loss = None
        for side, need in ((0, need_s), (1, need_t)):
            if not need:
                continue
            xa, xb, na, nb, ima, imb = (xs, xt, nrm_s, nrm_t, inv_mu_s, inv_mu_t) if side == 0 \
                else (xt, xs, nrm_t, nrm_s, inv_mu_t, inv_mu_s)
            row_loss, a, v, u, vx, ux = _sweep2(RKD, xa, xb, na, nb, ima, imb, 1.0, 0.0, True,
                                                side == 1)
            gh = v[:, None] * xa - vx
            gf = u[:, None] * xa - ux
            lam = (a.sum(dtype=torch.float64) / pairs).float()
            g32[side] += (gh - lam * gf) * (ima * (2.0 * distance_scale))
        if row_loss is None:
            row_loss = _sweep2(RKD, xs, xt, nrm_s, nrm_t, inv_mu_s, inv_mu_t, 1.0, 0.0, False,
                               False)[0]
        loss = loss + row_loss.sum(dtype=torch.float64) * distance_scale
    if angle_scale != 0.0:
        if b * b >= 2 ** 31:
            raise ValueError(f"student_features: the RKD angle term on the triton backend "
                             f"supports B < 46341, got B={b}")
        g_s, g_t = xs @ xs.t(), xt @ xt.t()
        rd_s, rd_t = _inv_dist(g_s, nrm_s), _inv_dist(g_t, nrm_t)
        f32 = dict(dtype=torch.float32, device=xs.device)
        dummy = torch.empty(1, **f32)
        t_s, r_s, e_s = (torch.empty(b, b, **f32) for _ in range(3)) if need_s else (dummy,) * 3
        t_t, r_t, e_t = (torch.empty(b, b, **f32) for _ in range(3)) if need_t else (dummy,) * 3
        nblk = triton.cdiv(b, ANGLE_BLOCK)
        loss_part = torch.empty(nblk, b, **f32)
        if need_s or need_t:
            launch(_angle_t_kernel, (nblk, nblk), g_s, g_t, rd_s, rd_t, t_s, t_t, b,
                   float(angle_scale), NEED_S=need_s, NEED_T=need_t, BI=ANGLE_BLOCK,
                   BK=ANGLE_BLOCK)
        launch(_angle_r_kernel, (nblk, nblk), g_s, g_t, rd_s, rd_t, r_s, e_s, r_t, e_t,
               loss_part, b, float(angle_scale), NEED_S=need_s, NEED_T=need_t, BJ=ANGLE_BLOCK,
               BI=ANGLE_BLOCK)
        loss = loss + loss_part.sum(dtype=torch.float64) * angle_scale
        for side, (t, r, e, rd, x) in enumerate(((t_s, r_s, e_s, rd_s, xs),
                                                 (t_t, r_t, e_t, rd_t, xt))):
            if g32[side] is None:
                continue
            z = e * rd * rd
            t = t - r - r.t()
            t.diagonal().add_(r.sum(1))
            t += 2.0 * z
            gn = -(z.sum(1) + z.sum(0))
            g32[side] += t @ x + t.t() @ x + 2.0 * gn[:, None] * x
    grads = [None if g is None else (g - g.mean(0, keepdim=True)).to(src.dtype)
             for g, src in zip(g32, (student, teacher))]
    return loss.float(), grads[0], grads[1]


def pkt_forward(student, teacher, need_s, need_t, *, eps, scale):
    """(loss, grad_student or None, grad_teacher or None) of PKT; see csrc/glue/relation.h."""
    xs, xt = _features(student), _features(teacher)
    norm_s, norm_t = xs.float().norm(dim=1), xt.float().norm(dim=1)
    inv_m_s, inv_m_t = (norm_s + eps).reciprocal(), (norm_t + eps).reciprocal()
    rsum_s, rsum_t = _stats(PKT, xs, xt, inv_m_s, inv_m_t)
    row_loss = None
    grads = []
    for side, need in ((0, need_s), (1, need_t)):
        if not need:
            grads.append(None)
            continue
        xa, xb, ima, imb, sa, sb, norm = (xs, xt, inv_m_s, inv_m_t, rsum_s, rsum_t, norm_s) \
            if side == 0 else (xt, xs, inv_m_t, inv_m_s, rsum_t, rsum_s, norm_t)
        row_loss, bb, _, _, ge, _ = _sweep2(PKT, xa, xb, ima, imb, sa, sb, scale, eps, True,
                                            side == 1)
        x32 = xa.float()
        beta = bb / (2.0 * sa)
        sigma = x32.t() @ ima
        tau = x32.t() @ (beta * ima)
        ge -= beta[:, None] * sigma[None, :] + tau[None, :]
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        proj = (ge * x32).sum(1) * ima * ima / safe
        grads.append((ge * ima[:, None] - proj[:, None] * x32).to(xa.dtype))
    if row_loss is None:
        row_loss = _sweep2(PKT, xs, xt, inv_m_s, inv_m_t, rsum_s, rsum_t, scale, eps, False,
                           False)[0]
    loss = (row_loss.sum(dtype=torch.float64) * scale).float()
    return loss, grads[0], grads[1]
