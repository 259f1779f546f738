"""Causal-LM distillation with the output layer swapped for the fused loss (torch only).

The trainers of :mod:`fastkd.integrations.transformers` and :mod:`fastkd.integrations.trl`
share this: run the teacher and the student through their own ``forward`` and, while they run,
replace the ``forward`` of their output layer (``model.get_output_embeddings()``, an
``nn.Linear``; tied embeddings included). The teacher's replacement keeps the final hidden states
and the weight it receives; the student's computes :class:`fastkd.FusedLinearKDLoss` on the
shifted, label-masked rows and returns a ``[*, S, 1]`` view of the loss instead of the
``[*, S, V]`` logits. So:

- no ``N x V`` logits are held, and only the final hidden states (after the model's last norm)
  are kept, not every layer's (``output_hidden_states=True`` would keep them all);
- the model's ``forward`` runs through whatever wraps it (DDP, FSDP1, FSDP2 ``fully_shard``):
  the weight is read inside that forward, so it is the gathered (unsharded) one, and DDP's
  search for unused parameters sees every parameter, since the returned "logits" depend on the
  loss;
- the loss handed back is read out of the model's output, so backward enters through the
  outputs, where FSDP registers its pre-backward hooks.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch.nn import functional as F

from fastkd.logit.topk_teacher import TopKTeacher

# Bytes of float32 logits per chunk of the no-grad cross-entropy used for logging.
_CE_CHUNK_BYTES = 64 << 20


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / FSDP1 / torch.compile wrappers (PEFT models pass through: they
    forward ``get_output_embeddings`` to the base model)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = model.module
        else:
            return model


def output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """``model.get_output_embeddings()`` (through wrappers), checked to be a plain linear layer
    whose ``forward`` is ``F.linear`` (what the fused loss computes)."""
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(f"{type(inner).__name__} has no output layer "
                        "(get_output_embeddings() returned None or does not exist)")
    head = _unwrap(head)
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(f"the output layer of {type(inner).__name__} is a "
                        f"{type(head).__name__}; fastkd's fused loss needs a plain nn.Linear "
                        "(no LoRA / quantised head)")
    return head


def _weights_are_sharded(model: torch.nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``weight`` may be freed (resharded) when the model's forward ends: FSDP1, FSDP2 or
    DeepSpeed ZeRO-3. The teacher's captured weight is then copied."""
    if getattr(weight, "ds_id", None) is not None:
        return True
    kinds = []
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule
        kinds.append(FSDPModule)
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FullyShardedDataParallel
        kinds.append(FullyShardedDataParallel)
    return bool(kinds) and any(isinstance(m, tuple(kinds)) for m in model.modules())


@contextlib.contextmanager
def replaced_forward(module: torch.nn.Module, fn):
    """``module.forward`` is ``fn`` inside the block; an instance-level forward set by someone
    else (e.g. an accelerate hook) is put back afterwards."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def _placeholder(value: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A ``[*, S, 1]`` copy of the scalar ``value`` standing in for the logits (a copy, not a
    view: FSDP2 warns that in-place ops on a view output would skip its pre-backward hook)."""
    return value.reshape((1,) * hidden.dim()).repeat(*hidden.shape[:-1], 1)


def _select_topk(topk, mask: torch.Tensor):
    """The rows of a ``[B, S, k]`` top-k teacher (pair, TopKTeacher or list) where ``mask``."""
    if isinstance(topk, list):
        return [_select_topk(t, mask) for t in topk]
    if isinstance(topk, TopKTeacher):
        return TopKTeacher(topk.indices[mask], topk.logprobs[mask], topk.temperature, check=False)
    indices, logprobs = topk
    return indices[mask], logprobs[mask]


def _topk_shape(topk):
    if isinstance(topk, list):
        return _topk_shape(topk[0])
    return (topk.indices if isinstance(topk, TopKTeacher) else topk[0]).shape[:-1]


@torch.no_grad()
def cross_entropy_sum(hidden, weight, bias, target, label_smoothing=0.0) -> torch.Tensor:
    """``sum_i CE(hidden_i W^T + b, target_i)`` in float32, in row chunks of at most 64 MiB of
    logits (no grad); for logging the hard part of the loss."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = max(1, _CE_CHUNK_BYTES // (4 * weight.shape[0]))
    for i in range(0, hidden.shape[0], step):
        logits = F.linear(hidden[i:i + step], weight, bias).float()
        total += F.cross_entropy(logits, target[i:i + step], reduction="sum",
                                 label_smoothing=label_smoothing)
    return total


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and (torch.equal(a, b) or bool(a.isnan() & b.isnan()))


@dataclasses.dataclass
class CausalLMKDResult:
    """What :func:`fused_causal_lm_kd` returns.

    Attributes:
        loss: the scalar loss (float32), read out of the student's outputs.
        outputs: the student's model outputs; their ``logits`` are a ``[B, S, 1]`` view of
            ``loss``, not logits.
        ce: with ``compute_ce=True``: the student's cross-entropy on the counted rows (no
            grad, float32), normalised like the loss (divided by ``num_items_in_batch``, else by
            the counted rows); otherwise None.
        rows: the number of counted rows (label != ignore_index) of this call.
    """

    loss: torch.Tensor
    outputs: Any
    ce: torch.Tensor | None
    rows: int


def fused_causal_lm_kd(student, kd_loss, inputs: dict, labels: torch.Tensor | None = None, *,
                       shift_labels: torch.Tensor | None = None, teacher=None,
                       teacher_topk=None, num_items_in_batch=None,
                       compute_ce: bool = False) -> CausalLMKDResult:
    r"""One causal-LM distillation loss through both models' ``forward``, no ``N x V`` logits.

    With hidden states :math:`h` (the input of the output layer, ``[B, S, H]``) and the next-token
    targets :math:`y_{b,i}` = ``labels[b, i + 1]`` (the last position has none), the rows that
    count are those with :math:`y_{b,i} \ne` ``ignore_index``; on them::

        loss = kd_loss(h_s[rows], W_s, h_t[rows], W_t, y[rows], b_s, b_t,
                       num_items_in_batch=num_items_in_batch)

    (or ``teacher_topk=`` rows instead of the teacher's hidden states and weight).

    Args:
        student: the student causal LM, wrapped or not (DDP, FSDP, torch.compile); called as
            ``student(**inputs)``.
        kd_loss: a :class:`fastkd.FusedLinearKDLoss` (its ``ignore_index`` marks masked labels).
        inputs: the model inputs (``input_ids``, ``attention_mask``, ...), without labels.
        labels: ``[B, S]`` token ids aligned with ``input_ids`` (shifted here), or
        shift_labels: ``[B, S]`` targets already shifted (position i predicts
            ``shift_labels[:, i]``), as some collators provide.
        teacher: the teacher causal LM, run first under ``torch.no_grad()``; or
        teacher_topk: a sparse teacher ``[B, S, k]`` aligned with the positions (row i is the
            teacher's distribution of token i + 1, as the logits of position i): an
            ``(indices, logprobs)`` pair, a :class:`fastkd.TopKTeacher`, or a list of them.
        num_items_in_batch: passed to the loss (the counted rows of the whole optimizer step,
            as the Hugging Face ``Trainer`` counts them). Default: None (this call's rows).
        compute_ce: also compute the student's CE on the counted rows, for logging (one more
            no-grad GEMM of the student's output layer, in chunks). Default: False.

    Returns:
        :class:`CausalLMKDResult`.
    """
    if (teacher is None) == (teacher_topk is None):
        raise ValueError("give exactly one teacher: teacher (a model) or teacher_topk")
    ignore = kd_loss.ignore_index
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels (or shift_labels) are needed to pick the rows that count")
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore)
    mask = shift_labels != ignore
    if teacher_topk is not None and tuple(_topk_shape(teacher_topk)) != tuple(mask.shape):
        raise ValueError(f"teacher_topk rows {tuple(_topk_shape(teacher_topk))} must match the "
                         f"labels {tuple(mask.shape)} (one top-k row per position, aligned "
                         "with the logits: row i is the distribution of token i + 1)")
    captured: dict = {}
    if teacher is not None:
        t_head = output_layer(teacher)

        def teacher_head(hidden):
            weight, bias = t_head.weight.detach(), t_head.bias
            bias = None if bias is None else bias.detach()
            if _weights_are_sharded(teacher, t_head.weight):  # freed after the forward
                weight = weight.clone()
                bias = None if bias is None else bias.clone()
            captured.update(hidden=hidden.detach(), weight=weight, bias=bias)
            return hidden.new_zeros(()).expand(*hidden.shape[:-1], 1)

        with torch.no_grad(), replaced_forward(t_head, teacher_head):
            teacher(**inputs)
        if "hidden" not in captured:
            raise RuntimeError("the teacher's forward did not call its output layer")

    s_head = output_layer(student)
    state: dict = {}

    def student_head(hidden):
        if hidden.shape[:-1] != mask.shape:
            raise ValueError(f"the output layer got hidden states {tuple(hidden.shape)}, which "
                             f"do not match the labels {tuple(mask.shape)} (logits_to_keep?)")
        h = hidden[mask]
        y = shift_labels[mask]
        weight, bias = s_head.weight, s_head.bias
        if teacher is not None:
            th, tw, tb = captured["hidden"], captured["weight"], captured["bias"]
            th = th[mask]
            if not torch.is_autocast_enabled(th.device.type) and th.dtype != tw.dtype:
                th = th.to(tw.dtype)  # F.linear without autocast would need the same
            loss = kd_loss(h, weight, th, tw, y, bias, tb, num_items_in_batch=num_items_in_batch)
        else:
            loss = kd_loss(h, weight, target=y, student_bias=bias,
                           teacher_topk=_select_topk(teacher_topk, mask),
                           num_items_in_batch=num_items_in_batch)
        state["loss"] = loss
        state["rows"] = h.shape[0]
        if compute_ce:
            denom = h.shape[0] if num_items_in_batch is None else num_items_in_batch
            if isinstance(denom, torch.Tensor):
                denom = denom.to(device=loss.device, dtype=torch.float32)
            ce = cross_entropy_sum(h.detach(), weight.detach(),
                                   None if bias is None else bias.detach(), y,
                                   kd_loss.label_smoothing)
            state["ce"] = ce / (denom.clamp_min(1) if isinstance(denom, torch.Tensor)
                                else max(denom, 1))
        return _placeholder(loss, hidden)

    with replaced_forward(s_head, student_head):
        outputs = student(**inputs)
    if "loss" not in state:
        raise RuntimeError("the student's forward did not call its output layer")
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    loss = logits[(0,) * logits.dim()]
    if not _same(loss.detach(), state["loss"].detach()):
        raise RuntimeError(
            f"{type(_unwrap(student)).__name__} transforms the output of its output layer "
            "(logit softcapping or scaling?); the fused loss would ignore that, so it is refused")
    return CausalLMKDResult(loss, outputs, state.get("ce"), state["rows"])
