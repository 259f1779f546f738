"""Test configuration: Triton kernels run on CPU tensors through the interpreter when no GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (fastkd imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
