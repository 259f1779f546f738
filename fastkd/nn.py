"""``torch.nn`` modules of fastkd (one per loss family, defined beside its kernels)."""
from fastkd.feature.module import FeatureKDLoss
from fastkd.logit.module import FusedLinearKDLoss, KDLoss
from fastkd.relation.module import PKTLoss, RKDLoss, SPLoss

__all__ = ["KDLoss", "FusedLinearKDLoss", "FeatureKDLoss", "SPLoss", "RKDLoss", "PKTLoss"]
