"""Relation KD (fastkd.SPLoss / RKDLoss / PKTLoss vs the stock B x B formulas, torch.compile),
forward and forward+backward."""
import pytest
import torch

from fastkd.bench import pytest_cases

if torch.cuda.is_available():
    B, B_ANGLE, D = 4096, 1024, 128
else:
    B, B_ANGLE, D = 512, 128, 128
SHAPES = [("float32", {"B": B, "ds": D, "dt": D}, {"loss": "sp"}),
          ("float32", {"B": B, "ds": D, "dt": D}, {"loss": "rkd-distance"}),
          ("float32", {"B": B_ANGLE, "ds": D, "dt": D}, {"loss": "rkd"}),
          ("float32", {"B": B, "ds": D, "dt": D}, {"loss": "pkt"})]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", pytest_cases.cases("relation", SHAPES))
def test_relation_kd(benchmark, case, mode):
    pytest_cases.run(benchmark, case, mode)
