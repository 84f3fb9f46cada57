import os
from types import SimpleNamespace

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
def tiny_dataset(tmp_path_factory):
    """The built-in shapes dataset, small: 32 train and 20 val images of 32 px with train/ and val/ splits."""
    from fastdino.pipelines import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=32, num_val=20, image_size=32)


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, tiny_dataset):
    """The fault tests' reference (test_resume.UNINTERRUPTED), run once per session on tiny_dataset."""
    from test_resume import UNINTERRUPTED, main_here

    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main_here("train", "--output", run, "--data", tiny_dataset, *UNINTERRUPTED) == 0
    return run


@pytest.fixture
def fastdino_here(capsys):
    """`test_resume.main_here` (fastdino ARGS in this process), returning returncode, stdout and stderr."""
    from test_resume import main_here

    def run(*args):
        code = main_here(*args)
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return run
