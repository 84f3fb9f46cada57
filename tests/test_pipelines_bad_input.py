"""Bad input: every case is decoded correctly or skipped with a counted warning, and no epoch crashes midway."""
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.pipelines import MultiCropConfig, build_loader, open_source
from fastdino.pipelines import dali as dali_backend
from fastdino.pipelines.sources import decode_rgb
from test_sources import encode, image_array, jpeg_bytes, make_image_folder, without_quant_tables

CROPS = MultiCropConfig(global_crops_size=32, local_crops_number=2, local_crops_size=16)
BACKENDS = ["torchvision", "dali"]


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing width x height (a decompression bomb), with a valid IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _image(mode: str, height=20, width=24, seed=0) -> Image.Image:
    rgb = Image.fromarray(image_array(height, width, seed))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.asarray(rgb), np.full((height, width), 90, np.uint8)]))
    return rgb.convert(mode)


good = jpeg_bytes(96, 128, 5)  # big enough that half of it is past the header
SKIPPED = {  # file name -> (bytes, reason)
    "truncated.jpg": (good[:len(good) // 2], "truncated"),
    "header_only.jpg": (good[:120], "not a readable image"),
    "text.jpg": (b"this is a text file with an image extension\n" * 4, "not a readable image"),
    "empty.jpg": (b"", "empty file"),
    "gif.jpg": (encode(_image("P"), "GIF"), "unsupported format GIF"),
    "truncated.png": (encode(_image("RGB"), "PNG")[:150], "truncated"),
    "bomb.png": (_png_claiming(20000, 20000), "too large (PIL decompression-bomb limit)"),
}
DECODED = {  # decodable oddities: kept, decoded alike by PIL (the fallback) and DALI
    "cmyk.jpg": encode(_image("CMYK"), "JPEG"),
    "gray.jpg": encode(_image("L"), "JPEG"),
    "rgba.png": encode(_image("RGBA"), "PNG"),
    "gray16.png": encode(_image("I;16"), "PNG"),
    "gray16.tif": encode(_image("I;16"), "TIFF"),
    "palette.png": encode(_image("P"), "PNG"),
    "gray_alpha.png": encode(_image("LA"), "PNG"),
    "bilevel.png": encode(_image("1"), "PNG"),
    "one_pixel.jpg": encode(_image("RGB", 1, 1), "JPEG"),
    "one_pixel.png": encode(_image("RGB", 1, 1), "PNG"),
    "one_row.png": encode(_image("RGB", 1, 300), "PNG"),
    "large.jpg": jpeg_bytes(1500, 2000, 9),
    "progressive.jpg": encode(_image("RGB"), "JPEG", progressive=True),
    "webp.webp": encode(_image("RGBA"), "WEBP"),
}
UNDECODABLE = without_quant_tables(jpeg_bytes(24, 32, 6))  # passes validation, fails when decoded


def dali_decode(data: bytes) -> np.ndarray:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    array = np.frombuffer(data, dtype=np.uint8)

    def graph():
        encoded = fn.external_source(source=lambda: [array], dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, jpeg_fancy_upsampling=True)

    pipe = pipeline_def(graph, batch_size=1, num_threads=1, device_id=None)()
    pipe.build()
    return np.array(pipe.run()[0][0])


@pytest.mark.parametrize("name", sorted(DECODED))
def test_odd_images_decode_like_dali(name):
    ours = np.asarray(decode_rgb(DECODED[name]), dtype=np.float64)
    theirs = dali_decode(DECODED[name]).astype(np.float64)
    assert ours.shape == theirs.shape and ours.shape[2] == 3
    assert np.abs(ours - theirs).mean() < 1.0, name  # the same pixels up to the odd rounding


@pytest.fixture
def messy(tmp_path):
    """8 good images per class in 2 classes, every bad case in class a, the oddities in class b, an empty class."""
    root = make_image_folder(tmp_path / "messy", classes=("a", "b"), per_class=8)
    for name, (data, _) in SKIPPED.items():
        (root / "a" / name).write_bytes(data)
    for name, data in DECODED.items():
        (root / "b" / name).write_bytes(data)
    (root / "c_empty").mkdir()
    return root


def test_validation_skips_each_bad_file_with_its_reason(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="fastdino.pipelines.sources"):
        src = open_source(str(messy))
    expected = {}
    for _, reason in SKIPPED.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["empty class folder"] = 1
    assert {reason: count for reason, (count, _) in src.skipped.items()} == expected
    assert len(src) == 16 + len(DECODED) and src.classes == ["a", "b", "c_empty"]
    kept = {n.decode().split("/")[-1] for n in src.names}
    assert set(DECODED) <= kept and not set(SKIPPED) & kept
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_over_messy_data_makes_valid_views(messy, backend):
    loader = build_loader(str(messy), CROPS, 6, backend=backend, num_workers=0)
    batches = 0
    for views in loader:
        batches += 1
        for view, size in zip(views, CROPS.view_sizes()):
            assert view.shape == (6, 3, size, size) and torch.isfinite(view).all()
    assert batches == len(loader) == (16 + len(DECODED)) // 6
    assert loader.num_skipped == len(SKIPPED) + 1 and not loader.decode_failures


def _folder_with_undecodable(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=6)
    (root / "a" / "no_tables.jpg").write_bytes(UNDECODABLE)
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_that_fails_to_decode_is_skipped_and_counted_once(tmp_path, backend, caplog):
    src = open_source(str(_folder_with_undecodable(tmp_path)))
    assert len(src) == 13  # validation cannot tell
    bad = [n.decode() for n in src.names].index("a/no_tables.jpg")
    loader = build_loader(src, CROPS, 4, backend=backend, num_workers=0, seed=1)
    with caplog.at_level(logging.WARNING, logger="fastdino.pipelines.loader"):
        for _ in range(3):  # every epoch, so the bad file is met whatever the order
            assert sum(v[0].shape[0] for v in loader) == 12
    assert loader.decode_failures == {bad} and loader.num_skipped == 1
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1 and "no_tables.jpg" in warnings[0] and "1 image(s) skipped" in warnings[0]


def test_both_backends_substitute_the_same_image(tmp_path):
    src = open_source(str(_folder_with_undecodable(tmp_path)))
    runs = {b: [[v.clone() for v in views] for views in build_loader(src, CROPS, 4, backend=b, num_workers=0,
                                                                       seed=1)] for b in BACKENDS}
    for ref, got in zip(runs["torchvision"], runs["dali"]):
        for r, d in zip(ref, got):
            assert (r - d).abs().mean() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_that_disappears_after_validation_is_skipped(tmp_path, backend):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=6)
    src = open_source(str(root))
    (root / "b" / "3.jpg").unlink()
    loader = build_loader(src, CROPS, 4, backend=backend, num_workers=0)
    assert sum(v[0].shape[0] for v in loader) == 12
    assert len(loader.decode_failures) == 1


def test_dali_failure_that_pil_does_not_see_is_found_by_decoding_alone(tmp_path, monkeypatch):
    """When PIL decodes every suspect, each is tried with DALI's own decoder."""
    monkeypatch.setattr(dali_backend, "decode_rgb", lambda data: None)
    src = open_source(str(_folder_with_undecodable(tmp_path)))
    loader = build_loader(src, CROPS, 4, backend="dali", num_workers=0)
    for _ in range(2):
        list(loader)
    assert len(loader.decode_failures) == 1


def test_dali_failure_without_a_culprit_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dali_backend, "decode_rgb", lambda data: None)
    monkeypatch.setattr(dali_backend, "dali_decode_error", lambda data, device: None)
    src = open_source(str(_folder_with_undecodable(tmp_path)))
    loader = build_loader(src, CROPS, 13, backend="dali", num_workers=0)  # one batch: the bad file is in it
    with pytest.raises(RuntimeError, match="every image of it decodes on its own"):
        list(loader)


@pytest.mark.parametrize("case", ["missing", "empty", "all_bad"])
def test_unusable_dataset_fails_before_training(tmp_path, case):
    path = tmp_path / "d"
    if case != "missing":
        (path / "a").mkdir(parents=True)
    if case == "all_bad":
        for name, (data, _) in SKIPPED.items():
            (path / "a" / name).write_bytes(data)
    with pytest.raises(ValueError, match=str(path)):
        build_loader(str(path), CROPS, 4, backend="dali")
