"""Sparse top-k teacher (SPEC §1b, offline distillation): validation and the chunked path.

The teacher is given as ``(indices [N, k], logprobs [N, k])``: its k most likely vocabulary
entries and their log-probabilities, stored ahead of training. The divergence is computed over
k + 1 buckets (the listed entries and one residual bucket), see
:func:`fastkd.logit.reference.topk_bucket_logprobs`.

The loss and the student gradient are computed together in the forward pass; backward only
scales that gradient. Backends with a fused kernel (:data:`FUSED_KERNELS`: Triton) do it in one
launch per call. The others run :func:`topk_rows_and_grad`: row chunks of PyTorch ops, so that
the float32 temporaries stay O(chunk * V) (the student gradient itself is written in the
student's dtype). Per chunk: three row statistics over V (logsumexp of all entries, of the
unlisted ones, and at T = 1 for the hard term), the divergence and its bucket gradients on the
small [rows, k + 1] tensors (through the reference's ``divergence_rows``), and one write of the
gradient over V.
"""
from __future__ import annotations

import math

import torch

from fastkd import _checks, _custom_op, _ext
from fastkd._dtypes import work_dtype
from fastkd._reduce import mean_count, reduce_rows
from fastkd.logit.config import (CONFIG_SCHEMA, N_CONFIG, REDUCTION_ARG, LogitKDConfig,
                                 raise_flags, unit_stride)
from fastkd.logit.reference import (_log_mix, checked_rows, divergence_rows, jsd_endpoint,
                                    kd_rows_topk_reference)
from fastkd.logit.topk_teacher import TopKTeacher, merge_topk_teachers, resolve_teacher_topk

# Float32 elements per chunk of rows: bounds the temporaries (~8 x 4 bytes each) to ~128 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _teacher_list(teacher_topk):
    """The top-k teachers of ``teacher_topk``: one (a pair or a :class:`TopKTeacher`) or a
    list/tuple of several (each a pair or a :class:`TopKTeacher`)."""
    if isinstance(teacher_topk, (tuple, list)) and any(
            isinstance(x, (TopKTeacher, tuple, list)) for x in teacher_topk):
        if not all(isinstance(x, (TopKTeacher, tuple, list)) for x in teacher_topk):
            raise TypeError("teacher_topk: a list of several top-k teachers holds only "
                            "(indices, logprobs) pairs or fastkd.TopKTeacher objects")
        return list(teacher_topk)
    return [teacher_topk]


def count_topk_teachers(teacher_topk) -> int:
    """How many top-k teachers ``teacher_topk`` holds (for ``teacher_weights``)."""
    return len(_teacher_list(teacher_topk))


def _validate_one(teacher, vocab, lead, temperature, name):
    if isinstance(teacher, TopKTeacher):
        if teacher.k > vocab:
            raise ValueError(f"{name} has k = {teacher.k} entries per row; need 1 <= k <= V = "
                             f"{vocab}")
        teacher = resolve_teacher_topk(teacher, vocab, temperature)
    if not isinstance(teacher, (tuple, list)) or len(teacher) != 2:
        raise TypeError(f"{name} must be a pair (indices, logprobs) of tensors or a "
                        "fastkd.TopKTeacher")
    indices, logprobs = teacher
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} indices must be an int64 (or int32) tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    _checks.check_float_tensor(f"{name} logprobs", logprobs)
    if indices.shape != logprobs.shape:
        raise ValueError(f"{name} indices {tuple(indices.shape)} and logprobs "
                         f"{tuple(logprobs.shape)} must have the same shape")
    if indices.dim() < 1 or indices.shape[:-1] != lead:
        raise ValueError(f"{name} tensors have shape {tuple(indices.shape)} but must be "
                         f"[*, k] with * = the leading shape of student_logits {tuple(lead)}")
    k = indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"{name} has k = {k} entries per row; need 1 <= k <= V = {vocab}")
    return indices.reshape(-1, k).to(torch.int64), logprobs.reshape(-1, k)


def validate_topk_teachers(teacher_topk, student_logits, temperature, teacher_weights=None):
    """Check ``teacher_topk`` against ``student_logits`` ``[*, V]`` (shapes, dtypes, devices):
    a pair ``(indices, logprobs)`` at the loss's ``temperature``, a :class:`~fastkd.TopKTeacher`
    (re-tempered from its temperature to ``temperature``), or a list of several of those.

    Returns ``(pairs, weights)``: one ``(indices [N, k_i] int64, logprobs [N, k_i])`` per
    teacher (-1 indices are empty slots) and the normalised ``teacher_weights`` (default
    equal). The device-data checks are :func:`check_topk_data`'s."""
    teachers = _teacher_list(teacher_topk)
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    several = len(teachers) > 1
    pairs = []
    for i, t in enumerate(teachers):
        name = f"teacher_topk[{i}]" if several else "teacher_topk"
        idx, lp = _validate_one(t, vocab, lead, temperature, name)
        _checks.check_same_device(student_logits=student_logits, **{f"{name} indices": idx,
                                                                    f"{name} logprobs": lp})
        pairs.append((idx, lp))
    return pairs, _checks.check_weights("teacher_weights", teacher_weights, len(pairs))


def validate_topk(teacher_topk, student_logits, temperature, check_data=True,
                  teacher_weights=None):
    """:func:`validate_topk_teachers`, then one sparse teacher: several are mixed with their
    weights by :func:`merge_topk_op` (which always checks their data). Returns ``(indices
    [N, k] int64, logprobs [N, k])``. The data checks of one teacher run here with
    ``check_data``, else inside the custom op."""
    pairs, weights = validate_topk_teachers(teacher_topk, student_logits, temperature,
                                            teacher_weights)
    if len(pairs) > 1:
        return merge_topk_op([i for i, _ in pairs], [lp for _, lp in pairs], weights,
                             student_logits.shape[-1])
    idx, lp = pairs[0]
    if check_data:
        check_topk_data(idx, lp, student_logits.shape[-1])
    return idx, lp


def check_topk_data(idx, lp, vocab, name="teacher_topk"):
    """Index range (-1: an empty slot), duplicate indices, listed probabilities summing to
    more than 1 (one host synchronisation)."""
    k = idx.shape[-1]
    if idx.numel():
        srt = idx.sort(-1).values
        bad_range = (srt[:, 0] < -1) | (srt[:, -1] >= vocab)
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(-1) if k > 1 \
            else torch.zeros_like(bad_range)
        p = torch.where(idx >= 0, lp.float().exp(), 0.0)
        over = p.sum(-1) > 1.0 + 1e-3  # NaN rows compare False: NaN propagates
        flags = torch.stack([bad_range.any(), dup.any(), over.any()]).tolist()
        if flags[0]:
            raise ValueError(f"{name} indices must lie in [0, {vocab}) (or be -1, an empty slot)")
        if flags[1]:
            raise ValueError(f"{name} indices must be distinct within a row")
        if flags[2]:
            raise ValueError(f"{name} logprobs must be log-probabilities: the listed "
                             "probabilities of a row sum to more than 1")


def check_topk_teachers(pairs, vocab):
    """:func:`check_topk_data` of each ``(indices, logprobs)`` pair, naming the teacher
    (``teacher_topk[i]`` when there are several)."""
    for i, (idx, lp) in enumerate(pairs):
        check_topk_data(idx, lp, vocab, f"teacher_topk[{i}]" if len(pairs) > 1 else "teacher_topk")


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::merge_topk", mutates_args=(),
                         schema="(Tensor[] indices, Tensor[] logprobs, float[] weights, "
                                "int vocab) -> (Tensor, Tensor)",
                         **_custom_op.host_sync_tags())
def merge_topk_op(indices, logprobs, weights, vocab):
    """``fastkd::merge_topk``: several top-k teachers (``[N, k_i]`` each, at the loss's
    temperature) checked (:func:`check_topk_data`, naming the teacher) and mixed with
    ``weights`` into one (:func:`~fastkd.logit.topk_teacher.merge_topk_teachers`)."""
    pairs = list(zip(indices, logprobs))
    check_topk_teachers(pairs, vocab)
    return merge_topk_teachers(pairs, list(weights), vocab)


@merge_topk_op.register_fake
def _merge_topk_fake(indices, logprobs, weights, vocab):
    width = min(sum(i.shape[-1] for i in indices), vocab)
    dtype = (torch.float64 if any(lp.dtype == torch.float64 for lp in logprobs)
             else torch.float32)
    n = indices[0].shape[0]
    return (indices[0].new_empty((n, width), dtype=torch.int64),
            logprobs[0].new_empty((n, width), dtype=dtype))


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _dlogq(logp, logq, divergence, beta):
    """``dD / dlog Q_b`` of the divergences of :func:`fastkd.logit.reference.divergence_rows`
    over buckets (``logp``, ``logq`` ``[rows, k + 1]``); 0 where Q_b = 0. Derived by hand (the
    custom op that runs this has no autograd) and checked against autograd in the tests:
    KL(P||Q): -P_b; KL(Q||P): Q_b (log Q_b - log P_b + 1); JSD(beta):
    (1 - beta) Q_b log(Q_b / M_b) with M = beta P + (1 - beta) Q; TVD: Q_b sign(Q_b - P_b) / 2.
    """
    p, q = logp.exp(), logq.exp()
    divergence = jsd_endpoint(divergence, beta)
    zero = torch.zeros_like(q)
    if divergence == "kl":
        return -p
    if divergence == "reverse_kl":
        return torch.where(q > 0, q * (logq - logp + 1.0), zero)
    if divergence == "jsd":
        logm = _log_mix(logp, logq, beta, 1.0 - beta)
        return torch.where(q > 0, (1.0 - beta) * q * (logq - logm), zero)
    return 0.5 * q * torch.sign(q - p)


class _RowExp:
    """``e = exp(x - max)`` of a chunk with its row max and row sum: the softmax is ``e / sum``
    and ``logsumexp = max + log(sum)``, so the exponentials are computed once and reused."""

    def __init__(self, x):
        self.m = x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)  # all -inf rows
        self.e = torch.exp(x - self.m)
        self.sum = self.e.sum(-1, keepdim=True)
        self.lse = self.m + self.sum.log()


def _bucket_terms(z, idx, lp, soft_factor, cfg, weight, ez):
    """Per row of one chunk (``z = s / T``, ``ez`` its :class:`_RowExp`): the soft row loss and
    the gradient of ``weight * soft_factor * D`` with respect to ``z``.

    The bucket log-probabilities come from row statistics: ``lse`` over all entries,
    ``lse_rest`` over the unlisted ones (summed directly, not as ``1 - sum Q_j``, so a tiny
    residual keeps its relative precision), and the listed ``z``. D and ``g_b = dD/dlog Q_b``
    are computed on the small ``[rows, k + 1]`` tensors (D by the reference's
    ``divergence_rows``, ``g`` by :func:`_dlogq`). Then, with ``G = sum_b g_b``,
    ``dD/dz_v = g_j [v = indices_j] + g_res e_v / sum_rest [v unlisted] - G e_v / sum``.
    """
    used = idx >= 0  # -1: an empty slot (P = Q = 0)
    sidx = idx.clamp_min(0)
    listed = torch.zeros_like(z).scatter_add_(-1, sidx, used.to(z.dtype)) > 0
    e_rest = torch.where(listed, 0.0, ez.e)
    sum_rest = e_rest.sum(-1, keepdim=True)
    empty = sum_rest == 0  # k == V, every unlisted entry masked, or underflow below the max
    lse_rest = torch.where(empty, torch.full_like(sum_rest, -math.inf), ez.m + sum_rest.log())
    logq = torch.cat([torch.where(used, z.gather(-1, sidx) - ez.lse, -math.inf),
                      lse_rest - ez.lse], -1)
    lp = torch.where(used, lp, -math.inf)
    p_res = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    p_res = torch.where(empty, torch.zeros_like(p_res), p_res)
    logp = torch.cat([lp, torch.where(p_res > 0, p_res.clamp_min(torch.finfo(z.dtype).tiny).log(),
                                      torch.full_like(p_res, -math.inf))], -1)
    d = divergence_rows(logp, logq, cfg.divergence, cfg.beta) * soft_factor
    g = _dlogq(logp, logq, cfg.divergence, cfg.beta) * (soft_factor * weight)
    g_res = torch.where(empty, torch.zeros_like(g[:, -1:]), g[:, -1:])
    g_k = torch.where(used, g[:, :-1], 0.0)
    grad = e_rest.mul_(g_res / torch.where(empty, torch.ones_like(sum_rest), sum_rest))
    grad.addcmul_(ez.e, (g_k.sum(-1, keepdim=True) + g_res) / ez.sum, value=-1.0)
    grad.scatter_add_(-1, sidx, g_k)
    return d.detach(), grad


def _hard_terms(s, tgt, cfg, weight, es):
    """Hard CE rows (T = 1, label smoothing as in the reference: the smoothing sum skips -inf
    entries and divides by V) and the gradient of ``weight * hard_weight * CE`` (``es``: the
    :class:`_RowExp` of ``s``)."""
    vocab = s.shape[-1]
    eps = cfg.label_smoothing
    ce = es.lse.squeeze(-1) - s.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    scale = weight * cfg.hard_weight
    if eps == 0.0:
        grad = es.e * (scale / es.sum)
    else:
        finite = s != -math.inf
        n_fin = finite.sum(-1, keepdim=True).to(s.dtype)
        s_fin = torch.where(finite, s, torch.zeros_like(s)).sum(-1, keepdim=True)
        ce = (1.0 - eps) * ce + eps * ((es.lse * n_fin - s_fin) / vocab).squeeze(-1)
        grad = es.e * (scale * ((1.0 - eps) + eps * n_fin / vocab) / es.sum)
        grad.sub_(finite.to(s.dtype) * (scale * eps / vocab))
    tgt_g = torch.full_like(ce.unsqueeze(-1), -(1.0 - eps)) * scale
    grad.scatter_add_(-1, tgt.unsqueeze(-1), tgt_g)
    return ce, grad


def topk_rows_and_grad(s2, idx, lp, tgt, cfg, grad_scale, need_grad: bool):
    """Row losses ``[N]`` (float32, float64 for float64 input) and, if ``need_grad``, the
    gradient of ``sum_r grad_scale * loss_r`` with respect to ``s2`` in its dtype (rows whose
    target is ``ignore_index`` are 0 and get a zero gradient)."""
    n, vocab = s2.shape
    work = work_dtype(s2)
    rows_out = torch.empty(n, dtype=work, device=s2.device)
    grad = torch.empty_like(s2) if need_grad else None
    soft_factor = cfg.soft_factor
    weight = grad_scale.to(work).reshape(-1, 1) if grad_scale is not None else 1.0
    step = _chunk_rows(vocab)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        s = s2[lo:hi].to(work)
        tg = None if tgt is None else tgt[lo:hi]
        # The reference's data checks (target range, a counted row -inf everywhere).
        valid = checked_rows(s, [], tg, cfg.ignore_index)
        if tg is not None:
            # Ignored rows may hold anything (padding): compute on zeros instead.
            s = torch.where(valid.unsqueeze(-1), s, torch.zeros((), dtype=work, device=s.device))
        z = s / cfg.temperature if cfg.temperature != 1.0 else s
        ez = _RowExp(z)
        w = weight if isinstance(weight, float) else weight.expand(hi - lo, 1)
        rows, g = _bucket_terms(z, idx[lo:hi], lp[lo:hi].detach().to(work), soft_factor, cfg,
                                w, ez)
        if cfg.temperature != 1.0:
            g.mul_(1.0 / cfg.temperature)
        if tg is not None and cfg.hard_weight != 0.0:
            safe = torch.where(valid, tg, torch.zeros_like(tg))
            ce, gh = _hard_terms(s, safe, cfg, w, ez if z is s else _RowExp(s))
            rows = rows + cfg.hard_weight * ce
            g.add_(gh)
        if tg is not None:
            rows = torch.where(valid, rows, torch.zeros_like(rows))
            g = torch.where(valid.unsqueeze(-1), g, torch.zeros_like(g))
        rows_out[lo:hi] = rows
        if need_grad:
            grad[lo:hi] = g
    return rows_out, grad


def _triton_topk(student, indices, logprobs, target, cfg, grad_scale, need):
    from fastkd.logit import triton_kernel
    return triton_kernel.logit_topk_forward(student, indices, logprobs, target, cfg, grad_scale,
                                            need)


def _cxx_topk(student, indices, logprobs, target, cfg, grad_scale, need):
    div, beta = cfg.kernel_divergence
    return _ext._C.logit_topk_forward(student, indices, logprobs, target, cfg.ignore_index,
                                      cfg.temperature, div, beta, cfg.soft_factor,
                                      cfg.hard_weight, cfg.label_smoothing, grad_scale, need)


#: Backends with a fused top-k kernel (one pass over the student row, loss and gradient in one
#: launch); the others run :func:`topk_rows_and_grad` (chunks of PyTorch ops). The extension's
#: kernel serves both cpu and cuda tensors (csrc/glue/logit.h).
FUSED_KERNELS = {"triton": _triton_topk}
if _ext._C is not None and hasattr(_ext._C, "logit_topk_forward"):
    FUSED_KERNELS["cpu"] = _cxx_topk
    FUSED_KERNELS["cuda"] = _cxx_topk


TOPK_SCHEMA = (f"(Tensor student, Tensor indices, Tensor logprobs, Tensor? target, "
               f"{CONFIG_SCHEMA}, bool need_grad_student, str backend, "
               f"Tensor? num_items=None) -> (Tensor, Tensor)")


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::logit_kd_topk", mutates_args=(),
                         schema=TOPK_SCHEMA, **_custom_op.host_sync_tags())
def logit_kd_topk_op(student, indices, logprobs, target, *rest):
    """``fastkd::logit_kd_topk``: KD against a sparse top-k teacher on rows ``[N, V]``.
    Returns ``(loss, grad_student)`` (the gradient computed in forward, or a ``[0]``
    placeholder); raises the data-dependent errors (indices, logprobs, target, -inf rows).
    ``num_items``: the denominator of ``"mean"`` (SPEC §1e), or None for this call's count."""
    cfg = LogitKDConfig.from_args(rest[:N_CONFIG])
    need = bool(rest[N_CONFIG])
    num_items = rest[N_CONFIG + 2] if len(rest) > N_CONFIG + 2 else None
    check_topk_data(indices, logprobs, student.shape[-1])
    with _custom_op.kernel_context(student.device):
        count = mean_count(target, cfg.ignore_index, student.shape[0], student.device,
                           num_items).to(work_dtype(student))
        grad_scale = (1.0 / count) if cfg.reduction == "mean" else None
        kernel = FUSED_KERNELS.get(rest[N_CONFIG + 1])
        if kernel is None:
            rows, grad = topk_rows_and_grad(student, indices, logprobs, target, cfg, grad_scale,
                                            need)
        else:
            rows, grad, flags = kernel(unit_stride(student), indices, logprobs, target, cfg,
                                       None if grad_scale is None else grad_scale.reshape(1),
                                       need)
            bits = int(flags.item())
            if bits:
                raise_flags(bits, cfg.ignore_index, student.shape[-1], False)
        loss = reduce_rows(rows, cfg.reduction, rows.shape, count.to(rows.dtype))
    return loss, _custom_op.placeholder(student) if grad is None else grad


@logit_kd_topk_op.register_fake
def _topk_fake(student, indices, logprobs, target, *rest):
    reduction, need = rest[REDUCTION_ARG], rest[N_CONFIG]
    dtype = work_dtype(student)
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (), dtype=dtype)
    return loss, student.new_empty(student.shape) if need else _custom_op.placeholder(student)


def _topk_setup(ctx, inputs, output):
    ctx.reduction = inputs[4 + REDUCTION_ARG]
    _custom_op.save_gradients(ctx, [output[1]], [inputs[4 + N_CONFIG]])


_TOPK_INPUTS = 4 + N_CONFIG + 3  # tensors, configuration, need_grad, backend, num_items


def _topk_backward(ctx, grad_loss, _grad):
    if grad_loss is None:
        return (None,) * _TOPK_INPUTS
    (g,) = _custom_op.scale_saved(ctx, ctx.saved_tensors, grad_loss, "KD loss (teacher_topk)",
                                  per_row=ctx.reduction == "none")
    return (g,) + (None,) * (_TOPK_INPUTS - 1)


_custom_op.register_autograd(logit_kd_topk_op, _topk_backward, _topk_setup)


def kd_loss_topk(student_logits, teacher_topk, target, cfg, backend_name: str, num_items=None,
                 teacher_weights=None):
    """KD loss against a sparse top-k teacher (or several, mixed with ``teacher_weights``);
    ``cfg`` is a validated ``LogitKDConfig``, ``num_items`` the checked
    ``num_items_in_batch`` or None."""
    lead_shape = student_logits.shape[:-1]
    s2 = student_logits.reshape(-1, student_logits.shape[-1])
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    if backend_name == "reference":
        pairs, weights = validate_topk_teachers(teacher_topk, student_logits, cfg.temperature,
                                                teacher_weights)
        check_topk_teachers(pairs, s2.shape[-1])
        if len(pairs) > 1:
            idx, lp = [i for i, _ in pairs], [lp for _, lp in pairs]
        else:
            idx, lp = pairs[0]
        rows = kd_rows_topk_reference(s2, idx, lp, tgt, weights=weights,
                                      **cfg.reference_kwargs())
        count = mean_count(tgt, cfg.ignore_index, s2.shape[0], s2.device, num_items)
        return reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
    idx, lp = validate_topk(teacher_topk, student_logits, cfg.temperature, check_data=False,
                            teacher_weights=teacher_weights)
    loss, _ = _custom_op.call(logit_kd_topk_op, s2, idx, lp, tgt, *cfg.as_args(),
                              _custom_op.needs_grad(s2), backend_name, num_items)
    return loss.reshape(lead_shape) if cfg.reduction == "none" else loss
