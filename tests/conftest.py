import os

import pytest
import torch

# Triton kernels run in interpreter mode on machines without a GPU. This must be set before any
# `@triton.jit` function is defined, i.e. before fastdino.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
