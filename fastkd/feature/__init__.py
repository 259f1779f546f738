"""Feature knowledge distillation (SPEC §2): ``FeatureKDLoss``.

``reference.py`` (the contract), ``ops.py`` (validation, dispatch and the custom ops over the
fused kernels), ``triton_kernel.py`` (the Triton kernels; C++/CUDA through ``fastkd._C``),
``module.py`` (the ``torch.nn`` module).
"""
