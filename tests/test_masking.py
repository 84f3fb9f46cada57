"""DINOv2's block masks (pipelines/masking.py) against dinov2's generator and collate (tests/dinov2_reference.py),
and the masks travelling with the batches of both loaders: seeded, resumable, the same on both paths."""
import random

import numpy as np
import pytest
import torch

import dinov2_reference as ref
from fastdino.pipelines import MaskBatch, MaskingConfig, MaskingGenerator, build_loader, open_source
from fastdino.pipelines.masking import draw_masks
from test_pipelines import CROPS
from test_sources import make_image_folder

MASKING = MaskingConfig(grid=CROPS.global_crops_size // 8)  # patch 8: 4 x 4 patches


@pytest.mark.parametrize("count", [0, 5, 30, 100])
def test_generator_draws_dinov2s_masks(count):
    ours = MaskingGenerator((14, 14), max_num_patches=0.5 * 14 * 14, rng=random.Random(count))
    theirs = ref.MaskingGenerator((14, 14), max_num_patches=0.5 * 14 * 14)
    for _ in range(5):
        random.seed(count + 100)
        expected = theirs(count)
        ours.rng = random.Random(count + 100)
        np.testing.assert_array_equal(ours(count), expected)


def test_batch_masks_are_dinov2s_collate():
    config = MaskingConfig(grid=14)
    random.seed(7)
    theirs = ref.collate_masks(16, (0.1, 0.5), 0.5, 14 * 14, ref.MaskingGenerator((14, 14), max_num_patches=98.0))
    masks = MaskBatch.from_masks(draw_masks(config, 16, random.Random(7)), config.upper_bound(16))
    assert masks.upperbound == theirs["upperbound"]
    torch.testing.assert_close(masks.masks, theirs["collated_masks"])
    n = int(masks.n_masked)
    assert n == int(theirs["n_masked_patches"]) and n <= masks.upperbound
    torch.testing.assert_close(masks.indices[:n], theirs["mask_indices_list"])
    torch.testing.assert_close(masks.weights[:n], theirs["masks_weight"])
    assert torch.all(masks.weights[n:] == 0) and torch.all(masks.indices[n:] == 0)
    assert masks.valid.sum() == n
    assert int(masks.masks.any(-1).sum()) <= 8  # half the crops at most


def test_masked_shares_are_stratified_and_blocks_respect_the_bounds():
    config = MaskingConfig(grid=16)
    masks = draw_masks(config, 64, random.Random(0))
    shares = np.sort(masks.sum(-1)[masks.sum(-1) > 0] / config.n_tokens)
    assert len(shares) == 32 and shares.max() <= 0.5 and shares.min() >= 0.05
    upper = np.linspace(0.1, 0.5, 33)[1:]
    assert np.all(shares <= upper + 1e-6)  # the k-th smallest share is at most the k-th interval's top


def test_config_checks():
    for bad in (dict(grid=0), dict(grid=4, ratio_min_max=(0.6, 0.2)), dict(grid=4, probability=1.5)):
        with pytest.raises(ValueError):
            MaskingConfig(**bad)
    with pytest.raises(ValueError, match="exceed the upper bound"):
        MaskBatch.from_masks(np.ones((2, 4), bool), 3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return open_source(str(make_image_folder(tmp_path_factory.mktemp("data") / "train")))


def _epoch_masks(loader):
    return [(views.masks.masks.clone(), views.masks.indices.clone(), views.masks.weights.clone()) for views in loader]


def test_torchvision_workers_give_the_workerless_masks(source):
    """Masks drawn in 2 forked torchvision workers equal the workerless ones; before the tests below run any DALI
    pipeline has started threads in this process (a fork after them hung once in CI)."""
    batches = [_epoch_masks(build_loader(source, CROPS, 4, backend="torchvision", num_workers=workers, seed=1,
                                         masking=MASKING)) for workers in (0, 2)]
    for a, b in zip(*batches, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_masks_travel_with_the_batch_seeded_and_resumable(source, backend):
    loader = build_loader(source, CROPS, 4, backend=backend, num_workers=0, seed=3, masking=MASKING)
    batches = _epoch_masks(loader)
    assert len(batches) == len(loader)
    first = next(iter(build_loader(source, CROPS, 4, backend=backend, num_workers=0, seed=3, masking=MASKING)))
    masks = first.masks
    assert masks.masks.shape == (8, 16) and masks.indices.shape == (MASKING.upper_bound(8),)
    assert masks.upperbound == MASKING.upper_bound(8)
    resumed = build_loader(source, CROPS, 4, backend=backend, num_workers=0, seed=3, masking=MASKING)
    resumed.load_state_dict({**resumed.state_dict(), "batch": 2})
    for (m, i, w), (rm, ri, rw) in zip(batches[2:], _epoch_masks(resumed), strict=True):
        assert torch.equal(m, rm) and torch.equal(i, ri) and torch.equal(w, rw)
    other_seed = _epoch_masks(build_loader(source, CROPS, 4, backend=backend, num_workers=0, seed=4,
                                           masking=MASKING))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(batches, other_seed))


def test_both_paths_and_worker_counts_give_the_same_masks(source):
    batches = [_epoch_masks(build_loader(source, CROPS, 4, backend=backend, num_workers=workers, seed=1,
                                         masking=MASKING))
               # No forked torchvision workers here: this process has run DALI's CPU pipeline (threads) in the test
               # before, and a fork after those threads hung once in CI; DALI's own workers and the torchvision
               # worker path (tests/test_pipelines.py) are still exercised.
               for backend, workers in (("torchvision", 0), ("dali", 0), ("dali", 4))]
    for other in batches[1:]:
        for a, b in zip(batches[0], other, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_no_masking_no_masks(source):
    views = next(iter(build_loader(source, CROPS, 4, backend="torchvision", num_workers=0)))
    assert views.masks is None and len(views) == CROPS.num_views
