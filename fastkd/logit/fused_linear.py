"""Large-vocabulary logit KD with the lm_head fused (SPEC §1b): ``fastkd.FusedLinearKDLoss``.

Scheme: rows are processed in chunks. For each chunk the student (and teacher) logits are one
cuBLAS/MKL GEMM, the fused KD kernel of :mod:`fastkd.logit.ops` (the same kernels as
``KDLoss``, no second softmax-KL implementation) turns them into row losses and the gradient with
respect to the logits, and two more GEMMs turn that gradient into the chunk's rows of
``grad student_hidden`` and its contribution to ``grad student_weight``. Only one chunk of logits
and one chunk of logit gradients exist at a time, so the extra memory is O(chunk * V + N) for
any N. Why this scheme rather than one blockwise kernel: the work is 4 GEMMs of 2*N*H*V FLOPs
each against ~6 N*V element passes of the KD kernel, so at H >= 512 the GEMMs dominate
(measured on CPU: benchmarks/results, the ``fused-linear`` suite), and vendor GEMMs are
already near peak; a blockwise kernel would have to re-implement the GEMM to fuse an
epilogue worth a few percent.

For ``reduction="mean"``/``"sum"`` every gradient is computed in the forward pass (with the
1/count of ``"mean"`` folded in) and backward scales it by the incoming gradient; with
``"none"`` the per-row incoming gradients are only known in backward, so backward recomputes
the chunks (one extra pair of logit GEMMs).
"""
from __future__ import annotations

import functools

import torch

from fastkd import _backend, _checks, _custom_op
from fastkd._dtypes import work_dtype
from fastkd._reduce import check_num_items, mean_count, reduce_rows
from fastkd.logit import topk as _topk
from fastkd.logit import vocab_parallel
from fastkd.logit.config import (CONFIG_SCHEMA, N_CONFIG, REDUCTION_ARG, LogitKDConfig, as_rows,
                                 check_vocab_mismatch, raise_flags, vocab_mismatch_error)
from fastkd.logit.ops import KERNELS
from fastkd.logit.reference import kd_rows_reference, kd_rows_topk_reference

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def auto_chunk_size(rows: int, vocab: int, bytes_per_logit_row: int, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits and logit gradients take at most ~1/8 of the free
    device memory (CUDA; clamped to [64 MiB, 1 GiB]) or 256 MiB (CPU), rounded to a multiple of
    8 rows (GEMM tiles), at least 1 and at most ``rows``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 8, 64 << 20), 1 << 30)
    else:
        budget = 256 << 20
    chunk = max(1, budget // max(1, vocab * bytes_per_logit_row))
    if chunk >= 8:
        chunk -= chunk % 8
    return int(min(rows, chunk))


def _wide(dtype):
    return torch.promote_types(dtype, torch.float32)


def _linear(hidden, weight, bias):
    return torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())


class _Accumulator:
    """Sum of per-chunk ``a.T @ b`` products (a weight gradient) with float32 accumulation.

    Low-precision weights: the running sum is kept in float32 (CUDA: the GEMM writes float32
    directly via ``out_dtype``), so the result is rounded to the weight dtype once, not once per
    chunk. With a single chunk the product is written straight in the weight dtype.
    """

    def __init__(self, shape, dtype, device, single_chunk: bool):
        self.dtype = dtype
        self.wide = dtype in _LOW_PRECISION and not single_chunk
        self.buf = torch.zeros(shape, dtype=torch.float32 if self.wide else dtype, device=device)

    def add_(self, rows_slice: slice, a, b):
        out = self.buf[rows_slice]
        if not self.wide:
            out.addmm_(a.t(), b)
        elif a.is_cuda:
            try:
                out.add_(torch.mm(a.t(), b, out_dtype=torch.float32))
            except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
                out.addmm_(a.t().float(), b.float())
        else:
            out.addmm_(a.t().float(), b.float())

    def result(self):
        return self.buf.to(self.dtype) if self.wide else self.buf


class _Plan:
    """Everything about one call that is not a tensor (shapes, flags, config, backend)."""

    def __init__(self, cfg, kernel, chunk, vocab, teacher_kind, lead_shape, topk_kernel=None):
        self.cfg, self.kernel, self.chunk, self.vocab = cfg, kernel, chunk, vocab
        self.teacher_kind = teacher_kind  # "linear" | "logits" | "topk"
        self.lead_shape = lead_shape
        self.topk_kernel = topk_kernel  # the backend's fused top-k kernel, if it has one


def _run_chunks(plan, tgt, hs, ws, bs, ht, wt, bt, tl, idx, lp, need, grad_scale, row_scale):
    """One sweep over the row chunks. ``need`` = which of (hs, ws, bs, ht, wt, bt, tl) get a
    gradient. Gradients of ``sum_r w_r loss_r`` where ``w_r = grad_scale`` (a device scalar, or
    1) times ``row_scale[r]`` (``"none"`` in backward, else None). Returns (row losses, flags,
    gradients)."""
    cfg, vocab, n = plan.cfg, plan.vocab, hs.shape[0]
    ws_v = ws[:vocab]
    bs_v = None if bs is None else bs[:vocab]
    wt_v = None if wt is None else wt[:vocab]
    bt_v = None if bt is None else bt[:vocab]
    single = plan.chunk >= n
    rows_out = torch.empty(n, dtype=work_dtype(hs), device=hs.device)
    flags = torch.zeros((), dtype=torch.int32, device=hs.device)
    g_hs = torch.empty_like(hs) if need[0] else None
    acc_ws = _Accumulator(ws.shape, ws.dtype, ws.device, single) if need[1] else None
    g_bs = torch.zeros(bs.shape, dtype=_wide(bs.dtype), device=bs.device) if need[2] else None
    g_ht = torch.empty_like(ht) if need[3] else None
    acc_wt = _Accumulator(wt.shape, wt.dtype, wt.device, single) if need[4] else None
    g_bt = torch.zeros(bt.shape, dtype=_wide(bt.dtype), device=bt.device) if need[5] else None
    g_tl = torch.zeros_like(tl) if need[6] else None
    need_s = need[0] or need[1] or need[2]
    need_t = need[3] or need[4] or need[5] or need[6]
    kernel = plan.kernel
    for lo in range(0, n, plan.chunk):
        hi = min(n, lo + plan.chunk)
        s = _linear(hs[lo:hi], ws_v, bs_v)
        tg = None if tgt is None else tgt[lo:hi]
        if plan.teacher_kind == "topk" and plan.topk_kernel is not None:
            scale = None if grad_scale is None else grad_scale.reshape(1)
            rows, gs, fl = plan.topk_kernel(s, idx[lo:hi], lp[lo:hi], tg, cfg, scale, need_s)
            flags.bitwise_or_(fl.reshape(()).to(torch.int32))
            gt = None
        elif plan.teacher_kind == "topk":
            rows, gs = _topk.topk_rows_and_grad(s, idx[lo:hi], lp[lo:hi], tg, cfg, grad_scale,
                                                need_s)
            gt = None
        else:
            if plan.teacher_kind == "linear":
                t = _linear(ht[lo:hi], wt_v, bt_v)
            else:
                t = as_rows(tl[lo:hi, :vocab])
            rows, gs, gts, fl = kernel(s, [t], tg, [1.0], cfg, grad_scale, need_s, [need_t])
            gt = gts[0] if need_t else None
            flags.bitwise_or_(fl.reshape(()).to(torch.int32))
        rows_out[lo:hi] = rows
        if row_scale is not None:
            rs = row_scale[lo:hi].reshape(-1, 1)
            gs = None if gs is None else (gs.float() * rs).to(gs.dtype)
            gt = None if gt is None else (gt.float() * rs).to(gt.dtype)
        # Logit gradient -> (hidden rows, weight, bias) gradients, student side then teacher.
        for off, g, h, w_v, g_h, acc, g_b in ((0, gs, hs, ws_v, g_hs, acc_ws, g_bs),
                                              (3, gt, ht, wt_v, g_ht, acc_wt, g_bt)):
            if need[off]:
                torch.mm(g, w_v, out=g_h[lo:hi])
            if need[off + 1]:
                acc.add_(slice(0, vocab), g, h[lo:hi])
            if need[off + 2]:
                g_b[:vocab] += g.sum(0, dtype=g_b.dtype)
        if need[6]:
            g_tl[lo:hi, :vocab] = gt
    grads = [g_hs, None if acc_ws is None else acc_ws.result(),
             None if g_bs is None else g_bs.to(bs.dtype), g_ht,
             None if acc_wt is None else acc_wt.result(),
             None if g_bt is None else g_bt.to(bt.dtype), g_tl]
    return rows_out, flags, grads


def _forward_pass(plan, tgt, inputs, idx, lp, need, num_items=None):
    """The loss (reduced; ``[N]`` for ``"none"``) and the gradients asked for by ``need``
    (``"mean"``/``"sum"``; with ``"none"`` they are computed in backward, so all None), after
    raising the kernels' data-dependent errors. ``num_items``: the denominator of ``"mean"``
    (SPEC §1e), or None for this call's count."""
    hs = inputs[0]
    count = mean_count(tgt, plan.cfg.ignore_index, hs.shape[0], hs.device, num_items)
    count = count.to(work_dtype(hs))  # float64 inputs (vocab-parallel path): exact 1/count
    deferred = plan.cfg.reduction == "none"
    grad_scale = (1.0 / count).reshape(1) if plan.cfg.reduction == "mean" else None
    rows, flags, grads = _run_chunks(plan, tgt, *inputs, idx, lp,
                                     [False] * 7 if deferred else list(need), grad_scale, None)
    bits = int(flags.item())
    if bits:
        raise_flags(bits, plan.cfg.ignore_index, plan.vocab, False)
    return reduce_rows(rows, plan.cfg.reduction, rows.shape, count.to(rows.dtype)), grads


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, tgt, idx, lp, num_items, hs, ws, bs, ht, wt, bt, tl):
        need = list(ctx.needs_input_grad[5:12])
        loss, grads = _forward_pass(plan, tgt, (hs, ws, bs, ht, wt, bt, tl), idx, lp, need,
                                    num_items)
        deferred = plan.cfg.reduction == "none"
        ctx.plan, ctx.need, ctx.deferred = plan, need, deferred
        if deferred:
            ctx.save_for_backward(tgt, hs, ws, bs, ht, wt, bt, tl, idx, lp)
            return loss.reshape(plan.lead_shape)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _custom_op.consume_once(ctx, "FusedLinearKDLoss")
        if ctx.deferred:
            saved = ctx.saved_tensors
            _, _, grads = _run_chunks(ctx.plan, *saved, ctx.need, None,
                                      grad_output.reshape(-1).float())
        else:
            grads = list(ctx.saved_tensors)
            scale = grad_output.reshape(())
            for g in grads:
                if g is not None:
                    g.mul_(scale)  # in place: no second copy of a weight-sized gradient
        return (None, None, None, None, None, *grads)


# --- torch.library custom ops (the pattern of fastkd/_custom_op.py) for the single-process path.
_CFG_SCHEMA = CONFIG_SCHEMA
_INPUTS_SCHEMA = ("Tensor hs, Tensor ws, Tensor? bs, Tensor? ht, Tensor? wt, Tensor? bt, "
                  "Tensor? tl, Tensor? target, Tensor? idx, Tensor? lp")
_PLAN_SCHEMA = "int chunk, int vocab, str kind, bool[] need, str backend"
_GRADS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
FUSED_LINEAR_SCHEMA = (f"({_INPUTS_SCHEMA}, {_CFG_SCHEMA}, {_PLAN_SCHEMA}, "
                       f"Tensor? num_items=None) -> "
                       f"(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
FUSED_LINEAR_BWD_SCHEMA = (f"(Tensor grad_rows, {_INPUTS_SCHEMA}, {_CFG_SCHEMA}, "
                           f"{_PLAN_SCHEMA}) -> {_GRADS}")

def _plan_from(cfg_args, chunk, vocab, kind, backend):
    cfg = LogitKDConfig.from_args(cfg_args)
    return _Plan(cfg, KERNELS[backend], chunk, vocab, kind, None,
                 _topk.FUSED_KERNELS.get(backend))


def _grad_outputs(grads, inputs):
    """Gradients (None -> ``[0]`` placeholder), contiguous as the fake impl declares them."""
    return tuple(_custom_op.placeholder(x if x is not None else inputs[0]) if g is None
                 else g.contiguous() for g, x in zip(grads, inputs))


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::fused_linear_kd", mutates_args=(),
                         schema=FUSED_LINEAR_SCHEMA, **_custom_op.host_sync_tags())
def fused_linear_kd_op(hs, ws, bs, ht, wt, bt, tl, target, idx, lp, *rest):
    """``fastkd::fused_linear_kd``: the chunked lm_head GEMMs + fused KD kernel of ``backend``.

    Returns ``(loss, grad_hs, grad_ws, grad_bs, grad_ht, grad_wt, grad_bt, grad_tl)``: the
    float32 loss (scalar, or ``[N]`` with ``"none"``) and, for ``"mean"``/``"sum"``, the
    gradients asked for by ``need`` (others, and all with ``"none"``, are ``[0]``
    placeholders: ``"none"`` computes them in ``fastkd::fused_linear_kd_backward``)."""
    cfg_args, (chunk, vocab, kind, need, backend) = rest[:N_CONFIG], rest[N_CONFIG:N_CONFIG + 5]
    num_items = rest[N_CONFIG + 5] if len(rest) > N_CONFIG + 5 else None
    plan = _plan_from(cfg_args, chunk, vocab, kind, backend)
    inputs = (hs, ws, bs, ht, wt, bt, tl)
    if kind == "topk":
        _topk.check_topk_data(idx, lp, vocab)
    with _custom_op.kernel_context(hs.device):
        loss, grads = _forward_pass(plan, target, inputs, idx, lp, need, num_items)
    return (loss,) + _grad_outputs(grads, inputs)


@fused_linear_kd_op.register_fake
def _fused_linear_fake(hs, ws, bs, ht, wt, bt, tl, target, idx, lp, *rest):
    reduction, need = rest[REDUCTION_ARG], rest[N_CONFIG + 3]
    loss = hs.new_empty((hs.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    inputs = (hs, ws, bs, ht, wt, bt, tl)
    return (loss,) + tuple(x.new_empty(x.shape) if (n and reduction != "none" and x is not None)
                           else _custom_op.placeholder(x if x is not None else hs)
                           for x, n in zip(inputs, need))


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::fused_linear_kd_backward", mutates_args=(),
                         schema=FUSED_LINEAR_BWD_SCHEMA)
def fused_linear_kd_backward_op(grad_rows, hs, ws, bs, ht, wt, bt, tl, target, idx, lp, *rest):
    """``reduction="none"``: the chunks recomputed with the per-row incoming gradients."""
    cfg_args, (chunk, vocab, kind, need, backend) = rest[:N_CONFIG], rest[N_CONFIG:]
    plan = _plan_from(cfg_args, chunk, vocab, kind, backend)
    with _custom_op.kernel_context(hs.device):
        _, _, grads = _run_chunks(plan, target, hs, ws, bs, ht, wt, bt, tl, idx, lp, list(need),
                                  None, grad_rows.reshape(-1).float())
    return _grad_outputs(grads, (hs, ws, bs, ht, wt, bt, tl))


@fused_linear_kd_backward_op.register_fake
def _fused_linear_bwd_fake(grad_rows, hs, ws, bs, ht, wt, bt, tl, target, idx, lp, *rest):
    need = rest[N_CONFIG + 3]
    return tuple(x.new_empty(x.shape) if (n and x is not None)
                 else _custom_op.placeholder(x if x is not None else hs)
                 for x, n in zip((hs, ws, bs, ht, wt, bt, tl), need))


def _fused_linear_setup(ctx, inputs, output):
    rest = inputs[10:15 + N_CONFIG]  # the configuration and the plan (num_items: forward only)
    ctx.reduction, ctx.need = rest[REDUCTION_ARG], list(rest[N_CONFIG + 3])
    ctx.rest = rest
    if ctx.reduction == "none":
        ctx.save_for_backward(*inputs[:10])
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
    else:
        _custom_op.save_gradients(ctx, list(output[1:]), ctx.need)


def _fused_linear_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        grads = [None] * 7
    elif ctx.reduction == "none":
        saved = ctx.saved_tensors
        out = fused_linear_kd_backward_op(grad_loss, *saved, *ctx.rest)
        grads = [g if n else None for g, n in zip(out, ctx.need)]
    else:
        grads = _custom_op.scale_saved(ctx, ctx.saved_tensors, grad_loss, "FusedLinearKDLoss")
    return tuple(grads) + (None,) * (3 + N_CONFIG + 5 + 1)


fused_linear_kd_op.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)


def _check_2d_pair(hidden_name, hidden, weight_name, weight, bias_name, bias):
    _checks.check_float_tensor(hidden_name, hidden)
    _checks.check_float_tensor(weight_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must be [*, H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name} has shape {tuple(weight.shape)} but {hidden_name} has "
                         f"hidden size {hidden.shape[-1]}; {weight_name} must be [V, "
                         f"{hidden.shape[-1]}]")
    if weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have V >= 1 rows, got {tuple(weight.shape)}")
    if bias is not None:
        _checks.check_float_tensor(bias_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{bias_name} has shape {tuple(bias.shape)} but must be "
                             f"[{weight.shape[0]}] (one entry per vocabulary row of "
                             f"{weight_name})")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise TypeError(f"{hidden_name}, {weight_name}"
                        f"{'' if bias is None else ', ' + bias_name} must share one dtype (got "
                        f"{', '.join(str(d) for d in dtypes)}); cast them, or run under "
                        f"torch.autocast")


def _autocast(device, *tensors):
    """Under ``torch.autocast`` the GEMM operands are cast like ``F.linear`` casts them."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        return [None if t is None else t.to(dtype) for t in tensors]
    return list(tensors)


def _check_teacher(kind, lead, teacher_hidden, teacher_weight, teacher_bias, teacher_logits):
    """Checks of the one teacher given; returns its vocabulary size (None for top-k)."""
    if kind == "linear":
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together: give both")
        _check_2d_pair("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight,
                       "teacher_bias", teacher_bias)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but its "
                             f"leading shape must equal student_hidden's {tuple(lead)}")
        return teacher_weight.shape[0]
    if teacher_bias is not None:
        raise ValueError("teacher_bias is only used with teacher_hidden/teacher_weight")
    if kind == "logits":
        if isinstance(teacher_logits, (list, tuple)):
            raise TypeError("FusedLinearKDLoss takes one teacher_logits tensor, not a list")
        _checks.check_float_tensor("teacher_logits", teacher_logits)
        if teacher_logits.dim() != len(lead) + 1 or teacher_logits.shape[:-1] != lead \
                or teacher_logits.shape[-1] < 1:
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but must be "
                             f"[*, V_t] with * = student_hidden's leading shape {tuple(lead)}")
        return teacher_logits.shape[-1]
    return None


def _check_target(target, lead):
    if target is None:
        return
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point \
            or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError("target must be an integer tensor of class indices")
    if target.shape != lead:
        raise ValueError(f"target has shape {tuple(target.shape)} but must equal the leading "
                         f"shape of student_hidden {tuple(lead)}")


def _teacher_kind(teacher_hidden, teacher_weight, teacher_logits, teacher_topk) -> str:
    kinds = [teacher_hidden is not None or teacher_weight is not None,
             teacher_logits is not None, teacher_topk is not None]
    if sum(kinds) != 1:
        raise ValueError("give exactly one teacher: teacher_hidden with teacher_weight, or "
                         "teacher_logits, or teacher_topk")
    return ("linear", "logits", "topk")[kinds.index(True)]


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None,
                         teacher_weight=None, target=None, student_bias=None, teacher_bias=None,
                         teacher_logits=None, *, cfg: LogitKDConfig, teacher_topk=None,
                         teacher_weights=None, backend="auto", chunk_size=None,
                         process_group=None, num_items_in_batch=None, vocab_mismatch="error"):
    """See :class:`fastkd.FusedLinearKDLoss`; ``cfg`` is the validated configuration."""
    backend = _backend.check_backend_name(backend)
    vocab_mismatch = check_vocab_mismatch(vocab_mismatch)
    if teacher_weights is not None and teacher_topk is None:
        _checks.check_weights("teacher_weights", teacher_weights, 1)
    chunk_size = check_chunk_size(chunk_size)
    _check_2d_pair("student_hidden", student_hidden, "student_weight", student_weight,
                   "student_bias", student_bias)
    lead = student_hidden.shape[:-1]
    kind = _teacher_kind(teacher_hidden, teacher_weight, teacher_logits, teacher_topk)
    vocab_t = _check_teacher(kind, lead, teacher_hidden, teacher_weight, teacher_bias,
                             teacher_logits)
    vocab_s = student_weight.shape[0]
    if kind != "topk" and vocab_s != vocab_t and vocab_mismatch != "truncate" \
            and cfg.divergence != "uld":
        raise vocab_mismatch_error(vocab_s, vocab_t)
    vocab = vocab_s if kind == "topk" else min(vocab_s, vocab_t)
    _check_target(target, lead)
    _checks.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                              student_bias=student_bias, teacher_hidden=teacher_hidden,
                              teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                              teacher_logits=teacher_logits, target=target)
    device = student_hidden.device
    hs, ws, bs = _autocast(device, student_hidden, student_weight, student_bias)
    ht, wt, bt = _autocast(device, teacher_hidden, teacher_weight, teacher_bias)
    hs = hs.reshape(-1, hs.shape[-1])
    ht = None if ht is None else ht.reshape(-1, ht.shape[-1])
    tl = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.shape[-1])
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    idx = lp = None
    if kind == "topk":
        idx, lp = _topk.validate_topk(teacher_topk, _ShapeOnly(lead + (vocab,), device),
                                      cfg.temperature, check_data=False,  # in the op
                                      teacher_weights=teacher_weights)
    num_items = check_num_items(num_items_in_batch, cfg.reduction, device)
    parallel = vocab_parallel.is_parallel(process_group)
    if parallel and (kind == "topk" or vocab_s != vocab_t):
        raise ValueError("with a process_group (vocabulary-parallel lm_head), the teacher must "
                         "be teacher_hidden/teacher_weight or teacher_logits whose local "
                         "vocabulary shard has the student's width (got "
                         f"{'teacher_topk' if kind == 'topk' else f'{vocab_t} vs {vocab_s}'})")
    dtypes = [x.dtype for x in (hs, ht, tl) if x is not None]
    name = _backend.select_backend(backend, device, dtypes, what="inputs")
    if name == "reference" and not parallel:
        if kind == "topk":
            _topk.check_topk_data(idx, lp, vocab)
        return _reference_path(cfg, kind, vocab, lead, tgt, idx, lp, hs, ws, bs, ht, wt, bt, tl,
                               num_items)
    if hs.shape[0] == 0 and not parallel:
        zero = 0.0 * (hs.sum() + ws.sum())  # keeps the graph: zero gradients, not None
        return reduce_rows(torch.zeros(0, device=device), cfg.reduction, lead,
                           torch.ones((), device=device)) + zero
    bytes_row = hs.element_size() * 2 + (0 if kind == "topk" else 2 * (ht if ht is not None
                                                                       else tl).element_size())
    chunk = chunk_size or auto_chunk_size(hs.shape[0], vocab, bytes_row, device)
    hs, ht = hs.contiguous(), None if ht is None else ht.contiguous()
    if parallel:
        # Vocabulary-parallel: the per-chunk KD runs on this rank's shard with the softmax
        # statistics all-reduced (O(chunk) floats per chunk), in any float dtype. A
        # ProcessGroup is no custom-op argument: an autograd.Function (eager only).
        kernel = functools.partial(vocab_parallel.vocab_parallel_kd_forward,
                                   process_group=process_group)
        plan = _Plan(cfg, kernel, chunk, vocab, kind, lead)
        return _FusedLinearKD.apply(plan, tgt, idx, lp, num_items, hs, ws, bs, ht, wt, bt, tl)
    need = [_custom_op.needs_grad(x) for x in (hs, ws, bs, ht, wt, bt, tl)]
    out = fused_linear_kd_op(hs, ws, bs, ht, wt, bt, tl, tgt, idx, lp, *cfg.as_args(), chunk,
                             vocab, kind, need, name, num_items)
    return out[0].reshape(lead) if cfg.reduction == "none" else out[0]


def check_chunk_size(chunk_size):
    """``None`` (auto) or a positive int (rows per chunk)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (auto), got {chunk_size!r}")
    return chunk_size


class _ShapeOnly:
    """Stands in for the student logits in :func:`fastkd.logit.topk.validate_topk` (which only
    reads their shape and device) without materialising them."""

    def __init__(self, shape, device):
        self.shape, self.device = torch.Size(shape), device


def _reference_path(cfg, kind, vocab, lead, tgt, idx, lp, hs, ws, bs, ht, wt, bt, tl,
                    num_items=None):
    """The spec, literally: materialise the logits and apply SPEC §1 (autograd does the rest)."""
    s = _linear(hs, ws[:vocab], None if bs is None else bs[:vocab])
    kwargs = cfg.reference_kwargs()
    if kind == "topk":
        rows = kd_rows_topk_reference(s, idx, lp, tgt, **kwargs)
    else:
        t = _linear(ht, wt[:vocab], None if bt is None else bt[:vocab]) if kind == "linear" \
            else tl[:, :vocab]
        rows = kd_rows_reference(s, [t], tgt, weights=[1.0], **kwargs)
    count = mean_count(tgt, cfg.ignore_index, s.shape[0], s.device, num_items)
    return reduce_rows(rows, cfg.reduction, lead, count.to(rows.dtype))
