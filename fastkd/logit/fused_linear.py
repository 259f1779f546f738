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

Precision: with bf16/fp16 inputs the chunk's logits, their softcap/scale (SPEC §1b) and the
logit gradients are float32, and the gradients handed back are rounded to the input dtype once,
so they sit at the rounding floor instead of 2-7x above it (rounding the logits to bf16, as
``nn.Linear`` would, measured in benchmarks/results/fused-linear-bf16-accuracy.md). CPU widens
the GEMM operands to float32 (faster there, too); CUDA asks the bf16 GEMMs for a float32 result
(:func:`_mm_wide`). ``divergence="uld"`` runs :data:`fastkd.logit.uld.ULD_KERNELS` per chunk,
each side over its own vocabulary.
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
from fastkd.logit.reference import kd_rows_reference, kd_rows_topk_reference, uld_rows_reference
from fastkd.logit.uld import ULD_KERNELS

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


def _gemm_operand(x):
    """``x`` as a GEMM operand whose products come out in float32 (float64 stays float64).

    CPU: low-precision tensors are widened (``torch.mm`` on CPU cannot write a float32 result
    from bf16/fp16 operands, and without AMX its float32 GEMM is also ~6x faster than its bf16
    one, measured in benchmarks/results/fused-linear-bf16-accuracy.md). CUDA: kept as they are;
    :func:`_mm_wide` asks the GEMM for a float32 result instead."""
    if x is None or x.is_cuda or x.dtype not in _LOW_PRECISION:
        return x
    return x.float()


def _mm_wide(a, b, split=True):
    """``a @ b`` in at least float32.

    Two low-precision operands of one dtype (CUDA): one GEMM with a float32 result
    (``out_dtype``; elsewhere, or on a torch without it: widened operands). A float32 logit
    gradient against a low-precision operand (CUDA, where the operands are not widened): with
    ``split``, the gradient is split as ``hi + lo``, both in the operand's dtype, and the two
    products summed, which keeps 16 of its 24 bits for a second GEMM; else it is rounded to the
    operand's dtype (8 bits). See ``_SPLIT`` for which GEMMs split."""
    low_a, low_b = a.dtype in _LOW_PRECISION, b.dtype in _LOW_PRECISION
    if low_a and low_b and a.dtype == b.dtype and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without out_dtype
            pass
    if low_a != low_b:
        if low_a:
            return _mm_wide(b.t(), a.t(), split).t()
        scale = None
        if b.dtype == torch.float16:
            # fp16 has 5 exponent bits: the gradient's small entries (~1/(N V)) would flush to
            # zero, so it is scaled by a power of two (exact) that puts its largest near 2**14.
            amax = a.abs().amax().clamp_min(2.0 ** -100)
            scale = torch.exp2(14.0 - torch.ceil(torch.log2(amax)))
            a = a * scale
        hi = a.to(b.dtype)
        out = _mm_wide(hi, b)
        if split:
            out.add_(_mm_wide((a - hi.to(a.dtype)).to(b.dtype), b))
        return (out if scale is None else out.div_(scale)).to(a.dtype)
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.mm(a.to(wide), b.to(wide))


#: Which backward GEMMs split the float32 logit gradient (CUDA; on CPU the operands are float32).
#: Rounding it to bf16 instead puts the weight gradients at 1.25-1.33x the rounding floor and
#: the hidden-state gradients at 1.01-1.09x (N = 512, H = 128, V = 32000, the CUDA scheme run on
#: CPU: benchmarks/results/fused-linear-bf16-accuracy.md), so only the weight GEMM pays for it.
_SPLIT = {"hidden": False, "weight": True}


def _addmm_wide_(out, a, b):
    """``out += a @ b`` with :func:`_mm_wide`'s precision (``out`` float32 or wider)."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(_mm_wide(a, b, _SPLIT["weight"]))


class _Accumulator:
    """Sum of per-chunk ``a.T @ b`` products (a weight gradient) with float32 accumulation.

    Low-precision weights: the sum is kept in float32 and rounded to the weight dtype once, at
    the end (also with one chunk: the logit gradient is float32, so a single product must be
    rounded once, too)."""

    def __init__(self, shape, dtype, device):
        self.dtype = dtype
        self.buf = torch.zeros(shape, dtype=_wide(dtype), device=device)

    def add_(self, rows_slice: slice, a, b):
        _addmm_wide_(self.buf[rows_slice], a.t(), b)

    def result(self):
        return self.buf.to(self.dtype)


def check_logit_transform(cap_name, cap, scale_name, scale):
    """Validated ``(softcap, scale)``: softcap None or a finite number > 0, scale finite > 0."""
    if cap is not None:
        cap = _checks.check_finite_number(cap_name, cap, positive=True)
    return cap, _checks.check_finite_number(scale_name, scale, positive=True)


def _apply_transform(z, cap, scale):
    """``c * tanh(a * z / c)`` (no tanh for ``c`` None), in place on the float32 logits ``z``."""
    if cap is not None:
        return z.mul_(scale / cap).tanh_().mul_(cap)
    return z if scale == 1.0 else z.mul_(scale)


def _transform_grad(g, s, cap, scale):
    """The gradient w.r.t. ``z`` from the one w.r.t. ``s = c * tanh(a z / c)``:
    ``g * a * (1 - tanh^2)``, with ``tanh = s / c`` read back from the transformed logits."""
    if cap is not None:
        u = s / cap
        return g * u.mul_(u).neg_().add_(1.0).mul_(scale)
    return g if scale == 1.0 else g * scale


class _Side:
    """One model's lm_head during a sweep: its GEMM operands (widened once on CPU, see
    :func:`_gemm_operand`), its softcap and scale, and the buffers of the gradients asked for
    (``need`` = hidden, weight, bias)."""

    def __init__(self, h, w, b, vocab, transform, need):
        self.h, self.vocab, self.transform, self.need = h, vocab, transform, need
        self.w = None if w is None else _gemm_operand(w[:vocab])
        self.b = None if b is None else b[:vocab].to(_wide(b.dtype))
        self.hc = None  # the current chunk's rows of h, as a GEMM operand
        self.g_h = torch.empty_like(h) if need[0] else None
        self.acc = _Accumulator(w.shape, w.dtype, w.device) if need[1] else None
        self.g_b = torch.zeros(b.shape, dtype=_wide(b.dtype), device=b.device) \
            if need[2] else None
        self.bias_dtype = None if b is None else b.dtype

    def logits(self, lo, hi):
        """The chunk's transformed logits ``[hi - lo, vocab]`` in float32 (or float64)."""
        self.hc = _gemm_operand(self.h[lo:hi])
        z = _mm_wide(self.hc, self.w.t())
        if self.b is not None:
            z.add_(self.b)
        return _apply_transform(z, *self.transform)

    def backward(self, lo, hi, g, s):
        """Turn the gradient ``g`` w.r.t. the chunk's transformed logits ``s`` into the chunk's
        hidden-state rows and its share of the weight and bias gradients."""
        g = _transform_grad(g, s, *self.transform)
        if self.need[0]:
            if self.g_h.dtype == g.dtype == self.w.dtype:
                torch.mm(g, self.w, out=self.g_h[lo:hi])
            else:
                # rounded once, to the hidden dtype
                self.g_h[lo:hi] = _mm_wide(g, self.w, _SPLIT["hidden"])
        if self.need[1]:
            self.acc.add_(slice(0, self.vocab), g, self.hc)
        if self.need[2]:
            self.g_b[:self.vocab] += g.sum(0, dtype=self.g_b.dtype)

    def grads(self):
        return [self.g_h, None if self.acc is None else self.acc.result(),
                None if self.g_b is None else self.g_b.to(self.bias_dtype)]


def _teacher_vocab(cfg, vocab, wt, tl):
    """The teacher's compared width: its own with ``divergence="uld"`` (which compares any two
    vocabularies), else the common ``vocab``."""
    if cfg.divergence != "uld":
        return vocab
    return wt.shape[0] if wt is not None else tl.shape[-1]


class _Plan:
    """Everything about one call that is not a tensor (shapes, flags, config, backend).
    ``transforms``: ``((student softcap, scale), (teacher softcap, scale))``."""

    def __init__(self, cfg, kernel, chunk, vocab, teacher_kind, lead_shape, topk_kernel=None,
                 transforms=((None, 1.0), (None, 1.0))):
        self.cfg, self.kernel, self.chunk, self.vocab = cfg, kernel, chunk, vocab
        self.teacher_kind = teacher_kind  # "linear" | "logits" | "topk"
        self.lead_shape = lead_shape
        self.topk_kernel = topk_kernel  # the backend's fused top-k kernel, if it has one
        self.transforms = transforms


def _run_chunks(plan, tgt, hs, ws, bs, ht, wt, bt, tl, idx, lp, need, grad_scale, row_scale):
    """One sweep over the row chunks. ``need`` = which of (hs, ws, bs, ht, wt, bt, tl) get a
    gradient. Gradients of ``sum_r w_r loss_r`` where ``w_r = grad_scale`` (a device scalar, or
    1) times ``row_scale[r]`` (``"none"`` in backward, else None). Returns (row losses, flags,
    gradients).

    The logits and their gradients stay in float32 (float64 for float64 inputs) inside the
    chunk, whatever the input dtype: only the gradients handed back are rounded to it."""
    cfg, vocab, n = plan.cfg, plan.vocab, hs.shape[0]
    vocab_t = _teacher_vocab(cfg, vocab, wt, tl)
    student = _Side(hs, ws, bs, vocab, plan.transforms[0], need[0:3])
    teacher = _Side(ht, wt, bt, vocab_t, plan.transforms[1], need[3:6]) \
        if plan.teacher_kind == "linear" else None
    rows_out = torch.empty(n, dtype=work_dtype(hs), device=hs.device)
    flags = torch.zeros((), dtype=torch.int32, device=hs.device)
    g_tl = torch.zeros_like(tl) if need[6] else None
    need_s = need[0] or need[1] or need[2]
    need_t = need[3] or need[4] or need[5] or need[6]
    kernel = plan.kernel
    for lo in range(0, n, plan.chunk):
        hi = min(n, lo + plan.chunk)
        s = student.logits(lo, hi)
        tg = None if tgt is None else tgt[lo:hi]
        t = gt = None
        if plan.teacher_kind == "topk" and plan.topk_kernel is not None:
            scale = None if grad_scale is None else grad_scale.reshape(1)
            rows, gs, fl = plan.topk_kernel(s, idx[lo:hi], lp[lo:hi], tg, cfg, scale, need_s)
            flags.bitwise_or_(fl.reshape(()).to(torch.int32))
        elif plan.teacher_kind == "topk":
            rows, gs = _topk.topk_rows_and_grad(s, idx[lo:hi], lp[lo:hi], tg, cfg, grad_scale,
                                                need_s)
        else:
            t = teacher.logits(lo, hi) if teacher is not None else as_rows(tl[lo:hi, :vocab_t])
            rows, gs, gts, fl = kernel(s, [t], tg, [1.0], cfg, grad_scale, need_s, [need_t])
            gt = gts[0] if need_t else None
            flags.bitwise_or_(fl.reshape(()).to(torch.int32))
        rows_out[lo:hi] = rows
        if row_scale is not None:
            rs = row_scale[lo:hi].reshape(-1, 1)
            gs = None if gs is None else (gs.float() * rs).to(gs.dtype)
            gt = None if gt is None else (gt.float() * rs).to(gt.dtype)
        if need_s:
            student.backward(lo, hi, gs, s)
        if teacher is not None and need_t:
            teacher.backward(lo, hi, gt, t)
        if need[6]:
            g_tl[lo:hi, :vocab_t] = gt
    grads = student.grads() + (teacher.grads() if teacher is not None else [None] * 3) + [g_tl]
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
_PLAN_SCHEMA = ("int chunk, int vocab, str kind, bool[] need, str backend, "
                "float? student_softcap, float student_logit_scale, float? teacher_softcap, "
                "float teacher_logit_scale")
_N_PLAN = 9  # arguments in _PLAN_SCHEMA
_GRADS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
FUSED_LINEAR_SCHEMA = (f"({_INPUTS_SCHEMA}, {_CFG_SCHEMA}, {_PLAN_SCHEMA}, "
                       f"Tensor? num_items=None) -> "
                       f"(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
FUSED_LINEAR_BWD_SCHEMA = (f"(Tensor grad_rows, {_INPUTS_SCHEMA}, {_CFG_SCHEMA}, "
                           f"{_PLAN_SCHEMA}) -> {_GRADS}")

def _plan_from(cfg_args, plan_args):
    cfg = LogitKDConfig.from_args(cfg_args)
    chunk, vocab, kind, _, backend, s_cap, s_scale, t_cap, t_scale = plan_args
    kernels = ULD_KERNELS if cfg.divergence == "uld" else KERNELS
    return _Plan(cfg, kernels[backend], chunk, vocab, kind, None,
                 _topk.FUSED_KERNELS.get(backend), ((s_cap, s_scale), (t_cap, t_scale)))


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
    cfg_args, plan_args = rest[:N_CONFIG], rest[N_CONFIG:N_CONFIG + _N_PLAN]
    num_items = rest[N_CONFIG + _N_PLAN] if len(rest) > N_CONFIG + _N_PLAN else None
    plan = _plan_from(cfg_args, plan_args)
    kind, vocab, need = plan.teacher_kind, plan.vocab, plan_args[3]
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
    plan = _plan_from(rest[:N_CONFIG], rest[N_CONFIG:])
    need = rest[N_CONFIG + 3]
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
    rest = inputs[10:10 + N_CONFIG + _N_PLAN]  # the configuration and the plan (not num_items)
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
    return tuple(grads) + (None,) * (3 + N_CONFIG + _N_PLAN + 1)


_custom_op.register_autograd(fused_linear_kd_op, _fused_linear_backward, _fused_linear_setup)


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
                         process_group=None, num_items_in_batch=None, vocab_mismatch="error",
                         student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
                         teacher_logit_scale=1.0):
    """See :class:`fastkd.FusedLinearKDLoss`; ``cfg`` is the validated configuration."""
    backend = _backend.check_backend_name(backend)
    transforms = (check_logit_transform("student_softcap", student_softcap,
                                        "student_logit_scale", student_logit_scale),
                  check_logit_transform("teacher_softcap", teacher_softcap,
                                        "teacher_logit_scale", teacher_logit_scale))
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
    if kind != "linear" and transforms[1] != (None, 1.0):
        # teacher_logits / teacher_topk are the teacher's final logits (log-probabilities).
        raise ValueError(f"teacher_softcap and teacher_logit_scale apply to a teacher given as "
                         f"teacher_hidden/teacher_weight; teacher_{kind} are taken as final "
                         f"(apply the softcap before passing them)")
    vocab_s = student_weight.shape[0]
    if kind != "topk" and vocab_s != vocab_t and vocab_mismatch != "truncate" \
            and cfg.divergence != "uld":
        raise vocab_mismatch_error(vocab_s, vocab_t)
    parallel = vocab_parallel.is_parallel(process_group)
    if cfg.divergence == "uld" and (kind == "topk" or parallel):
        raise ValueError("divergence='uld' sorts each side's whole distribution: it takes a "
                         "dense teacher (teacher_hidden/teacher_weight or teacher_logits), not "
                         "teacher_topk, and no process_group")
    # ULD: each side keeps its own vocabulary (the teacher's width: _teacher_vocab).
    vocab = vocab_s if kind == "topk" or cfg.divergence == "uld" else min(vocab_s, vocab_t)
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
                               num_items, transforms)
    if hs.shape[0] == 0 and not parallel:
        zero = 0.0 * (hs.sum() + ws.sum())  # keeps the graph: zero gradients, not None
        return reduce_rows(torch.zeros(0, device=device), cfg.reduction, lead,
                           torch.ones((), device=device)) + zero
    # Bytes per row of a chunk: the logits and logit gradients, float32 (or wider) for the GEMM
    # sides, of both models (ULD: each of its own width).
    wide_size = _wide(hs.dtype).itemsize
    teacher_bytes = 0 if kind == "topk" else 2 * wide_size if kind == "linear" \
        else 2 * tl.element_size()
    row_bytes = vocab * 2 * wide_size + _teacher_vocab(cfg, vocab, wt, tl) * teacher_bytes
    chunk = chunk_size or auto_chunk_size(hs.shape[0], 1, row_bytes, device)
    hs, ht = hs.contiguous(), None if ht is None else ht.contiguous()
    if parallel:
        # Vocabulary-parallel: the per-chunk KD runs on this rank's shard with the softmax
        # statistics all-reduced (O(chunk) floats per chunk), in any float dtype. A
        # ProcessGroup is no custom-op argument: an autograd.Function (eager only).
        kernel = functools.partial(vocab_parallel.vocab_parallel_kd_forward,
                                   process_group=process_group)
        plan = _Plan(cfg.concrete(), kernel, chunk, vocab, kind, lead, transforms=transforms)
        return _FusedLinearKD.apply(plan, tgt, idx, lp, num_items, hs, ws, bs, ht, wt, bt, tl)
    need = [_custom_op.needs_grad(x) for x in (hs, ws, bs, ht, wt, bt, tl)]
    out = _custom_op.call(fused_linear_kd_op, hs, ws, bs, ht, wt, bt, tl, tgt, idx, lp,
                          *cfg.as_args(), chunk, vocab, kind, need, name, *transforms[0],
                          *transforms[1], num_items)
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


def _reference_logits(h, w, b, vocab, transform):
    """``c * tanh(a * (h W^T + b) / c)`` (no tanh for ``c`` None) of the first ``vocab`` rows,
    materialised in float32 or wider (as the fused path computes them), with autograd."""
    wide = _wide(h.dtype)
    z = torch.nn.functional.linear(h.to(wide), w[:vocab].to(wide),
                                   None if b is None else b[:vocab].to(wide))
    cap, scale = transform
    return scale * z if cap is None else cap * torch.tanh(z * (scale / cap))


def _reference_path(cfg, kind, vocab, lead, tgt, idx, lp, hs, ws, bs, ht, wt, bt, tl,
                    num_items=None, transforms=((None, 1.0), (None, 1.0))):
    """The spec, literally: materialise the logits and apply SPEC §1 (autograd does the rest)."""
    s = _reference_logits(hs, ws, bs, vocab, transforms[0])
    kwargs = cfg.reference_kwargs()
    if kind == "topk":
        rows = kd_rows_topk_reference(s, idx, lp, tgt, **kwargs)
    else:
        vocab_t = _teacher_vocab(cfg, vocab, wt, tl)
        t = _reference_logits(ht, wt, bt, vocab_t, transforms[1]) if kind == "linear" \
            else tl[:, :vocab_t]
        rows_fn = uld_rows_reference if cfg.divergence == "uld" else kd_rows_reference
        rows = rows_fn(s, [t], tgt, weights=[1.0], **kwargs)
    count = mean_count(tgt, cfg.ignore_index, s.shape[0], s.device, num_items)
    return reduce_rows(rows, cfg.reduction, lead, count.to(rows.dtype))
