"""Checkpoint integrity: every file's SHA-256 is written with the checkpoint and verified on load; a truncated,
zeroed or missing file makes `latest()` fall back to the newest intact checkpoint with a warning naming the bad one,
keep_last counts intact checkpoints, and a run whose latest checkpoint was zeroed resumes exactly like an
uninterrupted run."""
import logging

import pytest
import torch

from fastdino.engine.checkpoint import CHECKSUMS, Checkpointer, CorruptCheckpointError

from _helpers import assert_close
from test_resume import UNINTERRUPTED


def _state(value: float, step: int) -> dict:
    return {"student": {"w": torch.full((4096,), value)}, "train_state": {"step": step}}


def _shard(path):
    return next(path.glob("__0_*.distcp"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 1024] = bytes(1024)
    path.write_bytes(bytes(data))


FAULTS = {
    "truncated shard": lambda ckpt: _truncate(_shard(ckpt)),
    "truncated .metadata": lambda ckpt: _truncate(ckpt / ".metadata"),
    "zeroed bytes in a shard": lambda ckpt: _zero_middle(_shard(ckpt)),
    "missing shard": lambda ckpt: _shard(ckpt).unlink(),
    "garbled SHA256SUMS": lambda ckpt: (ckpt / CHECKSUMS).write_text("not a checksum\n"),
}


def test_checksums_are_written_in_sha256sum_format(tmp_path):
    import hashlib

    ckpt = Checkpointer(tmp_path, keep_last=1)
    path = ckpt.save(1, _state(1.0, 1))
    lines = (path / CHECKSUMS).read_text().splitlines()
    names = sorted(p.name for p in path.iterdir() if p.name != CHECKSUMS)
    assert [line.split("  ")[1] for line in lines] == names and ".metadata" in names
    for line in lines:
        digest, name = line.split("  ")
        assert digest == hashlib.sha256((path / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("fault", FAULTS)
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, fault):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(1, _state(1.0, 1))
    bad = ckpt.save(2, _state(2.0, 2))
    FAULTS[fault](bad)
    with caplog.at_level(logging.WARNING):
        latest = Checkpointer(tmp_path, keep_last=2).latest()
    assert latest.name == "step_00000001"
    assert any("step_00000002 is corrupt" in r.getMessage() for r in caplog.records), caplog.text
    state = _state(0.0, 0)
    ckpt.load(latest, state)
    assert state["train_state"]["step"] == 1
    assert_close(state["student"]["w"], torch.full((4096,), 1.0), atol=0, rtol=0, name="w")


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2):
        _truncate(_shard(ckpt.save(step, _state(float(step), step))))
    with pytest.raises(CorruptCheckpointError, match="step_00000001, step_00000002 are all corrupt"):
        Checkpointer(tmp_path, keep_last=2).latest()


def test_keep_last_counts_intact_checkpoints(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, _state(1.0, 1))
    ckpt.keep_last = 2
    _zero_middle(_shard(ckpt.save(3, _state(3.0, 3))))
    resumed = Checkpointer(tmp_path, keep_last=1)
    assert resumed.latest().name == "step_00000001"
    resumed.save(2, _state(2.0, 2))  # a resumed run's next save: the corrupt, newer step 3 does not count
    assert [p.name for p in resumed.checkpoints()] == ["step_00000002", "step_00000003"]
    resumed.save(3, _state(3.0, 3))  # replaces the corrupt step 3; only the newest intact one is kept
    assert [p.name for p in resumed.checkpoints()] == ["step_00000003"]
    assert resumed.latest().name == "step_00000003"


@pytest.mark.slow
def test_a_run_whose_latest_checkpoint_was_zeroed_resumes_like_an_uninterrupted_run(tmp_path, tiny_dataset,
                                                                                     fastdino_here, uninterrupted_run):
    from test_resume import assert_same_run

    args = ["--data", tiny_dataset, *UNINTERRUPTED]
    broken = tmp_path / "broken"
    assert fastdino_here("train", "--output", broken, *args, "--max-steps", "4").returncode == 0
    _zero_middle(_shard(broken / "checkpoints" / "step_00000004"))
    resumed = fastdino_here("train", "--output", broken, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000004 is corrupt" in resumed.stderr and "resuming at step 2" in resumed.stderr, resumed.stderr
    assert_same_run(broken, uninterrupted_run)
