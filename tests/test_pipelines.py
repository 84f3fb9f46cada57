"""The multi-crop loaders: views, DALI (CPU pipeline) against the torch reference, resuming, sharding, selection."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from _helpers import assert_close
from fastdino.pipelines import MultiCropConfig, build_loader, open_source, select_backend
from fastdino.pipelines import augment as A
from fastdino.pipelines import dali as dali_backend
from fastdino.pipelines.config import IMAGENET_MEAN, IMAGENET_STD
from fastdino.pipelines.torchvision_loader import resized_crops
from test_sources import image_array, make_image_folder, write_tar

CROPS = MultiCropConfig(global_crops_size=32, local_crops_number=2, local_crops_size=16)
BACKENDS = ["torchvision", "dali"]
MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]
# DALI vs the reference, in normalised units (1 grey level ~ 0.017): both decode with libjpeg-turbo and apply the
# same colour map and blur, so pixels differ only where the bicubic resamplers (DALI's vs PIL's) round
# differently and the colour/blur steps then round that grey level on.
AGREE = dict(mean_abs=0.01, max_abs=0.25, stat=0.01)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """24 JPEG/PNG images of 16..64 px in 3 classes, listed once for all the loaders of this module."""
    return open_source(str(make_image_folder(tmp_path_factory.mktemp("data") / "train")))


def make_loader(source, backend, batch_size=4, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return build_loader(source, CROPS, batch_size, backend=backend, **kwargs)


def epoch(loader):
    return [[v.clone() for v in views] for views in loader]


def to_pixels(view):
    """Normalised (B, 3, H, W) back to 0..255."""
    return view.float() * STD + MEAN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_views_have_the_right_shapes_dtypes_and_ranges(source, backend, dtype):
    loader = make_loader(source, backend, dtype=dtype)
    assert loader.backend == backend and len(loader) == 6 and loader.num_images == 24
    views = next(iter(loader))
    assert len(views) == CROPS.num_views
    for v, (view, size) in enumerate(zip(views, CROPS.view_sizes())):
        assert view.shape == (4, 3, size, size) and view.dtype == dtype and view.device.type == "cpu"
        pixels = to_pixels(view)
        assert torch.isfinite(pixels).all()
        tol = 0.5 if dtype == torch.float32 else 3.0  # half-precision rounding of values up to ~2.6
        assert pixels.min() >= -tol and pixels.max() <= 255 + tol, v
        assert pixels.std() > 10, v  # real image content, not a constant


def _compare_backends(ref_batches, dali_batches):
    for b, (ref_views, dali_views) in enumerate(zip(ref_batches, dali_batches, strict=True)):
        for v, (r, d) in enumerate(zip(ref_views, dali_views, strict=True)):
            diff = (r - d).abs()
            assert diff.mean() < AGREE["mean_abs"], f"batch {b} view {v}: mean |diff| {diff.mean():.4f}"
            assert diff.max() < AGREE["max_abs"], f"batch {b} view {v}: max |diff| {diff.max():.4f}"
    for v in range(CROPS.num_views):
        r = torch.cat([views[v] for views in ref_batches])
        d = torch.cat([views[v] for views in dali_batches])
        for stat in (torch.mean, torch.std):
            assert_close(stat(d, dim=(0, 2, 3)), stat(r, dim=(0, 2, 3)), atol=AGREE["stat"], rtol=0,
                         name=f"view {v} per-channel {stat.__name__}")


def test_dali_agrees_with_the_reference(source):
    _compare_backends(epoch(make_loader(source, "torchvision")), epoch(make_loader(source, "dali")))


def test_tar_shards_feed_both_backends(source, tmp_path):
    """ImageFolder-in-tar shards of the same images: same number of batches, and the backends still agree."""
    root = source.root
    for k in range(2):
        write_tar(tmp_path / f"train-{k}.tar", {f"train/{n.decode()}": (Path(root) / n.decode()).read_bytes()
                                                 for n in source.names[k::2]})
    shards = open_source(str(tmp_path / "train-*.tar"))
    assert shards.layout == "tar-folder" and len(shards) == len(source)
    _compare_backends(epoch(make_loader(shards, "torchvision")), epoch(make_loader(shards, "dali")))


def _forced_params(feeder):
    """Per-view parameters with every augmentation switched on somewhere, at strong settings."""
    def params(epoch, index):
        rows = A.view_params(feeder.seed, epoch, int(index), *map(int, feeder.source.sizes[index]), feeder.crops)
        rows[:, A.JITTER] = 1
        rows[0, A.BRIGHTNESS:A.HUE + 1] = [1.4, 0.6, 1.2, 0.1]
        rows[0, A.BLUR_SIGMA_COL] = 1.7
        rows[1, [A.GRAY, A.SOLARIZE, A.FLIP]] = 1
        rows[1, A.BLUR_SIGMA_COL] = 0
        rows[2, A.BRIGHTNESS:A.HUE + 1] = [0.7, 1.4, 0.8, -0.1]
        rows[2, A.BLUR_SIGMA_COL] = 0.4
        rows[3, [A.FLIP, A.GRAY]] = [1, 0]
        rows[3, A.BRIGHTNESS:A.HUE + 1] = [1.0, 1.0, 1.0, 0.05]
        return rows
    return params


def test_dali_applies_every_augmentation_like_the_reference(source):
    batches = {}
    for backend in BACKENDS:
        loader = make_loader(source, backend)
        loader.feeder.params = _forced_params(loader.feeder)
        batches[backend] = [views for _, views in zip(range(2), loader)]
    _compare_backends(batches["torchvision"], batches["dali"])
    gray = to_pixels(batches["dali"][0][1])
    assert (gray.max(1).values - gray.min(1).values).max() <= 2  # grayscale: equal channels, up to rounding


# --- the reference ops against well-known implementations ---------------------------------------------------------


def _params(batch, **columns):
    rows = torch.zeros(batch, A.NUM_PARAMS)
    rows[:, [A.BRIGHTNESS, A.CONTRAST, A.SATURATION]] = 1
    for name, value in columns.items():
        rows[:, getattr(A, name)] = value
    return rows


@pytest.fixture
def pixels():
    """(2, 3, 20, 24) float images in 0..255."""
    return torch.from_numpy(np.stack([image_array(20, 24, s) for s in (1, 2)])).permute(0, 3, 1, 2).float()


def test_color_twist_matches_the_textbook_formulas(pixels):
    luma = TF.rgb_to_grayscale(pixels / 255, num_output_channels=3) * 255  # ITU-R 601, as torchvision
    # DALI's YIQ round trip is the identity to within 0.72 grey levels, hence 1 level after rounding
    cases = {
        "identity": (dict(), pixels),
        "brightness": (dict(BRIGHTNESS=1.3), pixels * 1.3),
        "contrast about mid-grey": (dict(CONTRAST=0.5), 128 + 0.5 * (pixels - 128)),
        "saturation": (dict(SATURATION=1.2), luma + 1.2 * (pixels - luma)),
        "grayscale": (dict(SATURATION=1.2, GRAY=1), luma),
        "full hue turn": (dict(HUE=1.0), pixels),
    }
    for name, (columns, expected) in cases.items():
        assert_close(A.color_twist(pixels, _params(2, **columns)), expected.round().clamp(0, 255), atol=1.0, rtol=0,
                     name=name)
    muted = 96 + 0.25 * pixels  # colours that stay inside the RGB cube when their hue turns
    rotated = A.color_twist(muted, _params(2, HUE=0.3))
    assert (rotated - muted).abs().mean() > 3  # hue does change colours...
    assert_close(TF.rgb_to_grayscale(rotated / 255) * 255, TF.rgb_to_grayscale(muted / 255) * 255, atol=1.5,
                 rtol=0, name="hue keeps luma")  # ...but not luma


def test_gaussian_blur_matches_torchvision(pixels):
    sigma = torch.tensor([0.7, 1.9])
    out = A.gaussian_blur(pixels, sigma)
    for i, s in enumerate(sigma.tolist()):
        size = 2 * A.blur_radius(s) + 1
        expected = TF.gaussian_blur(pixels[i:i + 1], [size, size], [s, s])  # reflect padding = reflect-101
        assert_close(out[i:i + 1], expected.round(), atol=1.0, rtol=0, name=f"sigma {s}")
    assert torch.equal(A.gaussian_blur(pixels, torch.tensor([0.0, 0.0])), pixels)
    assert torch.equal(A.gaussian_blur(pixels, torch.tensor([0.0, 1.0]))[0], pixels[0])
    tiny = pixels[:, :, :3, :2]  # a window wider than the image still has reflect-101 borders
    assert torch.isfinite(A.gaussian_blur(tiny, torch.tensor([2.0, 2.0]))).all()


def test_solarize_and_flip_match_pil(pixels):
    u8 = pixels.round()
    img = Image.fromarray(u8[0].permute(1, 2, 0).numpy().astype(np.uint8))
    expected = torch.from_numpy(np.array(ImageOps.solarize(img, 128))).permute(2, 0, 1).float()
    out = A.solarize(u8, torch.tensor([1.0, 0.0]))
    assert torch.equal(out[0], expected) and torch.equal(out[1], u8[1])
    crops_u8 = u8.permute(0, 2, 3, 1).to(torch.uint8)
    flipped = A.finish_views(crops_u8, _params(2, FLIP=1))
    assert torch.equal(flipped, A.finish_views(crops_u8, _params(2)).flip(-1))


def test_resized_crop_matches_torchvision():
    """Inside the crop, the same pixels as torchvision's resized_crop. At the crop's edge the filter reads the
    image beyond the box (as DALI's ROI resize does) where torchvision's crop-then-resize repeats the edge."""
    img = Image.fromarray(image_array(30, 40, 3))
    rows = np.zeros((2, A.NUM_PARAMS), np.float32)
    rows[0, :4] = [3 / 30, 5 / 40, 23 / 30, 37 / 40]
    rows[1, :4] = [0, 0, 1, 1]
    out = resized_crops(img, rows, [16, 8])
    inside = np.asarray(TF.resized_crop(img, 3, 5, 20, 32, [16, 16], InterpolationMode.BICUBIC)).astype(int)
    assert np.array_equal(out[0][3:-3, 3:-3], inside[3:-3, 3:-3])
    assert np.abs(out[0] - inside).mean() < 2
    assert np.array_equal(out[1], np.asarray(TF.resize(img, [8, 8], InterpolationMode.BICUBIC)))


# --- position: epochs, resuming, sharding -------------------------------------------------------------------------


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_the_same_batches(source, backend):
    full = make_loader(source, backend)
    first = epoch(full)
    assert full.state_dict()["epoch"] == 1 and full.state_dict()["batch"] == 0
    second = epoch(full)  # the DALI pipeline runs on into the next epoch
    assert not torch.equal(first[0][0], second[0][0])

    resumed = make_loader(source, backend)
    resumed.load_state_dict({**full.state_dict(), "epoch": 0, "batch": 2})
    resumed.set_epoch(0)  # the usual call at the top of the epoch loop keeps the loaded position
    _assert_same_batches(epoch(resumed), first[2:])
    _assert_same_batches(epoch(resumed), second)

    fresh = make_loader(source, backend)
    fresh.set_epoch(1)
    _assert_same_batches(epoch(fresh), second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_abandoned_epoch_resumes_where_it_stopped(source, backend):
    reference = epoch(make_loader(source, backend))
    loader = make_loader(source, backend)
    taken = [views for _, views in zip(range(2), loader)]
    assert loader.state_dict()["batch"] == 2
    _assert_same_batches(taken + epoch(loader), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_make_the_batch_of_one_rank_with_the_global_batch_size(source, backend):
    single = epoch(make_loader(source, backend, batch_size=8, seed=3))
    ranks = [epoch(make_loader(source, backend, batch_size=4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for b in range(3):
        for v in range(CROPS.num_views):
            assert torch.equal(torch.cat([ranks[0][b][v], ranks[1][b][v]]), single[b][v])


def test_set_epoch_moves_to_the_start_of_another_epoch_only(source):
    loader = make_loader(source, "torchvision")
    next(iter(loader))
    loader.set_epoch(0)
    assert loader.state_dict()["batch"] == 1
    loader.set_epoch(4)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batch"]) == (4, 0)


def test_load_state_dict_rejects_another_setup(source):
    loader = make_loader(source, "torchvision")
    state = loader.state_dict()
    for key, value in (("batch_size", 8), ("world_size", 2), ("num_images", 25), ("seed", 1)):
        with pytest.raises(ValueError, match=key):
            loader.load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="batch 7"):
        loader.load_state_dict({**state, "batch": 7})


@pytest.mark.slow
def test_dali_reads_files_in_worker_processes(source):
    """num_workers >= 4 gives DALI a parallel external source (spawned processes): same batches."""
    parallel = make_loader(source, "dali", num_workers=4)
    assert parallel.engine.py_workers == 1
    _assert_same_batches(epoch(parallel), epoch(make_loader(source, "dali")))


def test_torchvision_workers_make_the_same_batches(source):
    _assert_same_batches(epoch(make_loader(source, "torchvision", num_workers=2)),
                         epoch(make_loader(source, "torchvision")))


# --- backend selection and option errors --------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu)[0] == "dali"
    assert select_backend("torchvision", cpu) == ("torchvision", "requested")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("pil", cpu)
    monkeypatch.setattr(dali_backend, "dali_decode_error", lambda data, device: "no decoder for you")
    assert select_backend("auto", cpu) == ("torchvision", "DALI cannot decode on cpu (no decoder for you)")
    with pytest.raises(ValueError, match="no decoder for you.*backend='torchvision'"):
        select_backend("dali", cpu)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what a machine without DALI sees
    name, reason = select_backend("auto", cpu)
    assert name == "torchvision" and "nvidia.dali does not import" in reason
    with pytest.raises(ValueError, match="backend='torchvision'"):
        select_backend("dali", cpu)


def test_backend_choice_is_logged(source, caplog):
    with caplog.at_level("INFO", logger="fastdino.pipelines.loader"):
        make_loader(source, "auto")
    assert any("backend dali" in r.getMessage() and "decodes here" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs,match", [(dict(dtype=torch.int8), "dtype"), (dict(device="meta"), "device"),
                                          (dict(num_workers=-1), "num_workers"), (dict(rank=2), "rank"),
                                          (dict(batch_size=0), "batch_size"),
                                          (dict(batch_size=25), "fewer than one global batch")])
def test_bad_options_are_value_errors(source, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_loader(source, "torchvision", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_a_value_error(source):
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_loader(source, "dali", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for DALI's mixed decoder")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dali_on_the_gpu_agrees_with_the_reference(source, dtype):
    gpu = make_loader(source, "dali", device="cuda", dtype=dtype)
    batches = epoch(gpu)
    assert all(v.device.type == "cuda" and v.dtype == dtype for views in batches for v in views)
    # nvJPEG's IDCT differs from libjpeg-turbo's by a grey level here and there; half precision adds ~0.01
    cpu = [[v.float().cpu() for v in views] for views in batches]
    ref = epoch(make_loader(source, "torchvision"))
    for b in range(len(ref)):
        for r, d in zip(ref[b], cpu[b]):
            assert (r - d).abs().mean() < 2 * AGREE["mean_abs"] + 0.01
    assert math.isfinite(sum(float(v.float().sum()) for v in batches[0]))
