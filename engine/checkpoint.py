"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically, and the backbone export.

Layout (torchtitan: torchtitan/components/checkpoint.py): `DIR/checkpoints/step_XXXXXXXX/` holds one DCP
checkpoint of the fixed keys student, teacher, optimizer, loss, train_state and dataloader. Every rank writes its
shards into `.step_XXXXXXXX.tmp/`; once all ranks are done, rank 0 renames it. A run killed mid-write leaves only
a `.tmp` folder, which `latest()` ignores and the next save removes, so the previous checkpoint stays usable.
Old checkpoints beyond `keep_last` are deleted after each save.

The keys' DCP Statefuls are here: ModelState (student, teacher), OptimizerState, TrainState (the Trainer's step,
RNG states and accumulators) and PerRank (the loader's position). Per-rank values (RNG states, on-device metric
accumulators, loader positions) are stored under per-rank keys; DCP would otherwise keep one copy of a plain
tensor that every rank saves under the same key.
"""
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class ModelState:
    """DCP `Stateful` view of a (possibly FSDP2- or DDP-wrapped) model: sharded state dict with plain FQNs."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """DCP `Stateful` view of an optimizer, keyed by parameter FQNs (so it reshards like the model)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class TrainState:
    """DCP Stateful of a Trainer's own state: step, images seen, the step count of a time budget, training time,
    and per-rank RNG states and accumulators."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        rng_cpu, rng_cuda = rng_states(t.device)
        per_rank = {"rng_cpu": rng_cpu, "stats": t.stats.values}
        if rng_cuda is not None:
            per_rank["rng_cuda"] = rng_cuda
        if t.loss_scale:
            per_rank["loss_scale"] = t.loss_scale.state_dict()
        return {"step": t.step, "epoch": t.epoch, "images_seen": t.step * t.cfg.data.batch_size,
                "total_steps": t.schedules.total_steps, "trained_seconds": t.training_seconds(),
                "world_size": t.world_size, f"rank{t.rank}": per_rank}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        if t.graphs is not None:  # loading may replace the optimizer's state tensors that the graphs captured
            t.graphs.reset()
        t.step = state["step"]
        t.trained_seconds = state["trained_seconds"]
        if t.cfg.minutes is not None:
            t.set_total_steps(state["total_steps"])
        if state["world_size"] != t.world_size:
            logger.warning("checkpoint was written by %d processes, resuming on %d: RNG states start afresh",
                           state["world_size"], t.world_size)
            return
        per_rank = state[f"rank{t.rank}"]
        t.next_step_rng = (per_rank["rng_cpu"], per_rank.get("rng_cuda"))
        t.stats.load_state_dict({"values": per_rank["stats"]})
        if t.loss_scale:
            t.loss_scale.load_state_dict(per_rank["loss_scale"])


def rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global CPU RNG state, and `device`'s when it is a GPU."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_states(states: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class PerRank:
    """DCP Stateful storing an object's state under a per-rank key (each rank's loader has its own position)."""

    def __init__(self, obj, rank: int):
        self.obj, self.rank = obj, rank

    def state_dict(self) -> dict:
        return {f"rank{self.rank}": self.obj.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if f"rank{self.rank}" in state:
            self.obj.load_state_dict(state[f"rank{self.rank}"])


class Checkpointer:
    """Save and find DCP checkpoints under `folder`; every rank calls `save` and `load` (they are collective)."""

    def __init__(self, folder, *, keep_last: int, rank: int = 0, process_group=None):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.rank = rank
        self.process_group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()

    def step_path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (renamed, with DCP's .metadata), oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(_STEP_DIR.match(Path(path).name).group(1))

    def save(self, step: int, state: dict) -> Path:
        """Write `state` (DCP Statefuls and dicts of tensors) as checkpoint `step`; returns its folder."""
        final = self.step_path(step)
        tmp = self.folder / f".{final.name}.tmp"
        if self.rank == 0:
            self._remove_unfinished()
            tmp.mkdir(parents=True)
        self._barrier()
        with self._single_process_is_intended():
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.process_group, no_dist=not self.distributed)
        self._barrier()
        if self.rank == 0:
            if final.exists():  # the same step saved again (e.g. a rerun that stops where it resumed)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            for old in self.checkpoints()[:-self.keep_last]:
                shutil.rmtree(old)
            logger.info("saved checkpoint %s", final)
        self._barrier()
        return final

    def load(self, path: Path, state: dict) -> None:
        """Load checkpoint `path` into `state` in place. Keys absent from the checkpoint keep their values (a
        run resumed on another number of ranks finds no RNG state for its new ranks)."""
        with self._single_process_is_intended():
            dcp.load(state, checkpoint_id=str(path), process_group=self.process_group,
                     no_dist=not self.distributed, planner=DefaultLoadPlanner(allow_partial_load=True))
        logger.info("resumed from checkpoint %s", path)

    def _remove_unfinished(self) -> None:
        """Delete `.step_*.tmp` folders left by a run killed while writing."""
        if self.folder.is_dir():
            for leftover in self.folder.glob(".step_*.tmp"):
                logger.warning("removing unfinished checkpoint %s (a run was stopped while writing it)", leftover)
                shutil.rmtree(leftover)

    @contextmanager
    def _single_process_is_intended(self):
        """DCP warns on every call without a process group; one process is a supported mode here."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            yield

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.process_group)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_backbone_state_dict(model: torch.nn.Module, *, rank: int, everywhere: bool = False):
    """The unsharded `backbone.*` tensors of a DINOModel (keys without the prefix). Gathered to the CPU of rank 0
    (None on other ranks), or on every rank's device when `everywhere`. Collective under FSDP2."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    if rank != 0 and not everywhere:
        return None
    return {name.removeprefix("backbone."): t for name, t in state.items() if name.startswith("backbone.")}
