"""The run's identity travels with its checkpoints: every checkpoint holds the resolved config and the number of
processes that wrote it (run.json), and a resume is compared with them, so a checkpoints/ folder copied without
its config.json, a folder mixing two runs' checkpoints, or a torchrun launch with another number of processes is
refused in one line before anything is written (every rank alike, before any collective). A linear probe's
checkpoint holds the digest of the backbone's weights: a probe of another backbone is refused, never reported as
this one's. A plain rerun logs no changed setting."""
import shutil

import pytest
import torch

from fastdino.engine.backbone_io import RUN_FILE, save_backbone
from fastdino.engine.vit import build_backbone

from test_resume import UNINTERRUPTED
from test_user_errors import _assert_one_line_error


def _files(folder) -> dict:
    """Every file under `folder` and its bytes, but the lock file (which a refused run may create)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".fastdino.lock"}


@pytest.mark.slow
def test_copied_or_mixed_checkpoints_resume_only_with_their_own_settings(tmp_path, tiny_dataset, fastdino_here,
                                                                           uninterrupted_run):
    args = ["--data", tiny_dataset, *UNINTERRUPTED]
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted_run / "checkpoints", copy / "checkpoints")  # without config.json
    stored = _files(copy)
    refused = fastdino_here("train", "--output", copy, *args, "optim.base_lr=0.05")
    _assert_one_line_error(refused, "optim.base_lr 0.004 -> 0.05",
                           f"settings of {copy / 'checkpoints' / 'step_00000006' / 'run.json'}")
    assert _files(copy) == stored

    other = tmp_path / "other"  # another run's checkpoint mixed in
    assert fastdino_here("train", "--output", other, *args, "optim.base_lr=0.05", "--max-steps", "2").returncode == 0
    shutil.copytree(other / "checkpoints" / "step_00000002", copy / "checkpoints" / "step_00000002")
    stored = _files(copy)
    mixed = fastdino_here("train", "--output", copy, *args)
    _assert_one_line_error(mixed, "optim.base_lr 0.05 -> 0.004", "step_00000002")
    assert _files(copy) == stored

    shutil.rmtree(copy / "checkpoints" / "step_00000002")
    again = fastdino_here("train", "--output", copy, *args)  # its own settings: resumed at its end
    assert again.returncode == 0 and "resuming at step 6 of 16" in again.stderr, again.stderr
    assert "changed settings" not in again.stderr, again.stderr


@pytest.mark.slow
def test_a_plain_rerun_logs_no_changed_setting(tmp_path, fastdino_here):
    from test_cli import TINY_CLI
    from test_sources import jpeg_bytes

    data = tmp_path / "photos"  # no labels: the run turns its k-NN off, which is no change of the run's settings
    data.mkdir()
    for i in range(16):
        (data / f"{i}.jpg").write_bytes(jpeg_bytes(32, 40, i))
    args = ["train", "--output", tmp_path / "run", "--data", data, *TINY_CLI, "eval.at_end=true", "--max-steps", "2"]
    assert fastdino_here(*args).returncode == 0
    rerun = fastdino_here(*args)
    assert rerun.returncode == 0 and "resuming at step 2" in rerun.stderr, rerun.stderr
    assert "changed settings" not in rerun.stderr, rerun.stderr


@pytest.mark.slow
def test_torchrun_on_another_number_of_processes_is_refused_by_every_rank(tmp_path, tiny_dataset,
                                                                           uninterrupted_run):
    from test_cli import fastdino

    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    stored = _files(run)
    proc = fastdino("--standalone", "--nproc_per_node=2", "-m", "fastdino", "train", "--output", run, "--data",
                    tiny_dataset, *UNINTERRUPTED, "--max-steps", "8", launcher=("-m", "fastdino.torchrun"))
    assert proc.returncode == 2, proc.stderr
    refusals = {line for line in proc.stderr.splitlines() if line.startswith("fastdino: error: cannot resume")}
    assert refusals == {f"fastdino: error: cannot resume {run} on 2 process(es): "
                        f"{run / 'checkpoints' / 'step_00000006' / 'run.json'} was written by 1 (each process "
                        f"resumes its own data loader position); relaunch with 1, or train into a new --output"}
    assert "2 rank(s) exited non-zero" in proc.stderr  # both refused: none went on to a collective
    assert "Traceback" not in proc.stderr, proc.stderr
    assert _files(run) == stored


def _backbone_dir(folder, seed):
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", 16, img_size=32, embed_dim=32, depth=1, num_heads=2)
    folder.mkdir()
    save_backbone(model.state_dict(), folder / RUN_FILE, arch="vit_tiny", patch_size=16, img_size=32,
                  extra={"model": {"num_heads": 2}})
    return folder


def test_a_linear_probe_of_another_backbone_is_refused(tmp_path, tiny_dataset, fastdino_here):
    first, second = _backbone_dir(tmp_path / "a", seed=0), _backbone_dir(tmp_path / "b", seed=1)
    out = tmp_path / "probe"
    args = ["--data", tiny_dataset, "--output", out, "--epochs", "2", "--batch-size", "16", "--num-workers", "0"]
    done = fastdino_here("linear", "--checkpoint", first, *args)
    assert done.returncode == 0 and "after 2 epochs" in done.stdout, done.stderr
    stored = _files(out)
    other = fastdino_here("linear", "--checkpoint", second, *args)
    _assert_one_line_error(other, f"{out / 'linear_checkpoint.pth'} is the probe of other features",
                           "weights digest")
    assert _files(out) == stored
    again = fastdino_here("linear", "--checkpoint", first, *args)  # the same backbone: its finished probe
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr
