"""What the two command-line front ends share (cli.py: `fastdino train`; eval_cli.py: the evaluation commands):
the exit code of a usage error, the evaluation commands' names and help, an argument parser whose errors are one
line on stderr, a help formatter that shows defaults, and torch.distributed started from torchrun's environment.
Only these front ends start and stop torch.distributed. torch is imported when a function needs it, so that
`fastdino --help` answers without it."""
from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

EXIT_USAGE = 2

# The evaluation subcommands (eval_cli.py) and their one-line help. torch is imported only once a command runs,
# so that `fastdino --help` answers at once.
EVAL_COMMANDS = {
    "knn": "weighted k-NN top-1 / top-5 of a backbone (DINO eval_knn)",
    "linear": "linear probe on frozen features (DINO eval_linear; resumes from --output)",
    "attention": "PNG of the last block's per-head CLS attention and 60%% masks",
    "export": "write features and labels to .safetensors or .npz",
    "plot": "one figure (PNG and SVG) of every metric of DIR/metrics.jsonl; several DIRs overlaid",
}


class Parser(argparse.ArgumentParser):
    """An argument error is one line, `PROG: error: MESSAGE`, and exit code EXIT_USAGE (no usage block)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" where an option has a default its help does not already describe."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def process_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> DeviceMesh | None:
    """A 1-D mesh over torchrun's processes (gloo on the CPU, NCCL on CUDA); None, and no process group, for one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return init_device_mesh(device.type, (world_size,))


@contextmanager
def output_lock(folder: Path):
    """Hold `folder`'s lock (fastdino.files.FolderLock) for the block, under torchrun too: rank 0 takes it and
    broadcasts the outcome, so that every rank raises the same FolderLockError (naming the holder's PID) when
    another process holds it, before any other collective. The folder must exist."""
    import torch.distributed as dist

    from fastdino.files import FolderLock, FolderLockError

    distributed = dist.is_available() and dist.is_initialized()
    lock, refused = FolderLock(folder), None
    if not distributed or dist.get_rank() == 0:
        try:
            lock.acquire()
        except FolderLockError as error:
            refused = str(error)
    if distributed:
        outcome = [refused]
        dist.broadcast_object_list(outcome, src=0)
        refused = outcome[0]
    if refused:
        raise FolderLockError(refused)
    try:
        yield
    finally:
        lock.release()
