"""Everything a run writes under --output is checked before the first step: checkpoints/ (and the checkpoints it
may prune) must be writable folders, config.json, metrics.jsonl, the backbone file (and attention.png when the run
ends with one) writable files or absent. Each problem is one line naming the path (exit code 2, nothing trained).
A write that fails later, when something changed under the running job, ends the run with a checkpoint of the
steps trained and one line naming the path."""
import contextlib
import os
import shutil
import subprocess

import pytest

from test_resume import UNINTERRUPTED

NOT_WRITABLE = "is not writable (read-only, immutable, or another user's)"


@contextlib.contextmanager
def unwritable(path):
    """`path` made unwritable for this process: immutable (chattr +i) for root, whom file modes do not stop; a
    read-only mode for anyone else."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("root, and this filesystem has no immutable flag: nothing makes a path unwritable here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _make(run, piece: str, kind: str):
    path = run / piece
    if kind == "folder":
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n" if kind == "file" else "")
    return path


@pytest.mark.parametrize("piece, kind, problem", [
    ("checkpoints", "folder", NOT_WRITABLE),
    ("metrics.jsonl", "file", NOT_WRITABLE),
    ("config.json", "file", NOT_WRITABLE),
    ("teacher_backbone.safetensors", "file", NOT_WRITABLE),
    ("checkpoints", "regular file", "is a file; the run writes a folder there"),
    ("teacher_backbone.safetensors", "folder", "is a folder; the run writes a file there"),
    ("metrics.jsonl", "folder", "is a folder; the run writes a file there"),
])
def test_an_unwritable_piece_of_the_output_is_one_line_before_any_step(tmp_path, tiny_dataset, fastdino_here,
                                                                       piece, kind, problem):
    from test_user_errors import _assert_one_line_error

    run = tmp_path / "run"
    path = _make(run, piece, kind)
    with unwritable(path) if problem == NOT_WRITABLE else contextlib.nullcontext():
        proc = fastdino_here("train", "--output", run, "--data", tiny_dataset, *UNINTERRUPTED)
    _assert_one_line_error(proc, f"fastdino: error: cannot train into {run}: {path} {problem}")
    assert not (run / "checkpoints" / "step_00000002").exists()


def test_every_problem_is_named_on_its_own_line(tmp_path, tiny_dataset, fastdino_here):
    run = tmp_path / "run"
    checkpoints, picture = _make(run, "checkpoints", "regular file"), _make(run, "attention.png", "folder")
    proc = fastdino_here("train", "--output", run, "--data", tiny_dataset, *UNINTERRUPTED, "eval.at_end=true")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"fastdino: error: cannot train into {run}: {checkpoints} is a file; the run writes a folder there",
        f"fastdino: error: cannot train into {run}: {picture} is a folder; the run writes a file there"]


@pytest.mark.slow
def test_a_checkpoint_the_run_would_prune_must_be_deletable(tmp_path, tiny_dataset, fastdino_here,
                                                             uninterrupted_run):
    from test_user_errors import _assert_one_line_error

    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    oldest = run / "checkpoints" / "step_00000004"
    with unwritable(oldest):
        proc = fastdino_here("train", "--output", run, "--data", tiny_dataset, *UNINTERRUPTED, "--max-steps", "8")
    _assert_one_line_error(proc, f"cannot train into {run}: {oldest} {NOT_WRITABLE}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


@pytest.mark.slow
def test_a_write_that_fails_mid_run_ends_with_a_checkpoint_naming_the_path(tmp_path, tiny_dataset, fastdino_here,
                                                                           uninterrupted_run, monkeypatch):
    from fastdino.engine.train import Trainer

    from test_resume import assert_same_run

    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    real_train_step = Trainer.train_step
    with contextlib.ExitStack() as restore:
        def train_step(self, crops):  # metrics.jsonl turns unwritable in step 4, before its row is written
            if self.step == 3 and not restore._exit_callbacks:
                restore.enter_context(unwritable(metrics))
            real_train_step(self, crops)

        monkeypatch.setattr(Trainer, "train_step", train_step)
        failed = fastdino_here("train", "--output", run, "--data", tiny_dataset, *UNINTERRUPTED)
    monkeypatch.undo()
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fastdino: error: cannot write {metrics} (") and last.endswith(
        f") after step 4; checkpoint {run / 'checkpoints' / 'step_00000004'} written; rerun the same command to "
        f"resume"), last

    resumed = fastdino_here("train", "--output", run, "--data", tiny_dataset, *UNINTERRUPTED)
    assert resumed.returncode == 0 and "resuming at step 4" in resumed.stderr, resumed.stderr
    assert_same_run(run, uninterrupted_run, lost_rows=(4,))  # the weights and all; only the row of step 4 is lost
