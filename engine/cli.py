"""`fastdino` on the command line: `train` runs here, knn / linear / attention / export / plot go to eval_cli,
`estimate` (the step model) to estimate_cli.

    fastdino train --output DIR [--max-steps N] [--minutes M] [--data PATH] [--preset P] [--config FILE.yaml]
                   [key=value ...]
    torchrun --nproc_per_node=N -m fastdino train ...   (the same arguments)

The config is the preset, then the YAML file, then `--data` / `--max-steps` / `--minutes`, then the
`section.key=value` overrides (config.py). A bad value or unknown key is one line on stderr and exit code 2.
Running the same command again with a larger --max-steps resumes from DIR's latest intact checkpoint; a --minutes
run resumes with the step count it measured when it started. A resume that changes a setting outside
config.MAY_CHANGE_ON_RESUME (or on another number of processes) is refused before anything is written: each
checkpoint carries the run's config (checkpoint.py: run.json). The run holds OUTPUT/.fastdino.lock (one writer
per folder) and checks every path it will write before the first step. Ctrl-C and SIGTERM stop after the current
step with a checkpoint (stop.py); a full disk, a write that fails mid-run and a dataset gone mid-run are one line
(exit code 1, after a checkpoint of the steps trained where one process runs); a run whose last steps were
non-finite exits 3. Without --data, the built-in shapes dataset is generated once into the cache folder, and (the
demo preset) the run ends with the k-NN accuracy of the trained teacher next to the untrained network's and an
attention-map PNG. Every run ends with a few plain sentences on how training went (collapse, loss trend, k-NN
curve).

This module starts and stops torch.distributed for a run (command_line.py: from torchrun's environment, gloo on the
CPU, NCCL on CUDA), and, as a command-line front end, it prints the final results.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fastdino.engine import config as C
from fastdino.engine.command_line import (
    EVAL_COMMANDS,
    EXIT_USAGE,
    HelpFormatter,
    Parser,
    init_distributed,
    output_lock,
    process_device,
)
from fastdino.files import FolderLockError, atomic_write

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    from fastdino.engine.stop import StopRequest

logger = logging.getLogger(__name__)

EXIT_DIVERGED = 1
EXIT_DISK_FULL = 1
EXIT_DATA_UNREADABLE = 1
EXIT_WRITE_FAILED = 1
EXIT_NONFINITE_END = 3  # trained to the end, but the last steps were skipped as non-finite


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdino", description="Fast DINO pretraining for vision transformers. "
                     "`fastdino train --output DIR` trains the default preset, demo (a tiny ViT on built-in shapes, a "
                     "few CPU minutes), and evaluates it.",
                     epilog="`fastdino COMMAND --help` describes a command's options and their defaults.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    train = sub.add_parser("train", help="pretrain a ViT with DINO (resumes from --output)",
                           formatter_class=HelpFormatter)
    train.add_argument("--output", required=True, help="run directory (checkpoints, metrics.jsonl, weights)")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many steps; the schedules still span the config's epochs")
    train.add_argument("--minutes", type=float, default=None,
                       help="time budget instead of the config's epochs: the schedules span the steps that fit "
                            "(measured at the start)")
    train.add_argument("--data", default=None,
                       help="images, labels not needed: a folder (searched at any depth), tar shards (.tar, "
                            ".tar.gz, WebDataset) or a file list (.txt); with labelled train/ and val/ splits the "
                            "run also evaluates k-NN. default: the built-in shapes dataset")
    train.add_argument("--preset", default="demo", help=f"named config: {', '.join(sorted(C.PRESETS))}")
    train.add_argument("--init", default=None, metavar="PATH",
                       help="start student and teacher from these backbone weights (continued pretraining): a timm "
                            "or Meta DINOv2 / DINOv3 checkpoint, .safetensors or .pth, an official DINO one or a "
                            "fastdino run; the architecture is the checkpoint's (presets dinov2_vit_small14_adapt, "
                            "dinov3_vit_small16_adapt hold an adaptation schedule)")
    train.add_argument("--config", default=None, help="YAML file with sections of the config tree")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.base_lr=1e-3")
    for name, text in EVAL_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("estimate", help="peak memory, FLOPs and a roofline step time of a config, fastdino and the "
                   "official step, without a GPU", add_help=False)
    return parser


def build_config(args: argparse.Namespace) -> C.TrainConfig:
    """Preset, YAML file, --data / --max-steps / --minutes, then overrides; ValueError on anything invalid."""
    file_values = C.load_yaml(args.config) if args.config else None
    flags = [f"data.path={json.dumps(args.data)}"] if args.data is not None else []
    flags += [f"max_steps={args.max_steps}"] if args.max_steps is not None else []
    flags += [f"minutes={args.minutes}"] if args.minutes is not None else []
    if args.init is not None:  # the checkpoint's architecture, before the command line's overrides
        from fastdino.engine.model import init_settings

        if not Path(args.init).exists():
            raise ValueError(f"--init {args.init}: no such file or folder")
        settings = {**init_settings(args.init), "init": str(Path(args.init).resolve())}
        flags += [f"model.{key}={json.dumps(value)}" for key, value in settings.items()]
    return C.apply_overrides(C.preset(args.preset), file_values=file_values, overrides=flags + list(args.overrides))


def init_logging(rank: int) -> None:
    """Rank 0 logs info, the others warnings only (torchtitan tools/logging.py)."""
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr, force=True,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EVAL_COMMANDS:
        from fastdino.engine.eval_cli import main as eval_main

        return eval_main(argv)
    if argv and argv[0] == "estimate":
        from fastdino.engine.estimate_cli import main as estimate_main

        return estimate_main(argv[1:])
    parser = build_parser()
    # Overrides may come after options too (`... --minutes 4 optim.base_lr=1e-3`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    try:
        cfg = build_config(args)
        check_output(Path(args.output))
    except ValueError as error:
        sys.stderr.write(f"fastdino: error: {error}\n")
        return EXIT_USAGE
    import torch.distributed as dist

    from fastdino.engine.checkpoint import is_disk_full
    from fastdino.engine.stop import StopRequest

    device = process_device()
    mesh = init_distributed(device)
    rank = mesh.get_rank() if mesh is not None else 0
    try:
        init_logging(rank)
        stop = StopRequest()
        try:
            with output_lock(Path(args.output)), stop.handling():
                code = run_train(cfg, Path(args.output), device=device, mesh=mesh, stop=stop)
        except FolderLockError as error:  # the folder is another process's
            if rank == 0:
                sys.stderr.write(f"fastdino: error: {error}\n")
            return EXIT_USAGE
        except Exception as error:
            if not is_disk_full(error, Path(args.output)):
                raise
            sys.stderr.write(f"fastdino: error: {disk_full_message(error, Path(args.output))}\n")
            return EXIT_DISK_FULL
        if dist.is_initialized() and (code == 0 or stop.signum is not None):
            # Leave together: a rank that tears gloo down while its peer still writes (rank 0 prints and writes
            # files after the last collective) can be aborted by gloo ("terminate called without an active
            # exception").
            dist.barrier()
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_output(output: Path) -> None:
    """ValueError unless `output` is (or can be made) a folder this process can write in: said before any setup."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder (it is created if missing)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write_test.tmp{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to --output {output}: {error.strerror}") from None


def disk_full_message(error: Exception, output: Path) -> str:
    """One line: the disk is full, where, what is intact, and how to go on."""
    from fastdino.engine.checkpoint import DiskFullError

    what = error.strerror if isinstance(error, DiskFullError) else (
        f"disk full: no space left on the filesystem of {output} ({str(error).splitlines()[0]})")
    return f"{what}; free some space and rerun the same command to resume"


def run_train(cfg: C.TrainConfig, output: Path, *, device: torch.device, mesh: DeviceMesh | None,
              stop: StopRequest | None = None) -> int:
    """Dataset, loader, trainer, resume (or fit a time budget), train, the evaluation and the statement at the end;
    returns the exit code. A signal recorded by `stop` ends training early, with a checkpoint (stop.py)."""
    from fastdino.engine.budget import fit_to_budget
    from fastdino.engine.checkpoint import is_disk_full
    from fastdino.files import remove_stale_tmp_files
    from fastdino.engine.train import NonFiniteLossError, Trainer
    from fastdino.pipelines import DatasetUnreadableError, resolve_split

    started = time.perf_counter()
    rank, world_size = (mesh.get_rank(), mesh.size()) if mesh is not None else (0, 1)
    try:
        if cfg.model.init is not None:  # the run's first line: what its weights start from
            import torch

            from fastdino.engine.model import build_model, init_weights

            with torch.device("meta"):
                shapes = build_model(cfg, student=True).state_dict()
            logger.info(init_weights(cfg, shapes)[1])
        cfg = asked = with_dataset(cfg, rank)
        check_writes(cfg, output)
        check_resumable(cfg, output, world_size)
        train_split = resolve_split(cfg.data.path, "train")
        loader = build_train_loader(cfg, train_split, device, rank=rank, world_size=world_size)
        no_knn = knn_unavailable(cfg, loader.labelled)
        if no_knn:  # labels only matter to the evaluation: train without it (the run's config stays as asked)
            logger.info("k-NN evaluation off: %s", no_knn)
            cfg = replace(cfg, eval=replace(cfg.eval, at_end=False, knn_every_epochs=0))
        trainer = Trainer(cfg, len(loader), device=device, mesh=mesh, output_dir=output, run_config=asked)
        resumed = trainer.resume(loader)  # a time-budgeted run resumes with the step count it measured
        if rank == 0:  # only once the checkpoint fits: a refused resume leaves the run's config.json as it was
            remove_stale_tmp_files(output)
            write_config(asked, output)
        if cfg.minutes is not None and not resumed:
            fit_to_budget(trainer, loader, deadline=started + 60 * cfg.minutes)
    except ValueError as error:
        sys.stderr.write("".join(f"fastdino: error: {line}\n" for line in str(error).splitlines()))
        return EXIT_USAGE
    logger.info("%s at step %d of %d (stopping at %d); %d images, %s loader", "resuming" if resumed else "starting",
                trainer.step, trainer.schedules.total_steps, trainer.stop_step, loader.num_images, loader.backend)
    try:
        with stop.training_steps() if stop is not None else contextlib.nullcontext():
            rows = trainer.train(loader, stop)
    except NonFiniteLossError as error:
        sys.stderr.write(f"fastdino: training stopped: {error}\n")
        return EXIT_DIVERGED
    except DatasetUnreadableError as error:
        sys.stderr.write(f"fastdino: error: {error}; {checkpoint_after_failure(trainer, loader)}\n")
        return EXIT_DATA_UNREADABLE
    except OSError as error:  # a write that the preflight could not foresee (something changed since)
        if is_disk_full(error, output):
            raise
        path = error.filename2 or error.filename  # os.replace(tmp, path) names both
        sys.stderr.write(f"fastdino: error: cannot write {path} ({error.strerror}) after step {trainer.step}; "
                         f"{checkpoint_after_failure(trainer, loader)}\n")
        return EXIT_WRITE_FAILED
    finally:
        loader.close()
    if rows and rank == 0:
        last = rows[-1]
        print(f"trained to step {last['step']}: loss {last['loss']:.4f}, teacher entropy "
              f"{last['teacher_entropy']:.3f}, {last['img_per_s']:.0f} img/s; weights in "
              f"{output / 'teacher_backbone.safetensors'}")
    if stop is not None and stop.signum is not None:
        if rank == 0:
            sys.stderr.write(f"fastdino: stopped by {stop.name} after step {trainer.step}; checkpoint "
                             f"{trainer.checkpointer().step_path(trainer.step)} written; rerun the same command to "
                             f"resume\n")
        return stop.exit_code
    if cfg.eval.at_end and trainer.step == trainer.schedules.total_steps:
        evaluate_at_end(trainer, output)
    elif no_knn and rank == 0:
        print(f"k-NN evaluation skipped: {no_knn}. {KNN_DATA_HINT}")
    return state_the_run(trainer, output) if rank == 0 else 0


# What a run writes under --output besides checkpoints/ (and the lock file, fastdino.files.FolderLock).
RUN_FILES = ("config.json", "metrics.jsonl", "teacher_backbone.safetensors")


def check_writes(cfg: C.TrainConfig, output: Path) -> None:
    """ValueError, one line per path, unless the run can write every file and folder it writes under `output`:
    said before the first step, so that no trained step is lost to a write that was bound to fail. The
    checkpoints it may prune must be deletable too."""
    from fastdino.engine.checkpoint import Checkpointer
    from fastdino.files import write_problem

    checkpoints = output / "checkpoints"
    problems = [write_problem(checkpoints, folder=True)]
    if checkpoints.is_dir():
        problems += [write_problem(path, folder=True) for path in Checkpointer(checkpoints, keep_last=1).checkpoints()]
    files = RUN_FILES + (("attention.png",) if cfg.eval.at_end else ())
    problems += [write_problem(output / name) for name in files]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ValueError("\n".join(f"cannot train into {output}: {problem}" for problem in problems))


def checkpoint_after_failure(trainer, loader) -> str:
    """Checkpoint the steps trained since the last checkpoint after a failure outside the step (the data, a write)
    and say so: a clause for the error line. One process only: ranks cannot agree on a collective checkpoint
    that a failed rank never reaches, so there the last periodic checkpoint is what is kept."""
    checkpointer = trainer.checkpointer()
    saved = checkpointer.checkpoints()
    last = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
    if trainer.mesh is not None or (saved and checkpointer.step_of(saved[-1]) == trainer.step):
        return f"{last}; rerun the same command to resume"
    try:
        path = trainer.save_checkpoint(loader)
    except OSError as error:
        return f"checkpoint step {trainer.step} could not be written either ({error}); {last}"
    return f"checkpoint {path} written; rerun the same command to resume"


def build_train_loader(cfg: C.TrainConfig, train_split: str, device: torch.device, *, rank: int = 0,
                       world_size: int = 1):
    """The multi-crop loader of this rank's share of each global batch of `train_split`."""
    from fastdino.engine.train import masking_config
    from fastdino.pipelines import build_loader

    d = cfg.data  # a MultiCropConfig with the dataset and loader settings
    return build_loader(train_split, d, d.batch_size // world_size, rank=rank, world_size=world_size,
                        seed=cfg.seed, backend=d.backend, device=str(device), num_workers=d.num_workers,
                        masking=masking_config(cfg))


def with_dataset(cfg: C.TrainConfig, rank: int) -> C.TrainConfig:
    """`cfg` with data.path set: the built-in shapes dataset (generated once, by rank 0) when it is null."""
    if cfg.data.path is not None:
        return cfg
    import torch.distributed as dist

    from fastdino.pipelines import default_dataset_dir, make_shapes_dataset
    from fastdino.pipelines.synthetic import FORMAT_VERSION

    d = cfg.data
    root = default_dataset_dir() / (f"shapes_v{FORMAT_VERSION}_{d.shapes_train_images}_{d.shapes_val_images}_"
                                    f"{d.shapes_image_size}px")
    if rank == 0:
        make_shapes_dataset(root, num_train=d.shapes_train_images, num_val=d.shapes_val_images,
                            image_size=d.shapes_image_size, seed=0)
    if dist.is_initialized():
        dist.barrier()
    return replace(cfg, data=replace(d, path=str(root)))


KNN_DATA_HINT = ("For a k-NN evaluation, give --data a folder with labelled train/ and val/ splits: class folders "
                 "(DATA/train/CLASS/*.jpg, DATA/val/CLASS/*.jpg), or train.tar / val.tar holding them, or "
                 "WebDataset shards with .cls members.")


def knn_unavailable(cfg: C.TrainConfig, train_labelled: bool) -> str | None:
    """Why the run's k-NN evaluation (at the end or periodic) cannot run on its dataset, or None when it can
    or none is asked for. It needs class labels in the train split and a labelled val split."""
    from fastdino.pipelines import open_source, resolve_split

    if not (cfg.eval.at_end or cfg.eval.knn_every_epochs):
        return None
    try:
        val = resolve_split(cfg.data.path, "val")
    except ValueError:
        return f"{cfg.data.path} has no labelled val split"
    if not open_source(val).labelled:
        return f"the val split {val} has no class labels"
    if not train_labelled:
        return f"the train images of {cfg.data.path} have no class labels"
    return None


def check_resumable(cfg: C.TrainConfig, output: Path, world_size: int) -> None:
    """ValueError when `output` holds checkpoints of another run: each checkpoint's identity (the config and the
    number of processes it was written with, checkpoint.py) must be this run's but for the settings that may
    change on resume (config.MAY_CHANGE_ON_RESUME), which are logged. Checkpoints of an older fastdino, which have
    none, are compared with the run's config.json. Every rank reads the same files and so decides alike, before
    any collective; Checkpoint.load checks the tensor shapes too."""
    from fastdino.engine.checkpoint import Checkpointer

    checkpoints = Checkpointer(output / "checkpoints", keep_last=1).checkpoints()
    references = [(path / "run.json", identity["config"], identity["world_size"]) for path in reversed(checkpoints)
                  if (identity := Checkpointer.identity(path)) is not None]  # newest first
    if checkpoints and not references and (output / "config.json").is_file():
        references = [(output / "config.json", json.loads((output / "config.json").read_text()), None)]
    new = C.to_dict(cfg)
    for path, old, processes in references:
        if processes is not None and processes != world_size:
            raise ValueError(f"cannot resume {output} on {world_size} process(es): {path} was written by "
                             f"{processes} (each process resumes its own data loader position); relaunch with "
                             f"{processes}, or train into a new --output")
        refused = {key: change for key, change in C.config_changes(old, new).items()
                   if not C.may_change_on_resume(key)}
        if refused:
            raise ValueError(
                f"cannot resume {output} with other settings than it was trained with: "
                + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
                + f". Rerun with the settings of {path}, or train into a new --output. Only "
                + ", ".join(f"{k}*" if k.endswith(".") else k for k in C.MAY_CHANGE_ON_RESUME)
                + " may change on resume")
    changes = C.config_changes(references[0][1], new) if references else {}
    if changes:
        logger.info("resuming with changed settings: %s",
                    ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()))


def write_config(cfg: C.TrainConfig, output: Path) -> None:
    """DIR/config.json, written atomically."""
    path = output / "config.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(C.to_dict(cfg), indent=2) + "\n"))


def evaluate_at_end(trainer, output: Path) -> dict | None:
    """k-NN of the trained teacher and of the untrained network (same seed), an attention-map PNG, a metrics row.
    Collective under torch.distributed (every rank extracts the features of its shard). A dataset that allows no
    k-NN (eval.KNNDataError) skips it with one line; returns None then."""
    from fastdino.engine.eval import KNNDataError, knn_accuracy
    from fastdino.engine.model import build_model, initial_state
    from fastdino.engine.visualize import first_val_image, save_attention_png
    from fastdino.pipelines import resolve_split

    cfg = trainer.cfg
    trained = trainer.teacher_backbone()
    try:
        row = trainer.evaluate_knn(trained)
        if trainer.untrained_knn is None:  # else measured when the time budget was fitted
            untrained = build_model(cfg, student=False)
            untrained.load_state_dict(initial_state(cfg))
            trainer.untrained_knn = knn_accuracy(untrained.backbone, cfg, trainer.device)
        results = {"untrained": trainer.untrained_knn,
                   "trained": {"top1": row["knn_top1"], "top5": row["knn_top5"]}}
    except KNNDataError as error:  # training is done and saved: the attention map and the summary still come
        if trainer.rank == 0:
            print(f"k-NN evaluation skipped: {error}")
        results = None
    if trainer.rank != 0:
        return results
    image = first_val_image(cfg.data.path)
    png = save_attention_png(trained, image, output / "attention.png") if image is not None else None
    writer = trainer.metrics_writer()
    try:
        if results is not None:
            writer.replace({**row, "knn_top1_untrained": results["untrained"]["top1"]})
            print(f"k-NN top-1 on {resolve_split(cfg.data.path, 'val')} (k={cfg.eval.knn_k}, "
                  f"T={cfg.eval.knn_temperature}): untrained {results['untrained']['top1']:.1f}% -> trained "
                  f"{results['trained']['top1']:.1f}% (top-5 {results['untrained']['top5']:.1f}% -> "
                  f"{results['trained']['top5']:.1f}%)")
        if png is not None:
            trainer.attention_to_tensorboard(writer, trained)
            print(f"attention maps of {image.name}: {png}")
    finally:
        writer.close()
    return results


def state_the_run(trainer, output: Path) -> int:
    """Print the plain end-of-run statement from the whole run's metrics rows (every resumed part of it); returns
    the exit code: EXIT_NONFINITE_END, with a warning line, when the last steps were non-finite, else 0."""
    from fastdino.engine.metrics import end_of_run_statement, nonfinite_at_end
    from fastdino.engine.visualize import read_metrics

    path = output / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    lines = end_of_run_statement(rows, trainer.cfg.head.out_dim)
    if lines:
        print(f"end of run at step {trainer.step} of {trainer.schedules.total_steps}:")
        print("\n".join(f"  {line}" for line in lines))
    tail = nonfinite_at_end(rows)
    if not tail:
        return 0
    sys.stderr.write(f"fastdino: warning: the last {tail} step(s) had a non-finite loss or gradient (the weights "
                     f"stopped changing at step {trainer.step - tail}); exit code {EXIT_NONFINITE_END}\n")
    return EXIT_NONFINITE_END


if __name__ == "__main__":
    sys.exit(main())
