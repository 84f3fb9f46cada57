"""Schedules against facebookresearch/dino's numpy `cosine_scheduler`, and values at known steps."""
import math

import numpy as np
import pytest

from fastdino.engine import config as C
from fastdino.engine.schedules import Schedules, cosine, linear_warmup
from fastdino.official_dino import DINOLoss as OfficialDINOLoss
from fastdino.official_dino import cosine_scheduler as official_cosine_scheduler


def _cfg(**optim):
    cfg = C.vit_small16_imagenet()
    return C.apply_overrides(cfg, overrides=[f"optim.{k}={v}" for k, v in optim.items()] + ["epochs=12"])


def test_matches_the_official_schedules_at_every_step():
    cfg, steps_per_epoch = _cfg(warmup_epochs=3), 7
    sched = Schedules.from_config(cfg, steps_per_epoch)
    peak = cfg.optim.base_lr * cfg.data.batch_size / 256
    lr = official_cosine_scheduler(peak, cfg.optim.min_lr, 12, steps_per_epoch, 3)
    wd = official_cosine_scheduler(0.04, 0.4, 12, steps_per_epoch)
    momentum = official_cosine_scheduler(0.996, 1.0, 12, steps_per_epoch)
    values = [sched.at(step) for step in range(12 * steps_per_epoch)]
    np.testing.assert_allclose([v.lr for v in values], lr, rtol=1e-12)
    np.testing.assert_allclose([v.weight_decay for v in values], wd, rtol=1e-12)
    np.testing.assert_allclose([v.teacher_momentum for v in values], momentum, rtol=1e-12)


def test_values_at_known_steps():
    cfg, steps_per_epoch = _cfg(warmup_epochs=2, freeze_last_layer_epochs=1), 10
    sched = Schedules.from_config(cfg, steps_per_epoch)  # 120 steps, 20 of warmup, teacher temp over 30 epochs
    peak = 5e-4 * 1024 / 256
    assert sched.total_steps == 120 and sched.peak_lr == peak
    assert sched.at(0).lr == 0.0 and sched.at(19).lr == peak and sched.at(20).lr == peak
    assert sched.at(10).lr == pytest.approx(peak * 10 / 19)
    assert sched.at(70).lr == pytest.approx((peak + cfg.optim.min_lr) / 2)  # half way through the cosine
    assert sched.at(0).weight_decay == pytest.approx(0.04) and sched.at(60).weight_decay == pytest.approx(0.22)
    assert sched.at(0).teacher_momentum == pytest.approx(0.996) and sched.at(120).teacher_momentum == 1.0
    # The teacher temperature warmup (30 epochs) is longer than this run: it is clipped to the run's length.
    assert sched.at(0).teacher_temp == 0.04 and sched.at(119).teacher_temp == 0.07
    assert [sched.at(s).freeze_last_layer for s in (0, 9, 10)] == [True, True, False]


def test_teacher_temperature_rises_linearly_then_stays():
    cfg = C.apply_overrides(C.demo(), overrides=["loss.warmup_teacher_temp_epochs=1", "loss.teacher_temp=0.07",
                                                 "epochs=5"])
    sched = Schedules.from_config(cfg, steps_per_epoch=11)
    temps = [sched.at(s).teacher_temp for s in range(30)]
    np.testing.assert_allclose(temps[:11], np.linspace(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, 11),
                               rtol=1e-12)
    assert set(temps[11:]) == {cfg.loss.teacher_temp}


@pytest.mark.parametrize("warmup_epochs", [0, 1, 4])
def test_per_epoch_teacher_temperature_is_the_official_one(warmup_epochs):
    """The paper preset's teacher temperature (per_epoch) is the official DINOLoss's teacher_temp_schedule[epoch]
    at every step (DINOLoss.forward(..., epoch) reads the same function: test_loss_module.py)."""
    cfg = C.apply_overrides(C.vit_small16_imagenet(), overrides=[
        f"loss.warmup_teacher_temp_epochs={warmup_epochs}", "epochs=7"])
    assert cfg.loss.teacher_temp_schedule == "per_epoch"
    steps_per_epoch = 3
    sched = Schedules.from_config(cfg, steps_per_epoch)
    official = OfficialDINOLoss(16, 2, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, warmup_epochs, 7)
    expected = np.repeat(official.teacher_temp_schedule, steps_per_epoch)
    np.testing.assert_allclose([sched.at(s).teacher_temp for s in range(7 * steps_per_epoch)], expected, rtol=1e-12)


def test_explicit_total_steps_stretches_the_schedules():
    cfg = _cfg(warmup_epochs=1)
    sched = Schedules.from_config(cfg, steps_per_epoch=10, total_steps=1000)  # e.g. from a time budget
    assert sched.total_steps == 1000 and sched.warmup_steps == 10
    assert sched.at(505).lr == pytest.approx((sched.peak_lr + sched.min_lr) / 2)


def test_a_warmup_longer_than_the_whole_run_keeps_its_share_of_the_epochs_with_a_warning(caplog):
    cfg = _cfg(warmup_epochs=3, freeze_last_layer_epochs=1)  # 12 epochs: lr warmup 1/4, teacher temp 30/12 of them
    sched = Schedules.from_config(cfg, steps_per_epoch=10, total_steps=20)  # a budget of 2 epochs
    assert sched.warmup_steps == 5 and sched.teacher_temp_warmup_steps == 20 and sched.freeze_last_layer_steps == 10
    assert ("optim.warmup_epochs=3 (30 steps) is longer than the whole run of 20 steps: scaled down to 5 steps, its "
            "share of the configured 12 epochs") in caplog.text
    assert "loss.warmup_teacher_temp_epochs=30" in caplog.text and "freeze_last_layer" not in caplog.text
    # The paper preset's per-epoch temperature: its warmup, scaled to the 2 epochs, moves once, at the epoch start.
    assert [sched.at(s).teacher_temp for s in (0, 9, 10, 19)] == [0.04, 0.04, 0.07, 0.07]


def test_helpers_edge_cases():
    assert linear_warmup(0.0, 1.0, 0, 0) == 1.0 and linear_warmup(0.0, 1.0, 5, 1) == 1.0
    # np.linspace(0, 1, 1) == [0]: a one-step warmup starts at `start` (cosine_scheduler's lr at step 0 is 0)
    assert linear_warmup(0.0, 1.0, 0, 1) == 0.0 and linear_warmup(0.0, 1.0, 1, 1) == 1.0
    assert cosine(1.0, 0.0, 0, 10) == 1.0 and cosine(1.0, 0.0, 10, 10) == 0.0 and cosine(1.0, 0.0, 99, 10) == 0.0
    assert cosine(2.0, 0.0, 5, 10) == pytest.approx(1.0) and not math.isnan(cosine(1.0, 0.0, 0, 0))
    with pytest.raises(ValueError, match="steps_per_epoch must be > 0"):
        Schedules.from_config(C.demo(), steps_per_epoch=0)
