"""The metrics pieces of the loop (metrics.py): on-device step accumulators, the collapse watch, metrics.jsonl
rows and their truncation on resume, throughput without paused time, and the end-of-run statement."""
import json
import math
from types import SimpleNamespace

import torch

from fastdino.engine.metrics import (
    CollapseWatch,
    MetricsWriter,
    StepStats,
    Throughput,
    end_of_run_statement,
    format_row,
)


def test_step_stats_average_finite_steps_and_track_runs_of_non_finite_ones():
    stats = StepStats(torch.device("cpu"))
    t, f = torch.tensor(True), torch.tensor(False)
    for loss, skipped, nonfinite in ((1.0, f, f), (float("nan"), t, t), (float("nan"), t, t), (3.0, f, f),
                                     (float("inf"), t, t), (5.0, t, f)):  # the last: an fp16 overflow
        stats.update(torch.tensor(loss), torch.tensor(2 * loss), torch.tensor(0.5), skipped, nonfinite)
    first = stats.read()
    assert first == {"loss": 3.0, "teacher_entropy": 6.0, "grad_norm": 0.5, "skipped_steps": 4,
                     "nonfinite_in_a_row": 0, "max_nonfinite_in_a_row": 2, **dict.fromkeys(StepStats.TERMS, 0.0)}
    stats.update(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), t, t)
    assert stats.read()["max_nonfinite_in_a_row"] == 1
    stats.update(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), t, t)
    second = stats.read()  # a run counts from its start, across reads
    assert second["max_nonfinite_in_a_row"] == second["nonfinite_in_a_row"] == 2
    assert math.isnan(StepStats(torch.device("cpu")).read()["loss"])


def test_step_stats_average_the_named_terms_over_finite_steps_and_load_older_state():
    stats = StepStats(torch.device("cpu"))
    t, f = torch.tensor(True), torch.tensor(False)
    for terms, nonfinite in (([1.0, 2.0, 3.0, 4.0], f), ([float("nan")] * 4, t), ([3.0, 4.0, 5.0, 6.0], f)):
        stats.update(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), nonfinite, nonfinite,
                     torch.tensor(terms))
    read = stats.read()
    assert [read[name] for name in StepStats.TERMS] == [2.0, 3.0, 4.0, 5.0]
    older = torch.arange(len(StepStats.FIELDS), dtype=torch.float32)  # a checkpoint from before the terms
    stats.load_state_dict({"values": older})
    assert torch.equal(stats.values[:len(older)], older) and not stats.values[len(older):].any()


def test_progress_line_shows_the_terms_of_the_row():
    row = {"step": 1, "epoch": 0.1, "img_per_s": 10.0, "loss": 1.0, "lr": 1e-3, "wd": 0.04, "teacher_momentum": 0.99,
           "teacher_temp": 0.04, "teacher_entropy": 2.0, "grad_norm": 1.0, "skipped_steps": 0, "max_memory_gib": 1.0,
           "eta_s": 5}
    assert "ibot loss" not in format_row(row, 10)
    line = format_row({**row, "dino_loss": 0.5, "ibot_loss": 0.25, "teacher_patch_entropy": 3.0}, 10)
    assert "dino loss 0.5000 | ibot loss 0.2500 | teacher patch entropy 3.0000 |" in line


def test_collapse_watch_warns_once_after_patience():
    watch = CollapseWatch(out_dim=1000, patience_steps=20)  # ln K = 6.91
    assert watch.check(10, 6.9) is None and watch.check(20, 6.9) is None
    assert "uniform" in watch.check(30, 6.9)
    assert watch.check(40, 6.9) is None  # once
    assert watch.check(50, 3.0) is None and watch.check(60, 0.01) is None and watch.check(70, 0.01) is None
    assert "one prototype" in watch.check(80, 0.01)


def test_metrics_writer_rows_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, total_steps=100)
    row = dict(step=0, epoch=0, loss=1.0, lr=1e-3, wd=0.04, teacher_momentum=0.996, teacher_temp=0.04,
               teacher_entropy=3.0, grad_norm=1.0, skipped_steps=0, img_per_s=10.0, max_memory_gib=0.1, eta_s=3725)
    for step in (10, 20, 30):
        writer.write({**row, "step": step})
    with path.open("a") as f:
        f.write('{"step": 40, "lo')  # a run killed while writing
    writer.drop_after(20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    line = format_row({**row, "step": 10, "epoch": 0.25}, 100)
    assert line.startswith("step 10/100 | epoch 0.25 | 10 img/s | loss 1.0000") and line.endswith("ETA 1h02m05s")


def test_throughput_and_training_time_leave_out_paused_time(monkeypatch):
    from fastdino.engine import metrics

    now = [100.0]
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    throughput = Throughput(start_step=0, seconds_before=30.0)  # 30 s trained by an earlier run of the folder
    now[0] = 101.0
    with throughput.paused():  # e.g. a k-NN pass
        now[0] = 105.0
        assert throughput.trained_seconds() == 31.0  # the clock stands still while paused
    now[0] = 106.0
    img_per_s, eta_s = throughput.tick(10, images_per_step=4, total_steps=20)
    assert (img_per_s, eta_s) == (20.0, 2.0)  # 10 steps in 2 s of training, not in 6 s
    assert throughput.trained_seconds() == 32.0


# --------------------------------------------------------------------------------------- end of the run

def _rows(losses, entropies, step=10):
    return [{"step": step * (i + 1), "loss": loss, "teacher_entropy": entropy}
            for i, (loss, entropy) in enumerate(zip(losses, entropies))]


def test_end_statement_healthy_run_with_a_knn_curve():
    knn = [{"step": 10, "knn_top1": 10.0}, {"step": 20, "knn_top1": 14.0}, {"step": 30, "knn_top1": 12.0}]
    lines = end_of_run_statement(_rows([6.2, float("nan"), 4.1], [6.0, 5.5, 5.2]) + knn, out_dim=512)
    assert lines == ["teacher output entropy 5.20 of ln K = 6.24 at step 30: clear of both collapse modes",
                     "loss fell from 6.200 to 4.100 (ln K = 6.24)",
                     "k-NN top-1: first 10.0% at step 10 -> best 14.0% at step 20 -> last 12.0% at step 30"]


def test_end_statement_names_the_collapse_modes_and_a_stalled_loss():
    uniform = end_of_run_statement(_rows([6.24, 6.22], [6.1, 6.2]), out_dim=512)
    assert uniform == [("teacher output entropy 6.20 of ln K = 6.24 at step 20: near ln K: teacher outputs uniform "
                        "— collapsed or not learning yet"),
                       "loss stalled: 6.240 at step 10, 6.220 at step 20 (ln K = 6.24)"]
    one_prototype = end_of_run_statement(_rows([3.0, 6.0], [2.0, 0.1]), out_dim=512)
    assert one_prototype == ["teacher output entropy 0.10 of ln K = 6.24 at step 20: near 0: one prototype "
                             "dominates — collapsed", "loss rose from 3.000 to 6.000 (ln K = 6.24)"]


def test_end_statement_with_one_logged_step_and_the_final_evaluation_only():
    rows = _rows([5.0], [4.0]) + [{"step": 10, "knn_top1": 12.0, "knn_top1_untrained": 10.5}]
    assert end_of_run_statement(rows, out_dim=512)[1:] == [
        "loss 5.000 at step 10 (ln K = 6.24): one logged step, no trend yet",
        "k-NN top-1: 12.0% at step 10 (untrained network 10.5%)"]
    assert end_of_run_statement([], out_dim=512) == []
