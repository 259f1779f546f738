"""Trainers of other libraries with fastkd's fused losses inside (optional extras).

Nothing is imported here: ``import fastkd.integrations`` needs neither transformers nor TRL.
Import a submodule to use one:

- :mod:`fastkd.integrations.transformers`: ``KDTrainer``, a ``transformers.Trainer`` for
  causal-LM distillation (``pip install 'fastkd[hf]'``);
- :mod:`fastkd.integrations.trl`: ``FastKDGKDTrainer``, TRL's GKD trainer with the
  generalized JSD computed by fastkd on hidden states (``pip install 'fastkd[trl]'``).

Both run the student and the teacher through their own ``forward`` (so DDP / FSDP wrappers
work as usual) and swap the output layer for the fused loss during the step: see
:func:`fastkd.integrations._causal_lm.fused_causal_lm_kd`.
"""
