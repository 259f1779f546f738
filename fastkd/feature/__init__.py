"""Feature knowledge distillation (SPEC §2): reference, autograd/dispatch, Triton kernels, module."""
