"""A time budget (`minutes`) instead of a number of epochs: the schedules span the steps that fit.

`fit_to_budget` times a few real training steps on the run's own batches (and one k-NN pass when k-NN runs during
or after training), undoes them, and gives the Trainer the step count that fits. The undo puts back the run state
a checkpoint holds (`Trainer.checkpoint_state`), kept in memory, so the run is then exactly the run given that many
steps. The count is stored in every checkpoint (train_state), so a resumed run keeps it.
"""
import itertools
import logging
import math
import time

import torch
import torch.distributed as dist

from fastdino.engine.train import Trainer, rng_states

logger = logging.getLogger(__name__)

# A time budget is resolved from steps timed after a few untimed ones: allocations, autotuning and the loader's
# start make the first steps slow.
CALIBRATION_WARMUP_STEPS = 2
CALIBRATION_STEPS = 5


def steps_in_budget(seconds: float, step_seconds: float, *, knn_seconds: float = 0.0, knn_every_steps: int = 0,
                    end_knn_passes: int = 0) -> int:
    """How many training steps fit in `seconds` when a step takes `step_seconds` and a k-NN pass `knn_seconds`,
    with a pass every `knn_every_steps` steps (0: none) and `end_knn_passes` passes after the last step.
    Counting a pass per `knn_every_steps` steps errs on the short side by at most one pass."""
    seconds_per_step = step_seconds + (knn_seconds / knn_every_steps if knn_every_steps else 0.0)
    return max(math.floor((seconds - end_knn_passes * knn_seconds) / seconds_per_step), 0)


def fit_to_budget(trainer: Trainer, loader, deadline: float) -> None:
    """Make `trainer`'s schedules span the steps that fit before `deadline` (a `time.perf_counter()` value): time
    real steps on `loader`'s batches and undo them, time a k-NN pass when k-NN runs during or after training, and
    take the smallest count over the ranks."""
    saved = _copy_run_state(trainer, loader)
    batches = _endless(loader)
    first_batch = next(batches)
    # Creating the loader's iterator may draw from the global RNG (torch's DataLoader does, once per iterator,
    # or once in all with persistent workers): the run's first step starts from the state it has here.
    first_step_rng = rng_states(trainer.device)
    step_seconds = _time_steps(trainer, itertools.chain([first_batch], batches))
    batches.close()
    _put_back_run_state(trainer, loader, saved)
    trainer.next_step_rng = first_step_rng
    # The evaluation at the end is estimated, not a fixed fraction: one k-NN pass as long as the timed one,
    # since every pass embeds the same images (the timed pass is the untrained network's, which the evaluation
    # at the end reuses); its attention map is cheap.
    end_knn_passes = int(trainer.cfg.eval.at_end or trainer.knn_every_steps > 0)
    knn_seconds = _time_knn_pass(trainer) if end_knn_passes else 0.0
    seconds_left = deadline - time.perf_counter()
    total_steps = _min_over_ranks(trainer, steps_in_budget(seconds_left, step_seconds, knn_seconds=knn_seconds,
                                                           knn_every_steps=trainer.knn_every_steps,
                                                           end_knn_passes=end_knn_passes))
    minutes = trainer.cfg.minutes
    if total_steps < 1:
        raise ValueError(f"a time budget of {minutes:g} min leaves no time to train: "
                         f"{seconds_left:.1f} s are left after the start, a step takes {step_seconds:.3f} s and "
                         f"a k-NN pass {knn_seconds:.1f} s; raise --minutes")
    trainer.set_total_steps(total_steps)
    logger.info("time budget %g min: step %.3f s measured over %d steps -> %d steps (%.2f epochs)",
                minutes, step_seconds, CALIBRATION_STEPS, total_steps, total_steps / trainer.steps_per_epoch)


def _copy_run_state(trainer: Trainer, loader) -> dict:
    """The state a checkpoint of `trainer` holds, with every tensor copied (steps change weights in place)."""
    return {key: _copy(part.state_dict() if hasattr(part, "state_dict") else part)
            for key, part in trainer.checkpoint_state(loader).items()}


@torch.no_grad()
def _put_back_run_state(trainer: Trainer, loader, saved: dict) -> None:
    """Load `saved` (from `_copy_run_state`) as a resumed run loads a checkpoint, and set the RNG it holds now."""
    for key, part in trainer.checkpoint_state(loader).items():
        if hasattr(part, "load_state_dict"):
            part.load_state_dict(saved[key])
        else:  # plain tensors that DCP loads in place
            for name, tensor in part.items():
                tensor.copy_(saved[key][name])
    trainer.restore_rng()


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _endless(loader):
    """`loader`'s batches from its current position on, across epochs."""
    while True:
        yield from loader


def _time_steps(trainer: Trainer, batches) -> float:
    """Seconds per training step over the iterator `batches`, after CALIBRATION_WARMUP_STEPS untimed ones."""
    for _ in range(CALIBRATION_WARMUP_STEPS):
        trainer.train_step(next(batches))
    _synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        trainer.train_step(next(batches))
    _synchronize(trainer.device)
    return (time.perf_counter() - start) / CALIBRATION_STEPS


def _time_knn_pass(trainer: Trainer) -> float:
    """Seconds of one k-NN pass of the teacher, which still holds the initial weights: its result is the untrained
    network's, kept for the evaluation at the end."""
    start = time.perf_counter()
    row = trainer.evaluate_knn(trainer.teacher_backbone())
    seconds = time.perf_counter() - start
    trainer.untrained_knn = {"top1": row["knn_top1"], "top5": row["knn_top5"]}
    logger.info("one k-NN pass takes %.1f s (untrained network: top-1 %.1f%%)", seconds, row["knn_top1"])
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _min_over_ranks(trainer: Trainer, value: int) -> int:
    """The smallest `value` over the ranks, so that every rank runs the same schedules."""
    if trainer.mesh is None:
        return value
    smallest = torch.tensor(value, device=trainer.device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=trainer.mesh.get_group())
    return int(smallest)
