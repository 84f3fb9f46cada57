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


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """The fault tests' reference (test_resume.UNINTERRUPTED), run once per session on a copy of test_cli's
    tiny dataset (the same images)."""
    from fastdino.pipelines import make_shapes_dataset
    from test_resume import UNINTERRUPTED, main_here

    data = make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=32, num_val=20, image_size=32)
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main_here("train", "--output", run, "--data", data, *UNINTERRUPTED) == 0
    return run
