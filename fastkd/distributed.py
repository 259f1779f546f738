"""fastkd inside ``torch.distributed``: where the two ways a loss meets a process group live.

1. **Vocabulary parallelism** of the logit losses (Megatron-style tensor parallelism of the
   output layer): :mod:`fastkd.logit.vocab_parallel` (:func:`vocab_parallel_kd_loss`,
   :func:`vocab_parallel_kd_forward`; ``KDLoss(process_group=)``,
   ``FusedLinearKDLoss(process_group=)``).
2. **Global-batch relation KD**: :mod:`fastkd.relation.gather` (:func:`gather_rows`;
   ``SPLoss/RKDLoss/PKTLoss(gather=True)``), with the gradient convention under DDP explained
   there.

Both use only collectives of the group (NCCL on GPU, gloo on CPU: any backend with
``all_reduce`` and ``all_gather``). This module re-exports their public functions.
"""
from fastkd.logit.vocab_parallel import (is_parallel, vocab_parallel_kd_forward,
                                         vocab_parallel_kd_loss)
from fastkd.relation.gather import gather_features, gather_rows, resolve_gather_group

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_kd_forward", "gather_rows",
           "gather_features", "resolve_gather_group", "is_parallel"]
