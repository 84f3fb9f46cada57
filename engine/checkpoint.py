"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically, and the backbone export.

Layout (torchtitan: torchtitan/components/checkpoint.py): `DIR/checkpoints/step_XXXXXXXX/` holds one DCP
checkpoint of the fixed keys student, teacher, optimizer, loss, train_state and dataloader. Every rank writes its
shards into `.step_XXXXXXXX.tmp/`; once all ranks are done, rank 0 renames it. A run killed mid-write leaves only
a `.tmp` folder, which `latest()` ignores and the next save removes, so the previous checkpoint stays usable.
Old checkpoints beyond `keep_last` are deleted after each save.

Identity: each checkpoint also holds `run.json` (the run's resolved config and its number of processes), so that
a checkpoint copied into another folder, or a folder mixing two runs' checkpoints, cannot be resumed with other
settings (cli.py `check_resumable` compares it with the config of the run that would resume it).

Integrity: before the rename, `SHA256SUMS` records the SHA-256 of every file (each rank hashes the shards it
wrote; `sha256sum -c SHA256SUMS` checks a folder by hand). `latest()` verifies the newest checkpoint, each rank
hashing a share of its files, and falls back to the previous one with a warning naming the bad one: a truncated
shard or `.metadata` would otherwise fail deep inside DCP, and zeroed bytes in a shard would load silently.
`keep_last` counts intact checkpoints: pruning keeps the newest `keep_last` ones not found corrupt.

The keys' DCP Statefuls are here: ModelState (student, teacher), OptimizerState, TrainState (the Trainer's step,
RNG states and accumulators) and PerRank (the loader's position). Per-rank values (RNG states, on-device metric
accumulators, loader positions) are stored under per-rank keys; DCP would otherwise keep one copy of a plain
tensor that every rank saves under the same key.
"""
import errno
import hashlib
import json
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
CHECKSUMS = "SHA256SUMS"
IDENTITY = "run.json"
# State keys whose tensors a resume must find in the checkpoint with the same shapes (the rest is per-rank state).
MATCHED_KEYS = ("student.", "teacher.", "loss.", "optimizer.")
# A write that failed with less than this left on its filesystem failed because the disk is full.
_FULL_BELOW_BYTES = 1 << 20


class CorruptCheckpointError(ValueError):
    """Checkpoints exist but none is intact: resuming from none of them, or starting afresh, would be wrong."""


class ShapeMismatchError(ValueError):
    """The model or optimizer being resumed has other tensors or shapes than the checkpoint's."""


class DiskFullError(OSError):
    """A checkpoint write ran out of space (ENOSPC / EDQUOT); the previous checkpoint is untouched."""


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
        self.corrupt: set[str] = set()  # names of checkpoints found corrupt by `latest()`

    def step_path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (renamed, with DCP's .metadata), oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest intact checkpoint (None when there is none yet); collective. Corrupt ones are skipped with a
        warning; CorruptCheckpointError when every checkpoint is corrupt."""
        found = self.checkpoints()
        for path in reversed(found):
            problem = self.verify(path)
            if problem is None:
                return path
            self.corrupt.add(path.name)
            logger.warning("checkpoint %s is corrupt (%s); falling back to the previous one", path, problem)
        if found:
            raise CorruptCheckpointError(
                f"no intact checkpoint in {self.folder} ({', '.join(p.name for p in found)} are all corrupt); "
                f"move that folder away to start the run afresh")
        return None

    def verify(self, path: Path) -> str | None:
        """None when every file of checkpoint `path` has the SHA-256 in its SHA256SUMS, else what is wrong.
        Collective: each rank hashes a share of the files. A checkpoint without SHA256SUMS (written by an older
        fastdino) is taken as it is."""
        listed = _read_checksums(path / CHECKSUMS)
        if listed is None:
            logger.warning("checkpoint %s has no %s: loading it unverified", path, CHECKSUMS)
            return None
        on_disk = sorted(p.name for p in path.iterdir() if p.name != CHECKSUMS)
        problems = [f"{name} missing" for name in sorted(set(listed) - set(on_disk))]
        rank, world = self._group_rank_world()
        for name in sorted(set(listed) & set(on_disk))[rank::world]:
            if _sha256(path / name) != listed[name]:
                problems.append(f"{name} does not match its checksum")
        problems = sorted(set().union(*self._all_gather(problems)))
        return ", ".join(problems) if problems else None

    @staticmethod
    def identity(path: Path) -> dict | None:
        """The `identity` checkpoint `path` was saved with; None for one without (written by an older fastdino)
        or with an unreadable one (which its checksum then finds corrupt)."""
        try:
            return json.loads((Path(path) / IDENTITY).read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(_STEP_DIR.match(Path(path).name).group(1))

    def save(self, step: int, state: dict, identity: dict | None = None) -> Path:
        """Write `state` (DCP Statefuls and dicts of tensors) as checkpoint `step`, with `identity` (JSON values:
        what the run is, see `identity()`) beside it; returns its folder."""
        final = self.step_path(step)
        tmp = self.folder / f".{final.name}.tmp"
        if self.rank == 0:
            self._remove_unfinished()
            tmp.mkdir(parents=True)
            if identity is not None:
                (tmp / IDENTITY).write_text(json.dumps(identity, indent=1) + "\n")
        self._barrier()
        try:
            with self._single_process_is_intended():
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.process_group,
                         no_dist=not self.distributed)
            # Each rank hashes the shards it wrote (DCP names them __RANK_N.distcp); rank 0 adds the rest.
            rank, _ = self._group_rank_world()
            mine = [p for p in tmp.iterdir()
                    if p.name.startswith(f"__{rank}_") or (rank == 0 and p.name in (".metadata", IDENTITY))]
            sums = {name: digest for part in self._all_gather({p.name: _sha256(p) for p in mine})
                    for name, digest in part.items()}
            if self.rank == 0:
                _write_checksums(tmp / CHECKSUMS, sums)
        except (OSError, RuntimeError, dcp.api.CheckpointException) as error:
            if not is_disk_full(error, self.folder):
                # A DCP failure wraps the OSError that names the file (one rank's): raise that one.
                cause = next((e for e in _chain(error) if isinstance(e, OSError)), None)
                if cause is None or cause is error:
                    raise
                raise cause from None
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial write took
            previous = self.checkpoints()
            raise DiskFullError(errno.ENOSPC, f"disk full: no space left on {self.folder} for checkpoint step "
                                f"{step} (" + (f"the previous one, {previous[-1].name}, is intact" if previous
                                               else "no earlier checkpoint") + ")") from None
        self._barrier()
        if self.rank == 0:
            if final.exists():  # the same step saved again (e.g. a rerun that stops where it resumed)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            self.corrupt.discard(final.name)
            for old in self._prunable():
                shutil.rmtree(old)
            logger.info("saved checkpoint %s", final)
        self._barrier()
        return final

    def _prunable(self) -> list[Path]:
        """Checkpoints older than the newest `keep_last` intact ones (corrupt ones among them included)."""
        found = self.checkpoints()
        intact = [p for p in found if p.name not in self.corrupt]
        if len(intact) <= self.keep_last:
            return []
        oldest_kept = intact[-self.keep_last]
        return [p for p in found if p.name < oldest_kept.name]

    def load(self, path: Path, state: dict) -> None:
        """Load checkpoint `path` into `state` in place. The tensors of MATCHED_KEYS must match the checkpoint's
        one for one, in name and shape (ShapeMismatchError before anything changes, naming them); other keys
        absent from the checkpoint keep their values (a run resumed on another number of ranks finds no RNG state
        for its new ranks)."""
        try:
            with self._single_process_is_intended():
                dcp.load(state, checkpoint_id=str(path), process_group=self.process_group,
                         no_dist=not self.distributed, planner=_MatchingLoadPlanner())
        except dcp.api.CheckpointException as error:  # raised on every rank when one rank's planning failed
            mismatch = [f[0] for f in error.failures.values() if isinstance(f[0], ShapeMismatchError)]
            if mismatch:
                raise ShapeMismatchError(f"cannot resume from {path}: {mismatch[0]}") from None
            raise
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

    def _group_rank_world(self) -> tuple[int, int]:
        if not self.distributed:
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _all_gather(self, value) -> list:
        if not self.distributed:
            return [value]
        gathered = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, value, group=self.process_group)
        return gathered


class _MatchingLoadPlanner(DefaultLoadPlanner):
    """Partial loads for per-rank values only: the model, optimizer and loss tensors must match the checkpoint's
    (DCP's partial load would leave a deeper model's new blocks at their random initial values)."""

    def __init__(self):
        super().__init__(allow_partial_load=True)

    def create_local_plan(self):
        stored = {k: v for k, v in self.metadata.state_dict_metadata.items() if k.startswith(MATCHED_KEYS)}
        here = {k: v for k, v in self.state_dict.items() if k.startswith(MATCHED_KEYS)}
        by_key = {k: f"{k} is not in the checkpoint" for k in set(here) - set(stored)}
        by_key |= {k: f"{k} is in the checkpoint only" for k in set(stored) - set(here)}
        for key in set(here) & set(stored):
            size = getattr(stored[key], "size", None)
            if size is not None and torch.is_tensor(here[key]) and tuple(size) != tuple(here[key].shape):
                by_key[key] = f"{key} has shape {list(size)} in the checkpoint, {list(here[key].shape)} here"
        # The model's tensors first: they say what changed; the optimizer's follow from them.
        problems = [by_key[k] for k in sorted(by_key, key=lambda k: (_prefix_rank(k), k))]
        if problems:
            raise ShapeMismatchError(f"the model or optimizer differs from the checkpoint's ({len(problems)} "
                                     f"tensors): {'; '.join(problems[:3])}" + ("; ..." if len(problems) > 3 else ""))
        return super().create_local_plan()


def _prefix_rank(key: str) -> int:
    return next(i for i, prefix in enumerate(MATCHED_KEYS) if key.startswith(prefix))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksums(path: Path, sums: dict[str, str]) -> None:
    """`sha256sum` format, so `sha256sum -c SHA256SUMS` checks the folder too."""
    with open(path, "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
        f.flush()
        os.fsync(f.fileno())


def _read_checksums(path: Path) -> dict[str, str] | None:
    """{file name: hex digest} of a SHA256SUMS file, None when there is none; a garbled line is kept as a digest
    that matches nothing."""
    if not path.is_file():
        return None
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        sums[name or line] = digest
    return sums


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: an ENOSPC / EDQUOT anywhere in the error's chain (or in a DCP
    failure of any rank), or no space left in `folder` (torch's zip writer turns ENOSPC into a RuntimeError
    "unexpected pos" and drops the errno)."""
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(error)):
        return True
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _FULL_BELOW_BYTES


def _chain(error: BaseException):
    """`error`, its causes and contexts, and the failures of every rank inside a DCP CheckpointException."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, dcp.api.CheckpointException):
            pending += [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]


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
