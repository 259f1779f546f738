"""fastkd: fused knowledge-distillation losses for PyTorch (CUDA, Triton, CPU, reference)."""
import torch  # noqa: F401  (loads libtorch before the extension)

from fastkd import functional
from fastkd._backend import available_backends
from fastkd.logit.topk_teacher import TopKTeacher
from fastkd.nn import FeatureKDLoss, FusedLinearKDLoss, KDLoss, PKTLoss, RKDLoss, SPLoss

__version__ = "0.1.0"
__all__ = ["KDLoss", "FusedLinearKDLoss", "FeatureKDLoss", "SPLoss", "RKDLoss", "PKTLoss",
           "TopKTeacher", "functional", "available_backends"]
