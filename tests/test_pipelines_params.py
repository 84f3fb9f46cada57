"""The per-view parameter sampler: rates of every random choice, ranges, crop boxes, determinism.

Both backends apply these rows, so the augmentation statistics of the paper are checked here, on many samples.
"""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from fastdino.pipelines import MultiCropConfig
from fastdino.pipelines import augment as A
from fastdino.pipelines.config import BLUR_PROB, GRAYSCALE_PROB, JITTER_PROB, SOLARIZE_PROB

CROPS = MultiCropConfig(global_crops_size=32, local_crops_number=3, local_crops_size=16)
NUM_IMAGES = 3000


@pytest.fixture(scope="module")
def params():
    """(NUM_IMAGES, V, P) rows for images of 100..500 px with aspect ratios inside the crop ratio range (for
    other images torchvision's algorithm often falls back to a centre crop; see the degenerate-image test)."""
    rng = np.random.default_rng(0)
    heights = rng.integers(100, 500, NUM_IMAGES)
    widths = np.rint(heights * np.exp(rng.uniform(np.log(0.75), np.log(4 / 3), NUM_IMAGES))).astype(int)
    sizes = np.stack([heights, widths], 1)
    return np.stack([A.view_params(7, 3, i, int(h), int(w), CROPS) for i, (h, w) in enumerate(sizes)]), sizes


def _assert_rate(flags, p, name):
    """Observed rate within 4.5 binomial standard deviations of p (exact when p is 0 or 1)."""
    rate = float(np.mean(flags))
    tol = 4.5 * math.sqrt(p * (1 - p) / flags.size)
    assert abs(rate - p) <= tol, f"{name}: rate {rate:.4f}, expected {p} +- {tol:.4f}"


def test_rates_of_every_random_choice(params):
    rows, _ = params
    local = slice(2, None)
    for v in range(CROPS.num_views):
        _assert_rate(rows[:, v, A.FLIP], 0.5, f"flip view {v}")
        _assert_rate(rows[:, v, A.JITTER], JITTER_PROB, f"jitter view {v}")
        _assert_rate(rows[:, v, A.GRAY], GRAYSCALE_PROB, f"grayscale view {v}")
    blurred = rows[:, :, A.BLUR_SIGMA_COL] > 0
    _assert_rate(blurred[:, 0], BLUR_PROB[0], "blur global 1")
    _assert_rate(blurred[:, 1], BLUR_PROB[1], "blur global 2")
    _assert_rate(blurred[:, local], BLUR_PROB[2], "blur locals")
    _assert_rate(rows[:, 1, A.SOLARIZE], SOLARIZE_PROB, "solarize global 2")
    assert not rows[:, 0, A.SOLARIZE].any() and not rows[:, local, A.SOLARIZE].any()
    # independent choices: jitter and grayscale co-occur at the product rate
    _assert_rate(rows[:, :, A.JITTER] * rows[:, :, A.GRAY], JITTER_PROB * GRAYSCALE_PROB, "jitter and gray")


def test_jitter_factors_and_blur_sigma_ranges(params):
    rows, _ = params
    jit = rows[..., A.JITTER] > 0
    for col, low, high in ((A.BRIGHTNESS, 0.6, 1.4), (A.CONTRAST, 0.6, 1.4), (A.SATURATION, 0.8, 1.2),
                           (A.HUE, -0.1, 0.1)):
        values = rows[..., col][jit]
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high, col
        assert abs(values.mean() - (low + high) / 2) < 0.02 * (high - low) + 1e-3, col  # uniform: centred
        neutral = 0.0 if col == A.HUE else 1.0
        assert (rows[..., col][~jit] == neutral).all(), col
    # the paper's sigma range, in pixels of 224-px global and 96-px local views, scaled to these view sizes
    for views, scale in ((slice(0, 2), CROPS.global_crops_size / 224), (slice(2, None), CROPS.local_crops_size / 96)):
        sigma = rows[:, views, A.BLUR_SIGMA_COL]
        low, high = sigma[sigma > 0].min() / scale, sigma.max() / scale
        assert 0.1 <= low + 1e-6 and low < 0.12 and 1.98 < high <= 2.0 + 1e-6, (views, low, high)


def test_crop_area_and_aspect_ranges(params):
    rows, sizes = params
    h, w = sizes[:, 0:1].astype(float), sizes[:, 1:2].astype(float)
    box_h = (rows[..., A.Y1] - rows[..., A.Y0]) * h  # pixels
    box_w = (rows[..., A.X1] - rows[..., A.X0]) * w
    assert (rows[..., :4] >= 0).all() and (rows[..., :4] <= 1).all()
    assert (rows[..., A.Y1] > rows[..., A.Y0]).all() and (rows[..., A.X1] > rows[..., A.X0]).all()
    assert np.allclose(box_h, np.round(box_h), atol=1e-3) and np.allclose(box_w, np.round(box_w), atol=1e-3)
    area = box_h * box_w / (h * w)
    ratio = box_w / box_h
    # box sides are rounded to whole pixels (>= 17 px here): allow half a pixel on each side
    rounding = 2 * 0.5 / 17
    for views, (low, high) in ((slice(0, 2), CROPS.global_crops_scale), (slice(2, None), CROPS.local_crops_scale)):
        a = area[:, views]
        assert a.min() >= low * (1 - rounding) and a.max() <= min(1.0, high * (1 + rounding)), (a.min(), a.max())
        assert a.min() < low * 1.05 and a.max() > high * 0.95  # the whole range is used
    assert ratio.min() >= 0.75 * (1 - rounding) and ratio.max() <= 4 / 3 * (1 + rounding)
    assert ratio.min() < 0.78 and ratio.max() > 1.28


def test_crop_boxes_match_torchvision_random_resized_crop():
    """Same algorithm as torchvision (the DINO recipe): compare the distributions of area and aspect ratio."""
    height, width, n = 240, 400, 4000
    rrc = RandomResizedCrop(32, scale=(0.05, 0.4))
    torch.manual_seed(0)
    ours = np.concatenate([A.crop_boxes(np.random.default_rng(i), height, width, np.array([[0.05, 0.4]] * 8))
                           for i in range(n // 8)])
    theirs = np.array([rrc.get_params(torch.empty(3, height, width), rrc.scale, rrc.ratio) for _ in range(n)])
    area_ours = (ours[:, 2] - ours[:, 0]) * (ours[:, 3] - ours[:, 1])
    area_theirs = theirs[:, 2] * theirs[:, 3] / (height * width)
    log_ratio_ours = np.log((ours[:, 3] - ours[:, 1]) * width / ((ours[:, 2] - ours[:, 0]) * height))
    log_ratio_theirs = np.log(theirs[:, 3] / theirs[:, 2])
    for a, b in ((area_ours, area_theirs), (log_ratio_ours, log_ratio_theirs)):
        assert abs(a.mean() - b.mean()) < 4 * b.std() / math.sqrt(n) * math.sqrt(2)
        assert abs(a.std() - b.std()) < 0.05 * b.std()
    centre_ours = (ours[:, 1] + ours[:, 3]) / 2
    centre_theirs = (theirs[:, 1] + theirs[:, 3] / 2) / width
    assert abs(centre_ours.mean() - centre_theirs.mean()) < 0.01


@pytest.mark.parametrize("height,width", [(1, 1), (1, 300), (300, 2), (2, 2)])
def test_degenerate_images_fall_back_to_a_centre_crop(height, width):
    boxes = A.crop_boxes(np.random.default_rng(0), height, width, np.array([[0.05, 0.4], [0.4, 1.0]]))
    assert (boxes >= 0).all() and (boxes <= 1).all()
    box_h, box_w = (boxes[:, 2] - boxes[:, 0]) * height, (boxes[:, 3] - boxes[:, 1]) * width
    assert (box_h >= 1 - 1e-6).all() and (box_w >= 1 - 1e-6).all()
    if height == 1 and width == 300:  # nothing fits: the widest box with ratio 4/3 at most, centred
        assert np.allclose(box_w, 1) and np.allclose((boxes[:, 1] + boxes[:, 3]) / 2, 0.5, atol=1 / 300)


def test_params_are_keyed_by_seed_epoch_and_image():
    a = A.view_params(1, 2, 3, 100, 120, CROPS)
    assert a.shape == (CROPS.num_views, A.NUM_PARAMS) and a.dtype == np.float32
    assert np.array_equal(a, A.view_params(1, 2, 3, 100, 120, CROPS))
    for other in ((0, 2, 3), (1, 0, 3), (1, 2, 4)):
        assert not np.array_equal(a, A.view_params(*other, 100, 120, CROPS))


def test_config_is_validated():
    for bad in (dict(global_crops_scale=(0.5, 0.4)), dict(local_crops_scale=(0.0, 0.4)), dict(local_crops_number=-1),
                dict(global_crops_size=0), dict(local_crops_size=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MultiCropConfig(**bad)
    assert MultiCropConfig().view_sizes() == [224, 224] + [96] * 10
