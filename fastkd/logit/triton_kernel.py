"""Triton backend of fused logit KD (SPEC §1, §1c): one launch writes the row loss and gradients.

For every row r (student logits s, teachers t_i with normalised weights w_i, temperature T)::

    q = softmax(s / T),  p = sum_i w_i softmax(t_i / T)
    row_loss[r] = soft_factor * D(p, q) + hard_weight * CE(softmax(s), target[r], label_smoothing)

with D one of KL(p||q), KL(q||p), JSD_beta, TVD and soft_factor = soft_weight * T^2 (or
soft_weight without ``t2_scale``). The gradients d row_loss[r] / d s[r, :] and
d row_loss[r] / d t_i[r, :], multiplied by ``*grad_scale`` when given, are written in the same
launch. The math (and its order of evaluation) is the one of the CPU and CUDA kernels,
``csrc/include/fastkd/logit_kd.h``: subtract the raw row maximum before scaling by 1/T, online
(max, sum-exp) statistics, float32 accumulation, selects so that a zero probability contributes
exactly 0 (never 0 * inf = NaN).

Layout: one program per row (grid = N) loops over the vocabulary in ``BLOCK_V`` chunks:
(1) statistics of the student and of every teacher; (2) the row sums the gradient needs (and the
loss); (3) the gradients. For KL without a teacher gradient, (2) and (3) are one sweep. Several
teachers are a tuple of pointers indexed by a ``tl.static_range`` (unrolled at compile time);
their per-row statistics live in small ``[NT_PAD]`` register vectors. The same code runs compiled
on a GPU and under ``TRITON_INTERPRET=1`` on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_TEACHERS = 8
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_row(row_ptr, offs, mask):
    """One chunk of a row as float32; lanes past V read -inf (probability 0)."""
    return tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _pick(vec, tix, i):
    """vec[i] of a tiny register vector (i is a compile-time index)."""
    return tl.sum(tl.where(tix == i, vec, 0.0), axis=0)


@triton.jit
def _max_sumexp(row_ptr, hi, inv_t, BLOCK_V: tl.constexpr):
    """(m, Z): m = max_v x_v (raw), Z = sum_v exp((x_v - m) / T), merged online over chunks."""
    lane = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    for start in range(0, hi, BLOCK_V):
        offs = start + lane
        x = _load_row(row_ptr, offs, offs < hi)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # All -inf so far: shift by 0 so that exp(-inf - -inf) = NaN never appears.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp((m - ref) * inv_t) + tl.sum(tl.exp((x - ref) * inv_t), axis=0)
        m = m_new
    return m, z


@triton.jit
def _student_stats(row_ptr, hi, inv_t, HARD: tl.constexpr, SMOOTH: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """Student statistics: max m, Z at temperature T, Z1 at T = 1 (hard CE), nf = #{s_v != -inf}."""
    lane = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    z1 = tl.zeros((), tl.float32)
    nf = tl.zeros((), tl.int32)
    for start in range(0, hi, BLOCK_V):
        offs = start + lane
        x = _load_row(row_ptr, offs, offs < hi)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp((m - ref) * inv_t) + tl.sum(tl.exp((x - ref) * inv_t), axis=0)
        if HARD:
            z1 = z1 * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), axis=0)
        if SMOOTH:
            nf += tl.sum((x != float("-inf")).to(tl.int32), axis=0)
        m = m_new
    return m, z, z1, nf


@triton.jit
def _teacher_logp(t_ptrs, t_strides, row, i: tl.constexpr, offs, mask, mvec, lzvec, tix, inv_t):
    """log softmax(t_i / T) on one chunk (unweighted), from the row statistics of teacher i."""
    t = _load_row(t_ptrs[i] + row * t_strides[i], offs, mask)
    return (t - _pick(mvec, tix, i)) * inv_t - _pick(lzvec, tix, i)


@triton.jit
def _mixture_logp(t_ptrs, t_strides, t_weights, row, offs, mask, mvec, lzvec, tix, inv_t,
                  NT: tl.constexpr, BLOCK_V: tl.constexpr):
    """log p on one chunk: log softmax(t_0 / T) for one teacher (exactly), else
    log sum_i w_i softmax(t_i / T), max-shifted over the teachers; -inf where every term is."""
    if NT == 1:
        logp = _teacher_logp(t_ptrs, t_strides, row, 0, offs, mask, mvec, lzvec, tix, inv_t)
    else:
        # Two unrolled sweeps over the teachers (max, then sum) cost one exp per teacher and
        # element instead of two for an online merge; the second reload hits the cache.
        mx = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for i in tl.static_range(NT):
            lp = _teacher_logp(t_ptrs, t_strides, row, i, offs, mask, mvec, lzvec, tix, inv_t)
            mx = tl.maximum(mx, lp + tl.log(t_weights[i]))  # log 0 = -inf drops a zero weight
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for i in tl.static_range(NT):
            lp = _teacher_logp(t_ptrs, t_strides, row, i, offs, mask, mvec, lzvec, tix, inv_t)
            acc += tl.exp(lp + tl.log(t_weights[i]) - ref)
        logp = ref + tl.log(acc)  # acc = 0 (all -inf) gives -inf
    return logp


@triton.jit
def _log_mix(logp, logq, log_beta, log_1mbeta):
    """log m = log(beta p + (1 - beta) q), -inf where p = q = 0."""
    a = logp + log_beta
    b = logq + log_1mbeta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    d = tl.where(hi == float("-inf"), float("-inf"), lo - hi)
    return hi + tl.log(1.0 + tl.exp(d))


@triton.jit
def _sign(x):
    """sign(x) with sign(0) = 0."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _p_times_g(DIV: tl.constexpr, lp_i, p_i, logp, p, logq, q, logm, beta):
    """p_i,v * g_v where dD/db_i,v = w_i (p_i,v g_v - p_i,v S_i), S_i = sum_u p_i,u g_u."""
    if DIV == 0:    # kl: g = log p - log q (0 where p = 0)
        pg = tl.where((p_i == 0) | (p == 0), 0.0, p_i * (logp - logq))
    elif DIV == 1:  # reverse kl: g = -q / p, so p_i g = -q exp(log p_i - log p)
        pg = tl.where((p_i == 0) | (q == 0), 0.0, -q * tl.exp(lp_i - logp))
    elif DIV == 2:  # jsd: g = beta (log p - log m)
        pg = tl.where((p_i == 0) | (p == 0), 0.0, p_i * (beta * (logp - logm)))
    else:           # tvd: g = 0.5 sign(p - q)
        pg = p_i * (0.5 * _sign(p - q))
    return pg


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logit_kd_kernel(
    s_ptr, s_stride, t_ptrs, t_strides, t_weights, tgt_ptr, loss_ptr, gs_ptr, gt_ptrs,
    scale_ptr, flags_ptr,
    V, ignore_index, inv_t, beta, soft_factor, hard_weight, eps,
    NT: tl.constexpr, NT_PAD: tl.constexpr, DIV: tl.constexpr, HAS_TARGET: tl.constexpr,
    HAS_IGNORE: tl.constexpr, HARD: tl.constexpr, SMOOTH: tl.constexpr, NEED_S: tl.constexpr,
    NEED_T_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    NEED_T_ANY: tl.constexpr = NEED_T_MASK != 0
    GRAD: tl.constexpr = NEED_S or NEED_T_ANY
    # A separate sums sweep is needed unless the gradient needs no row sum (kl, student only).
    SUMS: tl.constexpr = (DIV != 0) or NEED_T_ANY or (not GRAD)
    NEG_INF: tl.constexpr = float("-inf")

    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2^31
    s_row = s_ptr + row * s_stride
    lane = tl.arange(0, BLOCK_V)
    tix = tl.arange(0, NT_PAD)

    # Which rows count: ignored rows and bad targets are skipped (loop bound 0), never read.
    go = row >= 0
    bad_target = row < 0
    y = row * 0
    if HAS_TARGET:
        y = tl.load(tgt_ptr + row)
        if HAS_IGNORE:
            counted = y != ignore_index
        else:
            counted = go
        bad_target = counted & ((y < 0) | (y >= V))
        go = counted & (y >= 0) & (y < V)
    hi = tl.where(go, V, 0)

    # ---- sweep 1: statistics ---------------------------------------------------------------
    ms, zs, z1, nf = _student_stats(s_row, hi, inv_t, HARD, SMOOTH, BLOCK_V)
    mvec = tl.zeros([NT_PAD], tl.float32)
    lzvec = tl.zeros([NT_PAD], tl.float32)
    n_masked = tl.zeros((), tl.int32)
    for i in tl.static_range(NT):
        mt, zt = _max_sumexp(t_ptrs[i] + row * t_strides[i], hi, inv_t, BLOCK_V)
        n_masked += (mt == NEG_INF).to(tl.int32)
        mvec = tl.where(tix == i, mt, mvec)
        lzvec = tl.where(tix == i, tl.log(zt), lzvec)
    s_masked = ms == NEG_INF
    # NaN statistics are not "masked": they flow on into the loss (SPEC: NaN propagates).
    flag = (tl.where(bad_target, 1, 0) | tl.where(go & s_masked, 2, 0)
            | tl.where(go & (n_masked > 0), 4, 0))
    tl.atomic_or(flags_ptr, flag, mask=flag != 0)
    live = go & (ms != NEG_INF) & (n_masked == 0)
    hi2 = tl.where(live, V, 0)
    lzs = tl.log(zs)

    log_beta = tl.log(beta)
    log_1mbeta = tl.log(1.0 - beta)

    ce = tl.zeros((), tl.float32)
    lz1 = tl.zeros((), tl.float32)
    if HARD:
        lz1 = tl.log(z1)
        s_y = tl.load(s_row + y, mask=live, other=0.0).to(tl.float32)
        ce = -(s_y - ms - lz1)  # nll; smoothing is added after the last sweep

    # ---- sweep 2: row sums (and the loss) --------------------------------------------------
    acc_a = tl.zeros([BLOCK_V], tl.float32)   # kl/rkl: D terms; jsd: Kp terms; tvd: |p - q|
    acc_b = tl.zeros([BLOCK_V], tl.float32)   # jsd: Kq terms; tvd: q h terms
    acc_ls = tl.zeros([BLOCK_V], tl.float32)  # label smoothing: sum over finite s of (s - ms)
    svec = tl.zeros([NT_PAD], tl.float32)     # S_i of the teachers that need a gradient
    if SUMS:
        for start in range(0, hi2, BLOCK_V):
            offs = start + lane
            mask = offs < hi2
            s = _load_row(s_row, offs, mask)
            logq = (s - ms) * inv_t - lzs
            q = tl.exp(logq)
            logp = _mixture_logp(t_ptrs, t_strides, t_weights, row, offs, mask, mvec, lzvec, tix,
                                 inv_t, NT, BLOCK_V)
            p = tl.exp(logp)
            logm = logp
            if DIV == 0:
                acc_a += tl.where(p == 0, 0.0, p * (logp - logq))
            elif DIV == 1:
                acc_a += tl.where(q == 0, 0.0, q * (logq - logp))
            elif DIV == 2:
                logm = _log_mix(logp, logq, log_beta, log_1mbeta)
                acc_a += tl.where(p == 0, 0.0, p * (logp - logm))
                acc_b += tl.where(q == 0, 0.0, q * (logq - logm))
            else:
                acc_a += tl.abs(p - q)
                acc_b += q * (-0.5 * _sign(p - q))
            if SMOOTH:
                acc_ls += tl.where(s == NEG_INF, 0.0, s - ms)
            if NEED_T_ANY:
                for i in tl.static_range(NT):
                    if (NEED_T_MASK >> i) & 1:
                        lp_i = _teacher_logp(t_ptrs, t_strides, row, i, offs, mask, mvec, lzvec,
                                             tix, inv_t)
                        pg = _p_times_g(DIV, lp_i, tl.exp(lp_i), logp, p, logq, q, logm, beta)
                        svec += tl.where(tix == i, tl.sum(pg, axis=0), 0.0)
    sum_a = tl.sum(acc_a, axis=0)
    sum_b = tl.sum(acc_b, axis=0)
    if DIV == 2:
        d_row = beta * sum_a + (1.0 - beta) * sum_b
    elif DIV == 3:
        d_row = 0.5 * sum_a
    else:
        d_row = sum_a

    # ---- sweep 3: gradients ----------------------------------------------------------------
    if GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(tl.float32)
        cf = soft_factor * inv_t * scale
        hw = hard_weight * scale
        c1 = 1.0 - eps + eps * nf.to(tl.float32) / V  # hard CE: coefficient of q1
        g_row = row * V  # gradients are contiguous [N, V]
        acc_d = tl.zeros([BLOCK_V], tl.float32)   # kl D terms when sweep 2 was merged in here
        for start in range(0, hi2, BLOCK_V):
            offs = start + lane
            mask = offs < hi2
            s = _load_row(s_row, offs, mask)
            logq = (s - ms) * inv_t - lzs
            q = tl.exp(logq)
            logp = _mixture_logp(t_ptrs, t_strides, t_weights, row, offs, mask, mvec, lzvec, tix,
                                 inv_t, NT, BLOCK_V)
            p = tl.exp(logp)
            logm = logp
            if DIV == 2:
                logm = _log_mix(logp, logq, log_beta, log_1mbeta)
            if not SUMS:
                acc_d += tl.where(p == 0, 0.0, p * (logp - logq))
                if SMOOTH:
                    acc_ls += tl.where(s == NEG_INF, 0.0, s - ms)
            if NEED_S:
                if DIV == 0:
                    da = q - p
                elif DIV == 1:
                    da = tl.where(q == 0, 0.0, q * (logq - logp - d_row))
                elif DIV == 2:
                    da = tl.where(q == 0, 0.0, (1.0 - beta) * q * (logq - logm - sum_b))
                else:
                    da = q * (-0.5 * _sign(p - q) - sum_b)
                gs = cf * da
                if HARD:
                    q1 = tl.exp(s - ms - lz1)
                    gh = q1 * c1 - tl.where(offs == y, 1.0 - eps, 0.0)
                    if SMOOTH:
                        gh -= tl.where(s == NEG_INF, 0.0, eps / V)
                    gs += hw * gh
                tl.store(gs_ptr + g_row + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)
            for i in tl.static_range(NT):
                if (NEED_T_MASK >> i) & 1:
                    lp_i = _teacher_logp(t_ptrs, t_strides, row, i, offs, mask, mvec, lzvec, tix,
                                         inv_t)
                    p_i = tl.exp(lp_i)
                    pg = _p_times_g(DIV, lp_i, p_i, logp, p, logq, q, logm, beta)
                    s_i = _pick(svec, tix, i)
                    w_i = t_weights[i]
                    gt = (cf * w_i) * (pg - tl.where(p_i == 0, 0.0, p_i * s_i))
                    gt = tl.where(w_i == 0, 0.0, gt)  # a zero-weight teacher has no gradient
                    gt_ptr = gt_ptrs[i]
                    tl.store(gt_ptr + g_row + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)
        if not SUMS:
            d_row = tl.sum(acc_d, axis=0)
        # Rows that do not count (ignored, bad target, all -inf): the buffers are uninitialised.
        hi0 = tl.where(live, 0, V)
        for start in range(0, hi0, BLOCK_V):
            offs = start + lane
            mask = offs < hi0
            zero = tl.zeros([BLOCK_V], tl.float32)
            if NEED_S:
                tl.store(gs_ptr + g_row + offs, zero.to(gs_ptr.dtype.element_ty), mask=mask)
            for i in tl.static_range(NT):
                if (NEED_T_MASK >> i) & 1:
                    gt_ptr = gt_ptrs[i]
                    tl.store(gt_ptr + g_row + offs, zero.to(gt_ptr.dtype.element_ty), mask=mask)

    loss = soft_factor * d_row
    if HARD:
        if SMOOTH:
            # sum over finite v of -log q1_v = -sum (s_v - ms) + nf log Z1
            smooth = (nf.to(tl.float32) * lz1 - tl.sum(acc_ls, axis=0)) / V
            ce = (1.0 - eps) * ce + eps * smooth
        loss += hard_weight * ce
    tl.store(loss_ptr + row, tl.where(live, loss, 0.0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_config(vocab: int, on_cpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps). GPU: chunks of up to 4096 elements (16 per thread with 8 warps)
    keep several sweeps' live values in registers; small V gets a block just covering it.
    Interpreter: up to 1024 (numpy vectorises a chunk; more chunks cost Python overhead)."""
    block = triton.next_power_of_2(max(vocab, 2))
    if on_cpu:
        return min(block, 1024), 1
    block = min(block, 4096)
    return block, max(1, min(8, block // 256))


def logit_kd_forward(student, teachers, target, weights, cfg, grad_scale, need_s, need_t, *,
                     block_v=None, num_warps=None):
    """Fused logit KD on the Triton backend: the row losses and the gradients in one launch.

    Args:
        student: ``[N, V]`` float32/bfloat16/float16 logits with unit stride along V (any row
            stride).
        teachers: list of 1 to 8 ``[N, V]`` teacher logits, one dtype (may differ from the
            student's), unit stride along V.
        target: int64 ``[N]`` class indices, or ``None`` (then every row counts and there is no
            hard term).
        weights: the normalised teacher weights (floats, sum 1, zeros allowed).
        cfg: a :class:`fastkd.logit.autograd.LogitKDConfig` (temperature, divergence, beta,
            soft_factor, hard_weight, label_smoothing, ignore_index).
        grad_scale: float32 tensor with one value multiplying every gradient, or ``None``.
        need_s: write the student gradient.
        need_t: one bool per teacher: write that teacher's gradient.
        block_v, num_warps: launch overrides (tests use a small ``block_v`` to exercise the
            chunked sweeps); default: see ``_launch_config``.

    Returns:
        ``(row_loss, grad_student, grad_teachers, flags)``: ``row_loss`` float32 ``[N]`` (0 at
        rows that do not count); ``grad_student`` ``[N, V]`` contiguous in the student dtype or
        ``None``; ``grad_teachers`` a list with a ``[N, V]`` tensor in the teacher dtype or
        ``None`` per teacher; ``flags`` int32 ``[1]`` OR of 1 (a counted target outside
        [0, V)), 2 (a counted student row all -inf), 4 (a counted teacher row all -inf). Rows
        with a flag get loss 0 and gradient 0; the caller raises.
    """
    if not isinstance(student, torch.Tensor) or student.dim() != 2:
        raise ValueError("student_logits must be a 2-D tensor [N, V] here")
    rows, vocab = student.shape
    if vocab < 1:
        raise ValueError("student_logits: V must be >= 1")
    if student.dtype not in _DTYPES:
        raise TypeError(f"student_logits: the triton backend takes float32, bfloat16 or float16, "
                        f"got {student.dtype}")
    if vocab > 1 and student.stride(1) != 1:
        raise ValueError("student_logits: the vocabulary stride must be 1")
    device = student.device
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError("the 'triton' backend needs CUDA tensors (or CPU tensors with "
                           "TRITON_INTERPRET=1 set before triton is imported)")
    nt = len(teachers)
    if not 1 <= nt <= MAX_TEACHERS:
        raise ValueError(f"teacher_logits: 1 to {MAX_TEACHERS} teachers, got {nt}")
    if len(weights) != nt:
        raise ValueError("teacher_weights: one weight per teacher")
    if len(need_t) != nt:
        raise ValueError("need_t: one bool per teacher")
    t_dtype = teachers[0].dtype
    if t_dtype not in _DTYPES:
        raise TypeError(f"teacher_logits: the triton backend takes float32, bfloat16 or float16, "
                        f"got {t_dtype}")
    for t in teachers:
        if t.shape != student.shape:
            raise ValueError("teacher_logits must have the student's shape")
        if t.dtype != t_dtype:
            raise TypeError("teacher_logits: all teachers must share one dtype")
        if t.device != device:
            raise ValueError("teacher_logits must be on the student's device")
        if vocab > 1 and t.stride(1) != 1:
            raise ValueError("teacher_logits: the vocabulary stride must be 1")
    if target is not None:
        if target.dtype != torch.int64 or target.numel() != rows or target.device != device:
            raise ValueError("target must be an int64 tensor [N] on the student's device")
        target = target.reshape(rows).contiguous()

    row_loss = torch.empty(rows, dtype=torch.float32, device=device)
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    grad_s = torch.empty((rows, vocab), dtype=student.dtype, device=device) if need_s else None
    grad_t = [torch.empty((rows, vocab), dtype=t_dtype, device=device) if n else None
              for n in need_t]
    if rows == 0:
        return row_loss, grad_s, grad_t, flags

    scale = None
    if grad_scale is not None:
        if grad_scale.numel() != 1:
            raise ValueError("grad_scale must hold one value")
        scale = grad_scale.to(device=device, dtype=torch.float32).reshape(1).contiguous()

    div, beta = cfg.kernel_divergence
    hard = target is not None and cfg.hard_weight != 0.0
    smooth = hard and cfg.label_smoothing != 0.0
    ignore = int(cfg.ignore_index)
    has_ignore = _INT64_MIN <= ignore <= _INT64_MAX  # else no int64 target can equal it
    need_mask = sum(1 << i for i, n in enumerate(need_t) if n)

    block, warps = _launch_config(vocab, device.type == "cpu")
    if block_v is not None:
        block = int(block_v)
        if block < 2 or block & (block - 1):
            raise ValueError(f"block_v must be a power of two >= 2, got {block_v}")
    if num_warps is not None:
        warps = int(num_warps)

    # Unused pointer slots point at real tensors of the right dtype; constexpr flags keep the
    # kernel from touching them.
    gs_arg = grad_s if grad_s is not None else student
    gt_args = tuple(g if g is not None else teachers[i] for i, g in enumerate(grad_t))
    args = (
        student, student.stride(0), tuple(teachers), tuple(t.stride(0) for t in teachers),
        tuple(float(w) for w in weights), target if target is not None else row_loss,
        row_loss, gs_arg, gt_args, scale if scale is not None else row_loss, flags,
        vocab, ignore if has_ignore else 0, 1.0 / cfg.temperature, float(beta),
        float(cfg.soft_factor), float(cfg.hard_weight), float(cfg.label_smoothing),
    )
    meta = dict(
        NT=nt, NT_PAD=max(2, triton.next_power_of_2(nt)), DIV=int(div),
        HAS_TARGET=target is not None, HAS_IGNORE=has_ignore, HARD=hard, SMOOTH=smooth,
        NEED_S=bool(need_s), NEED_T_MASK=need_mask, HAS_SCALE=scale is not None,
        BLOCK_V=block, num_warps=warps,
    )
    if device.type == "cuda":
        with torch.cuda.device(device):
            _logit_kd_kernel[(rows,)](*args, **meta)
    else:
        _logit_kd_kernel[(rows,)](*args, **meta)
    return row_loss, grad_s, grad_t, flags
