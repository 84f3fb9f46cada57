"""What an interrupted or repeated run leaves behind: a kill while the weights file is written leaves a temporary
file that the next run removes; rerunning a finished run does not repeat its k-NN row in metrics.jsonl; the weights
file follows the umask (0644 under umask 022, not safetensors' 0600)."""
import json
import os
import stat
import textwrap

import pytest

from test_resume import main_here

# Dies by SIGKILL right after the first weights file is written, before its rename.
KILLED_AT_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from fastdino.engine import backbone_io
    real_save_file = backbone_io.save_file
    def save_file(*args, **kwargs):
        real_save_file(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    backbone_io.save_file = save_file
    from fastdino.engine.cli import main
    sys.exit(main())
""")
TIME_KEYS = {"img_per_s", "eta_s", "max_memory_gib", "minutes"}


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_during_the_weights_write_then_reruns_leave_nothing_behind(tmp_path, tiny_dataset):
    from test_cli import TINY_CLI, fastdino

    args = ["--data", tiny_dataset, *TINY_CLI, "epochs=1", "eval.at_end=true"]
    run, whole = tmp_path / "run", tmp_path / "whole"
    killed = fastdino("train", "--output", run, *args, launcher=("-c", KILLED_AT_EXPORT))
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in run.glob(".teacher_backbone.safetensors.tmp*")], "the kill should leave a tmp file"

    old_umask = os.umask(0o022)
    try:
        for _ in range(2):  # resume and finish, then run the finished run once more
            assert main_here("train", "--output", run, *args) == 0
        assert main_here("train", "--output", whole, *args) == 0
    finally:
        os.umask(old_umask)
    assert not list(run.glob(".*.tmp*")), sorted(p.name for p in run.iterdir())
    assert _rows(run) == _rows(whole) and sum("knn_top1" in row for row in _rows(run)) == 1
    assert stat.S_IMODE((run / "teacher_backbone.safetensors").stat().st_mode) == 0o644
