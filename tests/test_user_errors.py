"""Mistakes a user can fix are one line on stderr with exit code 2, said before any work starts: an --output that
is a file or on a read-only filesystem, and a random or truncated .safetensors / .pth as --checkpoint (never with
torch's advice to load it with weights_only=False, which would run pickled code). A dataset whose k-NN cannot run
(val classes missing from train, fewer train images than k) does not fail a finished training: the k-NN is skipped
with one line, and the attention map and the end-of-run summary still come."""
import os
import subprocess

import pytest
import torch



def _assert_one_line_error(proc, *expected):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in lines[0], proc.stderr


def test_output_that_is_a_file(tmp_path, fastdino_here):
    output = tmp_path / "run"
    output.write_text("not a folder")
    _assert_one_line_error(fastdino_here("train", "--output", output), f"--output {output} is a file")
    _assert_one_line_error(fastdino_here("train", "--output", output / "sub"), "Not a directory")
    assert output.read_text() == "not a folder"


def test_output_on_a_read_only_filesystem(tmp_path, fastdino_here):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    # Root writes through file modes: mount a read-only tmpfs there, else a folder without write permission.
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                                                    str(read_only)], capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount: no way to make a folder read-only")
        read_only.chmod(0o555)
    try:
        proc = fastdino_here("train", "--output", read_only / "run")
        _assert_one_line_error(proc, f"cannot write to --output {read_only / 'run'}",
                               "Read-only file system" if mounted else "Permission denied")
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=True)
        read_only.chmod(0o755)


def _random(path):
    path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())


def _truncated_safetensors(path):
    from safetensors.torch import save_file

    save_file({"pos_embed": torch.zeros(1, 5, 32), "patch_embed.proj.weight": torch.zeros(32, 3, 4, 4)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])


def _truncated_pth(path):
    torch.save({"pos_embed": torch.zeros(1, 5, 32)}, path)
    path.write_bytes(path.read_bytes()[:700])


@pytest.mark.parametrize("name, make", [
    ("random.safetensors", _random), ("random.pth", _random), ("truncated.safetensors", _truncated_safetensors),
    ("truncated.pth", _truncated_pth), ("empty.pth", lambda path: path.write_bytes(b"")),
])
@pytest.mark.parametrize("command", ["knn", "attention"])
def test_unreadable_checkpoint(tmp_path, fastdino_here, name, make, command):
    checkpoint = tmp_path / name
    make(checkpoint)
    extra = (["--data", tmp_path] if command == "knn" else
             ["--image", tmp_path / "x.png", "--output", tmp_path / "out.png"])
    proc = fastdino_here(command, "--checkpoint", checkpoint, *extra)
    _assert_one_line_error(proc, f"cannot read checkpoint {checkpoint}", "truncated or corrupt")
    assert "weights_only" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("problem, override, message", [
    ("val classes missing from train", [], "class(es) of the val split are missing from the train split: star"),
    ("fewer training images than k", ["eval.knn_k=50"], "k=50 exceeds the 32 training images"),
])
def test_a_dataset_that_allows_no_knn_skips_it_after_training(tmp_path, fastdino_here, problem, override, message):
    import shutil

    from fastdino.pipelines import make_shapes_dataset

    from test_cli import TINY_CLI

    data = make_shapes_dataset(tmp_path / "shapes", num_train=32, num_val=20, image_size=32)
    if problem == "val classes missing from train":
        shutil.rmtree(data / "train" / "star")
        override = ["data.batch_size=2"]  # fewer images left; k (20) still fits
    run = tmp_path / "run"
    proc = fastdino_here("train", "--output", run, "--data", data, *TINY_CLI, "epochs=1", "eval.at_end=true",
                    "eval.knn_every_epochs=0.5", *override)
    assert proc.returncode == 0, proc.stderr
    assert "periodic k-NN off: " in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "k-NN evaluation skipped: " in proc.stdout and message in proc.stdout, proc.stdout
    assert (run / "attention.png").stat().st_size > 0 and (run / "teacher_backbone.safetensors").is_file()
    assert "end of run at step" in proc.stdout
