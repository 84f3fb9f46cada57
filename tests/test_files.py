"""`atomic_write`: the file appears whole, or not at all."""
import pytest

from fastdino.files import atomic_write


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert atomic_write(path, lambda tmp: tmp.write_text("first")) == path
    atomic_write(path, lambda tmp: tmp.write_text("second"))
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "out.bin", failing)
    assert list(tmp_path.iterdir()) == []
