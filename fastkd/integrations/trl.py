"""``FastKDGKDTrainer``: TRL's GKD trainer with the generalized JSD computed by fastkd's fused
kernels on hidden states, so neither model's ``[B, S, V]`` logits are materialised.

``pip install 'fastkd[trl]'`` (trl, transformers, accelerate, datasets). See
:class:`FastKDGKDTrainer`.
"""
from __future__ import annotations

try:
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import empty_cache
except ImportError as exc:  # the extra is optional; say which one is missing
    raise ImportError("fastkd.integrations.trl needs TRL (with transformers and accelerate): "
                      "pip install 'fastkd[trl]'") from exc

from fastkd.integrations._causal_lm import fused_causal_lm_kd
from fastkd.logit.module import FusedLinearKDLoss

__all__ = ["FastKDGKDTrainer"]


class FastKDGKDTrainer(GKDTrainer):
    r"""``trl.experimental.gkd.GKDTrainer`` with its loss computed by
    :class:`fastkd.FusedLinearKDLoss` on the final hidden states.

    Everything else is TRL's: on-policy generation with probability ``lmbda``, ``seq_kd``,
    the data collator, the teacher's preparation, logging. ``compute_loss`` computes the same
    number as ``GKDTrainer.compute_loss``: with student and teacher distributions
    :math:`q = \mathrm{softmax}(s / T)`, :math:`p = \mathrm{softmax}(t / T)` of the shifted
    logits (position i predicts token i + 1),

    .. math::
        \ell = \frac{1}{n}\sum_{\text{rows}}
               \beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m),
        \qquad m = \beta p + (1 - \beta) q

    over the rows whose label is not -100, where :math:`\beta` = ``args.beta`` (β = 0 is
    exactly KL(p‖q), β = 1 exactly KL(q‖p), as in TRL), with no :math:`T^2` factor, and
    :math:`n` = ``num_items_in_batch`` when the Trainer gives it, else the number of counted
    rows (at least 1). That is ``FusedLinearKDLoss(temperature=T, divergence="jsd", beta=β,
    t2_scale=False)`` on the counted rows of the hidden states and the output-layer weights,
    computed in row chunks. The models are called through their wrappers (DDP / FSDP): see
    :mod:`fastkd.integrations._causal_lm`.

    Args:
        (those of ``GKDTrainer``), plus
        loss_temperature (float): :math:`T` of the loss. GKD's ``compute_loss`` uses 1.0
            whatever ``args.temperature`` (which is the sampling temperature of generation).
            Default: 1.0.
        kd_loss (:class:`fastkd.FusedLinearKDLoss`, optional): the loss to use instead (e.g.
            another ``backend=``, ``chunk_size=`` or a ``hard_weight``); ``reduction="mean"``.
            When its ``divergence`` is ``"jsd"`` its ``beta`` follows ``self.beta`` at every
            step. Default: None (built from ``loss_temperature`` and ``args.beta`` as above).
    """

    def __init__(self, *args, loss_temperature: float = 1.0, kd_loss=None, **kwargs):
        super().__init__(*args, **kwargs)
        if kd_loss is None:
            kd_loss = FusedLinearKDLoss(temperature=loss_temperature, divergence="jsd",
                                        beta=self.beta, t2_scale=False, ignore_index=-100)
        if not isinstance(kd_loss, FusedLinearKDLoss):
            raise TypeError(f"kd_loss must be a fastkd.FusedLinearKDLoss, got "
                            f"{type(kd_loss).__name__}")
        if kd_loss.reduction not in ("mean", "batchmean"):
            raise ValueError(f"kd_loss must have reduction='mean', got {kd_loss.reduction!r}")
        self.kd_loss = kd_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GKD's loss of one micro-batch, fused (see the class docstring)."""
        if self.kd_loss.divergence == "jsd":
            self.kd_loss.beta = self.beta
        self.teacher_model.eval()
        model_inputs = {"input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"]}
        res = fused_causal_lm_kd(model, self.kd_loss, model_inputs, inputs["labels"],
                                 teacher=self.teacher_model,
                                 num_items_in_batch=num_items_in_batch)
        empty_cache()
        return (res.loss, res.outputs) if return_outputs else res.loss
