"""A dataset listing that cannot loop or block, and a dataset that vanishes mid-run: symbolic links are followed
into each folder once (known by device and inode), only regular files are opened (a FIFO named pipe.jpg is
skipped, not waited on), names that are not UTF-8 are kept and read, floating-point TIFFs (whose pixel range the
two backends read differently) are skipped and counted, a signal during a blocked listing ends the process at
once, and a run whose images all disappear ends with a checkpoint of the steps done and one line."""
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from fastdino.pipelines import open_source
from fastdino.pipelines import sources

from test_sources import jpeg_bytes


def _images(folder, count: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(24, 32, seed + i))


def test_symbolic_links_reach_each_folder_once(tmp_path):
    data = tmp_path / "data"
    _images(data, 4)
    _images(data / "sub", 4, seed=10)
    (data / "sub" / "up").symlink_to("..")  # a loop back to the root
    (data / "self").symlink_to(".")  # a loop onto itself
    (data / "via").symlink_to("sub")  # a second way into sub/ (walked after it: sorted order)
    _images(tmp_path / "elsewhere", 2, seed=20)
    (data / "linked").symlink_to(tmp_path / "elsewhere")  # a link to a folder outside: listed once
    source = open_source(str(data))
    names = sorted(os.fsdecode(n) for n in source.names)
    assert names == sorted([*(f"{i}.jpg" for i in range(4)), *(f"sub/{i}.jpg" for i in range(4)), "linked/0.jpg",
                            "linked/1.jpg"])
    assert source.ignored["link(s) to a folder listed already"][0] == 3


def test_a_class_folder_linked_twice_is_listed_once(tmp_path):
    data = tmp_path / "data"
    _images(data / "cat", 3)
    _images(data / "dog", 3, seed=5)
    (data / "kitten").symlink_to("cat")
    source = open_source(str(data))
    assert len(source) == 6 and source.classes == ["cat", "dog", "kitten"]
    assert source.ignored == {"link(s) to a folder listed already": [1, str(data / "kitten")]}


def test_a_fifo_named_like_an_image_is_skipped_without_blocking(tmp_path):
    data = tmp_path / "data"
    _images(data, 3)
    fifo = data / "pipe.jpg"
    os.mkfifo(fifo)
    blocked = []

    def unblock():  # a reader stuck on the FIFO would wait for a writer forever: be that writer, and say so
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            blocked.append(True)
        except OSError:  # no reader waiting (ENXIO)
            pass

    guard = threading.Timer(60, unblock)
    guard.daemon = True
    guard.start()
    try:
        source = open_source(str(data))
    finally:
        guard.cancel()
    assert not blocked, "the listing blocked on the FIFO"
    assert len(source) == 3 and source.skipped["not a regular file (a FIFO, socket or device)"] == [1, str(fifo)]
    with pytest.raises(sources.NotRegularFileError):  # and a file that becomes one after listing: not read
        sources.open_regular(str(fifo))


def test_names_that_are_not_utf8_are_kept_read_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "INDEX_CACHE_MIN_IMAGES", 1)  # the validation cache hashes every name too
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    _images(data, 2)
    raw = os.fsencode(data) + b"/caf\xe9-\xff.jpg"  # Latin-1 bytes, as an old camera or archive writes them
    with open(raw, "wb") as f:
        f.write(jpeg_bytes(24, 32, 7))
    for _ in range(2):  # validated, then read from the cache
        source = open_source(str(data))
        assert len(source) == 3
        index = [os.fsencode(os.fsdecode(n)) for n in source.names].index(b"caf\xe9-\xff.jpg")
        assert source.read(index) == jpeg_bytes(24, 32, 7)
        assert os.fsencode(source.describe(index)) == raw


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_floating_point_tiffs_are_skipped_and_counted(tmp_path, scale):
    data = tmp_path / "data"
    _images(data, 2)
    pixels = np.random.default_rng(0).random((16, 16), dtype=np.float32) * scale
    Image.fromarray(pixels, mode="F").save(data / "float.tif")
    Image.fromarray((pixels * (65535 / scale)).astype(np.uint16)).save(data / "sixteen.tif")  # kept: 16-bit
    source = open_source(str(data))
    assert sorted(os.fsdecode(n) for n in source.names) == ["0.jpg", "1.jpg", "sixteen.tif"]
    assert source.skipped == {sources._FLOAT_TIFF: [1, str(data / "float.tif")]}


# Lists the dataset through an inspection that never returns (a hung filesystem), after saying so.
# Each of the pool's threads says so in one write: print()'s two writes from several threads could interleave.
BLOCKED_LISTING = textwrap.dedent("""
    import os, sys, time
    from fastdino.pipelines import sources
    def hung(path):
        os.write(1, b"listing\\n")
        time.sleep(3600)
    sources._inspect_file = hung
    from fastdino.engine.cli import main
    sys.exit(main())
""")


def test_listing_threads_leave_signals_to_the_main_thread():
    # Otherwise the kernel may hand SIGTERM to a thread stuck on a hung file, and the main thread's wait on the pool
    # is never interrupted.
    masks = sources._inspect_all(list(range(4)), lambda _: signal.pthread_sigmask(signal.SIG_BLOCK, []), 2,
                                 identity=list)
    assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in masks), masks
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.slow
def test_a_signal_during_a_blocked_listing_ends_the_run_at_once(tmp_path, tiny_dataset):
    from test_cli import TINY_CLI

    # stderr goes to a file, and every wait is bounded: a failure must not leave the test waiting on a pipe of a
    # process that sleeps for an hour. The bounds are guards against a hang, not timings.
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-c", BLOCKED_LISTING, "train", "--output", str(tmp_path / "run"),
                                 "--data", str(tiny_dataset), *TINY_CLI], stdout=subprocess.PIPE,
                                stderr=stderr_file, text=True)
    try:
        assert select.select([proc.stdout], [], [], 300)[0], stderr_path.read_text()
        assert proc.stdout.readline() == "listing\n", stderr_path.read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the signal did not end the blocked listing: {stderr_path.read_text()}")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    stderr = stderr_path.read_text()
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == ("fastdino: stopped by SIGTERM outside the training steps: nothing to "
                                               "checkpoint; rerun the same command to go on")


@pytest.mark.slow
def test_a_dataset_deleted_mid_run_ends_with_a_checkpoint_and_resumes(tmp_path, tiny_dataset, fastdino_here,
                                                                     uninterrupted_run, monkeypatch):
    from fastdino.engine.train import Trainer

    from test_resume import UNINTERRUPTED, assert_same_run

    data = tmp_path / "shapes"
    shutil.copytree(tiny_dataset, data)
    kept = tmp_path / "kept"
    real_train_step = Trainer.train_step

    def train_step(self, crops):  # every training image is deleted during step 3
        if self.step == 2 and not kept.exists():
            shutil.copytree(data / "train", kept)
            for image in (data / "train").rglob("*.jpg"):
                image.unlink()
        real_train_step(self, crops)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    gone = fastdino_here("train", "--output", run, "--data", data, *UNINTERRUPTED)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr
    assert gone.stderr.strip().splitlines()[-1] == (
        f"fastdino: error: no image of the dataset {data / 'train'} can be read any more (all 32 failed since it was "
        f"listed: deleted, moved or unmounted?); checkpoint {run / 'checkpoints' / 'step_00000003'} written; rerun "
        f"the same command to resume")
    assert gone.stderr.count("skipping undecodable image") <= 10  # no line per image: the last one says it all

    shutil.rmtree(data / "train")
    shutil.copytree(kept, data / "train")
    resumed = fastdino_here("train", "--output", run, "--data", data, *UNINTERRUPTED)
    assert resumed.returncode == 0 and "resuming at step 3" in resumed.stderr, resumed.stderr
    assert_same_run(run, uninterrupted_run)
