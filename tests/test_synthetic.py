"""The built-in shapes dataset: layout, determinism, written once and atomically, and raw pixels are poor features."""
import os

import numpy as np
import pytest
from PIL import Image

from fastdino.pipelines import default_dataset_dir, make_shapes_dataset, open_source, resolve_split
from fastdino.pipelines.synthetic import CLASSES


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("cache") / "shapes", num_train=300, num_val=100,
                               image_size=32, seed=0)


def test_layout_classes_and_images(shapes):
    train = open_source(resolve_split(str(shapes), "train"))
    val = open_source(resolve_split(str(shapes), "val"))
    assert train.classes == val.classes == sorted(CLASSES) and len(CLASSES) == 10
    assert len(train) == 300 and len(val) == 100 and train.num_skipped == val.num_skipped == 0
    assert np.bincount(train.labels).tolist() == [30] * 10
    assert (train.sizes == 32).all()
    img = Image.open(shapes / "train" / "star" / "000008.jpg")
    assert img.size == (32, 32) and img.mode == "RGB" and img.format == "JPEG"
    assert (np.ptp(np.asarray(img), axis=2) == 0).all()  # grey: colour tells nothing apart


def test_deterministic_from_the_seed(shapes, tmp_path):
    again = make_shapes_dataset(tmp_path / "again", num_train=300, num_val=100, image_size=32, seed=0)
    other = make_shapes_dataset(tmp_path / "other", num_train=300, num_val=100, image_size=32, seed=1)
    for name in ("train/circle/000001.jpg", "val/ring/000006.jpg"):
        assert (again / name).read_bytes() == (shapes / name).read_bytes()
        assert (other / name).read_bytes() != (shapes / name).read_bytes()


def test_written_once_and_atomically(shapes):
    stamp = os.stat(shapes / "dataset.json").st_mtime_ns
    assert make_shapes_dataset(shapes, num_train=300, num_val=100, image_size=32, seed=0) == shapes
    assert os.stat(shapes / "dataset.json").st_mtime_ns == stamp
    assert [p.name for p in shapes.parent.iterdir()] == ["shapes"]  # no temporary folder left behind
    with pytest.raises(ValueError, match="other parameters.*num_train"):
        make_shapes_dataset(shapes, num_train=10, num_val=100, image_size=32, seed=0)


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a shapes dataset"):
        make_shapes_dataset(tmp_path / "mine", num_train=10, num_val=10, image_size=16)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _pixels(source):
    return np.stack([np.asarray(Image.open(source.root + "/" + n.decode()), dtype=np.float64).ravel()
                     for n in source.names])


def test_raw_pixels_are_poor_features(shapes):
    """Nearest neighbour on raw pixels stays near chance (10 %): grey level and position carry no label."""
    train, val = open_source(str(shapes / "train")), open_source(str(shapes / "val"))
    a, b = _pixels(train), _pixels(val)
    dist = (b**2).sum(1)[:, None] - 2 * b @ a.T + (a**2).sum(1)[None]
    accuracy = (train.labels[dist.argmin(1)] == val.labels).mean()
    assert accuracy < 0.25, accuracy


def test_default_dataset_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path))
    assert default_dataset_dir() == tmp_path
    monkeypatch.delenv("FASTDINO_CACHE")
    assert default_dataset_dir() == default_dataset_dir().home() / ".cache" / "fastdino"


def test_bad_sizes_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        make_shapes_dataset(tmp_path / "x", num_train=10, num_val=0, image_size=16)
