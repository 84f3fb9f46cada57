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
def tiny_dataset(tmp_path_factory):
    """The built-in shapes dataset, small: 32 train and 20 val images of 32 px with train/ and val/ splits."""
    from fastdino.pipelines import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=32, num_val=20, image_size=32)
