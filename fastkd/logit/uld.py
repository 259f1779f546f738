r"""Universal Logit Distillation (Boizard et al. 2024; SPEC §1d): KD across tokenizers.

For every row, with student logits ``s`` ``[V_s]`` and teacher logits ``t`` ``[V_t]`` (any two
vocabulary sizes)::

    q = softmax(s / T),  p = softmax(t / T)
    q_(1) >= q_(2) >= ...,  p_(1) >= p_(2) >= ...   (decreasing order; with uld_top=k only the
                                                      k largest of each, k may exceed V)
    D = sum_j |p_(j) - q_(j)|                        (the shorter list padded with zeros)
    row_loss = soft_weight * (T**2 if t2_scale) * D + hard_weight * CE(softmax(s), target)

The hard CE is on the student's own tokens at T = 1, with ``label_smoothing`` as in the other
divergences; rows whose target is ``ignore_index`` contribute 0 and do not count in ``"mean"``;
``num_items_in_batch`` and the reductions are those of every logit loss (SPEC §1e).

**Gradient.** The sort is a permutation whose indices are constants: with g_v = dD/dq_v =
sign(q_(j) - p_(j)) for the entry v at sorted position j (0 for an entry outside the top k),
dD/ds_v = (1/T) q_v (g_v - sum_u q_u g_u), and on the teacher side (when its logits require
grad) dD/dt_v = (1/T) p_v (-g_v - sum_u p_u (-g_u)). **Ties**: at p_(j) = q_(j) the
subgradient sign(0) = 0 is taken. Equal probabilities on one side (equal logits) keep the
order of the sort: index order for ``torch.sort(stable=True)`` (the full sort, as in the
reference), and ``torch.topk``'s unspecified order with ``uld_top`` smaller than V. D's value
does not depend on that order; its gradient is the one-sided gradient of that ordering.

**Kernels.** Per chunk of rows (temporaries O(chunk * (V_s + V_t)), never N x V in float32 for
the whole batch; the gradients are written in the inputs' dtypes), the student and teacher
logits are sorted in decreasing order on the host: ``torch.sort``, or ``torch.topk`` when
``uld_top`` < V (sorting logits sorts probabilities: softmax is monotone). That sort is the one
unfused step. Then one pass computes the softmax statistics, D, the gradient with respect to
the sorted q and p, its scatter back through the permutation and through the softmax Jacobian,
and the hard CE: the Triton kernel :func:`fastkd.logit.uld_triton.uld_pass` on the ``triton``
and ``cuda`` backends (CUDA tensors; the interpreter on CPU tensors), PyTorch ops
(:func:`_torch_pass`, the same formulas) on the ``cpu`` backend and for float64 inputs.
:data:`ULD_KERNELS` has the signature of :data:`fastkd.logit.ops.KERNELS`, for callers that
loop over row chunks themselves. Behind the custom op ``fastkd::logit_uld`` (computed in
forward, scaled in backward), so ``torch.compile(fullgraph=True)`` traces :func:`kd_loss_uld`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd import _backend, _checks, _custom_op
from fastkd._dtypes import work_dtype
from fastkd._reduce import check_num_items, mean_count, reduce_rows
from fastkd.logit.config import (CONFIG_SCHEMA, FLAG_STUDENT_MASKED, FLAG_TARGET,
                                 FLAG_TEACHER_MASKED, N_CONFIG, REDUCTION_ARG, LogitKDConfig,
                                 as_rows, raise_flags, unit_stride, validate_inputs)
from fastkd.logit.reference import uld_rows_reference
from fastkd.logit.topk import _hard_terms, _RowExp

# Elements of a chunk of rows (student and teacher together): the sorted values and int64
# indices, and the float32 temporaries of the PyTorch pass, stay ~100-200 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _sorted(x, top):
    """``(values, indices)`` of the rows of ``x`` in decreasing order, contiguous: the ``top``
    largest by ``torch.topk`` when ``top`` < V, else a stable ``torch.sort`` of all."""
    if top is not None and top < x.shape[-1]:
        vals, idx = torch.topk(x, top, dim=-1, largest=True, sorted=True)
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals.contiguous(), idx.contiguous()


def _torch_pass(s, t, sv, si, tv, ti, live, tgt, cfg, grad_scale, grad_s, grad_t):
    """The fused pass of :func:`fastkd.logit.uld_triton.uld_pass` in PyTorch ops (same
    arguments and result; float64 math for float64 inputs, else float32)."""
    work = work_dtype(s, t)
    inv_t = 1.0 / cfg.temperature
    keep = live.unsqueeze(-1)
    s_w = s.to(work)
    es = _RowExp(s_w * inv_t)
    et = _RowExp(t.to(work) * inv_t)
    b = torch.exp(sv.to(work) * inv_t - es.lse)  # q_(j)
    a = torch.exp(tv.to(work) * inv_t - et.lse)  # p_(j)
    ls, lt = b.shape[-1], a.shape[-1]
    width = max(ls, lt)
    diff = F.pad(b, (0, width - ls)) - F.pad(a, (0, width - lt))
    g = torch.sign(diff)  # dD/dq_(j); sign(0) = 0
    rows = cfg.soft_factor * diff.abs().sum(-1)
    weight = 1.0 if grad_scale is None else grad_scale.to(work).reshape(1, 1)
    cf = cfg.soft_factor * inv_t * weight
    hard = tgt is not None and cfg.hard_weight != 0.0
    if hard:
        ce, g_hard = _hard_terms(s_w, tgt, cfg, weight, es if inv_t == 1.0 else _RowExp(s_w))
        rows = rows + cfg.hard_weight * ce
    if grad_s is not None:
        g_q = g[:, :ls]
        c_q = (b * g_q).sum(-1, keepdim=True)
        # Unlisted entries (g_v = 0), then the listed ones through the permutation.
        gs = (es.e / es.sum) * -c_q
        gs.scatter_(-1, si, b * (g_q - c_q))
        gs = gs * cf
        if hard:
            gs = gs + g_hard
        grad_s.copy_(torch.where(keep, gs, 0.0))
    if grad_t is not None:
        h_p = -g[:, :lt]
        c_p = (a * h_p).sum(-1, keepdim=True)
        gt = (et.e / et.sum) * -c_p
        gt.scatter_(-1, ti, a * (h_p - c_p))
        grad_t.copy_(torch.where(keep, gt * cf, 0.0))
    return torch.where(live, rows, 0.0)


def _triton_pass(*args):
    from fastkd.logit import uld_triton
    return uld_triton.uld_pass(*args)


def _row_flags(tg, sv, tv, ignore_index, vocab):
    """``(live, flags)``: the rows that count with a target in range and no side -inf
    everywhere (the max, ``sv[:, 0]``, is -inf), and the int32 error bits of the chunk."""
    n = sv.shape[0]
    if tg is None:
        go = torch.ones(n, dtype=torch.bool, device=sv.device)
        bad = torch.zeros_like(go)
    else:
        counted = tg != ignore_index
        bad = counted & ((tg < 0) | (tg >= vocab))
        go = counted & ~bad
    s_masked = go & (sv[:, 0] == -math.inf)
    t_masked = go & (tv[:, 0] == -math.inf)
    bits = (bad.any().to(torch.int32) * FLAG_TARGET
            | s_masked.any().to(torch.int32) * FLAG_STUDENT_MASKED
            | t_masked.any().to(torch.int32) * FLAG_TEACHER_MASKED)
    return go & ~s_masked & ~t_masked, bits.reshape(1)


def uld_rows_and_grads(student, teacher, target, cfg, grad_scale, need_s, need_t, fused):
    """Row losses, gradients and error flags of ULD over row chunks; ``fused`` is the pass
    (:func:`_torch_pass` or :func:`_triton_pass`). Arguments and results as in
    :data:`ULD_KERNELS` (one teacher)."""
    n, vs = student.shape
    vt = teacher.shape[1]
    rows_out = torch.empty(n, dtype=work_dtype(student, teacher), device=student.device)
    grad_s = torch.empty((n, vs), dtype=student.dtype, device=student.device) if need_s \
        else None
    grad_t = torch.empty((n, vt), dtype=teacher.dtype, device=teacher.device) if need_t \
        else None
    flags = torch.zeros(1, dtype=torch.int32, device=student.device)
    step = max(1, _CHUNK_ELEMENTS // (vs + vt))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        s, t = student[lo:hi], teacher[lo:hi]
        tg = None if target is None else target[lo:hi]
        sv, si = _sorted(s, cfg.uld_top)
        tv, ti = _sorted(t, cfg.uld_top)
        live, bits = _row_flags(tg, sv, tv, cfg.ignore_index, vs)
        flags |= bits
        safe = None if tg is None else torch.where(live, tg, torch.zeros_like(tg))
        rows = fused(s, t, sv, si, tv, ti, live, safe, cfg, grad_scale,
                     None if grad_s is None else grad_s[lo:hi],
                     None if grad_t is None else grad_t[lo:hi])
        rows_out[lo:hi] = rows
    return rows_out, grad_s, grad_t, flags


def _check_one_teacher(teachers, weights, need_t):
    if len(teachers) != 1 or len(need_t) != 1:
        raise ValueError(f"divergence='uld' takes one teacher, got {len(teachers)}")
    if list(weights) not in ([1.0], [1]):
        raise ValueError(f"divergence='uld': the one teacher's weight must be 1.0, got "
                         f"{list(weights)}")


def _cpu_kernel(student, teachers, target, weights, cfg, grad_scale, need_s, need_t):
    _check_one_teacher(teachers, weights, need_t)
    rows, gs, gt, flags = uld_rows_and_grads(student, teachers[0], target, cfg, grad_scale,
                                             need_s, need_t[0], _torch_pass)
    return rows, gs, [gt], flags


def _triton_kernel(student, teachers, target, weights, cfg, grad_scale, need_s, need_t):
    _check_one_teacher(teachers, weights, need_t)
    t = teachers[0]
    # float64 (not a kernel dtype) and a CUDA machine without triton run the PyTorch pass.
    triton_ok = _backend._triton_import_reason() is None
    fused = _triton_pass if triton_ok and torch.float64 not in (student.dtype, t.dtype) \
        else _torch_pass
    rows, gs, gt, flags = uld_rows_and_grads(unit_stride(student), unit_stride(t), target, cfg,
                                             grad_scale, need_s, need_t[0], fused)
    return rows, gs, [gt], flags


#: backend -> ``fn(student [n, V_s], [teacher [n, V_t]], target [n] int64 or None, [1.0], cfg,
#: grad_scale (float32 [1] or None), need_grad_student, [need_grad_teacher]) -> (row_loss [n]
#: (float32; float64 for float64 inputs), grad_s or None, [grad_t or None], flags int32 [1])``,
#: like :data:`fastkd.logit.ops.KERNELS`: gradients of ``sum_r grad_scale * row_loss_r`` in the
#: inputs' dtypes, flags as in ``config.FLAG_*`` (rows with a flag get loss 0; the caller
#: raises with ``config.raise_flags``).
ULD_KERNELS = {"cpu": _cpu_kernel, "cuda": _triton_kernel, "triton": _triton_kernel}


ULD_SCHEMA = (f"(Tensor student, Tensor teacher, Tensor? target, {CONFIG_SCHEMA}, "
              f"bool need_grad_student, bool need_grad_teacher, str backend, "
              f"Tensor? num_items=None) -> (Tensor, Tensor, Tensor)")
_ULD_INPUTS = 3 + N_CONFIG + 4  # tensors, configuration, two needs, backend, num_items


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::logit_uld", mutates_args=(),
                         schema=ULD_SCHEMA, **_custom_op.host_sync_tags())
def logit_uld_op(student, teacher, target, *rest):
    """``fastkd::logit_uld``: ULD on rows, ``student`` ``[N, V_s]``, ``teacher`` ``[N, V_t]``,
    ``target`` ``[N]`` int64 or None, then the configuration (:class:`LogitKDConfig` order),
    ``need_grad_student``, ``need_grad_teacher``, ``backend`` (cpu, cuda, triton) and
    ``num_items`` (the denominator of ``"mean"``, or None for this call's count). Returns
    ``(loss, grad_student, grad_teacher)`` (gradients computed in forward, or ``[0]``
    placeholders); raises the data-dependent errors of SPEC §Errors."""
    cfg = LogitKDConfig.from_args(rest[:N_CONFIG])
    need_s, need_t, backend = rest[N_CONFIG:N_CONFIG + 3]
    num_items = rest[N_CONFIG + 3] if len(rest) > N_CONFIG + 3 else None
    tgt = None if target is None else target.contiguous()
    with _custom_op.kernel_context(student.device):
        count = mean_count(tgt, cfg.ignore_index, student.shape[0], student.device, num_items)
        grad_scale = (1.0 / count).reshape(1) if cfg.reduction == "mean" else None
        rows, grad_s, grad_t, flags = ULD_KERNELS[backend](
            student, [teacher], tgt, [1.0], cfg, grad_scale, bool(need_s), [bool(need_t)])
        bits = int(flags.item())
        if bits:
            raise_flags(bits, cfg.ignore_index, student.shape[-1], False)
        loss = reduce_rows(rows, cfg.reduction, rows.shape, count.to(rows.dtype))
    grad_t = grad_t[0]
    return (loss, _custom_op.placeholder(student) if grad_s is None else grad_s,
            _custom_op.placeholder(teacher) if grad_t is None else grad_t)


@logit_uld_op.register_fake
def _uld_fake(student, teacher, target, *rest):
    reduction, need_s, need_t = rest[REDUCTION_ARG], rest[N_CONFIG], rest[N_CONFIG + 1]
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (),
                             dtype=work_dtype(student, teacher))
    return (loss, student.new_empty(student.shape) if need_s else _custom_op.placeholder(student),
            teacher.new_empty(teacher.shape) if need_t else _custom_op.placeholder(teacher))


def _uld_setup(ctx, inputs, output):
    ctx.reduction = inputs[3 + REDUCTION_ARG]
    _custom_op.save_gradients(ctx, list(output[1:]),
                              [inputs[3 + N_CONFIG], inputs[4 + N_CONFIG]])


def _uld_backward(ctx, grad_loss, _grad_s, _grad_t):
    if grad_loss is None:
        return (None,) * _ULD_INPUTS
    g_s, g_t = _custom_op.scale_saved(ctx, ctx.saved_tensors, grad_loss, "KD loss (uld)",
                                      per_row=ctx.reduction == "none")
    return (g_s, g_t) + (None,) * (_ULD_INPUTS - 2)


_custom_op.register_autograd(logit_uld_op, _uld_backward, _uld_setup)


def kd_loss_uld(student_logits, teacher_logits, target, cfg: LogitKDConfig, *, backend="auto",
                teacher_topk=None, teacher_weights=None, num_items_in_batch=None):
    r"""ULD loss (module docstring, SPEC §1d) for a validated ``cfg`` with
    ``cfg.divergence == "uld"``.

    Args:
        student_logits: ``(*, V_s)`` float tensor.
        teacher_logits: ``(*, V_t)`` float tensor (any ``V_t``; a list holding one is
            accepted), same leading shape and device; gradients flow to it when it requires
            grad.
        target: ``(*)`` integer class indices of the student's vocabulary, or None (no hard
            term).
        cfg: temperature T (default 1), soft_weight (1), hard_weight (0), t2_scale (True),
            ignore_index (-100), label_smoothing (0), reduction ("mean"), uld_top (None: the
            whole distributions). ``beta`` and ``teacher_mixture`` do not apply.
        backend: ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``
            (float64 inputs: the reference under ``"auto"``).
        teacher_topk: must be None (a sparse teacher has no full distribution to sort).
        teacher_weights: None, or one weight (one teacher).
        num_items_in_batch: the denominator of ``"mean"`` (SPEC §1e).

    Returns the float32 loss (float64 on float64 inputs): a scalar, or ``(*)`` with
    ``reduction="none"``. ``ValueError`` for several teachers, ``teacher_topk``, mismatched
    shapes, a counted target outside ``[0, V_s)`` or a counted row that is -inf everywhere.
    """
    if teacher_topk is not None:
        raise ValueError("teacher_topk is not supported with divergence='uld': ULD sorts the "
                         "teacher's whole distribution; pass dense teacher_logits")
    if teacher_logits is None:
        raise ValueError("teacher_logits is None: divergence='uld' needs the teacher's logits")
    if isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) != 1:
            raise ValueError(f"teacher_logits: divergence='uld' takes one teacher, got a list "
                             f"of {len(teacher_logits)}")
        teacher_logits = teacher_logits[0]
    if teacher_weights is not None:
        _checks.check_weights("teacher_weights", teacher_weights, 1)
    backend = _backend.check_backend_name(backend)
    student, (teacher,), target = validate_inputs(student_logits, teacher_logits, target)
    name = _backend.select_backend(backend, student.device, [student.dtype, teacher.dtype],
                                   what="logits")
    lead_shape = student.shape[:-1]
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    num_items = check_num_items(num_items_in_batch, cfg.reduction, student.device)
    if name == "reference":
        s2 = student.reshape(-1, student.shape[-1])
        t2 = teacher.reshape(-1, teacher.shape[-1])
        with _custom_op.no_autocast(s2.device):
            rows = uld_rows_reference(s2, t2, tgt, **cfg.reference_kwargs())
            count = mean_count(tgt, cfg.ignore_index, s2.shape[0], s2.device, num_items)
            return reduce_rows(rows, cfg.reduction, lead_shape, count.to(rows.dtype))
    s2, t2 = as_rows(student), as_rows(teacher)
    loss, _, _ = _custom_op.call(logit_uld_op, s2, t2, tgt, *cfg.as_args(),
                                 _custom_op.needs_grad(s2), _custom_op.needs_grad(t2), name,
                                 num_items)
    return loss.reshape(lead_shape) if cfg.reduction == "none" else loss
