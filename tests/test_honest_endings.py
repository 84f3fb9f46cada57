"""Honest endings: a run whose last steps were non-finite (fewer in a row than max_nonfinite_in_a_row, so it was
not stopped) says so first in its end-of-run statement, warns on stderr and exits 3; settings that cannot work
together are refused by the config, in one line naming both fields; out-of-range and non-finite numbers name the
field."""
import math

import pytest

from fastdino.engine import config as C
from fastdino.engine.metrics import end_of_run_statement, nonfinite_at_end
from fastdino.engine.vit import build_backbone

from test_resume import UNINTERRUPTED


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["optim.base_lr=1e30", "optim.weight_decay=1e30", "loss.student_temp=1e-30"])
def test_a_run_whose_last_steps_were_non_finite_says_so_and_exits_3(tmp_path, tiny_dataset, fastdino_here, cause):
    proc = fastdino_here("train", "--output", tmp_path / "run", "--data", tiny_dataset, *UNINTERRUPTED, cause,
                         "max_nonfinite_in_a_row=10")
    assert proc.returncode == 3, proc.stderr
    statement = proc.stdout[proc.stdout.index("end of run at step 6 of 16:"):].splitlines()
    assert statement[1].startswith("  the run ended non-finite: the last "), proc.stdout
    tail = int(statement[1].split("the last ")[1].split()[0])
    assert f"step(s), {7 - tail} to 6, had a non-finite loss or gradient and were skipped" in statement[1]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fastdino: warning: the last {tail} step(s) had a non-finite loss or gradient (the weights stopped changing "
        f"at step {6 - tail}); exit code 3")


def _row(step, loss, skipped=0, in_a_row=0):
    return {"step": step, "loss": loss, "teacher_entropy": 2.0, "skipped_steps": skipped,
            "nonfinite_in_a_row": in_a_row}


def test_only_a_non_finite_end_is_called_one():
    recovered = [_row(2, 5.0), _row(4, math.nan, skipped=2, in_a_row=2), _row(6, 4.0, skipped=1)]
    assert nonfinite_at_end(recovered) == 0
    assert not any("non-finite" in line for line in end_of_run_statement(recovered, 256))
    ended = [_row(2, 5.0), _row(4, 4.5, skipped=1, in_a_row=1)]  # the last step of a finite-looking window
    assert nonfinite_at_end(ended) == 1
    assert end_of_run_statement(ended, 256)[0].startswith("the run ended non-finite: the last 1 step(s), 4 to 4,")
    older = [_row(2, 5.0), {"step": 4, "loss": math.nan, "teacher_entropy": math.nan, "skipped_steps": 2}]
    assert nonfinite_at_end(older) == 2  # rows written before nonfinite_in_a_row existed


@pytest.mark.parametrize("overrides, message", [
    (["data.global_crops_size=30"], "data.global_crops_size (30) must be a multiple of model.patch_size (8)"),
    (["data.local_crops_size=20"], "data.local_crops_size (20) must be a multiple of model.patch_size (8)"),
    (["data.local_crops_size=4"], "data.local_crops_size (4) must be a multiple of model.patch_size (8)"),
    (["model.patch_size=32", "model.img_size=32"], "data.local_crops_size (16) must be a multiple of "
                                                   "model.patch_size (32)"),
    (["seed=-1"], "seed must be in [0, 2**32), got -1"),
    ([f"seed={2**32}"], f"seed must be in [0, 2**32), got {2**32}"),
    (["optim.base_lr=inf"], "optim.base_lr must be a finite number, got inf"),
    (["optim.base_lr=.nan"], "optim.base_lr must be a finite number, got nan"),
    (["optim.min_lr=0.1"], "optim.min_lr (0.1) must be in [0, optim.base_lr (0.004)]"),
    (["model.depth=0"], "model.depth must be > 0 or null, got 0"),
    (["model.patch_size=0"], "model.patch_size must be > 0, got 0"),
])
def test_settings_that_cannot_work_are_refused_naming_the_fields(overrides, message):
    with pytest.raises(ValueError) as error:
        C.apply_overrides(C.preset("demo"), overrides=overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_crop_sizes_without_local_crops_need_no_local_multiple():
    cfg = C.apply_overrides(C.preset("demo"), overrides=["data.local_crops_number=0", "data.local_crops_size=20"])
    assert cfg.data.local_crops_size == 20


@pytest.mark.parametrize("argument, value", [("depth", 0), ("patch_size", 0), ("embed_dim", -8), ("num_heads", 2.5),
                                             ("img_size", None), ("depth", True)])
def test_build_backbone_refuses_sizes_that_are_not_positive_ints(argument, value):
    with pytest.raises(ValueError, match=f"build_backbone: {argument} must be a positive int"):
        build_backbone("vit_tiny", **{"patch_size": 16, argument: value})
