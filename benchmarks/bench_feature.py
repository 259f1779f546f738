"""Feature KD (fastkd.FeatureKDLoss vs nn.Linear + F.mse_loss / cosine, torch.compile),
forward and forward+backward."""
import pytest
import torch

from fastkd.bench import pytest_cases

if torch.cuda.is_available():
    SHAPES = [("bfloat16", {"N": 16384, "Ds": 1024, "Dt": 4096}, {"loss": "mse"}),
              ("float32", {"N": 16384, "Ds": 1024, "Dt": 4096}, {"loss": "mse"}),
              ("bfloat16", {"N": 16384, "Ds": 1024, "Dt": 4096}, {"loss": "cosine"})]
else:
    SHAPES = [("float32", {"N": 2048, "Ds": 256, "Dt": 512}, {"loss": "mse"}),
              ("float32", {"N": 2048, "Ds": 256, "Dt": 512}, {"loss": "cosine"})]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", pytest_cases.cases("feature", SHAPES))
def test_feature_kd(benchmark, case, mode):
    pytest_cases.run(benchmark, case, mode)
