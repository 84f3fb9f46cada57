"""`minutes`: the step count comes from timed real steps (faked here: no assertion depends on the machine's speed),
the timing leaves no trace in the run, warmups longer than the budget shrink with a warning, and a resumed run
keeps the count it measured."""
import logging
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from fastdino.engine import budget, train
from fastdino.engine.budget import fit_to_budget, steps_in_budget
from fastdino.engine.cli import build_train_loader, run_train
from fastdino.engine.eval import knn_accuracy
from fastdino.engine.model import build_model, initial_state
from fastdino.engine.train import Trainer

from test_train import make_trainer, tiny_config

CPU = torch.device("cpu")


def data_config(data, *overrides):
    """The tiny model of test_train.py on the tiny dataset of conftest.py (32 images: 8 steps per epoch)."""
    return tiny_config(f"data.path={data}", "data.backend=torchvision", "data.num_workers=0", "eval.batch_size=16",
                       "eval.at_end=false", *overrides)


def trainer_and_loader(cfg, output_dir=None):
    loader = build_train_loader(cfg, f"{cfg.data.path}/train", CPU)
    if output_dir is not None:
        output_dir.mkdir()
    return make_trainer(cfg, steps_per_epoch=len(loader), output_dir=output_dir), loader


def fake_costs(monkeypatch, *, step_seconds, knn_seconds=0.0):
    """A step and a k-NN pass take these many seconds, and no time passes otherwise."""
    monkeypatch.setattr(budget, "_time_steps", lambda trainer, batches: step_seconds)
    monkeypatch.setattr(budget, "_time_knn_pass", lambda trainer: knn_seconds)
    monkeypatch.setattr(budget, "time", SimpleNamespace(perf_counter=lambda: 0.0))


def test_the_budget_sets_the_step_count_of_every_schedule(monkeypatch, tiny_dataset):
    cfg = data_config(tiny_dataset, "minutes=1", "eval.at_end=true", "eval.knn_every_epochs=1", "max_steps=50")
    trainer, loader = trainer_and_loader(cfg)
    fake_costs(monkeypatch, step_seconds=0.05, knn_seconds=2.0)
    fit_to_budget(trainer, loader, deadline=60.0)
    # 60 s less 1 pass at the end (the trained network; the timed pass was the untrained one's), then 0.05 s a
    # step + a 2-s pass every 8 steps
    assert trainer.schedules.total_steps == int((60 - 2.0) / (0.05 + 2.0 / 8)) == 193
    assert trainer.stop_step == 50  # max_steps still stops early without changing the schedules
    assert trainer.schedules.warmup_steps == 8  # one epoch, as configured


def test_a_warmup_longer_than_the_budget_is_scaled_down_with_a_warning(monkeypatch, caplog, tiny_dataset):
    cfg = data_config(tiny_dataset, "minutes=0.1")  # epochs=2; lr and teacher temperature warm up over 1 epoch
    trainer, loader = trainer_and_loader(cfg)
    fake_costs(monkeypatch, step_seconds=1.0)
    fit_to_budget(trainer, loader, deadline=6.0)
    assert trainer.schedules.total_steps == 6 and trainer.schedules.warmup_steps == 3
    assert trainer.schedules.teacher_temp_warmup_steps == 3 and trainer.schedules.freeze_last_layer_steps == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [s for s in ("optim.warmup_epochs", "loss.warmup_teacher_temp_epochs", "optim.freeze_last_layer_epochs")
            if any(s in w for w in warnings)] == ["optim.warmup_epochs", "loss.warmup_teacher_temp_epochs"]


def test_a_budget_too_short_for_one_step_is_an_error(monkeypatch, tiny_dataset):
    cfg = data_config(tiny_dataset, "minutes=0.01")
    trainer, loader = trainer_and_loader(cfg)
    fake_costs(monkeypatch, step_seconds=1.0)
    with pytest.raises(ValueError, match=r"a time budget of 0.01 min leaves no time to train: 0.6 s are left .* "
                                         r"a step takes 1.000 s .* raise --minutes"):
        fit_to_budget(trainer, loader, deadline=0.6)


def _state(trainer, loader) -> dict:
    """Everything a step reads or changes, as plain values and tensors. Left out: the values a step writes before
    it reads them (the optimizer's found_inf flag, the loss module's last teacher entropy)."""
    optimizer = trainer.optimizer.state_dict()
    return {**{f"student.{k}": v for k, v in trainer.student.state_dict().items()},
            **{f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()},
            **{f"adam.{i}.{k}": v for i, state in optimizer["state"].items() for k, v in state.items()},
            "adam.groups": optimizer["param_groups"], "center": trainer.loss_fn.center, "step": trainer.step,
            "stats": trainer.stats.values, "loader": loader.state_dict(), "rng": torch.get_rng_state()}


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        same = torch.equal(actual[key], value) if isinstance(value, torch.Tensor) else actual[key] == value
        assert same, f"{key} differs"


@pytest.mark.slow
def test_the_timed_steps_leave_the_run_exactly_as_a_fresh_one(tmp_path, tiny_dataset):
    cfg = data_config(tiny_dataset, "minutes=60", "max_steps=3")  # drop_path_rate=0.1: steps draw from the RNG
    timed, timed_loader = trainer_and_loader(cfg, output_dir=tmp_path / "timed")
    rng_at_start = torch.get_rng_state()
    fit_to_budget(timed, timed_loader, deadline=time.perf_counter() + 3600)  # really timed...
    assert timed.schedules.total_steps > 3
    fresh, fresh_loader = trainer_and_loader(cfg, output_dir=tmp_path / "fresh")
    fresh.set_total_steps(timed.schedules.total_steps)  # ...and this is the run of that many steps without timing
    _assert_same(_state(timed, timed_loader), _state(fresh, fresh_loader))
    assert torch.equal(torch.get_rng_state(), rng_at_start)

    for trainer, loader in ((fresh, fresh_loader), (timed, timed_loader)):
        torch.set_rng_state(rng_at_start)
        trainer.train(loader)
    _assert_same(_state(timed, timed_loader), _state(fresh, fresh_loader))


def test_a_minutes_run_resumed_with_the_same_command_keeps_its_step_count(monkeypatch, tmp_path, tiny_dataset):
    cfg = data_config(tiny_dataset, "minutes=0.5")
    monkeypatch.setattr(budget, "_time_steps", lambda trainer, batches: 0.01)
    starts = []  # (step, total steps, stop step) of each run as its loop starts
    train_from_here = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, loader, stop=None: starts.append(
        (self.step, self.schedules.total_steps, self.stop_step)) or train_from_here(self, loader, stop))
    assert run_train(replace(cfg, max_steps=3), tmp_path / "run", device=CPU, mesh=None) == 0
    (_, total_steps, _), = starts
    assert total_steps > 6  # measured: 0.5 min at 0.01 s a step

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed run measured its steps again")

    monkeypatch.setattr(budget, "fit_to_budget", measure_again)
    assert run_train(replace(cfg, max_steps=6), tmp_path / "run", device=CPU, mesh=None) == 0
    assert starts[1] == (3, total_steps, 6)


def test_steps_in_budget_leaves_time_for_the_knn_passes():
    assert steps_in_budget(60.0, 0.5) == 120
    # 2 passes of 3 s at the end; one every 10 steps adds 0.3 s per step: (60 - 6) / 0.8 = 67.5
    assert steps_in_budget(60.0, 0.5, knn_seconds=3.0, knn_every_steps=10, end_knn_passes=2) == 67
    assert steps_in_budget(5.0, 0.5, knn_seconds=3.0, end_knn_passes=2) == 0


def test_the_timed_knn_pass_is_the_untrained_result_at_the_end(monkeypatch, tmp_path, tiny_dataset):
    from fastdino.engine.cli import evaluate_at_end

    cfg = data_config(tiny_dataset, "minutes=1", "eval.at_end=true")
    trainer, loader = trainer_and_loader(cfg, tmp_path / "run")
    monkeypatch.setattr(budget, "_time_steps", lambda trainer, batches: 0.05)
    fit_to_budget(trainer, loader, deadline=time.perf_counter() + 60)
    untrained = build_model(cfg, student=False)
    untrained.load_state_dict(initial_state(cfg))
    assert trainer.untrained_knn == knn_accuracy(untrained.backbone, cfg, CPU)

    passes = []
    monkeypatch.setattr(train, "knn_accuracy", lambda *args: passes.append(args) or {"top1": 50.0, "top5": 90.0})
    results = evaluate_at_end(trainer, tmp_path / "run")
    assert len(passes) == 1  # the trained teacher only
    assert results == {"untrained": trainer.untrained_knn, "trained": {"top1": 50.0, "top5": 90.0}}
