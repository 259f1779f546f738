"""``KDTrainer``: causal-LM distillation in the Hugging Face ``Trainer``, no ``N x V`` logits.

``pip install 'fastkd[hf]'`` (transformers, accelerate). See :class:`KDTrainer`.
"""
from __future__ import annotations

try:
    import transformers
except ImportError as exc:  # the extra is optional; say which one is missing
    raise ImportError("fastkd.integrations.transformers needs transformers and accelerate: "
                      "pip install 'fastkd[hf]'") from exc

import torch

from fastkd.logit.module import FusedLinearKDLoss
from fastkd.logit.topk_teacher import TopKTeacher
from fastkd.integrations._causal_lm import fused_causal_lm_kd

__all__ = ["KDTrainer", "TOPK_INDICES_KEY", "TOPK_LOGPROBS_KEY"]

#: Batch keys of a sparse (offline) teacher: ``[B, S, k]`` indices and log-probabilities.
TOPK_INDICES_KEY = "teacher_topk_indices"
TOPK_LOGPROBS_KEY = "teacher_topk_logprobs"

_LOG_PARTS = ("logging_steps", "every_step", None)


class KDTrainer(transformers.Trainer):
    r"""A ``transformers.Trainer`` that distils a causal LM with :class:`fastkd.FusedLinearKDLoss`.

    Each step runs the teacher's and the student's ``forward`` (the teacher first, under
    ``torch.no_grad()``) with their output layers swapped for the fused loss, so neither model's
    ``[B, S, V]`` logits exist (:func:`fastkd.integrations._causal_lm.fused_causal_lm_kd`). With
    the final hidden states :math:`h` ``[B, S, H]`` and the next-token targets
    :math:`y_{b,i} = \text{labels}_{b,i+1}`, on the rows with :math:`y \ne` ``ignore_index``::

        loss = kd_loss(h_s[rows], W_s, h_t[rows], W_t, y[rows], b_s, b_t,
                       num_items_in_batch=num_items_in_batch)

    i.e. :math:`\sum_\text{rows}(w_\text{soft}\,\tau\,D(p_t, q_s) + w_\text{hard}\,\mathrm{CE})
    / n`, where :math:`n` is the ``Trainer``'s ``num_items_in_batch`` (the counted targets of
    the whole optimizer step: gradient accumulation gives the loss of one big batch). Under data
    parallelism with ``average_tokens_across_devices`` (the default) :math:`n` counts every
    rank's targets and the loss is multiplied by the number of processes, as the ``Trainer``
    does for its own loss, so the averaged gradients are those of the global batch.

    Args:
        model: the student (a causal LM whose ``get_output_embeddings()`` is an ``nn.Linear``;
            tied embeddings are fine).
        args, and the other ``Trainer`` arguments: as in ``transformers.Trainer``
            (``compute_loss_func`` is not accepted: the loss is ``kd_loss``).
        teacher_model: the teacher causal LM (same vocabulary unless ``kd_loss`` says
            otherwise). It is put in eval mode with ``requires_grad_(False)`` and moved to the
            device by accelerate (``prepare_model(..., evaluation_mode=True)``: not wrapped in
            DDP). Default: None (then the teacher comes as top-k, below).
        kd_loss: a :class:`fastkd.FusedLinearKDLoss` with ``reduction="mean"``.
            Default: ``FusedLinearKDLoss()`` (forward KL at T = 1, no hard term).
        teacher_topk_fn: ``fn(batch) -> teacher``: a sparse teacher for the batch (the dict the
            collator made, labels included): a :class:`fastkd.TopKTeacher`, an
            ``(indices, logprobs)`` pair or a list of them, each ``[B, S, k]`` and aligned with
            the positions (row i is the teacher's distribution of token i + 1, as the logits of
            position i; e.g. ``fastkd.teacher_cache`` rows). Default: None.
        teacher_topk_temperature: the temperature the batch's top-k logprobs were taken at
            (``T_src`` of :class:`fastkd.TopKTeacher`; re-tempered to ``kd_loss.temperature``).
            Default: None (taken at the loss's temperature).
        log_kd_parts: ``"logging_steps"`` | ``"every_step"`` | None. Adds ``kd_soft``,
            ``kd_hard`` (the weighted parts, summing to the loss) and ``ce`` (the student's
            unweighted cross-entropy) to the training logs. The split costs one more no-grad
            GEMM of the student's output layer (in 64 MiB chunks), so by default it is computed
            only on the micro-batches of the optimizer steps that log (with
            ``logging_strategy="steps"``; other strategies: every step), and the logged parts
            are those steps' averages, while ``loss`` averages every step since the last log.
            ``"every_step"`` averages them over the same steps as ``loss``.
            Default: ``"logging_steps"``.

    Sparse teachers in the batch: the keys ``"teacher_topk_indices"`` and
    ``"teacher_topk_logprobs"`` (``[B, S, k]`` each, aligned as above; ``-1`` marks an empty
    slot) make the batch's teacher (and ``teacher_model`` must be None). They are kept by
    ``remove_unused_columns`` and not passed to the model.

    Labels: ``"labels"`` ``[B, S]`` as for the model's own loss (``-100`` where nothing is
    predicted, e.g. padding and prompts), or ``"shift_labels"`` already shifted.

    Distributed: the models are called through their wrappers (DDP, FSDP, ``fully_shard``) and
    the output layer's weight is read inside that call, so it is the gathered one and gradients
    are synchronised as usual. A sharded teacher's output-layer weight is copied while the
    teacher's forward holds it (it is freed after). DeepSpeed is not supported.
    """

    def __init__(self, model=None, args=None, *trainer_args, teacher_model=None, kd_loss=None,
                 teacher_topk_fn=None, teacher_topk_temperature=None,
                 log_kd_parts="logging_steps", **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("KDTrainer computes its loss with kd_loss; compute_loss_func is not "
                             "accepted")
        if kd_loss is None:
            kd_loss = FusedLinearKDLoss()
        if not isinstance(kd_loss, FusedLinearKDLoss):
            raise TypeError(f"kd_loss must be a fastkd.FusedLinearKDLoss, got "
                            f"{type(kd_loss).__name__}")
        if kd_loss.reduction not in ("mean", "batchmean"):
            raise ValueError(f"kd_loss must have reduction='mean' (the Trainer normalises by the "
                             f"step's tokens), got {kd_loss.reduction!r}")
        if teacher_model is not None and teacher_topk_fn is not None:
            raise ValueError("give teacher_model or teacher_topk_fn, not both")
        if log_kd_parts not in _LOG_PARTS:
            raise ValueError(f"log_kd_parts must be one of {_LOG_PARTS}, got {log_kd_parts!r}")
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError("KDTrainer does not support DeepSpeed yet")
        # The Trainer counts num_items_in_batch (over labels[..., 1:]) only for models that
        # take loss kwargs; the loss here always takes it and always shifts.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.kd_loss = kd_loss
        self.teacher_topk_fn = teacher_topk_fn
        self.teacher_topk_temperature = teacher_topk_temperature
        self.log_kd_parts = log_kd_parts
        self._kd_parts = None          # float32 [3]: soft, hard, ce summed over logged steps
        self._kd_parts_steps: set = set()
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher_model = teacher_model

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in (TOPK_INDICES_KEY, TOPK_LOGPROBS_KEY, "shift_labels"):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def _batch_teacher_topk(self, batch, inputs):
        """The sparse teacher of this batch (popping its keys from ``inputs``), or None."""
        indices = inputs.pop(TOPK_INDICES_KEY, None)
        logprobs = inputs.pop(TOPK_LOGPROBS_KEY, None)
        if (indices is None) != (logprobs is None):
            raise ValueError(f"the batch has only one of {TOPK_INDICES_KEY!r} and "
                             f"{TOPK_LOGPROBS_KEY!r}")
        if indices is not None:
            return TopKTeacher(indices, logprobs, self.teacher_topk_temperature)
        if self.teacher_topk_fn is not None:
            return self.teacher_topk_fn(batch)
        return None

    def _parts_due(self, model) -> bool:
        """Whether this micro-batch computes the soft / hard split for the logs."""
        if self.log_kd_parts is None or not model.training:
            return False
        if self.log_kd_parts == "every_step":
            return True
        strategy = str(getattr(self.args.logging_strategy, "value", self.args.logging_strategy))
        if strategy == "no":
            return False
        if strategy != "steps":
            return True
        step = self.state.global_step + 1      # the optimizer step this micro-batch belongs to
        every = int(self.state.logging_steps or self.args.logging_steps or 0)
        return (step == 1 and self.args.logging_first_step) or (every > 0 and step % every == 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused KD loss of one micro-batch (see the class docstring)."""
        batch = inputs
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        topk = self._batch_teacher_topk(batch, inputs)
        teacher = self.teacher_model
        if topk is not None and teacher is not None:
            raise ValueError("the batch carries a top-k teacher and a teacher_model was given: "
                             "use one")
        if topk is None and teacher is None:
            raise ValueError(f"no teacher: give teacher_model=, teacher_topk_fn= or the batch "
                             f"keys {TOPK_INDICES_KEY!r} / {TOPK_LOGPROBS_KEY!r}")
        if teacher is not None:
            teacher.eval()  # Trainer.train() puts only the student in train mode
        parts = self._parts_due(model)
        res = fused_causal_lm_kd(model, self.kd_loss, inputs, labels, shift_labels=shift_labels,
                                 teacher=teacher, teacher_topk=topk,
                                 num_items_in_batch=num_items_in_batch, compute_ce=parts)
        loss = res.loss
        scale = 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's targets and DDP/FSDP average the gradients:
            # scale back, as Trainer.compute_loss does (TP ranks share a batch).
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = max(self.accelerator.num_processes // tp, 1)
            if scale != 1:
                loss = loss * scale
        if parts:
            ce = res.ce * scale
            hard = self.kd_loss.hard_weight * ce
            vals = torch.stack([loss.detach().float() - hard, hard, ce])
            if num_items_in_batch is None:   # per-micro-batch means: the Trainer divides too
                vals = vals / self.current_gradient_accumulation_steps
            self._kd_parts = vals if self._kd_parts is None else self._kd_parts + vals
            self._kd_parts_steps.add(self.state.global_step)
        return (loss, res.outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        """Adds ``kd_soft``, ``kd_hard`` and ``ce`` to the training logs (see ``log_kd_parts``);
        averaged over processes like ``loss``."""
        if self._kd_parts is not None and "loss" in logs:
            vals = self._kd_parts
            if self.args.world_size > 1:   # every rank logs at the same steps
                vals = self.accelerator.gather(vals[None]).mean(0)
            vals = (vals / max(len(self._kd_parts_steps), 1)).tolist()
            logs = {**logs, "kd_soft": vals[0], "kd_hard": vals[1], "ce": vals[2]}
            self._kd_parts, self._kd_parts_steps = None, set()
        super().log(logs, start_time)
