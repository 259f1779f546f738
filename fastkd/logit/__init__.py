"""Logit knowledge distillation (SPEC §1): ``KDLoss``, ``FusedLinearKDLoss``, top-k teachers,
vocabulary parallelism.

One file per job, each layer importing only the ones below it:

- ``config.py``: the nine KD arguments (:class:`~fastkd.logit.config.LogitKDConfig`), tensor
  validation, the vocabulary rule, the kernels' error flags;
- ``reference.py``: the contract as float64-exact PyTorch code;
- ``ops.py``: backend dispatch and the ``fastkd::logit_kd`` custom op over the fused kernels
  (C++/CUDA through ``fastkd._C``; Triton in ``triton_kernel.py``);
- ``topk.py``: sparse top-k teachers; ``fused_linear.py``: the lm_head fused in;
  ``vocab_parallel.py``: the vocabulary sharded over a process group;
- ``module.py``: the ``torch.nn`` modules.
"""
