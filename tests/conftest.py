import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in interpreter mode on machines without a GPU. This must be set before any
# `@triton.jit` function is defined, i.e. before fastdino.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# benchmarks/ is a folder of scripts; its official_dino.py (the official DINO code restated, the benchmarks'
# baseline) is also the spec that the equivalence tests compare against, so tests import it by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
