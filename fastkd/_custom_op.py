"""The mechanism shared by fastkd's ``torch.library`` custom ops (namespace ``fastkd``).

Every fused kernel (backends ``cpu``, ``cuda``, ``triton``) runs behind a
``torch.library.custom_op``, so that ``torch.compile(fullgraph=True)`` sees one opaque node per
loss call instead of a graph break, and ``torch.library.opcheck`` can check it. The pattern, used
the same way by every family (``fastkd/{logit,feature,relation}/ops.py``):

- **Schema**: given explicitly (``schema=``). Tensors first; the validated configuration as plain
  ``float``/``int``/``bool``/``str`` (lists: ``float[]``, ``bool[]``, ``Tensor[]``) arguments;
  ``need_grad_*`` bools saying which gradients the forward pass must produce (computed by the
  Python dispatch from ``requires_grad`` and grad mode: :func:`needs_grad`); ``str backend`` last
  (``"cpu"``, ``"cuda"`` or ``"triton"``, already resolved: one op serves every fused backend).
  Outputs: ``(loss, grad_a, grad_b, ...)``, the gradients computed in the forward pass, each an
  empty ``[0]`` placeholder (:func:`placeholder`) when its ``need_grad_*`` is false (a custom op
  cannot return None).
- **Implementation** (``mutates_args=()``): runs the kernel under :func:`kernel_context`
  (autocast off, so that torch ops inside the kernels never run in bf16/fp16), reads the kernel's
  error flags and raises there (the ``.item()`` is inside the opaque op, not in the traced graph;
  such ops are registered with :func:`host_sync_tags`).
- **Fake** (``register_fake``): the output shapes and dtypes only.
- **Autograd** (``register_autograd``): ``setup_context`` marks the gradient outputs
  non-differentiable, turns off grad materialisation and saves them; ``backward`` returns them
  multiplied by the incoming gradient through :func:`scale_saved`.

Everything data-independent (argument checks, backend resolution, reshapes, dtype casts, the
autocast decisions) happens in Python before the op call and is traced by dynamo as ordinary code.

**Eager calls** (:func:`call`): entering a custom op from Python costs the dispatcher's argument
handling and the generic autograd wrapper, several hundred microseconds per call on a CPU, more
than the kernel itself at small sizes (a 10-class KD loss on 64 rows). Eagerly, on plain CPU/CUDA
tensors with no dispatch mode or functorch transform active, :func:`call` runs the same
implementation, ``setup_context`` and ``backward`` (registered through :func:`register_autograd`)
inside one ``torch.autograd.Function``; traced, or on anything else, it calls the op.

**In place vs out of place (the gradient computed in forward).** :func:`scale_saved` multiplies
the saved gradients *in place* when it runs eagerly on plain tensors: no second input-sized
buffer, and with ``loss.backward()`` on a reduced CPU loss the multiplication by 1 is skipped.
That is why a second backward through the same graph raises (:func:`consume_once`). Under
``torch.compile`` / AOTAutograd, functionalization forbids mutating a saved tensor, so it
multiplies *out of place*: the compiled backward allocates one more input-sized buffer and makes
one more pass over it (inductor fuses it with the cast to the input dtype). A mutating "scale in
place" op in the backward graph would not help: AOTAutograd's partitioner rejects it. The
relation losses (``[B, d]`` gradients, cheap to copy) always scale out of place
(``in_place=False``), so their retained graphs may be walked twice.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

NAMESPACE = "fastkd"


def host_sync_tags() -> dict:
    """``custom_op`` keyword arguments for an op whose implementation reads device data on the
    host (the logit ops read their error flags): tagged ``cudagraph_unsafe`` where this torch has
    the tag, so that ``torch.compile(mode="reduce-overhead")`` keeps it out of CUDA graphs."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None or "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return {}
    return {"tags": (tag,)}


def needs_grad(t) -> bool:
    """Whether the forward pass must produce the gradient of ``t`` (static under dynamo)."""
    return t is not None and torch.is_grad_enabled() and t.requires_grad


def placeholder(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """The ``[0]`` tensor an op returns in place of a gradient that was not asked for."""
    return like.new_empty(0, dtype=dtype)


def no_autocast(device: torch.device):
    """A context that disables autocast for ``device``'s type (fastkd losses are computed in
    float32 whatever the autocast state; see the README, "torch.compile and autocast")."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def kernel_context(device: torch.device):
    """Context of an op implementation: autocast off when it is on (the kernels call torch ops,
    e.g. ``mm``/``mv``, that autocast would otherwise run in bf16/fp16)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def save_gradients(ctx, grads, needs) -> None:
    """``setup_context`` part shared by the ops: the gradient outputs ``grads`` are saved for
    backward (None where ``needs`` is false) and are not differentiable."""
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*[g if n else None for g, n in zip(grads, needs)])


def consume_once(ctx, what: str) -> None:
    """The backward of a loss whose gradients were computed in forward and are scaled in place
    may run once per forward: a second call raises ``RuntimeError`` naming ``what``."""
    if getattr(ctx, "fastkd_consumed", False):
        raise RuntimeError(
            f"fastkd {what}: backward ran twice through the same graph. The fused kernels "
            f"compute the gradient once in the forward pass and scale it in place, so "
            f"retain_graph=True with a second backward is not supported; recompute the loss.")
    ctx.fastkd_consumed = True


_EAGER: dict = {}  # op -> (implementation, setup_context, backward, default arguments)


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=...)``, also recorded for :func:`call`."""
    op.register_autograd(backward, setup_context=setup_context)
    impl = getattr(op, "_init_fn", None)  # the decorated function (torch's CustomOpDef)
    if impl is None:
        return  # this torch keeps it elsewhere: :func:`call` then always dispatches
    params = list(inspect.signature(impl).parameters.values())
    defaults = []
    for arg in reversed(params):
        if arg.default is inspect.Parameter.empty:
            break
        defaults.insert(0, arg.default)
    npos = len(params)
    _EAGER[op] = (impl, setup_context, backward, npos, defaults)


def _tensor_leaves(values) -> tuple[list, list]:
    """The tensors among ``values`` (top level, or in a list/tuple of tensors) in order, and the
    layout to rebuild per value: None (not a tensor), -1 (a tensor) or a list's length."""
    leaves, layout = [], []
    for v in values:
        if isinstance(v, torch.Tensor):
            leaves.append(v)
            layout.append(-1)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            leaves.extend(v)
            layout.append(len(v))
        else:
            layout.append(None)
    return leaves, layout


def _rebuild(values, layout, leaves) -> tuple:
    out, i = [], 0
    for v, n in zip(values, layout):
        if n is None:
            out.append(v)
        elif n == -1:
            out.append(leaves[i])
            i += 1
        else:
            out.append(list(leaves[i:i + n]))
            i += n
    return tuple(out)


class _EagerOp(torch.autograd.Function):
    """A registered op's implementation, setup_context and backward, without the dispatcher."""

    @staticmethod
    def forward(ctx, entry, args, box, *leaves):
        impl, setup, _, _, _ = entry
        output = impl(*args)
        outs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        setup(ctx, args, output)
        out_leaves, out_layout = _tensor_leaves(outs)
        # The output's structure, for the caller (box) and for backward (ctx).
        box["outs"], box["layout"] = outs, out_layout
        box["single"] = isinstance(output, torch.Tensor)
        ctx.fastkd_eager = (entry, box["in_layout"], outs, out_layout)
        return tuple(out_leaves)

    @staticmethod
    def backward(ctx, *grad_leaves):
        entry, in_layout, outs, out_layout = ctx.fastkd_eager
        grads = entry[2](ctx, *_rebuild(outs, out_layout, grad_leaves))
        # One gradient per input leaf, in the order of _tensor_leaves(args).
        flat = []
        for g, n in zip(grads, in_layout):
            if n == -1:
                flat.append(g)
            elif n is not None:
                flat.extend(g if g is not None else [None] * n)
        return (None, None, None, *flat)


def _eager_ok(leaves) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) is torch.Tensor and t.device.type in ("cpu", "cuda") for t in leaves)


def call(op, *args):
    """``op(*args)``; eagerly on plain tensors, through :class:`_EagerOp` (same results, without
    the dispatcher's per-call cost; see the module docstring)."""
    entry = _EAGER.get(op)
    if entry is None:
        return op(*args)
    npos, defaults = entry[3], entry[4]
    if len(args) < npos:
        missing = npos - len(args)
        if missing > len(defaults):
            return op(*args)  # let the op report the missing arguments
        args = args + tuple(defaults[len(defaults) - missing:])
    leaves, layout = _tensor_leaves(args)
    if not _eager_ok(leaves):
        return op(*args)
    box: dict = {"in_layout": layout}
    out_leaves = _EagerOp.apply(entry, args, box, *leaves)
    if isinstance(out_leaves, torch.Tensor):
        out_leaves = (out_leaves,)
    out = _rebuild(box["outs"], box["layout"], out_leaves)
    return out[0] if box["single"] else out


def _plain(t: torch.Tensor) -> bool:
    # FakeTensor / FunctionalTensor (AOTAutograd, opcheck) and other subclasses are not plain.
    return type(t) is torch.Tensor


def scale_saved(ctx, saved, grad_output, what: str, per_row: bool = False,
                in_place: bool = True):
    """Multiply the gradients ``saved`` (computed in forward; None entries stay None) by
    ``grad_output``: a scalar, or with ``per_row`` one value per row (the leading dimension).

    Eagerly on plain tensors, with ``in_place``: in place (see the module docstring), once per
    forward; a second call raises ``RuntimeError``. Traced (torch.compile, AOTAutograd, opcheck),
    or without ``in_place`` (small gradients; a retained graph may be walked again): out of place.
    Eagerly, a CPU scalar ``grad_output`` equal to 1 returns ``saved`` as is. Results keep each
    gradient's dtype; the product is computed in float32.
    """
    live = [g for g in saved if g is not None]
    if not live:
        return list(saved)
    eager = (not torch.compiler.is_compiling() and _plain(grad_output)
             and all(_plain(g) for g in live))
    inplace = eager and in_place
    if inplace:
        consume_once(ctx, what)
    if (eager and not per_row and grad_output.device.type == "cpu" and grad_output.numel() == 1
            and grad_output.item() == 1.0):
        return list(saved)  # the common case: loss.backward() on the reduced loss
    scale = grad_output.to(torch.float32)
    out = []
    for g in saved:
        if g is None:
            out.append(None)
            continue
        # A dimensioned float32 factor: the product is computed in float32, then rounded once.
        shape = (-1,) + (1,) * (g.dim() - 1) if per_row else (1,) * g.dim()
        s = scale.reshape(shape)
        out.append(g.mul_(s) if inplace else (g * s).to(g.dtype))
    return out
