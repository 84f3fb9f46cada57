"""One writer per run folder: `fastdino train` and `fastdino linear` hold an fcntl lock on OUTPUT/.fastdino.lock
for the whole run, and a second process on the same folder is refused in one line naming the holder's PID (exit
code 2, nothing written), under torchrun too (rank 0 takes the lock, every rank learns the outcome before any
other collective). The OS drops the lock when its holder dies, so a killed run never blocks the next one."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from test_resume import UNINTERRUPTED
from test_user_errors import _assert_one_line_error

# `fastdino train ARGS` that prints "paused" at the start of step 1 and waits until its stdin closes.
PAUSED_TRAIN = textwrap.dedent("""
    import sys
    from fastdino.engine.train import Trainer
    real_train_step = Trainer.train_step
    def train_step(self, crops):
        if self.step == 1:
            print("paused", flush=True)
            sys.stdin.read()
        real_train_step(self, crops)
    Trainer.train_step = train_step
    from fastdino.engine.cli import main
    sys.exit(main())
""")
# Holds the lock of the folder argv[1] until its stdin closes.
LOCK_HOLDER = textwrap.dedent("""
    import sys
    from fastdino.files import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()
""")


def _start(*command):
    proc = subprocess.Popen([sys.executable, *map(str, command)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = proc.stdout.readline()
    if first.strip() not in ("paused", "locked"):
        proc.kill()  # its stderr ends only with it
        pytest.fail(first + proc.communicate()[1])
    return proc


@pytest.mark.slow
def test_a_second_run_on_a_busy_output_is_refused_and_a_killed_holder_does_not_block(
        tmp_path, tiny_dataset, fastdino_here, uninterrupted_run):
    from test_resume import assert_same_run

    args = ["--data", tiny_dataset, *UNINTERRUPTED]
    run = tmp_path / "run"
    holder = _start("-c", PAUSED_TRAIN, "train", "--output", run, *args)
    try:
        second = fastdino_here("train", "--output", run, *args, "optim.base_lr=0.05")
        _assert_one_line_error(second, f"{run} is in use by another fastdino process (PID {holder.pid} on ")
        assert not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert fastdino_here("train", "--output", run, *args).returncode == 0  # the dead holder's lock is gone
    assert_same_run(run, uninterrupted_run)


def test_a_linear_probe_into_a_busy_folder_is_refused_before_any_work(tmp_path, tiny_dataset, fastdino_here,
                                                                      uninterrupted_run):
    out = tmp_path / "linear"
    out.mkdir()
    holder = _start("-c", LOCK_HOLDER, out)
    try:
        proc = fastdino_here("linear", "--checkpoint", uninterrupted_run, "--data", tiny_dataset, "--output", out,
                             "--epochs", "1")
        _assert_one_line_error(proc, f"{out} is in use by another fastdino process (PID {holder.pid} on ")
        assert sorted(p.name for p in out.iterdir()) == [".fastdino.lock"]
    finally:
        holder.stdin.close()
        holder.wait()


@pytest.mark.slow
def test_under_torchrun_every_rank_is_refused_before_any_collective(tmp_path, tiny_dataset):
    from test_cli import TINY_CLI, fastdino

    run = tmp_path / "run"
    run.mkdir()
    holder = _start("-c", LOCK_HOLDER, run)
    try:
        proc = fastdino("--standalone", "--nproc_per_node=2", "-m", "fastdino", "train", "--output", run, "--data",
                        tiny_dataset, *TINY_CLI, launcher=("-m", "fastdino.torchrun"))
    finally:
        holder.stdin.close()
        holder.wait()
    assert proc.returncode == 2, proc.stderr  # the ranks' code, not torchrun's 1
    refusals = [line for line in proc.stderr.splitlines() if "is in use by another fastdino process" in line]
    assert len(refusals) == 1 and f"(PID {holder.pid} on " in refusals[0], proc.stderr  # said once, by rank 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".fastdino.lock"]
