"""A resume with another model, head, optimizer schedule or preset is refused before anything is written, naming
the settings that differ (one line, exit code 2); without the run's config.json, the checkpoint's own run.json
names them, and in a checkpoint of an older fastdino (without run.json) the tensor shapes catch it. The run's
config.json stays as it was, and the right command then resumes exactly like an uninterrupted run. Settings in
config.MAY_CHANGE_ON_RESUME may change."""
import pytest

from fastdino.engine import config as C

from test_resume import UNINTERRUPTED
from test_user_errors import _assert_one_line_error


def test_which_settings_may_change_on_resume():
    assert C.may_change_on_resume("max_steps") and C.may_change_on_resume("eval.knn_k")
    assert C.may_change_on_resume("data.num_workers") and C.may_change_on_resume("checkpoint.keep_last")
    for key in ("model.depth", "head.out_dim", "optim.base_lr", "data.batch_size", "epochs", "seed", "minutes",
                "data.num_workers_x", "evaluation"):
        assert not C.may_change_on_resume(key), key
    old = C.to_dict(C.preset("demo"))
    new = C.to_dict(C.apply_overrides(C.preset("demo"), overrides=["model.depth=6", "log_every=3"]))
    assert C.config_changes(old, new) == {"log_every": (old["log_every"], 3), "model.depth": (old["model"]["depth"], 6)}


def test_a_field_missing_from_an_older_config_json_counts_as_its_default():
    """A run started before optim.clip_grad_mode existed clipped globally (the default): resuming it with the
    default is no change, with the paper preset's per-tensor mode it is one."""
    old = C.to_dict(C.preset("demo"))
    del old["optim"]["clip_grad_mode"]
    assert C.config_changes(old, C.to_dict(C.preset("demo"))) == {}
    per_tensor = C.to_dict(C.apply_overrides(C.preset("demo"), overrides=["optim.clip_grad_mode=per_tensor"]))
    assert C.config_changes(old, per_tensor) == {"optim.clip_grad_mode": ("global", "per_tensor")}


@pytest.mark.slow
def test_a_changed_model_is_refused_before_anything_is_written(tmp_path, tiny_dataset, fastdino_here,
                                                                uninterrupted_run):
    from test_resume import assert_same_run

    args = ["--data", tiny_dataset, *UNINTERRUPTED]
    run = tmp_path / "run"
    assert fastdino_here("train", "--output", run, *args, "--max-steps", "2").returncode == 0
    stored = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".fastdino.lock"}

    for changes, named in [(["model.depth=3"], "model.depth 2 -> 3"),
                           (["head.out_dim=512", "optim.base_lr=1e-3"], "head.out_dim 256 -> 512, optim.base_lr"),
                           (["--preset", "small"], "cannot resume")]:
        _assert_one_line_error(fastdino_here("train", "--output", run, *args, "--max-steps", "4", *changes), named)
    config = (run / "config.json").read_bytes()
    (run / "config.json").unlink()  # the checkpoint's own run.json catches it
    _assert_one_line_error(fastdino_here("train", "--output", run, *args, "--max-steps", "4", "model.depth=3"),
                           "model.depth 2 -> 3", "step_00000002/run.json")
    # A checkpoint of an older fastdino (no run.json): the shapes still catch a deeper model.
    checkpoint = run / "checkpoints" / "step_00000002"
    identity, sums = (checkpoint / "run.json").read_bytes(), (checkpoint / "SHA256SUMS").read_text()
    (checkpoint / "run.json").unlink()
    (checkpoint / "SHA256SUMS").write_text("".join(line + "\n" for line in sums.splitlines()
                                                   if not line.endswith("  run.json")))
    deeper = fastdino_here("train", "--output", run, *args, "--max-steps", "4", "model.depth=3")
    assert deeper.returncode == 2 and "Traceback" not in deeper.stderr, deeper.stderr
    error = deeper.stderr.strip().splitlines()[-1]  # after the setup's log lines
    assert error.startswith("fastdino: error: cannot resume") and "student.backbone.blocks.2." in error, error
    (run / "config.json").write_bytes(config)
    (checkpoint / "run.json").write_bytes(identity)
    (checkpoint / "SHA256SUMS").write_text(sums)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*")
            if p.is_file() and p.name != ".fastdino.lock"} == stored

    # Settings that may change: no effect on the training itself.
    assert fastdino_here("train", "--output", run, *args, "eval.knn_k=5").returncode == 0
    assert_same_run(run, uninterrupted_run)
