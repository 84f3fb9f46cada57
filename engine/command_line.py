"""What the two command-line front ends share (cli.py: `fastdino train`; eval_cli.py: the evaluation commands):
the exit code of a usage error, an argument parser whose errors are one line on stderr, and torch.distributed
started from torchrun's environment. Only these front ends start and stop torch.distributed."""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An argument error is one line, `PROG: error: MESSAGE`, and exit code EXIT_USAGE (no usage block)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


def process_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> DeviceMesh | None:
    """A 1-D mesh over torchrun's processes (gloo on the CPU, NCCL on CUDA); None, and no process group, for one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return init_device_mesh(device.type, (world_size,))
