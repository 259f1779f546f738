"""Relation knowledge distillation (SPEC §3): SP, RKD and PKT losses computed in blocks.

``reference.py`` (the contract), ``ops.py`` (validation, dispatch and the custom ops over the
fused kernels), ``triton_kernel.py`` (the Triton kernels; C++/CUDA through ``fastkd._C``),
``gather.py`` (the global batch over a process group), ``module.py`` (the ``torch.nn``
modules).
"""
