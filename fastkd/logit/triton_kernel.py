"""Triton backend of fused logit KD (SPEC §1, §1c): one launch writes the row loss and gradients.
The sparse top-k teacher (SPEC §1b) has its own kernel, at the end of this module.

For every row r (student logits s, teachers t_i with normalised weights w_i, temperature T)::

    q = softmax(s / T),  p = sum_i w_i softmax(t_i / T)
    row_loss[r] = soft_factor * D(p, q) + hard_weight * CE(softmax(s), target[r], label_smoothing)

with D one of KL(p||q), KL(q||p), JSD_beta, TVD and soft_factor = soft_weight * T^2 (or
soft_weight without ``t2_scale``). With ``teacher_mixture="logprob"`` (``LOGMIX``) p is
softmax(y / T), y = sum_i w_i t_i: the single-teacher math on the logits y, each teacher's
gradient w_i times y's. The gradients d row_loss[r] / d s[r, :] and
d row_loss[r] / d t_i[r, :], multiplied by ``*grad_scale`` when given, are written in the same
launch. The math is the one of the CPU and CUDA kernels (``csrc/include/fastkd/logit_kd.h``):
subtract the raw row maximum before scaling by 1/T, online (max, sum-exp) statistics, float32
accumulation, selects so that a zero probability contributes exactly 0 (never 0 * inf = NaN).

Precision: every divergence is written in terms of the log-ratio d = log p - log q, formed as
(b - a) + log(Zs / Zt) (a, b: the max-shifted scaled logits) rather than as log p - log q, which
would carry a rounding of size eps * log V (~1e-6) into every term. Near p = q, p - q is taken as
q expm1(d) and JSD's log(m / q) as log1p(beta expm1(d)) by short series. So a small divergence
(a student close to its teacher) keeps float32 relative accuracy in its loss and gradients.

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

from fastkd._triton_launch import launch
from fastkd.logit.config import MAX_TEACHERS
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
def _teacher_b(t_ptrs, t_strides, row, i: tl.constexpr, offs, mask, mvec, tix, inv_t):
    """b_i = (t_i - max t_i) / T on one chunk (-inf where t_i is -inf or past V)."""
    t = _load_row(t_ptrs[i] + row * t_strides[i], offs, mask)
    return (t - _pick(mvec, tix, i)) * inv_t


@triton.jit
def _mixed_logits(t_ptrs, t_strides, t_weights, row, offs, mask, NT: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """y = sum over w_i > 0 of w_i t_i on one chunk: the logits of the log mixture
    (log p = log_softmax(y / T)). Teachers of weight 0 are left out (0 * -inf would be NaN);
    -inf in any other teacher (and past V) stays -inf."""
    y = tl.zeros([BLOCK_V], tl.float32)
    for i in tl.static_range(NT):
        t = _load_row(t_ptrs[i] + row * t_strides[i], offs, mask)
        y += tl.where(t_weights[i] > 0, t_weights[i] * t, 0.0)
    return y


@triton.jit
def _chunk(s_row, t_ptrs, t_strides, t_weights, row, offs, mask, ms, lzs, mvec, dlvec, tix, inv_t,
           NT: tl.constexpr, LOGMIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """One chunk of a row: (s, q, u, d, p, mref, lacc) with u = log p + log Zs, d = log p - log q
    and u = mref + lacc (several teachers: mref = max_i (log p_i + log Zs), lacc = log of the
    weighted sum relative to it; one teacher: mref = u, lacc = 0).

    d is formed without log Z: one teacher, ((t - s) - (max t - max s)) / T + log(Zs / Zt);
    several, u - a with u = log sum_i w_i exp(b_i + log(Zs / Zt_i)). It carries no rounding of
    size eps * log V (log q itself does), so small divergences keep their relative accuracy.
    A log mixture (LOGMIX) is the one teacher with logits y = sum_i w_i t_i (mvec[0], dlvec[0]:
    its max and log(Zs / Zy)).
    """
    s = _load_row(s_row, offs, mask)
    a = (s - ms) * inv_t
    q = tl.exp(a - lzs)
    if NT == 1 or LOGMIX:
        if LOGMIX:
            t = _mixed_logits(t_ptrs, t_strides, t_weights, row, offs, mask, NT, BLOCK_V)
        else:
            t = _load_row(t_ptrs[0] + row * t_strides[0], offs, mask)
        mt = _pick(mvec, tix, 0)
        dl = _pick(dlvec, tix, 0)
        u = (t - mt) * inv_t + dl
        mref = u
        lacc = tl.zeros([BLOCK_V], tl.float32)
        # d from the raw difference t - s (exact when t and s are close) rather than from the
        # separately rounded b and a: a student near its teacher keeps d to float32 precision.
        d = tl.where(u == float("-inf"), float("-inf"),
                     tl.where(s == float("-inf"), float("inf"),
                              ((t - s) - (mt - ms)) * inv_t + dl))
    else:
        # Two unrolled sweeps over the teachers (max, then sum) cost one exp per teacher and
        # element instead of two for an online merge; the reloads hit the cache. The weights
        # multiply (no log w / exp round trip: identical teachers give p = p_i exactly).
        mx = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for i in tl.static_range(NT):
            x = _teacher_b(t_ptrs, t_strides, row, i, offs, mask, mvec, tix, inv_t) \
                + _pick(dlvec, tix, i)
            mx = tl.maximum(mx, tl.where(t_weights[i] > 0, x, float("-inf")))
        ref = tl.where(mx == float("-inf"), 0.0, mx)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for i in tl.static_range(NT):
            x = _teacher_b(t_ptrs, t_strides, row, i, offs, mask, mvec, tix, inv_t) \
                + _pick(dlvec, tix, i)
            acc += tl.where(t_weights[i] > 0, t_weights[i] * tl.exp(x - ref), 0.0)
        mref = ref
        lacc = tl.log(acc)
        u = ref + lacc  # acc = 0 (every teacher -inf) gives -inf
        d = tl.where(u == float("-inf"), float("-inf"), u - a)  # p = 0: -inf; q = 0 < p: +inf
    p = tl.exp(u - lzs)
    return s, q, u, d, p, mref, lacc


@triton.jit
def _expm1_small(x):
    """exp(x) - 1 for |x| < 0.5 (Taylor to x^8, relative error < 1e-8)."""
    r = 1.0 + x * (1.0 / 8.0)
    r = 1.0 + x * (1.0 / 7.0) * r
    r = 1.0 + x * (1.0 / 6.0) * r
    r = 1.0 + x * (1.0 / 5.0) * r
    r = 1.0 + x * (1.0 / 4.0) * r
    r = 1.0 + x * (1.0 / 3.0) * r
    r = 1.0 + x * 0.5 * r
    return x * r


@triton.jit
def _log1p(x):
    """log(1 + x), accurate near 0: 2 atanh(x / (2 + x)) to z^11 for |x| < 0.25."""
    z = x / (2.0 + x)
    z2 = z * z
    small = 2.0 * z * (1.0 + z2 * (1.0 / 3.0 + z2 * (0.2 + z2 * (1.0 / 7.0 + z2 * (
        1.0 / 9.0 + z2 * (1.0 / 11.0))))))
    return tl.where(tl.abs(x) < 0.25, small, tl.log(1.0 + x))


@triton.jit
def _kl_terms(a, b, d):
    """Terms of KL(a||b) = sum_{a != 0} a phi(d) + sum_{a == 0} b, d = log a - log b,
    phi(d) = d + expm1(-d) >= 0 (as sum a exp(-d) = sum_{a != 0} b): non-negative terms, so a
    small divergence is not a difference of terms of size |d|, and a rounding common to all d
    cancels to first order. Series for |d| < 1/2, else a d + (b - a). NaN propagates."""
    ser = 1.0 / 362880.0
    ser = 1.0 / 40320.0 - d * ser
    ser = 1.0 / 5040.0 - d * ser
    ser = 1.0 / 720.0 - d * ser
    ser = 1.0 / 120.0 - d * ser
    ser = 1.0 / 24.0 - d * ser
    ser = 1.0 / 6.0 - d * ser
    ser = 0.5 - d * ser
    return tl.where(a == 0, b, tl.where(tl.abs(d) < 0.5, a * (d * d * ser), a * d + (b - a)))


@triton.jit
def _p_minus_q(p, q, d):
    """p - q; near p = q as q (exp(d) - 1), accurate relative to the difference."""
    return tl.where(tl.abs(d) < 0.5, q * _expm1_small(d), p - q)


@triton.jit
def _jsd_logs(d, beta, log_beta, log_1mbeta):
    """(e, f): e = log m - log q = log(beta exp(d) + 1 - beta), f = log p - log m = d - e.

    Near d = 0, e = log1p(x), x = beta expm1(d), as 2 atanh(x / (2 + x)) (|z| < 0.25, to z^11)
    and f = d - e. Elsewhere, with z = d + log beta - log(1 - beta) and L = log(1 + exp(-|z|)):
    e = log(1 - beta) + max(z, 0) + L and f = -log beta - max(-z, 0) - L, which stay exact for
    |d| large or infinite (q = 0 < p: e = +inf, f = -log beta; p = 0: f = -inf).
    """
    x = beta * _expm1_small(d)
    zz = x / (2.0 + x)
    z2 = zz * zz
    e_small = 2.0 * zz * (1.0 + z2 * (1.0 / 3.0 + z2 * (0.2 + z2 * (1.0 / 7.0 + z2 * (
        1.0 / 9.0 + z2 * (1.0 / 11.0))))))
    z = d + (log_beta - log_1mbeta)
    big_l = tl.log(1.0 + tl.exp(-tl.abs(z)))
    near = tl.abs(d) < 0.5
    e = tl.where(near, e_small, log_1mbeta + tl.maximum(z, 0.0) + big_l)
    f = tl.where(near, d - e_small, -log_beta - tl.maximum(-z, 0.0) - big_l)
    return e, f


@triton.jit
def _sign(x):
    """sign(x) with sign(0) = 0."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _teacher_g(DIV: tl.constexpr, d, f, diff, beta):
    """g_v with dD/db_i,v = w_i (p_i,v g_v - p_i,v S_i) (kl, jsd, tvd; reverse kl is special)."""
    if DIV == 0:
        g = d
    elif DIV == 2:
        g = beta * f  # beta (log p - log m)
    else:
        g = 0.5 * _sign(diff)
    return g


@triton.jit
def _p_times_g(DIV: tl.constexpr, x_i, p_i, mref, lacc, p, q, g):
    """p_i,v g_v, with 0 wherever p_i,v (or, for g undefined, p_v) is 0; x_i = log p_i + log Zs."""
    if DIV == 1:
        # g = -q / p: p_i g = -q exp(log p_i - log p). The ratio is taken as
        # exp((x_i - mref) - lacc), never through u = mref + lacc: rounding u (which can be
        # ~1e4 / T) would cost its ulp in the ratio.
        pg = tl.where((q == 0) | (x_i == float("-inf")), 0.0, -q * tl.exp((x_i - mref) - lacc))
    elif DIV == 3:
        pg = p_i * g
    else:
        pg = tl.where((p_i == 0) | (p == 0), 0.0, p_i * g)
    return pg


@triton.jit
def _hard_grad(s, v, y, ms, lz1, c1, eps, V, SMOOTH: tl.constexpr):
    """d CE / d s_v (T = 1, label smoothing over the finite entries, as the reference)."""
    gh = tl.exp(s - ms - lz1) * c1 - tl.where(v == y, 1.0 - eps, 0.0)
    if SMOOTH:
        gh -= tl.where(s == float("-inf"), 0.0, eps / V)
    return gh


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_status(tgt_ptr, row, V, ignore_index, HAS_TARGET: tl.constexpr,
                HAS_IGNORE: tl.constexpr):
    """(go, bad_target, y): whether the row counts with a target in [0, V) (ignored rows and bad
    targets get loop bounds 0: they are never read), whether a counted target lies outside
    [0, V), and the target (0 without one)."""
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
    return go, bad_target, y


@triton.jit
def _teacher_stats(t_ptrs, t_strides, row, hi, zs, inv_t, tix, NT: tl.constexpr,
                   NT_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """(mvec, dlvec, n_masked): max t_i and log(Zs / Zt_i) per teacher (no rounding of log Z
    itself), and how many teacher rows are -inf everywhere."""
    mvec = tl.zeros([NT_PAD], tl.float32)
    dlvec = tl.zeros([NT_PAD], tl.float32)
    n_masked = tl.zeros((), tl.int32)
    for i in tl.static_range(NT):
        mt, zt = _max_sumexp(t_ptrs[i] + row * t_strides[i], hi, inv_t, BLOCK_V)
        # All -inf: max -inf and sum exactly 0. An all-NaN row also has max -inf (max ignores
        # NaN) but a NaN sum: not "masked", its NaN flows into the loss (SPEC).
        n_masked += ((mt == float("-inf")) & (zt == 0.0)).to(tl.int32)
        mvec = tl.where(tix == i, mt, mvec)
        dlvec = tl.where(tix == i, tl.log(zs / zt), dlvec)
    return mvec, dlvec, n_masked


@triton.jit
def _mixture_stats(t_ptrs, t_strides, t_weights, row, hi, zs, inv_t, tix, NT: tl.constexpr,
                   NT_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """The log mixture's statistics in one sweep over the teachers: (mvec, dlvec, n_masked,
    y_masked) with max y and log(Zs / Zy) in slot 0, how many teacher rows are -inf everywhere
    (every teacher is checked, as in the reference) and whether y is -inf everywhere."""
    lane = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    seen = tl.zeros([NT_PAD], tl.int32)  # entries != -inf per teacher (NaN counts: not masked)
    for start in range(0, hi, BLOCK_V):
        offs = start + lane
        mask = offs < hi
        y = tl.zeros([BLOCK_V], tl.float32)
        for i in tl.static_range(NT):
            t = _load_row(t_ptrs[i] + row * t_strides[i], offs, mask)
            seen += tl.where(tix == i, tl.sum((t != float("-inf")).to(tl.int32), axis=0), 0)
            y += tl.where(t_weights[i] > 0, t_weights[i] * t, 0.0)  # as _mixed_logits
        m_new = tl.maximum(m, tl.max(y, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp((m - ref) * inv_t) + tl.sum(tl.exp((y - ref) * inv_t), axis=0)
        m = m_new
    n_masked = tl.sum(((seen == 0) & (tix < NT)).to(tl.int32), axis=0)
    mvec = tl.where(tix == 0, m, 0.0)
    dlvec = tl.where(tix == 0, tl.log(zs / z), 0.0)
    return mvec, dlvec, n_masked, (m == float("-inf")) & (z == 0.0)


@triton.jit
def _sums_sweep(s_row, t_ptrs, t_strides, t_weights, row, hi2, ms, lzs, mvec, dlvec, tix, inv_t,
                beta, log_beta, log_1mbeta, SUMS: tl.constexpr, DIV: tl.constexpr,
                NT: tl.constexpr, NT_PAD: tl.constexpr, SMOOTH: tl.constexpr,
                NEED_T_MASK: tl.constexpr, LOGMIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """Sweep 2 (when SUMS): the row sums the gradient needs and the loss, as lane vectors
    (acc_a, acc_b, acc_m, acc_c, acc_ls, acc_k) and svec (S_i of the teachers that need a
    gradient); zeros otherwise."""
    lane = tl.arange(0, BLOCK_V)
    acc_a = tl.zeros([BLOCK_V], tl.float32)   # kl/rkl: D terms; jsd: Kp terms; tvd: |p - q|
    acc_b = tl.zeros([BLOCK_V], tl.float32)   # jsd: Kq terms; tvd: q mass where p > q
    acc_m = tl.zeros([BLOCK_V], tl.float32)   # tvd: q mass where p < q
    acc_ls = tl.zeros([BLOCK_V], tl.float32)  # label smoothing: sum over finite s of (s - ms)
    acc_c = tl.zeros([BLOCK_V], tl.float32)   # tvd: q mass where p == q
    acc_k = tl.zeros([BLOCK_V], tl.float32)   # kl/rkl: the loss in the phi form (_kl_terms)
    svec = tl.zeros([NT_PAD], tl.float32)     # S_i of the teachers that need a gradient
    if SUMS:
        for start in range(0, hi2, BLOCK_V):
            offs = start + lane
            mask = offs < hi2
            s, q, u, d, p, mref, lacc = _chunk(s_row, t_ptrs, t_strides, t_weights, row, offs,
                                               mask, ms, lzs, mvec, dlvec, tix, inv_t, NT,
                                               LOGMIX, BLOCK_V)
            e = d
            f = d
            diff = d
            if DIV == 0:
                acc_a += tl.where(p == 0, 0.0, p * d)
                acc_k += _kl_terms(p, q, d)
            elif DIV == 1:
                acc_a += tl.where(q == 0, 0.0, -q * d)  # D as the gradient q (-d - D) needs it
                acc_k += _kl_terms(q, p, -d)
            if DIV == 2:
                e, f = _jsd_logs(d, beta, log_beta, log_1mbeta)
                acc_a += tl.where(p == 0, 0.0, p * f)
                acc_b += tl.where(q == 0, 0.0, -q * e)
            elif DIV == 3:
                # q mass in the sign classes of p - q: h - sum q h is then formed from small
                # masses without cancelling (sum q h ~ -1/2 for a student far from its teacher).
                diff = _p_minus_q(p, q, d)
                acc_a += tl.abs(diff)
                acc_b += tl.where(diff > 0, q, 0.0)
                acc_m += tl.where(diff < 0, q, 0.0)
                acc_c += tl.where(diff == 0, q, 0.0)
            if SMOOTH:
                acc_ls += tl.where(s == float("-inf"), 0.0, s - ms)
            if NEED_T_MASK != 0 and LOGMIX:
                # One S for the mixture's logits y (slot 0): d/dt_i = w_i d/dy.
                g = _teacher_g(DIV, d, f, diff, beta)
                pg = _p_times_g(DIV, u, p, mref, lacc, p, q, g)
                svec += tl.where(tix == 0, tl.sum(pg, axis=0), 0.0)
            elif NEED_T_MASK != 0:
                g = _teacher_g(DIV, d, f, diff, beta)
                for i in tl.static_range(NT):
                    if (NEED_T_MASK >> i) & 1:
                        x_i = _teacher_b(t_ptrs, t_strides, row, i, offs, mask, mvec, tix, inv_t) \
                            + _pick(dlvec, tix, i)
                        pg = _p_times_g(DIV, x_i, tl.exp(x_i - lzs), mref, lacc, p, q, g)
                        svec += tl.where(tix == i, tl.sum(pg, axis=0), 0.0)
    return acc_a, acc_b, acc_m, acc_c, acc_ls, acc_k, svec


@triton.jit
def _student_da(DIV: tl.constexpr, q, d, e, diff, d_row, sum_b, acc_m, acc_c, beta):
    """dD/da_v of the student (a = s / T) from one chunk's values and the row sums."""
    if DIV == 0:
        da = -diff
    elif DIV == 1:
        da = tl.where(q == 0, 0.0, q * (-d - d_row))
    elif DIV == 2:
        da = tl.where(q == 0, 0.0, (1.0 - beta) * q * (-e - sum_b))
    else:
        # h_v - sum_u q_u h_u by class: p > q: -B - C/2; p < q: A + C/2; else (A - B)/2
        tvd_a = sum_b
        tvd_b = tl.sum(acc_m, axis=0)
        tvd_c = tl.sum(acc_c, axis=0)
        da = q * tl.where(diff > 0, -tvd_b - 0.5 * tvd_c,
                          tl.where(diff < 0, tvd_a + 0.5 * tvd_c, 0.5 * (tvd_a - tvd_b)))
    return da


@triton.jit
def _store_teacher_grads(gt_ptrs, g_row, t_ptrs, t_strides, t_weights, row, offs, mask, mvec,
                         dlvec, svec, tix, inv_t, lzs, mref, lacc, p, q, g, u, cf,
                         DIV: tl.constexpr, NT: tl.constexpr, NEED_T_MASK: tl.constexpr,
                         LOGMIX: tl.constexpr):
    """Teacher gradients of one chunk: cf w_i (p_i g - p_i S_i) for every teacher in the mask;
    a log mixture: w_i times the gradient of its logits y, cf (p g - p S)."""
    if LOGMIX:
        pg = _p_times_g(DIV, u, p, mref, lacc, p, q, g)
        gy = cf * (pg - tl.where(p == 0, 0.0, p * _pick(svec, tix, 0)))
    for i in tl.static_range(NT):
        if LOGMIX and (NEED_T_MASK >> i) & 1:
            w_i = t_weights[i]
            gt = tl.where(w_i > 0, w_i * gy, 0.0)  # a zero-weight teacher has no gradient
            gt_ptr = gt_ptrs[i]
            tl.store(gt_ptr + g_row + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)
        elif (NEED_T_MASK >> i) & 1:
            x_i = _teacher_b(t_ptrs, t_strides, row, i, offs, mask, mvec, tix, inv_t) \
                + _pick(dlvec, tix, i)
            p_i = tl.exp(x_i - lzs)
            pg = _p_times_g(DIV, x_i, p_i, mref, lacc, p, q, g)
            s_i = _pick(svec, tix, i)
            w_i = t_weights[i]
            gt = (cf * w_i) * (pg - tl.where(p_i == 0, 0.0, p_i * s_i))
            gt = tl.where(w_i == 0, 0.0, gt)  # a zero-weight teacher has no gradient
            gt_ptr = gt_ptrs[i]
            tl.store(gt_ptr + g_row + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sweep(s_row, t_ptrs, t_strides, t_weights, gs_ptr, gt_ptrs, g_row, row, y, hi2, V, ms,
                lzs, lz1, nf, mvec, dlvec, svec, tix, inv_t, beta, log_beta, log_1mbeta, eps,
                cf, hw, d_row, sum_b, acc_m, acc_c, acc_k, acc_ls, SUMS: tl.constexpr,
                DIV: tl.constexpr, NT: tl.constexpr, HARD: tl.constexpr, SMOOTH: tl.constexpr,
                NEED_S: tl.constexpr, NEED_T_MASK: tl.constexpr, LOGMIX: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Sweep 3: the student and teacher gradients of the counted rows. Without a sums sweep (kl,
    student only) it also accumulates the loss: returns (acc_d, acc_k, acc_ls)."""
    lane = tl.arange(0, BLOCK_V)
    c1 = 1.0 - eps + eps * nf.to(tl.float32) / V  # hard CE: coefficient of q1
    acc_d = tl.zeros([BLOCK_V], tl.float32)   # kl D terms when sweep 2 was merged in here
    for start in range(0, hi2, BLOCK_V):
        offs = start + lane
        mask = offs < hi2
        s, q, u, d, p, mref, lacc = _chunk(s_row, t_ptrs, t_strides, t_weights, row, offs,
                                           mask, ms, lzs, mvec, dlvec, tix, inv_t, NT, LOGMIX,
                                           BLOCK_V)
        e = d
        f = d
        diff = d
        if DIV == 2:
            e, f = _jsd_logs(d, beta, log_beta, log_1mbeta)
        if DIV == 0 or DIV == 3:
            diff = _p_minus_q(p, q, d)
        if not SUMS:
            acc_d += tl.where(p == 0, 0.0, p * d)
            acc_k += _kl_terms(p, q, d)
            if SMOOTH:
                acc_ls += tl.where(s == float("-inf"), 0.0, s - ms)
        if NEED_S:
            gs = cf * _student_da(DIV, q, d, e, diff, d_row, sum_b, acc_m, acc_c, beta)
            if HARD:
                gs += hw * _hard_grad(s, offs, y, ms, lz1, c1, eps, V, SMOOTH)
            tl.store(gs_ptr + g_row + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)
        if NEED_T_MASK != 0:
            g = _teacher_g(DIV, d, f, diff, beta)
            _store_teacher_grads(gt_ptrs, g_row, t_ptrs, t_strides, t_weights, row, offs, mask,
                                 mvec, dlvec, svec, tix, inv_t, lzs, mref, lacc, p, q, g, u, cf,
                                 DIV, NT, NEED_T_MASK, LOGMIX)
    return acc_d, acc_k, acc_ls


@triton.jit
def _zero_grads(gs_ptr, gt_ptrs, g_row, hi0, NT: tl.constexpr, NEED_S: tl.constexpr,
                NEED_T_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    """Zero gradients over [0, hi0) (rows that do not count: the buffers are uninitialised)."""
    lane = tl.arange(0, BLOCK_V)
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


@triton.jit
def _logit_kd_kernel(
    s_ptr, s_stride, t_ptrs, t_strides, t_weights, tgt_ptr, loss_ptr, gs_ptr, gt_ptrs,
    scale_ptr, flags_ptr,
    V, ignore_index, inv_t, beta, soft_factor, hard_weight, eps,
    NT: tl.constexpr, NT_PAD: tl.constexpr, DIV: tl.constexpr, HAS_TARGET: tl.constexpr,
    HAS_IGNORE: tl.constexpr, HARD: tl.constexpr, SMOOTH: tl.constexpr, NEED_S: tl.constexpr,
    NEED_T_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, LOGMIX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    NEED_T_ANY: tl.constexpr = NEED_T_MASK != 0
    GRAD: tl.constexpr = NEED_S or NEED_T_ANY
    # A separate sums sweep is needed unless the gradient needs no row sum (kl, student only).
    SUMS: tl.constexpr = (DIV != 0) or NEED_T_ANY or (not GRAD)
    NEG_INF: tl.constexpr = float("-inf")

    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2^31
    s_row = s_ptr + row * s_stride
    tix = tl.arange(0, NT_PAD)
    go, bad_target, y = _row_status(tgt_ptr, row, V, ignore_index, HAS_TARGET, HAS_IGNORE)
    hi = tl.where(go, V, 0)

    # ---- sweep 1: statistics ---------------------------------------------------------------
    ms, zs, z1, nf = _student_stats(s_row, hi, inv_t, HARD, SMOOTH, BLOCK_V)
    if LOGMIX:
        mvec, dlvec, n_masked, y_masked = _mixture_stats(t_ptrs, t_strides, t_weights, row, hi,
                                                         zs, inv_t, tix, NT, NT_PAD, BLOCK_V)
    else:
        mvec, dlvec, n_masked = _teacher_stats(t_ptrs, t_strides, row, hi, zs, inv_t, tix, NT,
                                               NT_PAD, BLOCK_V)
        y_masked = n_masked < 0  # False
    s_masked = (ms == NEG_INF) & (zs == 0.0)
    # NaN statistics are not "masked": they flow on into the loss (SPEC: NaN propagates).
    flag = (tl.where(bad_target, 1, 0) | tl.where(go & s_masked, 2, 0)
            | tl.where(go & (n_masked > 0), 4, 0)
            | tl.where(go & (n_masked == 0) & y_masked, 8, 0))
    tl.atomic_or(flags_ptr, flag, mask=flag != 0)
    live = go & ((ms != NEG_INF) | (zs != 0.0)) & (n_masked == 0) & (y_masked == 0)
    hi2 = tl.where(live, V, 0)
    lzs = tl.log(zs)
    log_beta = tl.log(beta)
    log_1mbeta = tl.log(1.0 - beta)

    ce = tl.zeros((), tl.float32)
    lz1 = tl.zeros((), tl.float32)
    if HARD:
        lz1 = tl.log(z1)
        s_y = tl.load(s_row + y, mask=live, other=0.0).to(tl.float32)
        ce = lz1 - (s_y - ms)  # nll; smoothing is added after the last sweep

    # ---- sweep 2: row sums (and the loss) --------------------------------------------------
    acc_a, acc_b, acc_m, acc_c, acc_ls, acc_k, svec = _sums_sweep(
        s_row, t_ptrs, t_strides, t_weights, row, hi2, ms, lzs, mvec, dlvec, tix, inv_t, beta,
        log_beta, log_1mbeta, SUMS, DIV, NT, NT_PAD, SMOOTH, NEED_T_MASK, LOGMIX, BLOCK_V)
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
        g_row = row * V  # gradients are contiguous [N, V]
        acc_d, acc_k, acc_ls = _grad_sweep(
            s_row, t_ptrs, t_strides, t_weights, gs_ptr, gt_ptrs, g_row, row, y, hi2, V, ms,
            lzs, lz1, nf, mvec, dlvec, svec, tix, inv_t, beta, log_beta, log_1mbeta, eps,
            soft_factor * inv_t * scale, hard_weight * scale, d_row, sum_b, acc_m, acc_c, acc_k,
            acc_ls, SUMS, DIV, NT, HARD, SMOOTH, NEED_S, NEED_T_MASK, LOGMIX, BLOCK_V)
        if not SUMS:
            d_row = tl.sum(acc_d, axis=0)
            sum_b = tl.sum(acc_b, axis=0)
        _zero_grads(gs_ptr, gt_ptrs, g_row, tl.where(live, 0, V), NT, NEED_S, NEED_T_MASK,
                    BLOCK_V)

    d_loss = d_row
    if DIV == 0 or DIV == 1:
        # The loss value from the phi form (_kl_terms: non-negative terms; the common rounding of
        # d from log(Zs / Zt) cancels to first order), not from sum p d, whose terms of size |d|
        # cancel for a student near its teacher (the gradient, q (-d - D) for reverse KL, uses
        # the plain D, consistent with its d).
        d_loss = tl.sum(acc_k, axis=0)
    loss = soft_factor * d_loss
    if HARD:
        if SMOOTH:
            # sum over finite v of -log q1_v = nf log Z1 - sum (s_v - ms)
            smooth = (nf.to(tl.float32) * lz1 - tl.sum(acc_ls, axis=0)) / V
            ce = (1.0 - eps) * ce + eps * smooth
        loss += hard_weight * ce
    tl.store(loss_ptr + row, tl.where(live, loss, 0.0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Register budget per thread on GPU (PTX ``.maxnreg``): 4-warp blocks at <= 128 registers keep
#: at least 4 blocks (16 warps) per SM. Without it ptxas picks its own occupancy targets (80 or
#: 96 registers at 8 warps) and spills a few bytes (4-34) to reach them.
MAX_REGISTERS = 128


def launch_config(vocab: int, num_teachers: int, divergence: int, teacher_grad: bool,
                  on_cpu: bool) -> dict:
    """Launch options of ``_logit_kd_kernel``: ``BLOCK_V``, ``num_warps`` (and ``maxnreg``).

    GPU: 4 warps, at most :data:`MAX_REGISTERS` registers per thread, and a chunk of ``BLOCK_V``
    = 128 x (elements per thread): 16 elements on the light path (one teacher, kl or
    reverse kl, no teacher gradient); 4 with teacher gradients of 3 or more teachers (each
    keeps its own terms live through the gradient sweep); 8 otherwise. These sizes compile
    without spills on sm_80 and sm_90 (``benchmarks/results/resources-triton.md``). A small
    vocabulary gets one chunk just covering it, with fewer warps. Interpreter: up to 1024 per
    chunk, one warp (numpy vectorises a chunk; more chunks cost Python overhead).
    """
    block = triton.next_power_of_2(max(vocab, 2))
    if on_cpu:
        return {"BLOCK_V": min(block, 1024), "num_warps": 1}
    if num_teachers == 1 and divergence in (0, 1) and not teacher_grad:
        per_thread = 16
    elif num_teachers >= 3 and teacher_grad:
        per_thread = 4
    else:
        per_thread = 8
    block = min(block, 128 * per_thread)
    return {"BLOCK_V": block, "num_warps": max(1, min(4, block // (32 * per_thread))),
            "maxnreg": MAX_REGISTERS}


def _check_student(student) -> tuple:
    """``(rows, vocab)`` of a 2-D student the Triton kernels take (SPEC §Errors: the checks
    that need no device data)."""
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
    if student.device.type == "cpu" and not _interpreting():
        raise RuntimeError("the 'triton' backend needs CUDA tensors (or CPU tensors with "
                           "TRITON_INTERPRET=1 set before triton is imported)")
    return rows, vocab


def _check_teachers(teachers, weights, need_t, student):
    """The teachers' common dtype, after checking them against the student."""
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
        if t.device != student.device:
            raise ValueError("teacher_logits must be on the student's device")
        if student.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError("teacher_logits: the vocabulary stride must be 1")
    return t_dtype


def _check_target(target, rows, device):
    """``target`` as a contiguous int64 ``[N]`` (or ``None``)."""
    if target is None:
        return None
    if target.dtype != torch.int64 or target.numel() != rows or target.device != device:
        raise ValueError("target must be an int64 tensor [N] on the student's device")
    return target.reshape(rows).contiguous()


def _scale_arg(grad_scale, device):
    """``grad_scale`` as a one-element float32 tensor on ``device`` (or ``None``)."""
    if grad_scale is None:
        return None
    if grad_scale.numel() != 1:
        raise ValueError("grad_scale must hold one value")
    return grad_scale.to(device=device, dtype=torch.float32).reshape(1).contiguous()


def _override(opts: dict, num_warps=None, **blocks) -> dict:
    """Launch options with the tests' overrides (block sizes: powers of two >= 2)."""
    for name, value in blocks.items():
        if value is not None:
            block = int(value)
            if block < 2 or block & (block - 1):
                raise ValueError(f"{name} must be a power of two >= 2, got {value}")
            opts[name.upper()] = block
    if num_warps is not None:
        opts["num_warps"] = int(num_warps)
    return opts


def _hard_config(cfg, target) -> tuple:
    """(hard, smooth, has_ignore, ignore): the hard-CE switches and the ignore index the
    kernels take (an ignore_index no int64 target can equal is none)."""
    hard = target is not None and cfg.hard_weight != 0.0
    smooth = hard and cfg.label_smoothing != 0.0
    ignore = int(cfg.ignore_index)
    has_ignore = _INT64_MIN <= ignore <= _INT64_MAX
    return hard, smooth, has_ignore, ignore if has_ignore else 0


def _launch_rows(kernel, device, rows, args, meta):
    """One program per row, on the student's device."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            launch(kernel, (rows,), *args, **meta)
    else:
        launch(kernel, (rows,), *args, **meta)


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
        cfg: a :class:`fastkd.logit.config.LogitKDConfig` (temperature, divergence, beta,
            soft_factor, hard_weight, label_smoothing, ignore_index, teacher_mixture).
        grad_scale: float32 tensor with one value multiplying every gradient, or ``None``.
        need_s: write the student gradient.
        need_t: one bool per teacher: write that teacher's gradient.
        block_v, num_warps: launch overrides (tests use a small ``block_v`` to exercise the
            chunked sweeps); default: see :func:`launch_config`.

    Returns:
        ``(row_loss, grad_student, grad_teachers, flags)``: ``row_loss`` float32 ``[N]`` (0 at
        rows that do not count); ``grad_student`` ``[N, V]`` contiguous in the student dtype or
        ``None``; ``grad_teachers`` a list with a ``[N, V]`` tensor in the teacher dtype or
        ``None`` per teacher; ``flags`` int32 ``[1]`` OR of 1 (a counted target outside
        [0, V)), 2 (a counted student row all -inf), 4 (a counted teacher row all -inf), 8 (a
        counted row of the log mixture all -inf). Rows with a flag get loss 0 and gradient 0;
        the caller raises.
    """
    rows, vocab = _check_student(student)
    device = student.device
    t_dtype = _check_teachers(teachers, weights, need_t, student)
    target = _check_target(target, rows, device)

    row_loss = torch.empty(rows, dtype=torch.float32, device=device)
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    grad_s = torch.empty((rows, vocab), dtype=student.dtype, device=device) if need_s else None
    grad_t = [torch.empty((rows, vocab), dtype=t_dtype, device=device) if n else None
              for n in need_t]
    if rows == 0:
        return row_loss, grad_s, grad_t, flags
    scale = _scale_arg(grad_scale, device)

    nt = len(teachers)
    div, beta = cfg.kernel_divergence
    hard, smooth, has_ignore, ignore = _hard_config(cfg, target)
    need_mask = sum(1 << i for i, n in enumerate(need_t) if n)
    opts = _override(launch_config(vocab, nt, int(div), need_mask != 0, device.type == "cpu"),
                     num_warps, block_v=block_v)
    # Unused pointer slots point at real tensors of the right dtype; constexpr flags keep the
    # kernel from touching them.
    args = (
        student, student.stride(0), tuple(teachers), tuple(t.stride(0) for t in teachers),
        tuple(float(w) for w in weights), target if target is not None else row_loss,
        row_loss, grad_s if grad_s is not None else student,
        tuple(g if g is not None else teachers[i] for i, g in enumerate(grad_t)),
        scale if scale is not None else row_loss, flags,
        vocab, ignore, 1.0 / cfg.temperature, float(beta),
        float(cfg.soft_factor), float(cfg.hard_weight), float(cfg.label_smoothing),
    )
    meta = dict(
        NT=nt, NT_PAD=max(2, triton.next_power_of_2(nt)), DIV=int(div),
        HAS_TARGET=target is not None, HAS_IGNORE=has_ignore, HARD=hard, SMOOTH=smooth,
        NEED_S=bool(need_s), NEED_T_MASK=need_mask, HAS_SCALE=scale is not None,
        LOGMIX=bool(cfg.log_mixture and nt > 1), **opts,
    )
    _launch_rows(_logit_kd_kernel, device, rows, args, meta)
    return row_loss, grad_s, grad_t, flags


# ----------------------------------------------------------------------------------------------
# Sparse top-k teacher (SPEC §1b)
# ----------------------------------------------------------------------------------------------
# One program per row. The divergence runs over k + 1 buckets: the k listed entries (teacher
# log P_j given, student log Q_j = (s_j - max s) / T - log Z) and the residual (P_res =
# max(0, 1 - sum P_j), Q_res = the student mass on the unlisted entries, summed directly).
#
# (1) One sweep over V: max, Z (at T), Z1 (T = 1, hard CE) and, for the unlisted entries, their
#     sum Z_rest and max. Which lanes of a chunk are listed comes from the row's indices sorted
#     on the host: the chunk's listed indices are a contiguous run of them, found by counting,
#     and a lane is looked up in that run by a branchless binary search (ceil(log2 run) gathers;
#     none when the run is empty or covers the chunk). A residual more than e^40 below the max
#     is summed again relative to its own max, so that underflow never empties it.
# (2) A loop over the k entries in BLOCK_K blocks (gathered student loads): the divergence and
#     the row sums its gradient needs. Every bucket's gradient with respect to its bucket logit,
#     h_b = g_b - Q_b sum_c g_c (g_b = dD / dlog Q_b), is formed from those sums like the dense
#     kernel's (KL: Q_b - P_b as q expm1(d) near P = Q), so a student close to its teacher keeps
#     its relative accuracy.
# (3) The gradient: h_res e_v / Z_rest at every entry (plus the hard CE term), then, after a
#     block barrier, h_j (plus hard CE) written over the k listed entries.
#
# KL's and reverse KL's loss use the phi form of _kl_terms over the buckets, plus the excess
# sum_b P_b - 1 (nonzero only when the listed mass exceeds 1 or the residual is empty).
_FAR_RESIDUAL = tl.constexpr(40.0)  # nats: a rest below e^-40 of the max is summed again


@triton.jit
def _listed_lanes(sidx_row, j, start, offs, n_sorted, V, BLOCK_V: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(listed, cnt): which lanes of the chunk [start, start + BLOCK_V) are listed, and how many
    listed indices the chunk holds; ``sidx_row`` holds the row's indices in ascending order and
    ``j`` is the first position not in an earlier chunk."""
    kl = tl.arange(0, BLOCK_K)
    end = start + BLOCK_V
    cnt = tl.zeros((), tl.int32)
    c = tl.full((), BLOCK_K, tl.int32)
    while c == BLOCK_K:
        pos = j + cnt + kl
        blk = tl.load(sidx_row + pos, mask=pos < n_sorted, other=2147483647)
        c = tl.sum((blk < end).to(tl.int32), axis=0)
        cnt += c
    full = cnt == tl.minimum(end, V) - start
    n = tl.where(full, 0, cnt)
    base = tl.zeros([BLOCK_V], tl.int32) + j
    # Largest position in [j, j + n) whose index is <= the lane (j when none is).
    while n > 1:
        half = n // 2
        probe = tl.load(sidx_row + base + half)
        base = tl.where(probe <= offs, base + half, base)
        n -= half
    found = tl.load(sidx_row + base, mask=(base >= 0) & (n > 0), other=-1) == offs
    return full | found, cnt


@triton.jit
def _topk_stats(s_row, sidx_row, hi, n_sorted, inv_t, HARD: tl.constexpr, SMOOTH: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sweep (1): m = max s, Z, Z_rest (unlisted) at T relative to m, m_rest = max of the
    unlisted s, Z1 at T = 1, nf = #{s != -inf} and ls = sum over finite s of (s - m)."""
    lane = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    m_rest = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    z_rest = tl.zeros((), tl.float32)
    z1 = tl.zeros((), tl.float32)
    ls = tl.zeros((), tl.float32)
    nf = tl.zeros((), tl.int32)
    j = tl.zeros((), tl.int32)
    for start in range(0, hi, BLOCK_V):
        offs = start + lane
        x = _load_row(s_row, offs, offs < hi)
        listed, cnt = _listed_lanes(sidx_row, j, start, offs, n_sorted, hi, BLOCK_V, BLOCK_K)
        j += cnt
        m_new = tl.maximum(m, tl.max(x, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp((x - ref) * inv_t)
        shift = tl.exp((m - ref) * inv_t)
        z = z * shift + tl.sum(e, axis=0)
        z_rest = z_rest * shift + tl.sum(tl.where(listed, 0.0, e), axis=0)
        m_rest = tl.maximum(m_rest, tl.max(tl.where(listed, float("-inf"), x), axis=0))
        if HARD:
            z1 = z1 * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), axis=0)
        if SMOOTH:
            # Terms s - m are all <= 0: re-basing on a new max adds terms of the same sign.
            fin = x != float("-inf")
            ls = tl.where(nf == 0, 0.0, ls + nf.to(tl.float32) * (m - m_new))
            ls += tl.sum(tl.where(fin, x - m_new, 0.0), axis=0)
            nf += tl.sum(fin.to(tl.int32), axis=0)
        m = m_new
    return m, z, z_rest, m_rest, z1, nf, ls


@triton.jit
def _rest_sumexp(s_row, sidx_row, hi, n_sorted, ref, inv_t, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """sum over the unlisted entries of exp((s - ref) / T) (ref: their own max)."""
    lane = tl.arange(0, BLOCK_V)
    z = tl.zeros((), tl.float32)
    j = tl.zeros((), tl.int32)
    for start in range(0, hi, BLOCK_V):
        offs = start + lane
        x = _load_row(s_row, offs, offs < hi)
        listed, cnt = _listed_lanes(sidx_row, j, start, offs, n_sorted, hi, BLOCK_V, BLOCK_K)
        j += cnt
        z += tl.sum(tl.where(listed, 0.0, tl.exp((x - ref) * inv_t)), axis=0)
    return z


@triton.jit
def _listed_block(idx_row, lp_row, s_row, kk, km, ms, lzs, inv_t):
    """One block of listed entries: (index, s, P, Q, d) with d = log P - log Q (-inf where P = 0,
    +inf where s = -inf < P); lanes past k and empty slots (index -1) have P = Q = 0."""
    idx = tl.load(idx_row + kk, mask=km, other=-1)
    used = km & (idx >= 0)
    lp = tl.load(lp_row + kk, mask=used, other=float("-inf")).to(tl.float32)
    s = tl.load(s_row + idx, mask=used, other=float("-inf")).to(tl.float32)
    lq = (s - ms) * inv_t - lzs
    d = tl.where(lp == float("-inf"), float("-inf"),
                 tl.where(s == float("-inf"), float("inf"), lp - lq))
    return idx, s, tl.exp(lp), tl.exp(lq), d


@triton.jit
def _bucket_loss(DIV: tl.constexpr, p, q, d, beta, log_beta, log_1mbeta):
    """Per-bucket terms (t0, t1, t2, t3) whose sums give D and its gradient's row sums:
    kl: (phi-form terms, -, -, -); reverse kl: (phi-form terms, -q d, -, -); jsd: (p f, -q e,
    -, -); tvd: (|p - q|, q [p > q], q [p < q], q [p == q])."""
    t1 = tl.zeros_like(d)
    t2 = tl.zeros_like(d)
    t3 = tl.zeros_like(d)
    if DIV == 0:
        t0 = _kl_terms(p, q, d)
    elif DIV == 1:
        t0 = _kl_terms(q, p, -d)
        t1 = tl.where(q == 0, 0.0, -q * d)
    elif DIV == 2:
        e, f = _jsd_logs(d, beta, log_beta, log_1mbeta)
        t0 = tl.where(p == 0, 0.0, p * f)
        t1 = tl.where(q == 0, 0.0, -q * e)
    else:
        diff = _p_minus_q(p, q, d)
        t0 = tl.abs(diff)
        t1 = tl.where(diff > 0, q, 0.0)
        t2 = tl.where(diff < 0, q, 0.0)
        t3 = tl.where(diff == 0, q, 0.0)
    return t0, t1, t2, t3


@triton.jit
def _bucket_h(DIV: tl.constexpr, p, q, d, excess, sum1, sum2, sum3, beta, log_beta, log_1mbeta):
    """h_b = dD/dlog Q_b - Q_b sum_c dD/dlog Q_c: the gradient with respect to the bucket's
    logit (kl: Q - P + excess Q; reverse kl: Q (-d - D); jsd: (1 - beta) Q (-e - sum -Q e);
    tvd: by the sign class of P - Q, as in the dense kernel)."""
    if DIV == 0:
        h = excess * q - _p_minus_q(p, q, d)
    elif DIV == 1:
        h = tl.where(q == 0, 0.0, q * (-d - sum1))
    elif DIV == 2:
        e, f = _jsd_logs(d, beta, log_beta, log_1mbeta)
        h = tl.where(q == 0, 0.0, (1.0 - beta) * q * (-e - sum1))
    else:
        diff = _p_minus_q(p, q, d)
        h = q * tl.where(diff > 0, -sum2 - 0.5 * sum3,
                         tl.where(diff < 0, sum1 + 0.5 * sum3, 0.5 * (sum1 - sum2)))
    return h


@triton.jit
def _residual_logq(s_row, sidx_row, live, ms, zs, z_rest, m_rest, V, K, inv_t,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(empty, r_ref, lzr, lq_res): whether no unlisted entry is finite (k = V, or the rest is
    masked), Z_rest = exp(lzr) as the sum of exp((s - r_ref) / T) over the unlisted entries, and
    log Q_res. A residual far below the max is summed again relative to its own max."""
    empty = m_rest == float("-inf")
    far = live & (m_rest != float("-inf")) & ((m_rest - ms) * inv_t < -_FAR_RESIDUAL)
    z_far = _rest_sumexp(s_row, sidx_row, tl.where(far, V, 0), K, m_rest, inv_t, BLOCK_V,
                         BLOCK_K)
    r_ref = tl.where(far, m_rest, ms)
    lzr = tl.log(tl.where(far, z_far, z_rest))
    lq_res = tl.where(empty, float("-inf"), (r_ref - ms) * inv_t + lzr - tl.log(zs))
    return empty, r_ref, lzr, lq_res


@triton.jit
def _bucket_sums(idx_row, lp_row, s_row, hk, ms, lzs, inv_t, empty, lq_res, beta, log_beta,
                 log_1mbeta, DIV: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass (2) over the k listed entries, then the residual bucket: (D, P_res, Q_res, d_res,
    excess, sum1, sum2, sum3), the last four being what the bucket gradients need."""
    kl = tl.arange(0, BLOCK_K)
    acc_p = tl.zeros([BLOCK_K], tl.float32)
    acc0 = tl.zeros([BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_K], tl.float32)
    acc2 = tl.zeros([BLOCK_K], tl.float32)
    acc3 = tl.zeros([BLOCK_K], tl.float32)
    for j0 in range(0, hk, BLOCK_K):
        kk = j0 + kl
        _, _, p, q, d = _listed_block(idx_row, lp_row, s_row, kk, kk < hk, ms, lzs, inv_t)
        t0, t1, t2, t3 = _bucket_loss(DIV, p, q, d, beta, log_beta, log_1mbeta)
        acc_p += p
        acc0 += t0
        acc1 += t1
        acc2 += t2
        acc3 += t3
    sum_p = tl.sum(acc_p, axis=0)
    p_res = tl.where(empty, 0.0, tl.maximum(1.0 - sum_p, 0.0))
    # sum_b P_b - 1, exactly 0 whenever the residual takes up the missing mass.
    excess = tl.where(empty | (sum_p > 1.0), sum_p - 1.0, 0.0)
    q_res = tl.exp(lq_res)
    d_res = tl.where(p_res == 0.0, float("-inf"),
                     tl.where(empty, float("inf"), tl.log(p_res) - lq_res))
    r0, r1, r2, r3 = _bucket_loss(DIV, p_res, q_res, d_res, beta, log_beta, log_1mbeta)
    sum0 = tl.sum(acc0, axis=0) + r0
    sum1 = tl.sum(acc1, axis=0) + r1
    sum2 = tl.sum(acc2, axis=0) + r2
    sum3 = tl.sum(acc3, axis=0) + r3
    if DIV == 0:
        d_row = sum0 + excess
    elif DIV == 1:
        d_row = sum0 - excess
    elif DIV == 2:
        d_row = beta * sum0 + (1.0 - beta) * sum1
    else:
        d_row = 0.5 * sum0
    return d_row, p_res, q_res, d_res, excess, sum1, sum2, sum3


@triton.jit
def _topk_grad(g_ptr, s_row, idx_row, lp_row, row, y, live, V, hk, ms, lzs, lz1, nf, r_ref, lzr,
               empty, p_res, q_res, d_res, excess, sum1, sum2, sum3, inv_t, beta, log_beta,
               log_1mbeta, eps, cf, hw, DIV: tl.constexpr, HARD: tl.constexpr,
               SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass (3): cf h_res e_v / Z_rest (+ hard CE) at every entry, then cf h_j (+ hard CE) over
    the listed ones; zeros on rows that do not count (nothing read)."""
    c1 = 1.0 - eps + eps * nf.to(tl.float32) / V
    h_res = _bucket_h(DIV, p_res, q_res, d_res, excess, sum1, sum2, sum3, beta, log_beta,
                      log_1mbeta)
    c_res = tl.where(empty, 0.0, cf * h_res)
    lzr_g = tl.where(empty, float("inf"), lzr)  # e_v / Z_rest = 0 when there is no rest
    g_row = g_ptr + row * V  # the gradient is contiguous [N, V]
    lane = tl.arange(0, BLOCK_V)
    hi2 = tl.where(live, V, 0)
    for start in range(0, V, BLOCK_V):
        offs = start + lane
        s = _load_row(s_row, offs, offs < hi2)
        # e_v / Z_rest <= 1 for an unlisted entry; the cap keeps listed ones (rewritten below)
        # finite.
        g = c_res * tl.exp(tl.minimum((s - r_ref) * inv_t - lzr_g, 0.0))
        if HARD:
            g += hw * _hard_grad(s, offs, y, ms, lz1, c1, eps, V, SMOOTH)
        g = tl.where(live, g, 0.0)
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
    # The listed entries over it: every thread's stores above land first.
    tl.debug_barrier()
    kl = tl.arange(0, BLOCK_K)
    for j0 in range(0, hk, BLOCK_K):
        kk = j0 + kl
        km = kk < hk
        idx, s, p, q, d = _listed_block(idx_row, lp_row, s_row, kk, km, ms, lzs, inv_t)
        g = cf * _bucket_h(DIV, p, q, d, excess, sum1, sum2, sum3, beta, log_beta, log_1mbeta)
        if HARD:
            g += hw * _hard_grad(s, idx, y, ms, lz1, c1, eps, V, SMOOTH)
        tl.store(g_row + idx, g.to(g_ptr.dtype.element_ty), mask=km & (idx >= 0))


@triton.jit
def _logit_topk_kernel(
    s_ptr, s_stride, idx_ptr, lp_ptr, sidx_ptr, tgt_ptr, loss_ptr, g_ptr, scale_ptr, flags_ptr,
    V, K, ignore_index, inv_t, beta, soft_factor, hard_weight, eps,
    DIV: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_IGNORE: tl.constexpr, HARD: tl.constexpr,
    SMOOTH: tl.constexpr, NEED_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    idx_row = idx_ptr + row * K
    lp_row = lp_ptr + row * K
    sidx_row = sidx_ptr + row * K
    go, bad_target, y = _row_status(tgt_ptr, row, V, ignore_index, HAS_TARGET, HAS_IGNORE)

    # ---- (1) statistics over V ---------------------------------------------------------------
    ms, zs, z_rest, m_rest, z1, nf, ls = _topk_stats(s_row, sidx_row, tl.where(go, V, 0), K,
                                                     inv_t, HARD, SMOOTH, BLOCK_V, BLOCK_K)
    s_masked = (ms == NEG_INF) & (zs == 0.0)
    flag = tl.where(bad_target, 1, 0) | tl.where(go & s_masked, 2, 0)
    tl.atomic_or(flags_ptr, flag, mask=flag != 0)
    live = go & ((ms != NEG_INF) | (zs != 0.0))
    empty, r_ref, lzr, lq_res = _residual_logq(s_row, sidx_row, live, ms, zs, z_rest, m_rest, V,
                                               K, inv_t, BLOCK_V, BLOCK_K)

    # ---- (2) the k + 1 buckets ---------------------------------------------------------------
    lzs = tl.log(zs)
    log_beta = tl.log(beta)
    log_1mbeta = tl.log(1.0 - beta)
    hk = tl.where(live, K, 0)
    d_row, p_res, q_res, d_res, excess, sum1, sum2, sum3 = _bucket_sums(
        idx_row, lp_row, s_row, hk, ms, lzs, inv_t, empty, lq_res, beta, log_beta, log_1mbeta,
        DIV, BLOCK_K)

    # ---- (3) gradient -----------------------------------------------------------------------
    lz1 = tl.log(z1)
    if NEED_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(tl.float32)
        _topk_grad(g_ptr, s_row, idx_row, lp_row, row, y, live, V, hk, ms, lzs, lz1, nf, r_ref,
                   lzr, empty, p_res, q_res, d_res, excess, sum1, sum2, sum3, inv_t, beta,
                   log_beta, log_1mbeta, eps, soft_factor * inv_t * scale, hard_weight * scale,
                   DIV, HARD, SMOOTH, BLOCK_V, BLOCK_K)

    loss = soft_factor * d_row
    if HARD:
        s_y = tl.load(s_row + y, mask=live, other=0.0).to(tl.float32)
        ce = lz1 - (s_y - ms)
        if SMOOTH:
            # sum over finite v of -log q1_v = nf log Z1 - sum (s_v - m)
            ce = (1.0 - eps) * ce + eps * (nf.to(tl.float32) * lz1 - ls) / V
        loss += hard_weight * ce
    tl.store(loss_ptr + row, tl.where(live, loss, 0.0))


def topk_launch_config(vocab: int, k: int, on_cpu: bool) -> dict:
    """Launch options of ``_logit_topk_kernel``: ``BLOCK_V``, ``BLOCK_K``, ``num_warps`` (and
    ``maxnreg``). GPU: 4 warps, 8 vocabulary elements per thread (chunks of 1024), blocks of
    16 to 128 listed entries. Interpreter: chunks up to 1024, one warp."""
    block_v = triton.next_power_of_2(max(vocab, 2))
    block_k = triton.next_power_of_2(max(k, 2))
    if on_cpu:
        return {"BLOCK_V": min(block_v, 1024), "BLOCK_K": min(block_k, 1024), "num_warps": 1}
    block_v = min(block_v, 1024)
    return {"BLOCK_V": block_v, "BLOCK_K": max(16, min(block_k, 128)),
            "num_warps": max(1, min(4, block_v // 256)), "maxnreg": MAX_REGISTERS}


def logit_topk_forward(student, indices, logprobs, target, cfg, grad_scale, need_grad, *,
                       block_v=None, block_k=None, num_warps=None):
    """KD against a sparse top-k teacher (SPEC §1b) on the Triton backend: the row losses and
    the student gradient in one launch (plus a sort of the indices).

    Args:
        student: ``[N, V]`` float32/bfloat16/float16 logits, unit stride along V.
        indices: ``[N, k]`` int64, in range and distinct within a row, or -1 (an empty slot)
            (checked by the caller).
        logprobs: ``[N, k]`` float tensor (read as float32), listed mass <= 1 + 1e-3.
        target: int64 ``[N]`` or ``None``.
        cfg: a :class:`fastkd.logit.config.LogitKDConfig`.
        grad_scale: one-element float32 tensor multiplying the gradient, or ``None``.
        need_grad: write the student gradient.
        block_v, block_k, num_warps: launch overrides (tests); see :func:`topk_launch_config`.

    Returns:
        ``(row_loss, grad, flags)``: ``row_loss`` float32 ``[N]`` (0 at rows that do not count);
        ``grad`` ``[N, V]`` contiguous in the student dtype (0 at those rows) or ``None``;
        ``flags`` int32 ``[1]``: 1 (a counted target outside [0, V)), 2 (a counted student row
        all -inf). Rows with a flag get loss 0 and gradient 0; the caller raises.
    """
    rows, vocab = _check_student(student)
    if vocab >= 2 ** 31:
        raise ValueError("student_logits: V must be below 2^31 (the indices are sorted as int32)")
    device = student.device
    if indices.dim() != 2 or indices.shape[0] != rows or indices.dtype != torch.int64:
        raise ValueError("teacher_topk indices must be an int64 tensor [N, k]")
    k = indices.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk: need 1 <= k <= V = {vocab}, got k = {k}")
    if logprobs.shape != indices.shape or not logprobs.dtype.is_floating_point:
        raise ValueError("teacher_topk logprobs must be a float tensor shaped like indices")
    if indices.device != device or logprobs.device != device:
        raise ValueError("teacher_topk must be on the student's device")
    target = _check_target(target, rows, device)

    row_loss = torch.empty(rows, dtype=torch.float32, device=device)
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    grad = torch.empty((rows, vocab), dtype=student.dtype, device=device) if need_grad else None
    if rows == 0:
        return row_loss, grad, flags
    scale = _scale_arg(grad_scale, device)
    indices = indices.contiguous()
    logprobs = logprobs.contiguous()
    # Sorted per row, the listed indices of a vocabulary chunk are one contiguous run; empty
    # slots (-1) sort last, beyond every chunk.
    sorted_idx = torch.sort(torch.where(indices < 0, 2 ** 31 - 1, indices).to(torch.int32),
                            dim=1).values

    div, beta = cfg.kernel_divergence
    hard, smooth, has_ignore, ignore = _hard_config(cfg, target)
    opts = _override(topk_launch_config(vocab, k, device.type == "cpu"), num_warps,
                     block_v=block_v, block_k=block_k)
    args = (
        student, student.stride(0), indices, logprobs, sorted_idx,
        target if target is not None else row_loss, row_loss,
        grad if grad is not None else student, scale if scale is not None else row_loss, flags,
        vocab, k, ignore, 1.0 / cfg.temperature, float(beta),
        float(cfg.soft_factor), float(cfg.hard_weight), float(cfg.label_smoothing),
    )
    meta = dict(DIV=int(div), HAS_TARGET=target is not None, HAS_IGNORE=has_ignore, HARD=hard,
                SMOOTH=smooth, NEED_GRAD=bool(need_grad), HAS_SCALE=scale is not None, **opts)
    _launch_rows(_logit_topk_kernel, device, rows, args, meta)
    return row_loss, grad, flags
