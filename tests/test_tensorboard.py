"""TensorBoard event files of a run (DIR/tb/), read back with tensorboard's own reader: every metrics.jsonl column
as a scalar at the steps of its rows, the attention maps at each k-NN pass, and each step once after a resumed run
and after a rerun's end-of-run k-NN, as metrics.jsonl holds them; `logging.tensorboard` auto / true / false."""
import json
import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastdino.engine.metrics import resolve_tensorboard
from test_cli import TINY_CLI

# 32 training images, 4 per step: 8 steps per epoch; k-NN every 4 steps; rows every 2 steps (TINY_CLI).
RUN = [*TINY_CLI, "epochs=1", "eval.knn_every_epochs=0.5"]


def jsonl_steps(run) -> dict[str, list[int]]:
    """Column -> the steps of the rows that hold it, for the numeric columns of DIR/metrics.jsonl."""
    steps: dict[str, list[int]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.setdefault(key, []).append(row["step"])
    return {key: sorted(s) for key, s in steps.items()}


def event_steps(run) -> tuple[dict[str, list[int]], list[int]]:
    """(scalar tag -> steps, steps of the attention images) as TensorBoard shows DIR/tb."""
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: sorted(e.step for e in events.Scalars(tag)) for tag in tags["scalars"]}
    return scalars, sorted(e.step for e in events.Images("attention")) if "attention" in tags["images"] else []


@pytest.mark.slow
def test_event_files_hold_what_metrics_jsonl_holds_after_a_resume_and_a_rerun(fastdino_here, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train = ("train", "--output", run, "--data", tiny_dataset, *RUN)
    # Stopped at step 5, between two log steps: rows at 2 and 4 and a partial row at 5, k-NN at 4.
    assert fastdino_here(*train, "eval.at_end=false", "--max-steps", "5").returncode == 0
    scalars, images = event_steps(run)
    assert scalars == jsonl_steps(run) and scalars["loss"] == [2, 4, 5] and scalars["knn_top1"] == [4]
    assert {"lr", "wd", "teacher_momentum", "teacher_temp", "teacher_entropy", "grad_norm", "skipped_steps",
            "img_per_s", "max_memory_gib", "knn_top5"} <= set(scalars)
    assert images == [4]

    # Resumed to the end with the end-of-run k-NN: the partial row at 5 is gone from both, nothing is doubled.
    assert fastdino_here(*train, "eval.at_end=true").returncode == 0
    scalars, images = event_steps(run)
    assert scalars == jsonl_steps(run) and scalars["loss"] == [2, 4, 6, 8] and scalars["knn_top1"] == [4, 8]
    assert scalars["knn_top1_untrained"] == [8] and images == [4, 8]

    # The same command again: the run is done, its end-of-run k-NN is redone and replaces the row at step 8.
    assert fastdino_here(*train, "eval.at_end=true").returncode == 0
    scalars, images = event_steps(run)
    assert scalars == jsonl_steps(run) and scalars["knn_top1"] == [4, 8] and images == [4, 8]


def test_logging_tensorboard_choices(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    assert resolve_tensorboard("auto", tmp_path) == resolve_tensorboard("true", tmp_path) == tmp_path / "tb"
    assert resolve_tensorboard("false", tmp_path) is None and resolve_tensorboard("true", None) is None
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    assert resolve_tensorboard("auto", tmp_path) is None
    assert "TensorBoard: off (logging.tensorboard=auto and the tensorboard package is not installed)" in caplog.text
    with pytest.raises(ValueError, match=r"logging.tensorboard=true needs the tensorboard package"):
        resolve_tensorboard("true", tmp_path)
