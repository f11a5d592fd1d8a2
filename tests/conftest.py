import os

# Must happen before anything imports triton: with no CUDA device, Triton kernels run in the
# interpreter on the CPU, so every CI run exercises them.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SEGFORMER_FAST_DEBUG", "1")  # NaN-fill torch.empty outputs of kernels

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
