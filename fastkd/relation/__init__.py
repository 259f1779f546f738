"""Relation knowledge distillation (SPEC §3): SP, RKD and PKT losses computed in blocks.

Reference (``reference.py``), autograd/dispatch and functional forms (``autograd.py``), Triton
kernels (``triton_kernel.py``) and the ``torch.nn`` modules (``module.py``).
"""
