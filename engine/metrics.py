"""What a run reports: on-device step accumulators, throughput and ETA, peak memory, the progress line,
DIR/metrics.jsonl (and its TensorBoard mirror, DIR/tb/), the teacher-collapse watch, and the plain statement at the end
of a run.

The step never reads a tensor on the host. `StepStats` adds each step's loss, teacher entropy and skip flag into
one small device tensor; `read` (the only host sync, once every `log_every` steps) sums it over ranks and resets
it. Keys of a metrics row are the flat names of the run-directory contract (step, epoch, loss, lr, wd,
teacher_momentum, teacher_temp, teacher_entropy, img_per_s, max_memory_gib, ...), one JSON object per line.
"""
import importlib.util
import json
import logging
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastdino.kernels.reference import N_STEP_STATS, add_step_stats_

logger = logging.getLogger(__name__)


class StepStats:
    """Device-side sums since the last log step, and the length of the current run of non-finite steps.

    A step is *skipped* when its gradient norm is non-finite, and *non-finite* when its loss is (or, without fp16
    loss scaling, when it was skipped): an fp16 overflow with a finite loss is the loss scale backing off.
    """

    FIELDS = ("loss_sum", "entropy_sum", "finite_steps", "skipped_steps", "nonfinite_in_a_row",
              "max_nonfinite_in_a_row", "grad_norm")
    # The DINOv2 objective's named terms (engine/train.py: Trainer.loss_terms), summed like the loss, after FIELDS.
    TERMS = ("dino_loss", "ibot_loss", "koleo_loss", "teacher_patch_entropy")

    def __init__(self, device: torch.device):
        assert len(self.FIELDS) == N_STEP_STATS
        self.values = torch.zeros(len(self.FIELDS) + len(self.TERMS), device=device)
        self.fields = self.values[:N_STEP_STATS]  # a view: what the Triton update (kernels/step_stats.py) adds to

    def update(self, loss: torch.Tensor, entropy: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor,
               nonfinite: torch.Tensor, terms: torch.Tensor | None = None) -> None:
        """Add one step (0-d device tensors; `skipped` and `nonfinite` are bool; `terms` the (len(TERMS),) values
        of the named loss terms, or None). No host sync. (The Triton update adds the FIELDS with
        kernels/step_stats.py instead, in one launch; it runs without terms.)"""
        add_step_stats_(self.fields, loss, entropy, grad_norm, skipped, nonfinite)
        if terms is not None:
            term_sums = self.values[N_STEP_STATS:]
            term_sums.copy_(term_sums + torch.where(nonfinite, 0.0, terms.float()))

    def read(self, process_group=None, *, reset: bool = True) -> dict[str, float]:
        """Means since the last read and the counters, reduced over ranks (collective when torch.distributed is
        initialised); with `reset`, resets everything but the current run of non-finite steps."""
        values = self.values.clone()
        if dist.is_available() and dist.is_initialized():
            # loss_sum, entropy_sum; nonfinite_in_a_row, max_nonfinite_in_a_row
            sums, in_a_row = torch.cat([values[:2], values[len(self.FIELDS):]]), values[4:6].clone()
            dist.all_reduce(sums, group=process_group)
            dist.all_reduce(in_a_row, op=dist.ReduceOp.MAX, group=process_group)  # losses are per rank
            sums /= dist.get_world_size(process_group)
            values[:2], values[len(self.FIELDS):], values[4:6] = sums[:2], sums[2:], in_a_row
        listed = values.tolist()  # host sync: once per log step
        raw = dict(zip(self.FIELDS, listed))
        if reset:
            keep = [0, 0, 0, 0, 1, 0, 1] + [0] * len(self.TERMS)
            self.values.mul_(torch.tensor(keep, device=self.values.device))
        finite = raw["finite_steps"]
        terms = {name: value / finite if finite else math.nan
                 for name, value in zip(self.TERMS, listed[len(self.FIELDS):])}
        return {**terms,
            "loss": raw["loss_sum"] / finite if finite else math.nan,
            "teacher_entropy": raw["entropy_sum"] / finite if finite else math.nan,
            "grad_norm": raw["grad_norm"],
            "skipped_steps": int(raw["skipped_steps"]),
            "nonfinite_in_a_row": int(raw["nonfinite_in_a_row"]),
            "max_nonfinite_in_a_row": int(raw["max_nonfinite_in_a_row"]),
        }

    def state_dict(self) -> dict:
        return {"values": self.values}

    def load_state_dict(self, state: dict) -> None:
        values = state["values"].clone()  # DCP may hand back `self.values` itself, loaded in place
        self.values.zero_()  # a checkpoint from before TERMS has the FIELDS only: the terms' sums start at 0
        self.values[:len(values)].copy_(values)


def max_memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on the GPU, peak resident set size of this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class Throughput:
    """Images per second and ETA from the wall time between two log steps, and the training time so far
    (`trained_seconds`, counted on from `seconds_before`). Time spent inside `paused()` counts in neither."""

    def __init__(self, start_step: int, seconds_before: float = 0.0):
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.started, self.seconds_before, self.paused_seconds = self.last_time, seconds_before, 0.0
        self.pause_started: float | None = None

    def tick(self, step: int, images_per_step: int, total_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_time, self.last_step = now, step
        return images_per_step / seconds_per_step, (total_steps - step) * seconds_per_step

    @contextmanager
    def paused(self):
        """Leave the time spent in the `with` block (an evaluation) out of the throughput and the training time."""
        self.pause_started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - self.pause_started
            self.pause_started = None
            self.last_time += seconds
            self.paused_seconds += seconds

    def trained_seconds(self) -> float:
        """Training time so far; read inside `paused()`, it is the time at which the pause began."""
        now = time.perf_counter() if self.pause_started is None else self.pause_started
        return self.seconds_before + now - self.started - self.paused_seconds


class CollapseWatch:
    """Warn when the teacher's output entropy stays near 0 (one prototype wins) or near ln K (uniform outputs,
    centering won over sharpening) for `patience_steps`: the two collapse modes of DINO Sec. 5.3."""

    LOW, HIGH = 0.05, 0.95  # fractions of ln K

    def __init__(self, out_dim: int, patience_steps: int, what: str = "teacher output"):
        """`what`: the distribution watched, named in the warning (iBOT's: "teacher patch")."""
        self.what = what
        self.log_k = math.log(out_dim)
        self.patience_steps = patience_steps
        self.since: dict[str, int] = {}
        self.warned: set[str] = set()

    @classmethod
    def mode(cls, entropy: float, log_k: float) -> str | None:
        """The collapse mode a teacher entropy points to: "one prototype", "uniform", or None (neither)."""
        if entropy < cls.LOW * log_k:
            return "one prototype"
        if entropy > cls.HIGH * log_k:
            return "uniform"
        return None

    def check(self, step: int, entropy: float) -> str | None:
        """A warning the first time a collapse mode has lasted `patience_steps`, else None."""
        current = self.mode(entropy, self.log_k)
        for mode in ("one prototype", "uniform"):
            if mode != current:
                self.since.pop(mode, None)
                continue
            start = self.since.setdefault(mode, step)
            if step - start >= self.patience_steps and mode not in self.warned:
                self.warned.add(mode)
                return (f"{self.what} entropy {entropy:.3f} has been near "
                        f"{'0' if mode == 'one prototype' else f'ln K = {self.log_k:.2f}'} since step {start}: "
                        f"the teacher looks collapsed ({mode}); try a lower teacher temperature, a higher "
                        f"teacher momentum or a smaller head.out_dim")
        return None


def resolve_tensorboard(choice: str, output_dir: Path | None) -> Path | None:
    """DIR/tb for logging.tensorboard = `choice` ("auto": when the tensorboard package is installed), or None; the
    choice is logged once. An explicit "true" without the package is a ValueError naming it."""
    if choice == "false" or output_dir is None:
        return None
    installed = importlib.util.find_spec("tensorboard") is not None
    if not installed:
        if choice == "true":
            raise ValueError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard, or "
                             "fastdino[tensorboard]); or set logging.tensorboard=auto or false")
        logger.info("TensorBoard: off (logging.tensorboard=auto and the tensorboard package is not installed)")
        return None
    logger.info("TensorBoard: event files in %s (tensorboard --logdir %s)", output_dir / "tb", output_dir.parent)
    return output_dir / "tb"


class TensorBoard:
    """Event files (torch's SummaryWriter) mirroring metrics.jsonl: every numeric column of a row is a scalar at the
    row's step; images too (the attention maps of each k-NN pass). Opened at `purge_step`, it first hides what
    earlier writers in the folder logged at that step and after (TensorBoard's own purge on restart), so that rows
    metrics.jsonl dropped or replaced are gone here too."""

    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add_row(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def add_image(self, tag: str, image, step: int) -> None:
        """`image`: a PIL RGB image."""
        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsWriter:
    """Progress lines on the log and rows in DIR/metrics.jsonl, mirrored to TensorBoard event files in
    `tensorboard_dir` when given (rank 0 only)."""

    def __init__(self, path: Path | None, total_steps: int, tensorboard_dir: Path | None = None):
        self.path = path
        self.total_steps = total_steps
        self.tensorboard_dir = tensorboard_dir if path is not None else None
        self.tensorboard: TensorBoard | None = None

    def drop_after(self, step: int) -> None:
        """Remove rows logged after `step` (a resumed run logs them again), a `partial` row at `step` (the row of
        a run stopped between two log steps: the resumed run's next row covers its steps) and a line cut short by
        a kill; TensorBoard drops the same."""
        if self.path is None:
            return
        if not self.path.is_file():  # created now, so that every run leaves one, even one that logs no row
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            self._tensorboard_from(step + 1)
            return
        dropped = self._keep(lambda row: row["step"] < step or (row["step"] == step and not row.get("partial")))
        self._tensorboard_from(step if any(row["step"] == step for row in dropped) else step + 1)

    def replace(self, row: dict) -> None:
        """Append `row` in place of the rows of the same step with the same keys (a rerun's end-of-run k-NN)."""
        if self.path is None:
            return
        if self.path.is_file():
            self._keep(lambda old: old["step"] != row["step"] or old.keys() != row.keys())
        self._tensorboard_from(row["step"])
        self.append(row)

    def _keep(self, keep) -> list[dict]:
        """Rewrite the file with the rows `keep` accepts, atomically: a full disk leaves the old file whole.
        Returns the rows dropped."""
        from fastdino.files import atomic_write

        kept, dropped = [], []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("dropping a truncated line of %s", self.path)
                continue
            if keep(row):
                kept.append(line)
            else:
                dropped.append(row)
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(row + "\n" for row in kept)))
        return dropped

    def _tensorboard_from(self, step: int) -> None:
        """A new TensorBoard writer that purges what was logged at `step` and after, then holds again the rows
        metrics.jsonl keeps from `step` on."""
        if self.tensorboard_dir is None:
            return
        self.close()
        self.tensorboard = TensorBoard(self.tensorboard_dir, purge_step=step)
        for line in self.path.read_text().splitlines() if self.path.is_file() else []:
            row = json.loads(line)
            if row["step"] >= step:
                self.tensorboard.add_row(row)

    def write(self, row: dict) -> None:
        """Log a training row's progress line and append the row."""
        if self.path is None:
            return
        logger.info(format_row(row, self.total_steps))
        self.append(row)

    def append(self, row: dict) -> None:
        """Append any row (e.g. a k-NN result) without a progress line."""
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard() is not None:
            self.tensorboard.add_row(row)

    def add_image(self, tag: str, image, step: int) -> None:
        """An image (PIL) at `step` in TensorBoard, when it is on."""
        if self._tensorboard() is not None:
            self.tensorboard.add_image(tag, image, step)

    def _tensorboard(self) -> TensorBoard | None:
        """The open TensorBoard writer (opened now if need be: nothing to purge), or None when it is off."""
        if self.tensorboard is None and self.tensorboard_dir is not None:
            self.tensorboard = TensorBoard(self.tensorboard_dir, purge_step=None)
        return self.tensorboard

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def format_row(row: dict, total_steps: int) -> str:
    """One progress line, e.g. `step 120/1000 | epoch 3.87 | 512 img/s | loss 6.91 | lr 1.2e-04 | ...`."""
    eta = int(row["eta_s"])
    return (f"step {row['step']}/{total_steps} | epoch {row['epoch']:.2f} | {row['img_per_s']:.0f} img/s | "
            f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | wd {row['wd']:.3f} | "
            f"momentum {row['teacher_momentum']:.4f} | teacher temp {row['teacher_temp']:.4f} | "
            f"teacher entropy {row['teacher_entropy']:.3f} | "
            + "".join(f"{name.replace('_', ' ')} {row[name]:.4f} | " for name in StepStats.TERMS if name in row)
            + f"grad norm {row['grad_norm']:.3f} | "
            f"skipped {row['skipped_steps']} | mem {row['max_memory_gib']:.2f} GiB | "
            f"ETA {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s")


def format_knn_row(row: dict, k: int) -> str:
    """One k-NN progress line, e.g. `step 600 (epoch 19.35): k-NN top-1 12.2% (k=20)`."""
    return f"step {row['step']} (epoch {row['epoch']:.2f}): k-NN top-1 {row['knn_top1']:.1f}% (k={k})"


# A change of the loss between the first and the last logged step smaller than this fraction of ln K is a stall.
LOSS_STALL_FRACTION = 0.02


def nonfinite_at_end(rows: list[dict]) -> int:
    """How many steps at the end of a run had a non-finite loss or gradient (skipped, so the weights stopped
    changing), from its last training row; 0 when its last step was finite."""
    trained = [r for r in rows if "loss" in r]
    if not trained:
        return 0
    last = max(trained, key=lambda r: r["step"])
    return last.get("nonfinite_in_a_row", 0 if math.isfinite(last["loss"]) else last.get("skipped_steps", 1))


def end_of_run_statement(rows: list[dict], out_dim: int) -> list[str]:
    """Plain sentences on a run from its metrics rows (training rows and k-NN rows, in any order): first, when
    its last steps were non-finite, that they were; the teacher entropy at the end against ln K (CollapseWatch's
    thresholds), the loss at the end against its start and ln K, both over the finite steps, and the k-NN curve
    (first -> best -> last) when k-NN ran."""
    log_k = math.log(out_dim)
    lines = []
    tail = nonfinite_at_end(rows)
    if tail:
        end = max(r["step"] for r in rows if "loss" in r)
        lines.append(f"the run ended non-finite: the last {tail} step(s), {end - tail + 1} to {end}, had a non-finite "
                     f"loss or gradient and were skipped, so the weights are those of step {end - tail}; what "
                     f"follows is about the finite steps (fewer than max_nonfinite_in_a_row in a row: the run was "
                     f"not stopped)")
    trained = sorted((r for r in rows if math.isfinite(r.get("loss", math.nan))), key=lambda r: r["step"])
    if trained:
        first, last = trained[0], trained[-1]
        entropy = last["teacher_entropy"]
        verdict = {
            None: "clear of both collapse modes",
            "uniform": "near ln K: teacher outputs uniform — collapsed or not learning yet",
            "one prototype": "near 0: one prototype dominates — collapsed",
        }[CollapseWatch.mode(entropy, log_k)]
        lines.append(f"teacher output entropy {entropy:.2f} of ln K = {log_k:.2f} at step {last['step']}: {verdict}")
        if first is last:
            lines.append(f"loss {last['loss']:.3f} at step {last['step']} (ln K = {log_k:.2f}): one logged step, "
                         f"no trend yet")
        elif abs(first["loss"] - last["loss"]) > LOSS_STALL_FRACTION * log_k:
            trend = "fell" if last["loss"] < first["loss"] else "rose"
            lines.append(f"loss {trend} from {first['loss']:.3f} to {last['loss']:.3f} (ln K = {log_k:.2f})")
        else:
            lines.append(f"loss stalled: {first['loss']:.3f} at step {first['step']}, {last['loss']:.3f} at step "
                         f"{last['step']} (ln K = {log_k:.2f})")
    knn = sorted((r for r in rows if "knn_top1" in r), key=lambda r: r["step"])
    if knn:
        best = max(knn, key=lambda r: r["knn_top1"])
        points = [("first", knn[0]), ("best", best), ("last", knn[-1])] if len(knn) > 1 else [("", knn[0])]
        curve = " -> ".join(f"{name} {r['knn_top1']:.1f}% at step {r['step']}".lstrip() for name, r in points)
        untrained = [r["knn_top1_untrained"] for r in knn if "knn_top1_untrained" in r]
        lines.append(f"k-NN top-1: {curve}" + (f" (untrained network {untrained[0]:.1f}%)" if untrained else ""))
    return lines
