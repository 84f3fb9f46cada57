"""Checkpoints: atomic DCP writes (a SIGKILL mid-write leaves the previous one usable), keep-last-k, and a run
stopped at step k and resumed with a larger --max-steps ending exactly like an uninterrupted run."""
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdino.engine.checkpoint import Checkpointer

from _helpers import assert_close
from test_cli import TINY_CLI

# The uninterrupted run that the fault tests' interrupted-then-resumed runs must equal.
UNINTERRUPTED = [*TINY_CLI, "eval.at_end=false", "--max-steps", "6"]


def main_here(*args) -> int:
    """`fastdino ARGS` in this process (no interpreter start), on one thread like test_cli's subprocesses (the
    summation order, and so the bits, depend on it); the root logger `train` configures is put back."""
    from fastdino.engine.cli import main

    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        root.handlers[:], root.level = handlers, level
        torch.set_num_threads(threads)


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


TIME_KEYS = {"img_per_s", "eta_s", "max_memory_gib"}  # wall-clock and process facts: they differ run to run
TIME_STATE = {"train_state/trained_seconds"}  # the same in the checkpoint


def _run_state(run):
    """Rows of metrics.jsonl without time-dependent keys, and every tensor of the last checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    rows = [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = Checkpointer(run / "checkpoints", keep_last=1).latest()
    dcp_to_torch_save(last, run / "last.pt")
    return rows, last.name, torch.load(run / "last.pt", weights_only=False)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): tree}


@pytest.mark.slow
def test_stop_and_resume_with_a_larger_max_steps_equals_an_uninterrupted_run(tmp_path, tiny_dataset):
    from test_cli import TINY_CLI, fastdino

    args = ["--data", tiny_dataset, *TINY_CLI, "eval.at_end=false", "model.drop_path_rate=0.2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert fastdino("train", "--output", whole, *args, "--max-steps", "11").returncode == 0
    first = fastdino("train", "--output", split, *args, "--max-steps", "5")  # mid-epoch, between two log steps
    assert first.returncode == 0, first.stderr
    second = fastdino("train", "--output", split, *args, "--max-steps", "11")
    assert second.returncode == 0 and "resuming at step 5" in second.stderr, second.stderr

    rows = assert_same_run(split, whole)
    # The stop at step 5 logged a partial row, which the resumed run replaced; step 11 is the last step.
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 11] and rows[-1]["partial"]
    assert Checkpointer(whole / "checkpoints", keep_last=1).latest().name == "step_00000011"


def assert_same_run(run, reference, *, lost_rows=()) -> list[dict]:
    """`run` (interrupted and resumed) has `reference`'s metrics rows (but those of the steps in `lost_rows`) and,
    bit for bit, its last checkpoint (but for wall times); returns the rows."""
    rows, name, state = _run_state(reference)
    run_rows, run_name, run_state = _run_state(run)
    assert run_rows == [row for row in rows if row["step"] not in lost_rows]
    assert run_name == name
    expected, actual = _flat(state), _flat(run_state)
    assert actual.keys() == expected.keys() and TIME_STATE <= expected.keys()
    assert {k.split("/")[0] for k in expected} >= {"student", "teacher", "optimizer", "loss", "train_state",
                                                   "dataloader"}
    for key, value in expected.items():
        if key in TIME_STATE:
            continue
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), f"{key} differs after resuming"
        else:
            assert actual[key] == value, f"{key}: {actual[key]} != {value}"
    return rows
