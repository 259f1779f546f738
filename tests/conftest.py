"""Test configuration: Triton kernels run on CPU tensors through the interpreter when no GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (fastkd imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles of the property-based tests (tests/test_properties.py): "ci" (default) is
# bounded and derandomized, so CI runs are fast and reproducible; "long" is for release runs:
#   FASTKD_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py
try:
    from hypothesis import HealthCheck, settings as _hyp_settings
except ImportError:  # hypothesis is a test extra; only the property tests need it
    pass
else:
    _hyp_common = dict(deadline=None, print_blob=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                              HealthCheck.filter_too_much])
    _hyp_settings.register_profile("ci", max_examples=25, derandomize=True, database=None,
                                   **_hyp_common)
    _hyp_settings.register_profile("long", max_examples=500, **_hyp_common)
    _hyp_settings.load_profile(os.environ.get("FASTKD_HYPOTHESIS_PROFILE", "ci"))
