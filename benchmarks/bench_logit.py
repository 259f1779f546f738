"""Logit KD (fastkd.KDLoss vs stock KL + CE, torch.compile, Liger) and fused-linear KD
(fastkd.FusedLinearKDLoss vs matmul + stock, torch.compile, Liger), forward and forward+backward."""
import pytest
import torch

from fastkd.bench import pytest_cases

if torch.cuda.is_available():
    LOGIT = [("bfloat16", {"N": 4096, "V": 32000}, {}),
             ("bfloat16", {"N": 4096, "V": 128256}, {}),
             ("float32", {"N": 4096, "V": 32000}, {})]
    FUSED = [("bfloat16", {"BT": 4096, "H": 4096, "V": 128256}, {})]
else:
    LOGIT = [("float32", {"N": 64, "V": 8192}, {}),
             ("float32", {"N": 256, "V": 32000}, {})]
    FUSED = [("float32", {"BT": 128, "H": 256, "V": 8192}, {})]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", pytest_cases.cases("logit", LOGIT))
def test_logit_kd(benchmark, case, mode):
    pytest_cases.run(benchmark, case, mode)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", pytest_cases.cases("fused-linear", FUSED))
def test_fused_linear_kd(benchmark, case, mode):
    pytest_cases.run(benchmark, case, mode)
