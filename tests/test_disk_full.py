"""A full disk while writing a checkpoint: one line that says the disk is full and where (exit code 1), the previous
checkpoint intact and no partial one left; once space is freed, the same command resumes and ends exactly like an
uninterrupted run. The disk fills for real on a small tmpfs where this machine lets us mount one (root), and by a
simulated ENOSPC on the checkpoint's shard writes everywhere."""
import shutil
import subprocess
import textwrap

import pytest

from fastdino.engine.checkpoint import Checkpointer

from test_resume import UNINTERRUPTED

# Fails the fsync of every file of checkpoint step 4 with ENOSPC, as a full disk does, then runs the CLI.
SIMULATED_FULL_DISK = textwrap.dedent("""
    import errno, os, sys
    real_fsync = os.fsync
    def fsync(fd):
        if ".step_00000004.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    os.fsync = fsync
    from fastdino.engine.cli import main
    sys.exit(main())
""")


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    if not shutil.which("mount"):
        return False
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_full_disk_says_so_keeps_the_previous_checkpoint_and_resumes(tmp_path, tiny_dataset, disk, fastdino_here,
                                                                        uninterrupted_run):
    from test_cli import fastdino
    from test_resume import assert_same_run

    args = ["--data", tiny_dataset, *UNINTERRUPTED]
    disk_root = tmp_path / "disk"
    if disk == "tmpfs":
        # One 1.1 MB checkpoint and the run's small files fit; a second checkpoint does not.
        if not _mount_tmpfs(disk_root, "1700k"):
            pytest.skip("cannot mount a tmpfs here (needs root); the simulated case covers the code")
        launcher = ("-m", "fastdino.engine.cli")
    else:
        disk_root.mkdir()
        launcher = ("-c", SIMULATED_FULL_DISK)
    run = disk_root / "run"
    try:
        full = fastdino("train", "--output", run, *args, launcher=launcher)
        assert full.returncode == 1, full.stderr
        last_line = full.stderr.strip().splitlines()[-1]
        assert last_line.startswith("fastdino: error: disk full") and str(run) in last_line, full.stderr
        assert "step_00000002, is intact" in last_line and "Traceback" not in full.stderr
        checkpoints = Checkpointer(run / "checkpoints", keep_last=2)
        assert [p.name for p in checkpoints.checkpoints()] == ["step_00000002"]
        assert checkpoints.verify(checkpoints.latest()) is None
        assert not list((run / "checkpoints").glob(".*.tmp")), "the partial checkpoint should be gone"

        if disk == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk_root)], check=True)
        resumed = fastdino_here("train", "--output", run, *args)
        assert resumed.returncode == 0 and "resuming at step 2" in resumed.stderr, resumed.stderr
        assert_same_run(run, uninterrupted_run)
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(disk_root)], check=True)
