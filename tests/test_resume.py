"""Checkpoints: atomic DCP writes (a SIGKILL mid-write leaves the previous one usable), keep-last-k, and a run
stopped at step k and resumed with a larger --max-steps ending exactly like an uninterrupted run."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdino.engine.checkpoint import Checkpointer

from _helpers import assert_close


def _state(value: float, step: int) -> dict:
    return {"student": {"w": torch.full((64,), value)}, "train_state": {"step": step}}


def test_save_load_and_keep_last(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    assert ckpt.latest() is None
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step), step))
    assert [p.name for p in ckpt.checkpoints()] == ["step_00000002", "step_00000003"]
    state = _state(0.0, 0)
    ckpt.load(ckpt.latest(), state)
    assert state["train_state"]["step"] == 3
    assert_close(state["student"]["w"], torch.full((64,), 3.0), atol=0, rtol=0, name="w")


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch.distributed.checkpoint import filesystem
    from fastdino.engine.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], keep_last=2)
    ckpt.save(1, {"student": {"w": torch.full((64,), 1.0)}, "train_state": {"step": 1}})
    # Step 2: every shard is written, then the process dies before the metadata and the rename.
    filesystem.FileSystemWriter.finish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save(2, {"student": {"w": torch.full((64,), 2.0)}, "train_state": {"step": 2}})
""")


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(folder)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    leftover = folder / ".step_00000002.tmp"
    assert leftover.is_dir() and any(leftover.iterdir()), "the killed write should have left partial shards"
    ckpt = Checkpointer(folder, keep_last=2)
    assert ckpt.latest().name == "step_00000001"
    state = _state(0.0, 0)
    ckpt.load(ckpt.latest(), state)
    assert state["train_state"]["step"] == 1 and state["student"]["w"][0].item() == 1.0
    ckpt.save(2, _state(2.0, 2))  # the next save clears the leftover
    assert not leftover.exists() and ckpt.latest().name == "step_00000002"
