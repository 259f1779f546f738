"""``torch.nn`` modules of fastkd (one per loss family, defined beside its kernels)."""
from fastkd.logit.module import KDLoss

__all__ = ["KDLoss"]
