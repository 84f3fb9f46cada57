"""Ctrl-C (SIGINT) and SIGTERM finish the current step, write a checkpoint, say so in one line and exit with 130 /
143; the run then resumes exactly like an uninterrupted one. A second Ctrl-C aborts at once. Under torchrun, a
signal that reaches one rank stops every rank after the same step, and `python -m fastdino.torchrun` exits 143.
The signals are sent by the training process to itself from inside a chosen step, so the step they land in is
known."""
import textwrap

import pytest

from fastdino.engine.checkpoint import Checkpointer

from test_resume import UNINTERRUPTED

# `fastdino train` whose rank FAULT_RANK sends itself the signals FAULT_SIGNALS at the start of step FAULT_STEP.
INJECTOR = textwrap.dedent("""
    import os, signal, sys
    from fastdino.engine.train import Trainer
    signals = [getattr(signal, name) for name in os.environ["FAULT_SIGNALS"].split(",")]
    real_train_step = Trainer.train_step
    def train_step(self, crops):
        if self.step == int(os.environ["FAULT_STEP"]) and self.rank == int(os.environ.get("FAULT_RANK", 0)):
            for signum in signals:
                os.kill(os.getpid(), signum)
        real_train_step(self, crops)
    Trainer.train_step = train_step
    from fastdino.engine.cli import main
    sys.exit(main())
""")
# Checkpoints only at epoch ends (8 steps) and at the stop: the checkpoint of an early stop is the signal's doing.
ARGS = ["eval.at_end=false", "checkpoint.every_steps=0"]


def _injector(tmp_path):
    script = tmp_path / "inject.py"
    script.write_text(INJECTOR)
    return script


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, tiny_dataset, signal_name, code,
                                                                  fastdino_here, uninterrupted_run):
    from test_cli import fastdino
    from test_resume import assert_same_run

    args = ["--data", tiny_dataset, *UNINTERRUPTED, *ARGS]
    run = tmp_path / "run"
    stopped = fastdino("train", "--output", run, *args, launcher=(_injector(tmp_path),),
                       env={"FAULT_SIGNALS": signal_name, "FAULT_STEP": "2"})
    assert stopped.returncode == code, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"fastdino: stopped by {signal_name} after step 3; checkpoint {run / 'checkpoints' / 'step_00000003'} "
        f"written; rerun the same command to resume")
    assert Checkpointer(run / "checkpoints", keep_last=2).latest().name == "step_00000003"

    resumed = fastdino_here("train", "--output", run, *args)
    assert resumed.returncode == 0 and "resuming at step 3" in resumed.stderr, resumed.stderr
    assert_same_run(run, uninterrupted_run)  # whose checkpoints were every 2 steps: that changes nothing


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(tmp_path, tiny_dataset):
    from test_cli import TINY_CLI, fastdino

    run = tmp_path / "run"
    proc = fastdino("train", "--output", run, "--data", tiny_dataset, *TINY_CLI, *ARGS, "--max-steps", "6",
                    launcher=(_injector(tmp_path),), env={"FAULT_SIGNALS": "SIGINT,SIGINT", "FAULT_STEP": "2"})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fastdino: aborted by a second Ctrl-C")
    assert "Traceback" not in proc.stderr and Checkpointer(run / "checkpoints", keep_last=2).latest() is None


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, tiny_dataset):
    from test_cli import TINY_CLI, fastdino

    run = tmp_path / "run"
    proc = fastdino("--standalone", "--nproc_per_node=2", _injector(tmp_path), "train", "--output", run, "--data",
                    tiny_dataset, *TINY_CLI, *ARGS, "--max-steps", "6", launcher=("-m", "fastdino.torchrun"),
                    env={"FAULT_SIGNALS": "SIGTERM", "FAULT_STEP": "2", "FAULT_RANK": "1"})
    # Rank 1 got the signal at step 3; the ranks compare flags at log steps (log_every=2), so both stop after 4.
    assert f"fastdino: stopped by SIGTERM after step 4; checkpoint {run / 'checkpoints' / 'step_00000004'}" \
        in proc.stderr, proc.stderr
    assert Checkpointer(run / "checkpoints", keep_last=2).latest().name == "step_00000004"
    # torchrun would exit 1 (a rank's 143 is a failure to it, and it may stop the other rank in its teardown,
    # after the checkpoint); fastdino.torchrun exits with the code of the rank that ended first.
    assert proc.returncode == 143, proc.stderr
