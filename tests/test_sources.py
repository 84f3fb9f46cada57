"""Dataset listing and validation (ImageFolder, ImageFolder-in-tar, WebDataset), splits, and the epoch order.

Also holds the small image writers the other pipeline tests import.
"""
import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastdino.pipelines import epoch_batches, open_source, resolve_split


# --- image writers shared by the pipeline tests -------------------------------------------------------------------


def image_array(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (blotches plus a little noise), like a tiny photo."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_bytes(height: int, width: int, seed: int, **options) -> bytes:
    return encode(Image.fromarray(image_array(height, width, seed)), "JPEG", quality=90, **options)


def without_quant_tables(jpeg: bytes) -> bytes:
    """A JPEG whose DQT segment is gone: the header and end marker look fine, decoding fails."""
    i = jpeg.find(b"\xff\xdb")
    length = int.from_bytes(jpeg[i + 2:i + 4], "big")
    return jpeg[:i] + jpeg[i + 2 + length:]


def make_image_folder(root, classes=("a", "b", "c"), per_class: int = 8, seed: int = 0):
    """ImageFolder with JPEGs of 16..64 px (one PNG per class); returns root."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(16, 65, 2))
            if i == 0:
                (root / name / f"{i}.png").write_bytes(encode(Image.fromarray(image_array(h, w, seed + 100 * c + i)),
                                                              "PNG"))
            else:
                (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(h, w, seed + 100 * c + i))
    return root


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --- layouts ------------------------------------------------------------------------------------------------------


def test_image_folder_lists_classes_labels_sizes_and_bytes(tmp_path):
    root = make_image_folder(tmp_path / "data")
    (root / "b" / "nested").mkdir()
    (root / "b" / "nested" / "x.JPEG").write_bytes(jpeg_bytes(20, 30, 7))
    (root / "a" / "notes.txt").write_text("not an image extension: ignored and counted")
    src = open_source(str(root))
    assert src.layout == "folder" and src.classes == ["a", "b", "c"] and src.labelled
    assert len(src) == 25 and src.num_skipped == 0 and src.ignored["not an image"][0] == 1
    names = [n.decode() for n in src.names]
    i = names.index("b/nested/x.JPEG")
    assert src.labels[i] == 1 and tuple(src.sizes[i]) == (20, 30)
    assert src.read(i) == (root / "b" / "nested" / "x.JPEG").read_bytes()
    assert np.bincount(src.labels).tolist() == [8, 9, 8]
    for j in range(len(src)):
        h, w = Image.open(io.BytesIO(src.read(j))).size[::-1]
        assert tuple(src.sizes[j]) == (h, w)


def test_exif_orientation_swaps_the_header_size(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 20 x 30 (h x w), shown 30 x 20
    (tmp_path / "d" / "a" / "r.jpg").write_bytes(jpeg_bytes(20, 30, 1, exif=exif.tobytes()))
    src = open_source(str(tmp_path / "d"))
    assert tuple(src.sizes[0]) == (30, 20)


def test_image_folder_in_tar_shards_match_the_folder(tmp_path):
    root = make_image_folder(tmp_path / "data")
    folder = open_source(str(root))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        write_tar(shards / f"train-{k}.tar",
                  {f"train/{p.relative_to(root)}": p.read_bytes() for p in files[k::2]})
    for spec in (str(shards), str(shards / "train-*.tar")):
        src = open_source(spec)
        assert src.layout == "tar-folder" and src.classes == folder.classes and len(src) == len(folder)
        by_name = {n.decode().removeprefix("train/"): i for i, n in enumerate(src.names)}
        for i, name in enumerate(folder.names):
            j = by_name[name.decode()]
            assert src.read(j) == folder.read(i)
            assert src.labels[j] == folder.labels[i] and tuple(src.sizes[j]) == tuple(folder.sizes[i])


def test_webdataset_with_and_without_labels(tmp_path):
    members = {}
    for i in range(6):
        members[f"s/{i:04d}.jpg"] = jpeg_bytes(16, 24, i)
        members[f"s/{i:04d}.cls"] = str(i % 3).encode()
    members["s/9999.json"] = b"{}"  # a sample without an image: skipped and counted
    src = open_source(str(write_tar(tmp_path / "wds.tar", members)))
    assert src.layout == "webdataset" and src.classes == ["0", "1", "2"]
    assert sorted(zip(src.labels.tolist(), [n.decode() for n in src.names]))[0] == (0, "s/0000.jpg")
    assert src.skipped["sample without an image"][0] == 1
    assert src.read(int(np.flatnonzero(src.names == b"s/0003.jpg")[0])) == members["s/0003.jpg"]
    plain = open_source(str(write_tar(tmp_path / "plain.tar", {f"{i}.png": encode(
        Image.fromarray(image_array(16, 16, i)), "PNG") for i in range(3)})))
    assert plain.layout == "webdataset" and plain.classes == [] and plain.labels.tolist() == [-1, -1, -1]


def gif_bytes(seed: int) -> bytes:
    return encode(Image.fromarray(image_array(16, 16, seed)), "GIF")


def test_unlabeled_folder_is_found_at_any_depth_and_leftovers_are_counted(tmp_path, caplog):
    root = tmp_path / "photos"
    (root / "2019" / "trip").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg_bytes(16, 20, 0))  # loose images: an unlabeled collection, not ImageFolder
    (root / "2019" / "b.jpg").write_bytes(jpeg_bytes(16, 20, 1))
    (root / "2019" / "trip" / "c.png").write_bytes(encode(Image.fromarray(image_array(18, 16, 2)), "PNG"))
    (root / "2019" / "anim.gif").write_bytes(gif_bytes(3))
    (root / "2019" / "trip" / "notes.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"x")  # hidden files are not the user's data
    with caplog.at_level(logging.INFO, logger="fastdino.pipelines.sources"):
        src = open_source(str(root))
    assert sorted(n.decode() for n in src.names) == ["2019/b.jpg", "2019/trip/c.png", "a.jpg"]
    assert src.classes == [] and src.labels.tolist() == [-1, -1, -1] and not src.labelled
    assert src.skipped["GIF (DALI cannot decode it: convert to PNG)"][0] == 1
    assert src.ignored == {"not an image": [1, str(root / "2019" / "trip" / "notes.json")]}
    summary = [r.getMessage() for r in caplog.records]
    assert len(summary) == 1 and "kept 3 images (no labels)" in summary[0]
    assert "skipped 1 file(s): 1 GIF" in summary[0] and "ignored 1 file(s): 1 not an image" in summary[0]
    only_images = tmp_path / "flat"
    only_images.mkdir()
    (only_images / "x.jpg").write_bytes(jpeg_bytes(16, 16, 0))
    assert len(open_source(str(only_images))) == 1


def test_file_list_relative_and_absolute_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes(16, 16, 0))
    (tmp_path / "elsewhere.png").write_bytes(encode(Image.fromarray(image_array(16, 24, 1)), "PNG"))
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my images\n../imgs/a.jpg\n\n{tmp_path / 'elsewhere.png'}\n../imgs/missing.jpg\n")
    src = open_source(str(listing))
    assert len(src) == 2 and not src.labelled and src.skipped["unreadable"][0] == 1
    assert src.read(1) == (tmp_path / "elsewhere.png").read_bytes() and tuple(src.sizes[1]) == (16, 24)
    assert resolve_split(str(tmp_path / "lists"), "train") == str(listing)


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar.xz", "w:xz")])
def test_compressed_tar_is_read_through_a_decompressed_copy(tmp_path, monkeypatch, suffix, mode):
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    members = {f"val/{c}/{i}.jpg": jpeg_bytes(16, 16, 10 * i + j) for j, c in enumerate("ab") for i in range(3)}
    members["val/README"] = b"text"
    plain = open_source(str(write_tar(tmp_path / "val.tar", members)))
    packed = tmp_path / "packed" / f"val{suffix}"
    packed.parent.mkdir()
    with tarfile.open(packed, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert resolve_split(str(packed.parent), "val") == str(packed)
    src = open_source(str(packed))
    assert src.layout == "tar-folder" and src.classes == ["a", "b"] and len(src) == len(plain) == 6
    assert [src.read(i) for i in range(6)] == [plain.read(i) for i in range(6)]
    assert src.ignored["not an image"][0] == 1
    copies = list((tmp_path / "cache" / "untarred").glob("*.tar"))
    assert len(copies) == 1
    open_source(str(packed))  # the second open reuses the copy
    assert list((tmp_path / "cache" / "untarred").iterdir()) == copies


def test_webdataset_gif_and_extra_members_are_counted(tmp_path):
    members = {"0.jpg": jpeg_bytes(16, 16, 0), "0.json": b"{}", "1.gif": gif_bytes(1), "2.png": encode(
        Image.fromarray(image_array(16, 16, 2)), "PNG"), "2.txt": b"a caption"}
    src = open_source(str(write_tar(tmp_path / "wds.tar", members)))
    assert src.layout == "webdataset" and len(src) == 2 and not src.labelled
    assert src.skipped == {"GIF (DALI cannot decode it: convert to PNG)": [1, "1.gif"]}
    assert src.ignored["not an image"][0] == 2


# --- splits and errors --------------------------------------------------------------------------------------------


def test_resolve_split(tmp_path):
    make_image_folder(tmp_path / "both" / "train", per_class=1)
    make_image_folder(tmp_path / "both" / "val", per_class=1)
    assert resolve_split(str(tmp_path / "both"), "val") == str(tmp_path / "both" / "val")
    flat = make_image_folder(tmp_path / "flat", per_class=1)
    assert resolve_split(str(flat), "train") == str(flat)
    with pytest.raises(ValueError, match="no 'val' split"):
        resolve_split(str(flat), "val")
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "val-000.tar", {"a/x.jpg": jpeg_bytes(16, 16, 0)})
    write_tar(tmp_path / "tars" / "train.tar", {"a/x.jpg": jpeg_bytes(16, 16, 0)})
    assert resolve_split(str(tmp_path / "tars"), "val") == str(tmp_path / "tars" / "val-*.tar")
    assert resolve_split(str(tmp_path / "tars"), "train") == str(tmp_path / "tars" / "train.tar")
    assert len(open_source(resolve_split(str(tmp_path / "tars"), "val"))) == 1
    with pytest.raises(ValueError, match="does not exist"):
        resolve_split(str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        resolve_split(str(tmp_path / "empty"), "train")


@pytest.mark.parametrize("case", ["missing", "empty", "not_tar", "corrupt_tar", "corrupt_tgz", "no_match",
                                  "only_bad", "only_empty_classes"])
def test_unusable_dataset_is_a_clear_value_error(tmp_path, case, monkeypatch):
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d"
    if case == "empty":
        path.mkdir()
    elif case == "not_tar":
        path = tmp_path / "d.csv"
        path.write_text("hello")
    elif case == "corrupt_tar":
        path = tmp_path / "d.tar"
        path.write_bytes(b"PK" + bytes(2000))
    elif case == "corrupt_tgz":
        path = tmp_path / "d.tar.gz"
        path.write_bytes(b"\x1f\x8b" + bytes(2000))
    elif case == "no_match":
        path = tmp_path / "shard-*.tar"
    elif case == "only_bad":
        (path / "a").mkdir(parents=True)
        (path / "a" / "x.jpg").write_bytes(b"definitely not a jpeg")
    elif case == "only_empty_classes":
        (path / "a").mkdir(parents=True)
        (path / "b").mkdir()
    message = {"missing": "does not exist", "empty": "is empty", "not_tar": "not a tar shard",
               "corrupt_tar": "unreadable", "corrupt_tgz": "could not be decompressed .*tar -xf",
               "no_match": "no tar shards",
               "only_bad": "no decodable images .*1 not a readable image",
               "only_empty_classes": "no decodable images .*2 empty class folder"}[case]
    with pytest.raises(ValueError, match=message):
        open_source(str(path))


def test_skips_are_counted_and_reported_once(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "a" / "bad1.jpg").write_bytes(b"nope")
    (root / "a" / "bad2.png").write_bytes(b"nope either")
    (root / "empty_class").mkdir()
    with caplog.at_level(logging.WARNING, logger="fastdino.pipelines.sources"):
        src = open_source(str(root))
    assert len(src) == 6 and src.num_skipped == 3
    assert src.skipped["not a readable image"][0] == 2 and src.skipped["empty class folder"] == [1, "empty_class"]
    assert src.classes == ["a", "b", "c", "empty_class"]  # kept, so labels match a split that has images there
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3" in warnings[0] and "kept 6 images (4 classes)" in warnings[0]


# --- epoch order and sharding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images,batch_size,world_size", [(103, 4, 3), (64, 8, 2), (10, 3, 1)])
def test_ranks_cover_the_epoch_once(num_images, batch_size, world_size):
    per_rank = [epoch_batches(num_images, batch_size, seed=5, epoch=2, rank=r, world_size=world_size)
                for r in range(world_size)]
    num_batches = num_images // (batch_size * world_size)
    assert all(b.shape == (num_batches, batch_size) for b in per_rank)
    seen = np.concatenate([b.ravel() for b in per_rank])
    assert len(np.unique(seen)) == len(seen) == num_batches * batch_size * world_size  # disjoint
    assert num_images - len(seen) < batch_size * world_size  # only the remainder of one global batch is dropped
    # the ranks' batch b together are the single-process batch b of the global batch size
    single = epoch_batches(num_images, batch_size * world_size, seed=5, epoch=2)
    for b in range(num_batches):
        assert np.array_equal(np.concatenate([p[b] for p in per_rank]), single[b])


def test_epoch_order_is_seeded_and_changes_every_epoch():
    a = epoch_batches(50, 5, seed=1, epoch=0)
    assert np.array_equal(a, epoch_batches(50, 5, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_batches(50, 5, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_batches(50, 5, seed=2, epoch=0))
    assert sorted(a.ravel().tolist()) == list(range(50))


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_batches(7, 4, seed=0, epoch=0, world_size=2)


def test_validation_of_large_datasets_is_cached(tmp_path, monkeypatch):
    from fastdino.pipelines import sources

    monkeypatch.setattr(sources, "INDEX_CACHE_MIN_IMAGES", 1)  # every dataset is "large"
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "a" / "bad.jpg").write_bytes(b"nope")
    first = open_source(str(root))
    assert len(list((tmp_path / "cache" / "index").glob("*.json"))) == 1

    def no_inspection(f, size):
        raise AssertionError("validated again despite the cache")

    monkeypatch.setattr(sources, "inspect_image", no_inspection)
    cached = open_source(str(root))
    assert np.array_equal(cached.sizes, first.sizes) and cached.skipped == first.skipped
    (root / "b" / "1.jpg").write_bytes(jpeg_bytes(17, 19, 3))  # a changed file invalidates the cache
    with pytest.raises(AssertionError, match="validated again"):
        open_source(str(root))
