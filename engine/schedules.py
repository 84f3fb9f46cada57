"""Learning rate, weight decay, teacher momentum and teacher temperature as pure functions of the global step.

The shapes follow facebookresearch/dino `utils.cosine_scheduler` step for step: a linear warmup that reaches
the peak on its last step (`np.linspace(start, peak, warmup)`), then a half cosine from the peak towards the final
value over the remaining steps. Weight decay and teacher momentum are cosines with no warmup. The teacher
temperature rises linearly over its warmup and then stays (DINO Sec. 3.1 and App. on teacher temperature): every
step (`loss.teacher_temp_schedule=per_step`), or once per epoch as the official DINOLoss does (`per_epoch`:
`np.linspace(start, end, warmup_epochs)[epoch]`; `DINOLoss.forward(..., epoch)` calls the same `linear_warmup`).

Nothing here holds state: a resumed run asks for step k and gets what the uninterrupted run got. The schedules
span `total_steps`; `epochs * steps_per_epoch` by default, or any other count (e.g. from a time budget,
budget.py). Warmups keep their length in epochs of the dataset; one longer than the whole run is scaled
down to the share of the run it has in the configured epochs, with a warning (a per-epoch temperature warmup to
the nearest whole epoch).
"""
import logging
import math
from dataclasses import dataclass

from fastdino.engine.config import TrainConfig

logger = logging.getLogger(__name__)


def linear_warmup(start: float, end: float, step: int, warmup_steps: int) -> float:
    """`np.linspace(start, end, warmup_steps)[step]` (which is `end` at its last step, and `start` when it has only
    one), and `end` after the warmup."""
    if step >= warmup_steps or (step == warmup_steps - 1 and warmup_steps > 1):
        return end
    if warmup_steps == 1:
        return start
    return start + (end - start) * step / (warmup_steps - 1)


def cosine(start: float, end: float, step: int, total_steps: int) -> float:
    """Half cosine from `start` at step 0 towards `end` at `total_steps` (clamped to `end` after it)."""
    if step >= total_steps:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total_steps))


def warmup_cosine(start: float, peak: float, end: float, step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from `start` to `peak` over `warmup_steps`, then a cosine from `peak` to `end`."""
    if step < warmup_steps:
        return linear_warmup(start, peak, step, warmup_steps)
    return cosine(peak, end, step - warmup_steps, total_steps - warmup_steps)


def peak_lr(cfg: TrainConfig) -> float:
    """The lr after the warmup: base_lr scaled by the global batch (optim.lr_scaling)."""
    if cfg.optim.lr_scaling == "sqrt_1024":
        return cfg.optim.base_lr * math.sqrt(cfg.data.batch_size / 1024)
    return cfg.optim.base_lr * cfg.data.batch_size / 256


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    """AdamW learning rate of every parameter group."""
    weight_decay: float
    """AdamW weight decay of the decayed group."""
    teacher_momentum: float
    """EMA momentum m in teacher <- m * teacher + (1 - m) * student."""
    teacher_temp: float
    """Teacher softmax temperature."""
    freeze_last_layer: bool
    """Whether the head's last layer gets no update this step."""


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    """Steps every schedule spans."""
    warmup_steps: int
    """Learning-rate warmup length."""
    peak_lr: float
    """Learning rate after the warmup (base_lr scaled by the global batch, `peak_lr`)."""
    min_lr: float
    """Learning rate at the end."""
    weight_decay: tuple[float, float]
    """Weight decay at the start and at the end."""
    teacher_momentum: tuple[float, float]
    """Teacher momentum at the start and at the end."""
    teacher_temp: tuple[float, float]
    """Teacher temperature at the start and after its warmup."""
    teacher_temp_warmup_steps: int
    """Teacher temperature warmup length (a multiple of teacher_temp_every_steps)."""
    teacher_temp_every_steps: int
    """Steps between two moves of the teacher temperature: 1, or an epoch's steps (the official per-epoch one)."""
    freeze_last_layer_steps: int
    """Steps during which the head's last layer gets no update."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> "Schedules":
        """The run's schedules; they span `epochs * steps_per_epoch` steps unless `total_steps` is given."""
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch} (dataset smaller than one batch?)")
        total_steps = total_steps or cfg.epochs * steps_per_epoch

        def in_steps(name: str, epochs: float) -> int:
            steps = round(epochs * steps_per_epoch)
            if steps <= total_steps:
                return steps
            scaled = min(round(epochs / cfg.epochs * total_steps), total_steps)
            logger.warning("%s=%g (%d steps) is longer than the whole run of %d steps: scaled down to %d steps, "
                           "its share of the configured %d epochs", name, epochs, steps, total_steps, scaled,
                           cfg.epochs)
            return scaled

        temp_warmup_steps = in_steps("loss.warmup_teacher_temp_epochs", cfg.loss.warmup_teacher_temp_epochs)
        temp_every_steps = steps_per_epoch if cfg.loss.teacher_temp_schedule == "per_epoch" else 1
        return cls(
            total_steps=total_steps,
            warmup_steps=in_steps("optim.warmup_epochs", cfg.optim.warmup_epochs),
            peak_lr=peak_lr(cfg),
            min_lr=cfg.optim.min_lr,
            weight_decay=(cfg.optim.weight_decay, cfg.optim.weight_decay_end),
            teacher_momentum=(cfg.optim.teacher_momentum, cfg.optim.teacher_momentum_end),
            teacher_temp=(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp),
            teacher_temp_warmup_steps=round(temp_warmup_steps / temp_every_steps) * temp_every_steps,
            teacher_temp_every_steps=temp_every_steps,
            freeze_last_layer_steps=in_steps("optim.freeze_last_layer_epochs", cfg.optim.freeze_last_layer_epochs),
        )

    def at(self, step: int) -> ScheduleValues:
        """Every scheduled value at global step `step` (0-based)."""
        return ScheduleValues(
            lr=warmup_cosine(0.0, self.peak_lr, self.min_lr, step, self.warmup_steps, self.total_steps),
            weight_decay=cosine(*self.weight_decay, step, self.total_steps),
            teacher_momentum=cosine(*self.teacher_momentum, step, self.total_steps),
            teacher_temp=linear_warmup(*self.teacher_temp, step // self.teacher_temp_every_steps,
                                       self.teacher_temp_warmup_steps // self.teacher_temp_every_steps),
            freeze_last_layer=step < self.freeze_last_layer_steps,
        )
