"""`eval.knn_every_epochs`: k-NN rows of the teacher at the right steps of metrics.jsonl, no change to the
training itself, the end-of-run statement with the k-NN curve, and a plain message when there is no val split."""
import json
import logging

import pytest

from test_time_budget import CPU, data_config
from test_train import make_trainer

TIME_KEYS = {"img_per_s", "eta_s", "max_memory_gib", "minutes"}


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_knn_rows_every_interval_and_at_the_end_without_changing_the_training(tmp_path, tiny_dataset, caplog,
                                                                             capsys):
    from fastdino.engine.cli import run_train

    caplog.set_level(logging.INFO)
    cfg = data_config(tiny_dataset, "epochs=1", "eval.knn_every_epochs=0.375")  # 8 steps: k-NN every 3 steps
    assert run_train(cfg, tmp_path / "knn", device=CPU, mesh=None) == 0
    rows = _rows(tmp_path / "knn")
    knn = [row for row in rows if "knn_top1" in row]
    assert [row["step"] for row in knn] == [3, 6, 8] and knn[0]["epoch"] == 0.375
    assert all(set(row) == {"step", "epoch", "knn_top1", "knn_top5", "minutes"} for row in knn)
    # training minutes (3 decimals) never go back, also across the evaluation pauses
    assert 0 <= knn[0]["minutes"] <= knn[1]["minutes"] <= knn[2]["minutes"] and knn[2]["minutes"] > 0
    logged = [r.getMessage() for r in caplog.records if r.name == "fastdino.engine.train"]
    assert any(f"{knn[0]['knn_top1']:.1f}%" in line for line in logged)  # each pass is logged with its result
    out = capsys.readouterr().out
    assert "end of run at step 8 of 8:" in out and "teacher output entropy" in out and "ln K = 5.55" in out
    assert f"k-NN top-1: first {knn[0]['knn_top1']:.1f}% at step 3 -> best" in out

    # The k-NN passes draw nothing from the training's RNG: the same run without them logs the same values.
    assert run_train(data_config(tiny_dataset, "epochs=1"), tmp_path / "plain", device=CPU, mesh=None) == 0
    without_knn = [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows if "loss" in row]
    assert without_knn == [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in _rows(tmp_path / "plain")]


def test_no_val_split_turns_periodic_knn_off_with_a_message(tiny_dataset, caplog):
    caplog.set_level(logging.INFO)
    cfg = data_config(tiny_dataset / "train", "eval.knn_every_epochs=1")  # the class folders, no val/ beside
    trainer = make_trainer(cfg, steps_per_epoch=8)
    assert trainer.knn_every_steps == 0
    said = [r.getMessage() for r in caplog.records if "eval.knn_every_epochs" in r.getMessage()]
    assert len(said) == 1 and str(tiny_dataset / "train") in said[0]  # names the setting and the dataset
    assert make_trainer(data_config(tiny_dataset, "eval.knn_every_epochs=1"), steps_per_epoch=8).knn_every_steps == 8
