"""Feature KD: argument checks, backend dispatch and the autograd function over the fused kernels.

With ``reduction="mean"``/``"sum"`` every fused backend (cuda, cpu, triton) computes the loss *and*
the gradients for the student, the adapter weight and bias (and the teacher when it requires grad)
in the forward call, chunk by chunk, so that no ``N x teacher_dim`` float32 tensor outlives a
chunk; backward only scales the saved gradients by ``grad_output``. With ``reduction="none"`` the
gradient of ``grad_W`` depends on the per-row ``grad_output``, which is unknown in forward: forward
computes the row losses only (nothing but the inputs is saved) and backward re-runs the fused pass
with the per-row weights.

The fused pass runs behind the ``torch.library`` custom ops ``fastkd::feature_kd`` and (the
``"none"`` backward) ``fastkd::feature_kd_backward`` (the pattern is described in
:mod:`fastkd._custom_op`), so ``torch.compile(fullgraph=True)`` traces :func:`feature_kd_loss` without a
graph break. Autocast: see :func:`feature_kd_loss`.
"""
from __future__ import annotations

import math

import torch

from fastkd import _backend, _checks, _custom_op, _ext
from fastkd.feature.reference import COSINE_EPS, LOSSES, feature_kd_reference  # noqa: F401

LOSS_IDS = {"mse": 0, "cosine": 1}
# The extension backends read NCHW maps in place (the epilogue sweeps runs of H*W contiguous
# positions); maps with fewer positions than this are transposed to an [N, C] copy first, where
# the short runs would leave most vector lanes / threads of the epilogue idle.
MIN_COLUMNS = 32
_EXT_OP = "feature_kd_forward"


def ext_has_feature_ops() -> bool:
    """Whether the compiled extension fastkd._C provides the feature-KD kernels."""
    return _ext._C is not None and hasattr(_ext._C, _EXT_OP)


def check_channel_dim(channel_dim, ndim: int) -> int:
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    if not -ndim <= channel_dim < ndim:
        raise ValueError(f"channel_dim={channel_dim} is out of range for student_feat with "
                         f"{ndim} dimensions")
    return channel_dim % ndim


def check_chunk_size(chunk_size) -> int:
    """``None`` (auto) -> 0; otherwise a positive int (rows per chunk)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size


def validate_inputs(student_feat, teacher_feat, weight, bias, channel_dim):
    """Checks of SPEC §Errors that need no device data. Returns the normalised channel_dim."""
    _checks.check_float_tensor("student_feat", student_feat)
    _checks.check_float_tensor("teacher_feat", teacher_feat)
    if weight is not None:
        _checks.check_float_tensor("weight", weight)
    if bias is not None:
        _checks.check_float_tensor("bias", bias)
    if student_feat.dim() < 1:
        raise ValueError("student_feat must have at least one dimension (the channels)")
    if teacher_feat.dim() != student_feat.dim():
        raise ValueError(f"teacher_feat has {teacher_feat.dim()} dimensions but student_feat has "
                         f"{student_feat.dim()}; they must have the same number")
    cd = check_channel_dim(channel_dim, student_feat.dim())
    s_shape, t_shape = list(student_feat.shape), list(teacher_feat.shape)
    ds, dt = s_shape.pop(cd), t_shape.pop(cd)
    if s_shape != t_shape:
        raise ValueError(f"teacher_feat has shape {tuple(teacher_feat.shape)} and student_feat "
                         f"{tuple(student_feat.shape)}: all dimensions other than "
                         f"channel_dim={channel_dim} must match")
    if ds < 1 or dt < 1:
        raise ValueError(f"student_feat and teacher_feat need at least one channel along "
                         f"channel_dim={channel_dim}, got {ds} and {dt}")
    if weight is None:
        if bias is not None:
            raise ValueError("bias was given without weight: the bias belongs to the adapter")
        if ds != dt:
            raise ValueError(f"without an adapter (weight=None) student_feat and teacher_feat "
                             f"need the same number of channels, got {ds} and {dt}")
    else:
        if weight.dim() != 2 or tuple(weight.shape) != (dt, ds):
            raise ValueError(f"weight has shape {tuple(weight.shape)} but must be "
                             f"[teacher_dim, student_dim] = [{dt}, {ds}] (the channels of "
                             f"teacher_feat and student_feat along channel_dim={channel_dim})")
        if bias is not None and tuple(bias.shape) != (dt,):
            raise ValueError(f"bias has shape {tuple(bias.shape)} but must be [teacher_dim] = "
                             f"[{dt}]")
    _checks.check_same_device(student_feat=student_feat, teacher_feat=teacher_feat,
                              weight=weight, bias=bias)
    return cd


def _as_pcq(x: torch.Tensor, cd: int) -> torch.Tensor:
    """``[*pre, C, *post]`` -> ``[P, C, Q]`` (a view when the strides allow it)."""
    pre = math.prod(x.shape[:cd])
    post = math.prod(x.shape[cd + 1:])
    return x.reshape(pre, x.shape[cd], post)


class _Layout:
    """How the inputs are handed to a kernel, and how its gradients go back to their shapes."""

    def __init__(self, student, teacher, cd, backend):
        x3, t3 = _as_pcq(student, cd), _as_pcq(teacher, cd)
        p, _, q = x3.shape
        self.transposed = backend != "triton" and 1 < q < MIN_COLUMNS
        if self.transposed:
            # Small maps: one [N, C] copy each (see MIN_COLUMNS).
            x3 = x3.transpose(1, 2).reshape(p * q, -1, 1)
            t3 = t3.transpose(1, 2).reshape(p * q, -1, 1)
        self.p, self.q = p, q
        self.x3, self.t3 = x3, t3

    def restore(self, g3, shape):
        if g3 is None:
            return None
        if self.transposed:
            g3 = g3.view(self.p, self.q, -1).transpose(1, 2)
        return g3.reshape(shape)


def _kernel(backend):
    if backend == "triton":
        from fastkd.feature import triton_kernel
        return triton_kernel.feature_kd_forward
    return _ext._C.feature_kd_forward


def _run(backend, layout, weight, bias, loss_id, scale, row_scale, compute_loss, needs, chunk):
    need_x, need_t, need_w, need_b = needs
    return _kernel(backend)(layout.x3, layout.t3, weight, bias, loss_id, float(scale), row_scale,
                            compute_loss, need_x, need_w, need_b, need_t, chunk)


# The fused pass behind torch.library custom ops (the pattern is described in fastkd/_custom_op.py).
FEATURE_KD_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor? weight, Tensor? bias, str loss, int channel_dim, "
    "str reduction, int chunk_size, bool need_grad_student, bool need_grad_teacher, "
    "bool need_grad_weight, bool need_grad_bias, ScalarType? gemm_dtype, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
FEATURE_KD_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? weight, Tensor? bias, str loss, "
    "int channel_dim, int chunk_size, bool need_grad_student, bool need_grad_teacher, "
    "bool need_grad_weight, bool need_grad_bias, ScalarType? gemm_dtype, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)")


def autocast_gemm_dtype(student, weight, backend):
    """The dtype of the adapter GEMMs under autocast, or None (the inputs' dtypes decide).

    Inside an enabled CUDA autocast region, with ``student`` already in the autocast dtype (the
    usual case: produced by autocast layers) and a weight of another dtype (float32), the cuda and
    triton backends run the adapter GEMMs in the autocast dtype (the weight is cast per call, as
    ``nn.Linear`` would be) with float32 accumulation; ``grad_W`` and ``grad_b`` are still
    accumulated in float32 and returned in the parameters' dtype. The cpu backend always runs its
    GEMMs in float32, so it is never asked to.
    """
    if weight is None or backend not in ("cuda", "triton") or student.device.type != "cuda":
        return None
    if not torch.is_autocast_enabled("cuda"):
        return None
    dtype = torch.get_autocast_dtype("cuda")
    return dtype if student.dtype == dtype and weight.dtype != dtype else None


def _lead_shape(student, cd):
    return student.shape[:cd] + student.shape[cd + 1:]


def _op_grads(layout, student, teacher, gx, gt, gw, gb):
    """Kernel gradients -> op outputs: input shapes (contiguous), placeholders where absent."""
    f32 = torch.float32
    return (_custom_op.placeholder(student) if gx is None
            else layout.restore(gx, student.shape).contiguous(),
            _custom_op.placeholder(teacher) if gt is None
            else layout.restore(gt, teacher.shape).contiguous(),
            _custom_op.placeholder(student, f32) if gw is None else gw,
            _custom_op.placeholder(student, f32) if gb is None else gb)


def _fake_grads(student, teacher, weight, bias, need_x, need_t, need_w, need_b):
    f32 = torch.float32
    gw = student.new_empty(weight.shape, dtype=f32) if need_w else _custom_op.placeholder(student, f32)
    gb = student.new_empty(bias.shape, dtype=f32) if need_b else _custom_op.placeholder(student, f32)
    return (student.new_empty(student.shape) if need_x else _custom_op.placeholder(student),
            teacher.new_empty(teacher.shape) if need_t else _custom_op.placeholder(teacher), gw, gb)


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::feature_kd", mutates_args=(),
                         schema=FEATURE_KD_SCHEMA)
def feature_kd_op(student, teacher, weight, bias, loss, channel_dim, reduction, chunk_size,
                  need_grad_student, need_grad_teacher, need_grad_weight, need_grad_bias,
                  gemm_dtype, backend):
    """``fastkd::feature_kd``: the chunked fused pass of ``backend`` (cpu, cuda, triton).

    Validated arguments (``channel_dim`` non-negative, ``chunk_size`` 0 = auto, ``reduction``
    without the alias). Returns ``(loss, grad_student, grad_teacher, grad_weight, grad_bias)``:
    the float32 loss (a scalar, or the leading shape with ``"none"``) and, for ``"mean"``/``"sum"``,
    its gradients (student/teacher shaped and typed like their inputs, weight/bias float32), each
    a ``[0]`` placeholder where not asked for. With ``"none"`` all four are placeholders: the
    backward recomputes them (``fastkd::feature_kd_backward``). ``gemm_dtype``: see
    :func:`autocast_gemm_dtype`.
    """
    if gemm_dtype is not None and weight is not None:
        weight = weight.to(gemm_dtype)
    with _custom_op.kernel_context(student.device):
        layout = _Layout(student, teacher, channel_dim, backend)
        dt = layout.t3.shape[1]
        loss_id = LOSS_IDS[loss]
        if reduction == "none":
            row_loss = _run(backend, layout, weight, bias, loss_id, 0.0, None, True,
                            (False,) * 4, chunk_size)[0]
            out = row_loss / dt if loss == "mse" else row_loss
            return (out.reshape(_lead_shape(student, channel_dim)),
                    *_op_grads(layout, student, teacher, None, None, None, None))
        rows = layout.x3.shape[0] * layout.x3.shape[2]
        count = rows * dt if loss == "mse" else rows
        scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        needs = (need_grad_student, need_grad_teacher, need_grad_weight, need_grad_bias)
        row_loss, gx, gw, gb, gt = _run(backend, layout, weight, bias, loss_id, scale, None,
                                        True, tuple(bool(n) for n in needs), chunk_size)
        total = (row_loss.sum(dtype=torch.float64) * scale).to(torch.float32)
    return (total, *_op_grads(layout, student, teacher, gx, gt, gw, gb))


@feature_kd_op.register_fake
def _feature_kd_fake(student, teacher, weight, bias, loss, channel_dim, reduction, chunk_size,
                     need_grad_student, need_grad_teacher, need_grad_weight, need_grad_bias,
                     gemm_dtype, backend):
    if reduction == "none":
        out = student.new_empty(_lead_shape(student, channel_dim), dtype=torch.float32)
        return (out, *_fake_grads(student, teacher, weight, bias, False, False, False, False))
    return (student.new_empty((), dtype=torch.float32),
            *_fake_grads(student, teacher, weight, bias, need_grad_student, need_grad_teacher,
                         need_grad_weight, need_grad_bias))


@torch.library.custom_op(f"{_custom_op.NAMESPACE}::feature_kd_backward", mutates_args=(),
                         schema=FEATURE_KD_BACKWARD_SCHEMA)
def feature_kd_backward_op(grad_loss, student, teacher, weight, bias, loss, channel_dim,
                           chunk_size, need_grad_student, need_grad_teacher, need_grad_weight,
                           need_grad_bias, gemm_dtype, backend):
    """``fastkd::feature_kd_backward``: the gradients of ``reduction="none"`` for the per-row
    ``grad_loss`` (leading shape), recomputed by the fused pass with per-row weights. Returns
    ``(grad_student, grad_teacher, grad_weight, grad_bias)`` as :func:`feature_kd_op` does."""
    if gemm_dtype is not None and weight is not None:
        weight = weight.to(gemm_dtype)
    with _custom_op.kernel_context(student.device):
        layout = _Layout(student, teacher, channel_dim, backend)
        dt = layout.t3.shape[1]
        row_scale = grad_loss.reshape(-1).to(torch.float32).contiguous()
        scale = 1.0 / dt if loss == "mse" else 1.0
        needs = (need_grad_student, need_grad_teacher, need_grad_weight, need_grad_bias)
        _, gx, gw, gb, gt = _run(backend, layout, weight, bias, LOSS_IDS[loss], scale, row_scale,
                                 False, tuple(bool(n) for n in needs), chunk_size)
    return _op_grads(layout, student, teacher, gx, gt, gw, gb)


@feature_kd_backward_op.register_fake
def _feature_kd_backward_fake(grad_loss, student, teacher, weight, bias, loss, channel_dim,
                              chunk_size, need_grad_student, need_grad_teacher, need_grad_weight,
                              need_grad_bias, gemm_dtype, backend):
    return _fake_grads(student, teacher, weight, bias, need_grad_student, need_grad_teacher,
                       need_grad_weight, need_grad_bias)


def _feature_kd_setup(ctx, inputs, output):
    (student, teacher, weight, bias, loss, cd, reduction, chunk, need_x, need_t, need_w, need_b,
     gemm_dtype, backend) = inputs
    needs = (need_x, need_t, need_w, need_b)
    ctx.needs = needs
    ctx.reduction = reduction
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    if reduction != "none":
        _custom_op.save_gradients(ctx, output[1:], needs)
        return
    # "none": the gradients depend on the per-row grad_output; backward recomputes them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.args = (loss, cd, chunk, need_x, need_t, need_w, need_b, gemm_dtype, backend)
    if any(needs):
        ctx.save_for_backward(student, teacher, weight, bias)


def _feature_kd_backward(ctx, grad_loss, *_grads):
    if grad_loss is None:
        return (None,) * 14
    if ctx.reduction == "none":
        student, teacher, weight, bias = ctx.saved_tensors
        grads = feature_kd_backward_op(grad_loss, student, teacher, weight, bias, *ctx.args)
        grads = [g if n else None for g, n in zip(grads, ctx.needs)]
    else:
        grads = _custom_op.scale_saved(ctx, ctx.saved_tensors, grad_loss, "feature KD loss")
    gx, gt, gw, gb = grads
    w_dtype, b_dtype = ctx.param_dtypes
    gw = None if gw is None else gw.to(w_dtype)
    gb = None if gb is None else gb.to(b_dtype)
    return (gx, gt, gw, gb) + (None,) * 10


_custom_op.register_autograd(feature_kd_op, _feature_kd_backward, _feature_kd_setup)


def feature_kd_loss(student_feat, teacher_feat, weight=None, bias=None, *, loss="mse",
                    channel_dim=-1, reduction="mean", backend="auto", chunk_size=None):
    r"""Feature distillation loss through a linear adapter (SPEC §2).

    ``y = x W^T + b`` maps the student's channels (``channel_dim``) to the teacher's; every other
    dimension is a row and must match between student and teacher. Then

    - ``loss="mse"``: :math:`\frac{1}{N\,D_t}\sum (y - t)^2` over all elements (``"sum"``: the
      sum; ``"none"``: per row, the **mean** over the teacher channels of :math:`(y - t)^2`, so
      that the mean of the rows is the ``"mean"`` loss);
    - ``loss="cosine"``: per row :math:`1 - \frac{y\cdot t}{\max(\|y\|\|t\|,\,10^{-8})}`, then
      mean over rows (``"sum"``, ``"none"``: per row).

    ``"none"`` returns the leading shape: the input shape without ``channel_dim``. A mean over
    zero rows is 0 with zero gradient. With ``weight=None`` there is no adapter (``y = x``; the
    channel counts must be equal).

    Args:
        student_feat: ``[*, D_s, *]`` float32/bfloat16/float16 student features (float64: reference
            backend only), e.g. ``[N, D_s]`` tokens or ``[B, D_s, H, W]`` conv maps.
        teacher_feat: same shape but ``D_t`` channels; gets a gradient if it requires grad.
        weight: adapter weight ``[D_t, D_s]`` or None. bias: ``[D_t]`` or None.
        loss: ``"mse"`` | ``"cosine"``. Default: ``"mse"``.
        channel_dim: the channel dimension (``1`` for NCHW maps). Default: ``-1``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``"batchmean"`` = ``"mean"``).
        backend: ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"cpu"`` | ``"reference"``.
        chunk_size: rows per chunk of the fused pass (None: about 8 MB of float32 ``y`` per chunk
            on CPU, 64 MB on GPU). Only changes speed and peak memory, not the result.

    Returns:
        float32 scalar, or float32 per-row losses of the leading shape with ``"none"``.

    Precision: all reductions and the ``grad_W``/``grad_b`` accumulators are float32. CPU: the
    GEMMs run in float32 (half inputs are upcast chunk by chunk). CUDA/Triton: with bf16/fp16
    student and weight the GEMMs run on tensor cores with float32 accumulation and output, and
    ``dL/dy`` is rounded to bf16/fp16 before the two gradient GEMMs (as in ``nn.Linear``'s
    backward; relative gradient error about 1e-3); float32 GEMMs follow torch's
    ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision`` setting
    (TF32 tensor cores, 10-bit mantissa: about 1e-3 relative error on ``y``, when enabled; full
    float32 by default).

    Memory: no ``N x D_t`` float32 tensor outlives a chunk. ``"mean"``/``"sum"`` keep the
    gradients (input-sized, in the inputs' dtypes; ``grad_W``, ``grad_b`` in float32) from forward
    to backward; ``"none"`` keeps nothing but the inputs and recomputes in backward. Conv maps
    (``channel_dim`` not last) are not transposed: the teacher is read in place, and each chunk of
    whole images of the student is regrouped as ``[D_s, images, H*W]`` (moving runs of ``H*W``
    contiguous positions; chunk-sized) so that each GEMM is one call per chunk; maps with fewer
    than 32 positions per image are instead transposed to an ``[N, C]`` copy by the cpu/cuda
    backends (the Triton kernels read any strides). Backward may run once per forward for ``"mean"``/``"sum"``.

    torch.compile: the fused pass is one custom op (no graph break with ``fullgraph=True``).
    Autocast: the loss opts out; the inputs are taken in their own dtypes (features made by
    autocast layers stay bf16/fp16, the adapter stays float32), the loss and the ``grad_W`` /
    ``grad_b`` accumulators are float32, and each gradient has its input's dtype. The one effect
    of an enabled CUDA autocast region: when ``student_feat`` already has the autocast dtype, the
    cuda and triton backends run the adapter GEMMs in that dtype (the weight cast per call, as
    ``nn.Linear`` would be; tensor cores, float32 accumulation) instead of float32;
    ``grad_W``/``grad_b`` are still returned in float32, not rounded. The cpu backend (float32
    GEMMs) and the reference compute exactly as outside autocast.
    """
    loss = _checks.check_choice("loss", loss, LOSSES)
    reduction = _checks.check_reduction(reduction)
    backend = _backend.check_backend_name(backend)
    chunk = check_chunk_size(chunk_size)
    cd = validate_inputs(student_feat, teacher_feat, weight, bias, channel_dim)
    device = student_feat.device
    tensors = [t for t in (student_feat, teacher_feat, weight, bias) if t is not None]
    name = _backend.select_backend(backend, device, [t.dtype for t in tensors], what="tensors",
                                   ext_ops=(_EXT_OP,))
    if name == "reference":
        with _custom_op.no_autocast(device):
            return feature_kd_reference(student_feat, teacher_feat, weight, bias, loss=loss,
                                        channel_dim=cd, reduction=reduction)
    needs = [_custom_op.needs_grad(t) for t in (student_feat, teacher_feat, weight, bias)]
    return _custom_op.call(feature_kd_op, student_feat, teacher_feat, weight, bias, loss, cd,
                           reduction, chunk, *needs,
                           autocast_gemm_dtype(student_feat, weight, name), name)[0]
