"""`fastdino train`: config errors are one line with exit code 2, the option list is frozen, a tiny run goes end to
end (training, checkpoint, export, k-NN against the untrained network, attention PNG), unlabeled data trains, and
torchrun launches it across two simulated nodes."""
import json
import os
import subprocess
import sys

import pytest

from _helpers import help_without_torch
from fastdino.engine.cli import EVAL_COMMANDS, build_parser

# The tiny model of test_train.py, as command-line overrides, on a tiny dataset read in the main process.
TINY_CLI = ["model.patch_size=4", "model.img_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
            "model.drop_path_rate=0.1", "head.out_dim=256", "head.hidden_dim=64", "head.bottleneck_dim=32",
            "loss.impl=torch", "data.batch_size=4", "data.global_crops_size=16", "data.local_crops_number=2",
            "data.local_crops_size=8", "data.backend=torchvision", "data.num_workers=0", "epochs=2",
            "optim.warmup_epochs=1", "log_every=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "eval.batch_size=16"]


def fastdino(*args, env=None, launcher=("-m", "fastdino.engine.cli")):
    return subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def test_the_train_options_are_frozen():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {opt for action in train._actions for opt in action.option_strings}
    assert options == {"-h", "--help", "--output", "--max-steps", "--minutes", "--data", "--preset", "--config",
                       "--init"}
    assert set(build_parser()._subparsers._group_actions[0].choices) == {"train", "estimate", *EVAL_COMMANDS}


@pytest.mark.parametrize("args, message", [
    (["optim.lr=1"], "fastdino: error: unknown config key 'optim.lr'"),
    (["optim.base_lr=-1"], "fastdino: error: optim.base_lr must be > 0, got -1.0"),
    (["--preset", "huge"], "fastdino: error: unknown preset 'huge'"),
    (["--max-steps", "0"], "fastdino: error: max_steps must be > 0 or null, got 0"),
    (["--max-steps", "ten"], "fastdino train: error: argument --max-steps: invalid int value: 'ten'"),
    (["--minutes", "0"], "fastdino: error: minutes must be > 0 or null, got 0.0"),
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
    (["--max-steps", "1", "optim.lr=1"], "fastdino: error: unknown config key 'optim.lr'"),  # override after option
    (["optim.base_lr=1", "--max-steps", "1", "stray"], "fastdino: error: unrecognized arguments: stray"),
])
def test_config_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    proc = fastdino("train", "--output", tmp_path / "run", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("launcher", [("-m", "fastdino"), ("-m", "fastdino.engine.train")])
def test_the_module_launch_lines_run_the_train_command(tmp_path, launcher):
    """`python -m fastdino ARGS` and the older `-m fastdino.engine.train ARGS` (train implied) are `fastdino ARGS`."""
    args = ["--output", tmp_path / "run", "optim.lr=1"]
    proc = fastdino(*(["train", *args] if launcher == ("-m", "fastdino") else args), launcher=launcher)
    assert proc.returncode == 2 and "unknown config key 'optim.lr'" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    proc = fastdino("train", "--output", run, "--data", tiny_dataset, *TINY_CLI, "epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "step 8/8 | epoch 1.00 |" in proc.stderr  # progress lines (32 images / batch 4 = 8 steps)
    assert "k-NN top-1" in proc.stdout and "untrained" in proc.stdout and "attention maps" in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 8] and "knn_top1" in rows[-1] and "knn_top1_untrained" in rows[-1]
    for key in ("epoch", "loss", "lr", "wd", "teacher_momentum", "teacher_temp", "teacher_entropy", "img_per_s",
                "max_memory_gib"):
        assert key in rows[0]
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(tiny_dataset)
    assert (run / "attention.png").stat().st_size > 0 and (run / "teacher_backbone.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


@pytest.mark.slow
def test_unlabeled_flat_folder_trains_logs_the_last_step_and_says_why_knn_is_skipped(tmp_path):
    from test_sources import jpeg_bytes

    data = tmp_path / "photos"
    (data / "more").mkdir(parents=True)
    for i in range(16):
        (data / ("more" if i % 3 else "") / f"{i}.jpg").write_bytes(jpeg_bytes(32, 40, i))
    run = tmp_path / "run"
    # 4 steps per epoch. The demo preset evaluates at the end; stopping at step 6 with log_every=10 still logs
    # step 6; checkpoints come every 5 steps and at the stop, not at the epoch end (step 4).
    proc = fastdino("train", "--output", run, "--data", data, *TINY_CLI, "--max-steps", "6", "log_every=10",
                    "eval.at_end=true", "checkpoint.every_steps=5", "checkpoint.keep_last=5")
    assert proc.returncode == 0, proc.stderr
    assert "kept 16 images (no labels)" in proc.stderr and "step 6/8 |" in proc.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005", "step_00000006"]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("k-NN evaluation skipped")]
    assert len(skipped) == 1 and "has no labelled val split" in skipped[0] and "DATA/val/CLASS" in skipped[0]


def test_help_names_every_command_and_the_default_preset_without_importing_torch():
    stdout = help_without_torch("--help")
    for name, text in EVAL_COMMANDS.items():
        assert name in stdout and text.replace("%%", "%")[:30] in " ".join(stdout.split())
    assert "default preset, demo" in " ".join(stdout.split())
    train_help = " ".join(fastdino("train", "--help").stdout.split())
    assert "(default: demo)" in train_help and "labels not needed" in train_help


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_rendezvous_through_c10d(tmp_path, tiny_dataset):
    """The README's multi-node launch, simulated on one machine: two torchrun agents (one per "node", one
    process each) meet at a c10d rendezvous endpoint and train one run on gloo. (`--standalone` is the same c10d
    rendezvous with one node, so this covers the single-node launch too.)"""
    run = tmp_path / "run"
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            "--rdzv-id=test"]
    command = [sys.executable, "-m", "torch.distributed.run", *rdzv, "-m", "fastdino", "train", "--output",
               str(run), "--data", str(tiny_dataset), *TINY_CLI, "--max-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2]
    checkpoint = run / "checkpoints" / "step_00000002"
    assert (checkpoint / ".metadata").is_file()
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote
