"""The DINO training loop: `Trainer` builds student, teacher, loss and optimizer; `train_step` is the algorithm
(DINO's, or with loss.ibot_weight / loss.koleo_weight DINOv2's sum of named terms, `_dinov2_loss`);
`train` runs steps, logs, checkpoints and resumes. Launch with `fastdino train ...` or
`torchrun --nproc_per_node=N -m fastdino train ...` (see cli.py).

Build order (torchtitan): student and teacher on the meta device -> parallelize (parallelize.py) -> `to_empty` ->
the student takes the run's initial weights (model.py: `initial_state`) -> the teacher copies the student ->
optimizer.

No host-device sync inside a step. Loss, gradient norm and counters stay on the device (`StepStats`); a step
with a non-finite gradient norm is skipped by the fused AdamW's `found_inf` flag, with the teacher momentum set to 1
and the loss center restored, so it changes nothing but the counters. The host reads them every `log_every`
steps and stops the run after `max_nonfinite_in_a_row` skipped steps in a row.

With a time budget (`minutes`), budget.py's `fit_to_budget` sets the number of steps before training starts; the
count is stored in every checkpoint, so a resumed run keeps it. With `eval.knn_every_epochs`, the loop runs a k-NN
of the teacher on the val split every that many epochs and at the last step; its time counts neither as training
time nor in the throughput.
"""
import contextlib
import logging
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from fastdino.engine.checkpoint import (
    Checkpointer,
    ModelState,
    OptimizerState,
    PerRank,
    TrainState,
    full_backbone_state_dict,
    set_rng_states,
)
from fastdino.engine.clipping import clip_gradients_
from fastdino.engine.config import TrainConfig, checkpoint_every, to_dict
from fastdino.engine.cuda_graph import PostBackwardGraphs, StepGraph, resolve_cuda_graph
from fastdino.engine.eval import KNNDataError, knn_accuracy
from fastdino.engine.ibot_loss import iBOTPatchLoss
from fastdino.engine.koleo_loss import KoLeoLoss
from fastdino.engine.loss import DINOLoss
from fastdino.engine.metrics import (
    CollapseWatch,
    MetricsWriter,
    StepStats,
    Throughput,
    format_knn_row,
    max_memory_gib,
    resolve_tensorboard,
)
from fastdino.engine.parallelize import (
    DynamicLossScale,
    apply_ac,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    compile_forward,
    last_layer_weights,
    local_tensors,
    resolve_compile,
    resolve_mode,
    resolve_precision,
)
from fastdino.engine.model import Outputs, build_model, initial_state
from fastdino.engine.schedules import Schedules
from fastdino.engine.stop import StopRequest
from fastdino.engine.update import TritonUpdate, resolve_update_impl
from fastdino.engine.weight_cast import WeightCasts
from fastdino.kernels import EMAUpdate
from fastdino.pipelines.masking import MaskBatch, MaskingConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def masking_config(cfg: TrainConfig) -> MaskingConfig | None:
    """The iBOT masks a run's loader draws with every batch (None without iBOT)."""
    if cfg.loss.ibot_weight == 0:
        return None
    return MaskingConfig(grid=cfg.data.global_crops_size // cfg.model.patch_size,
                         ratio_min_max=cfg.loss.ibot_mask_ratio, probability=cfg.loss.ibot_mask_probability)


ENTROPY_ROWS = 256  # about how many masked patches the logged teacher patch entropy is the mean over


BACKBONE_EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def lr_multiplier(name: str, num_blocks: int, layer_decay: float, patch_embed_lr_mult: float) -> float:
    """DINOv2's per-parameter lr factor (dinov2/utils/param_groups.py: get_vit_lr_decay_rate, with the patch
    embedding's extra factor): a backbone parameter of block i gets layer_decay^(L - i), the embeddings and tokens
    layer_decay^(L + 1), the backbone's final norm 1; the heads 1."""
    if not name.startswith("backbone."):
        return 1.0
    name = name.removeprefix("backbone.")
    layer = num_blocks + 1
    if any(part in name for part in BACKBONE_EMBEDDINGS):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    factor = layer_decay ** (num_blocks + 1 - layer)
    return factor * patch_embed_lr_mult if "patch_embed" in name else factor


def param_groups(model: torch.nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: decayed weights, then biases and norms without decay, each split by lr factor (`lr_multiplier`,
    1 for all unless layer decay or the patch-embedding factor is set), each group with its `lr_multiplier` and
    `wd_multiplier` (1 or 0) for the schedules. As in the official get_params_groups, the CLS token and position
    embeddings are decayed."""
    num_blocks = len(model.backbone.blocks)
    groups: dict[tuple[float, float], list] = {}
    for wd_multiplier in (1.0, 0.0):  # decayed groups first
        for name, param in model.named_parameters():
            exempt = name.endswith(".bias") or param.ndim <= 1
            if exempt == (wd_multiplier == 0.0):
                lr_mult = lr_multiplier(name, num_blocks, layer_decay, patch_embed_lr_mult)
                groups.setdefault((wd_multiplier, lr_mult), []).append(param)
    return [{"params": params, "lr_multiplier": lr_mult, "wd_multiplier": wd_multiplier,
             **({} if wd_multiplier else {"weight_decay": 0.0})}
            for (wd_multiplier, lr_mult), params in groups.items()]


class Trainer:
    """Student, teacher, loss, optimizer and the step; `mesh` is None for one process."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, *, device: torch.device, mesh: DeviceMesh | None = None,
                 output_dir: Path | None = None, run_config: TrainConfig | None = None):
        """`run_config`: the config stored in every checkpoint as the run's identity (default `cfg`; the CLI gives
        the one it was asked for, before it turned off a k-NN the dataset cannot have)."""
        self.cfg, self.device, self.mesh = cfg, device, mesh
        self.run_config = run_config or cfg
        self.rank = mesh.get_rank() if mesh is not None else 0
        self.world_size = mesh.size() if mesh is not None else 1
        self.mode = resolve_mode(cfg.parallel.mode, self.world_size, process_group=mesh is not None)
        self.precision = resolve_precision(cfg.parallel.precision, device)
        self.compile = resolve_compile(cfg.model.compile, device)
        if cfg.data.batch_size % self.world_size:
            raise ValueError(f"data.batch_size ({cfg.data.batch_size}) must be a multiple of the number of "
                             f"processes ({self.world_size})")
        torch.manual_seed(cfg.seed + self.rank)  # stochastic depth differs between ranks, as in DINO
        self.steps_per_epoch = steps_per_epoch
        self.set_total_steps(cfg.epochs * steps_per_epoch)  # a time budget replaces it (budget.py)
        self.knn_every_steps = self._knn_every_steps()

        self.student, self.teacher = self._build_models()
        self.model = self.student.module if self.mode == "ddp" else self.student  # the DINOModel itself
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.teacher_params = list(self.teacher.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.layer_decay,
                                                        cfg.optim.patch_embed_lr_mult),
                                           lr=self.schedules.peak_lr, fused=True)
        self._init_optimizer_state()
        # Its launch plan is built at the first step; storage moves are checked at log steps (`_log`), not per step.
        self.ema = EMAUpdate(self.teacher_params, self.params, check_storage=False)
        self.weight_casts = self._weight_casts()
        ncrops = 2 + cfg.data.local_crops_number
        self.loss_fn = DINOLoss(cfg.head.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                cfg.loss.warmup_teacher_temp_epochs, cfg.epochs, cfg.loss.student_temp,
                                cfg.loss.center_momentum, impl=cfg.loss.impl, teacher_norm=cfg.loss.teacher_norm,
                                process_group=mesh.get_group() if mesh is not None else None).to(device)
        if self.compile and self.loss_fn.resolve_impl(device) == "torch":  # the Triton loss is one fused launch
            compile_forward(self.loss_fn)
        self.ibot_fn = self.koleo_fn = None  # DINOv2's extra terms, built when their weights are > 0
        if cfg.loss.ibot_weight > 0:
            self.ibot_fn = iBOTPatchLoss(cfg.head.ibot_out_dim if cfg.head.ibot_separate and cfg.head.ibot_out_dim
                                         else cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum,
                                         impl=cfg.loss.ibot_impl,
                                         process_group=mesh.get_group() if mesh is not None else None).to(device)
            ibot_impl = self.ibot_fn.resolve_impl(device)
            if self.compile and ibot_impl == "torch":  # fuses log-softmax, product, sum
                self.ibot_fn.forward_masked = torch.compile(self.ibot_fn.forward_masked, fullgraph=True)
        if cfg.loss.koleo_weight > 0:
            if cfg.data.batch_size // self.world_size < 2:
                raise ValueError(f"loss.koleo_weight > 0 needs 2 images per rank or more (a nearest neighbour in the "
                                 f"rank's batch); data.batch_size={cfg.data.batch_size} on {self.world_size} ranks")
            self.koleo_fn = KoLeoLoss()
        self.loss_scale = DynamicLossScale(device) if self.precision.loss_scaling else None
        self.stats = StepStats(device)
        self.patch_collapse: CollapseWatch | None = None  # the iBOT teacher's, set by `train`
        # This step's lr, weight decay and teacher momentum on the device: one copy per step, read by the Triton
        # update and by CUDA graphs.
        self.schedule_values = torch.zeros(3, device=device)
        self.update_impl = resolve_update_impl(cfg.optim.impl, device, self.mode, cfg.plain_update())
        self.triton_update = TritonUpdate(self, self.schedule_values) if self.update_impl == "triton" else None
        cuda_graph = resolve_cuda_graph(cfg.optim.cuda_graph, device, self.mode, cfg.plain_update())
        self.graphs = {"true": PostBackwardGraphs, "step": StepGraph}.get(cuda_graph, lambda _: None)(self)
        self.step = 0
        self.next_step_rng = None  # (cpu, cuda) RNG states set right before the next step (resume, time budget)
        self.trained_seconds = 0.0  # training wall time of the earlier runs of this output folder
        self.untrained_knn: dict | None = None  # k-NN of the initial weights when the time budget measured it
        self.throughput: Throughput | None = None  # the clock of the running `train`
        self.output_dir = Path(output_dir) if output_dir is not None else None
        tensorboard_dir = resolve_tensorboard(cfg.logging.tensorboard, self.output_dir)  # on every rank: one error
        self.tensorboard_dir = tensorboard_dir if self.rank == 0 else None
        length = (f"steps from a {cfg.minutes:g}-min time budget" if cfg.minutes is not None
                  else f"{self.schedules.total_steps} steps")
        logger.info("mode %s, precision %s, %d process(es), %.1fM parameters, %s (%d per epoch)",
                    self.mode, self.precision.name, self.world_size,
                    sum(p.numel() for p in self.model.parameters()) / 1e6, length, steps_per_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Make every schedule span `total_steps`; `max_steps` may still stop the run earlier."""
        self.schedules = Schedules.from_config(self.cfg, self.steps_per_epoch, total_steps)
        self.stop_step = min(total_steps, self.cfg.max_steps or total_steps)

    def _knn_every_steps(self) -> int:
        """Steps between two k-NN passes during training; 0 when off or when the dataset has no val split."""
        from fastdino.pipelines import resolve_split

        every, path = self.cfg.eval.knn_every_epochs, self.cfg.data.path
        if not every:
            return 0
        try:
            has_val = path is not None and bool(resolve_split(path, "val"))
        except ValueError:
            has_val = False
        if not has_val:
            logger.info("periodic k-NN (eval.knn_every_epochs=%g) is off: dataset %s has no held-out val split",
                        every, path)
            return 0
        return max(1, round(every * self.steps_per_epoch))

    def _build_models(self):
        with torch.device("meta"):
            student, teacher = build_model(self.cfg, student=True), build_model(self.cfg, student=False)
        teacher.requires_grad_(False)
        apply_ac(student, self.cfg.model.activation_checkpointing)
        if self.compile:
            apply_compile(student)
            apply_compile(teacher)
        if self.mode == "fsdp":
            apply_fsdp(student, self.mesh, self.precision.mp_policy, trains=True)
            apply_fsdp(teacher, self.mesh, self.precision.mp_policy, trains=False)
        student.to_empty(device=self.device)
        teacher.to_empty(device=self.device)
        set_model_state_dict(student, initial_state(self.cfg), options=StateDictOptions(full_state_dict=True))
        teacher.load_state_dict(student.state_dict())
        if self.mode == "ddp":
            student = apply_ddp(student, self.mesh, self.device)
        return student, teacher

    def _weight_casts(self) -> tuple[WeightCasts, WeightCasts] | None:
        """(teacher, student) run on one cast of their weights per step (weight_cast.py says when), or None."""
        dtype = self.precision.autocast_dtype
        if (dtype is None or self.mode != "single" or self.compile
                or checkpoint_every(self.cfg.model.activation_checkpointing)):
            return None
        return WeightCasts(self.teacher, dtype, trains=False), WeightCasts(self.student, dtype, trains=True)

    def _init_optimizer_state(self) -> None:
        """Create AdamW's state for every parameter now, as its first real step would (zero moments, step 0), by a
        skipped step on zero gradients. Otherwise a parameter without state yet (the frozen last layer) gets a fake
        step from DCP's get_optimizer_state_dict when a run resumes, and the resumed run drifts."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.found_inf = torch.ones((), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        """Autocast in the single and ddp modes; FSDP2 casts through its MixedPrecisionPolicy instead."""
        if self.mode == "fsdp" or self.precision.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast_dtype)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def train_step(self, crops: list[torch.Tensor], masks: MaskBatch | None = None) -> None:
        """One step on this rank's crops (2 global first, then the local ones, each (B, 3, H, W)); with iBOT,
        `masks` are the global crops' (default: the batch's own, `crops.masks` of a CropBatch)."""
        values = self.schedules.at(self.step)
        self.schedule_values.copy_(torch.tensor([values.lr, values.weight_decay, values.teacher_momentum]),
                                   non_blocking=True)  # from pageable memory: staged at once, no sync
        if self.graphs is not None:
            self.graphs.set_schedule()
        else:
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] = values.lr * group.get("lr_multiplier", 1.0)
                wd_multiplier = group.get("wd_multiplier", float(i == 0))  # groups saved before the multipliers
                if wd_multiplier:
                    group["weight_decay"] = values.weight_decay * wd_multiplier
        if isinstance(self.graphs, StepGraph):
            self.graphs.run(crops, values)
        else:
            self.device_step(crops, values, masks)
        self.step += 1

    def device_step(self, crops: list[torch.Tensor], values, masks: MaskBatch | None = None) -> None:
        """The step's device work for the schedule `values` (schedules.py): forward, loss, backward, update."""
        center = self.loss_fn.center.clone()
        ibot_center = self.ibot_fn.center.clone() if self.ibot_fn is not None else None
        fused = self.cfg.loss.fused_head  # the models stop at the bottleneck; the loss applies the last layers
        teacher, student = self.weight_casts or (self.teacher, self.student)
        with self._autocast():
            if self.ibot_fn is None and self.koleo_fn is None:  # DINO: the official step
                with torch.no_grad():
                    teacher_out = teacher(crops[:2], bottleneck=fused)  # (2*B, K), fused: (2*B, D)
                student_out = student(crops, bottleneck=fused)  # (V*B, K), fused: (V*B, D)
                loss = self._loss(student_out, teacher_out, values.teacher_temp)
                terms = None
            else:
                loss, terms = self._dinov2_loss(teacher, student, crops, self._masks(crops, masks),
                                                values.teacher_temp)
        (loss * self.loss_scale.scale if self.loss_scale else loss).backward()

        if values.freeze_last_layer:
            self.model.cancel_last_layer_gradients()
        if isinstance(self.graphs, PostBackwardGraphs):
            self.graphs.run(loss, center, frozen=values.freeze_last_layer)
        elif self.graphs is not None:  # inside the step's graph: the schedule comes from the device
            self.graphs.update(loss.detach(), self.loss_fn.last_teacher_entropy, center)
        else:
            self.after_backward(loss.detach(), self.loss_fn.last_teacher_entropy, center, values.teacher_momentum,
                                terms=terms, ibot_center=ibot_center)

    def _masks(self, crops, masks: MaskBatch | None) -> MaskBatch | None:
        if self.ibot_fn is None:
            return None
        masks = masks if masks is not None else getattr(crops, "masks", None)
        if masks is None:
            raise ValueError("loss.ibot_weight > 0 needs the global crops' iBOT masks with every batch: a loader "
                             "built with masking=trainer.masking_config(), or train_step(crops, masks)")
        return masks

    def masking_config(self) -> MaskingConfig | None:
        """The masks the loader must draw for this run (None without iBOT)."""
        return masking_config(self.cfg)

    def _dinov2_loss(self, teacher, student, crops: list[torch.Tensor], masks: MaskBatch | None,
                     teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv2's objective (dinov2/train/ssl_meta_arch.py: forward_backward) as a sum of named terms: the DINO
        loss over the global and local pairs (normalised by the number of pairs, as DINOLoss and DINOv2), plus
        ibot_weight * iBOT (the student's masked global-crop patches against the teacher's, per crop and then over
        the 2B crops) plus koleo_weight * KoLeo (summed over the two global crops, each over the rank's B images).
        Returns the loss and the (4,) terms of StepStats.TERMS (unweighted; 0 for a term that is off).

        One difference: without local crops dinov2 divides its DINO term by 3 (ssl_meta_arch.py:147,
        max(n_local_crops * 2, 1) + 2 pairs), DINOLoss by the 2 pairs there are."""
        ibot, koleo, cfg = self.ibot_fn, self.koleo_fn, self.cfg
        index = masks.indices if masks is not None else None
        fused = cfg.loss.fused_head  # the CLS rows stop at the bottleneck
        ibot_fused = ibot is not None and ibot.impl == "fused"  # the patch rows too
        with torch.no_grad():  # KoLeo alone: the teacher's CLS outputs only
            teacher = (teacher(crops[:2], patch_index=index, bottleneck=fused, patch_bottleneck=ibot_fused)
                       if index is not None else Outputs(teacher(crops[:2], bottleneck=fused), None, None))
        student = student(crops, masks=masks.masks if masks is not None else None, patch_index=index,
                          cls_tokens=koleo is not None, bottleneck=fused, patch_bottleneck=ibot_fused)
        dino = self._loss(student.cls, teacher.cls, teacher_temp)
        loss, zero = dino, torch.zeros((), device=dino.device)
        ibot_loss = koleo_loss = patch_entropy = zero
        if ibot_fused:
            ibot_loss, patch_entropy = self._fused_ibot_loss(student.patches, teacher.patches, masks, teacher_temp)
            loss = loss + cfg.loss.ibot_weight * ibot_loss
        elif ibot is not None:
            valid = masks.valid
            if cfg.loss.teacher_norm == "sinkhorn_knopp":
                probs = ibot.sinkhorn_knopp_teacher(teacher.patches, teacher_temp, masks.n_masked, valid=valid)
            else:
                probs = ibot.softmax_center_teacher(teacher.patches[None], teacher_temp)[0]  # center (1, 1, K)
                ibot.update_center(teacher.patches[None], masks.n_masked)
                ibot.apply_center_update()  # now, not at the next step: a checkpoint in between holds it
            ibot_loss = ibot.forward_masked(student.patches, probs, masks.masks, masks_weight=masks.weights)
            with torch.no_grad():  # on every stride-th row: a full (M, K) pass would cost as much as the softmax
                stride = max(1, masks.upperbound // ENTROPY_ROWS)
                sampled = valid[::stride]
                patch_entropy = ((torch.special.entr(probs[::stride]).sum(-1) * sampled).sum()
                                 / sampled.sum().clamp_min(1))
            loss = loss + cfg.loss.ibot_weight * ibot_loss
        if koleo is not None:
            global_tokens = student.cls_tokens[:2 * crops[0].shape[0]]
            koleo_loss = sum(koleo(c) for c in global_tokens.chunk(2))  # never between the crops of one image
            loss = loss + cfg.loss.koleo_weight * koleo_loss
        return loss, torch.stack([dino.detach().float(), ibot_loss.detach().float(), koleo_loss.detach().float(),
                                  patch_entropy.float().reshape(())])

    def _fused_ibot_loss(self, student_features: torch.Tensor, teacher_features: torch.Tensor, masks: MaskBatch,
                         teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """iBOT (loss.ibot_impl=fused) of the masked patches' bottleneck features and the iBOT head's last layers
        (the DINO head's when shared); returns the loss and the logged teacher patch entropy."""
        head = "ibot_head" if self.model.ibot_head is not None else "head"
        student_v, teacher_v, student_g, teacher_g = last_layer_weights(self.model, self.teacher, head)
        return self.ibot_fn.forward_fused_head(
            student_features, student_v, teacher_features, teacher_v, teacher_temp, masks.masks, masks.weights,
            masks.n_masked, sinkhorn=self.cfg.loss.teacher_norm == "sinkhorn_knopp", student_gain=student_g,
            teacher_gain=teacher_g, entropy_stride=max(1, masks.upperbound // ENTROPY_ROWS),
            kernel_impl=self.cfg.loss.impl)

    def after_backward(self, loss: torch.Tensor, entropy: torch.Tensor, center: torch.Tensor, teacher_momentum, *,
                       lr: torch.Tensor | None = None, weight_decay: torch.Tensor | None = None,
                       terms: torch.Tensor | None = None, ibot_center: torch.Tensor | None = None) -> None:
        """Unscale, clip, AdamW, EMA, center and counters: device work only, state changed in place, so that
        optim.cuda_graph can capture it (cuda_graph.py). `loss` and `entropy` are the step's, `center` the center
        before this step's loss (restored on a skipped step). With `lr` and `weight_decay` (0-d tensors, the graphs'
        inputs) AdamW's decoupled weight decay is applied here, before its update, instead of by AdamW. `terms`: the
        named loss terms (StepStats.TERMS); `ibot_center`: the iBOT center before this step (restored on a skip).
        On the Triton path (update.py; DINO's step only: config.plain_update) the schedule comes from
        `schedule_values` and `teacher_momentum`, `lr` and `weight_decay` are not read."""
        if self.triton_update is not None:
            self.triton_update(loss, entropy, center, keep_grads=self.graphs is not None)
            return
        if self.loss_scale:
            self.loss_scale.unscale_([p.grad for p in self.params if p.grad is not None])
        grad_norm = clip_gradients_(self.params, self.cfg.optim.clip_grad, self.cfg.optim.clip_grad_mode)
        skipped = ~torch.isfinite(grad_norm)  # the same on every rank: the norm is global

        if weight_decay is not None:
            decayed = [p for p in self.optimizer.param_groups[0]["params"] if p.grad is not None]
            with torch.no_grad():
                torch._foreach_mul_(local_tensors(decayed), 1 - lr * weight_decay * ~skipped)
        self.optimizer.found_inf = skipped.float()  # fused AdamW skips the update (and its step count) when 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.graphs is None)  # graphs read the gradients where they are
        self.ema(torch.where(skipped, 1.0, teacher_momentum))
        self.loss_fn.center.copy_(torch.where(skipped, center, self.loss_fn.center))
        if ibot_center is not None:
            self.ibot_fn.center.copy_(torch.where(skipped, ibot_center, self.ibot_fn.center))
        if self.loss_scale:
            self.loss_scale.update(skipped)
        nonfinite = ~torch.isfinite(loss)  # per rank; StepStats.read takes the max over ranks
        if self.loss_scale is None:  # with fp16 loss scaling, a skip with a finite loss is an overflow
            nonfinite |= skipped
        self.stats.update(loss, entropy, grad_norm, skipped, nonfinite, terms)

    def _loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """DINOLoss of the logits, or with loss.fused_head of the bottleneck features and the last layers' weights."""
        if not self.cfg.loss.fused_head:
            return self.loss_fn(student_out, teacher_out, self.epoch, teacher_temp=teacher_temp)
        student_v, teacher_v, student_g, teacher_g = last_layer_weights(self.model, self.teacher)
        return self.loss_fn.forward_fused_head(student_out, student_v, teacher_out, teacher_v, self.epoch,
                                               teacher_temp, student_gain=student_g, teacher_gain=teacher_g)

    def train(self, loader, stop: StopRequest | None = None) -> list[dict]:
        """Run from `self.step` to the stop step over `loader` (a MultiCropLoader of this rank's batches): log
        every `log_every` steps, run the periodic k-NN, checkpoint every `checkpoint.every_steps` (epoch ends when 0)
        and at the end, and after the step at which `stop` reports a signal (see stop.py), which then ends the
        run. Returns the logged training rows (rank 0; empty elsewhere)."""
        writer = self.metrics_writer()
        try:
            return self._train(loader, stop, writer)
        finally:
            writer.close()

    def _train(self, loader, stop: StopRequest | None, writer: MetricsWriter) -> list[dict]:
        cfg = self.cfg
        writer.drop_after(self.step)
        patience = max(self.steps_per_epoch, 5 * cfg.log_every)
        collapse = CollapseWatch(cfg.head.out_dim, patience_steps=patience)
        self.patch_collapse = (CollapseWatch(self.ibot_fn.patch_out_dim, patience, what="teacher patch")
                               if self.ibot_fn is not None else None)
        self.throughput = Throughput(self.step, self.trained_seconds)
        rows = []
        self.student.train()
        self.teacher.train()
        while self.step < self.stop_step:
            if self.step % self.steps_per_epoch == 0:  # else a resumed loader already stands mid-epoch
                loader.set_epoch(self.epoch)
            start = self.step
            for crops in loader:
                self.restore_rng()
                self.train_step(crops)
                if stop is not None and self._stop_agreed(stop):
                    self.stop_step = self.step  # a signal: this step is the last, logged and checkpointed
                on_cycle = self.step % cfg.log_every == 0 or self.step == self.schedules.total_steps
                if on_cycle or self.step == self.stop_step:  # a run stopped between log steps shows its loss too
                    rows.append(self._log(writer, collapse, self.throughput, partial=not on_cycle))
                if self._knn_due():  # before the checkpoint: a run resumed from it must not miss this pass
                    self._periodic_knn(writer)
                if self._checkpoint_due():
                    self.save_checkpoint(loader)
                if self.step >= self.stop_step or self.step % self.steps_per_epoch == 0:
                    break
            if self.step == start:
                raise RuntimeError(f"the data loader yielded no batch at step {self.step} (epoch {self.epoch})")
        if stop is not None and self.mesh is not None:  # a signal after the last check: every rank must know
            stop.agreed(self.mesh.get_group(), self.device)
        self.trained_seconds, self.throughput = self.throughput.trained_seconds(), None
        return [row for row in rows if row]

    def loss_terms(self) -> list[str]:
        """The named loss terms of this run's metrics rows: none for DINO alone (its loss is the `loss` column)."""
        if self.ibot_fn is None and self.koleo_fn is None:
            return []
        return ["dino_loss"] + (["ibot_loss", "teacher_patch_entropy"] if self.ibot_fn is not None else []) + (
            ["koleo_loss"] if self.koleo_fn is not None else [])

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """One process reads its flag after every step; ranks combine theirs at log steps only (stop.py)."""
        if self.mesh is None:
            return stop.agreed()
        return self.step % self.cfg.log_every == 0 and stop.agreed(self.mesh.get_group(), self.device)

    def metrics_writer(self) -> MetricsWriter:
        """The writer of DIR/metrics.jsonl and its TensorBoard mirror (a no-op on ranks other than 0 and without an
        output folder); close it when done."""
        return MetricsWriter(self.output_dir / "metrics.jsonl" if self._writes() else None,
                             self.schedules.total_steps, self.tensorboard_dir)

    def training_seconds(self) -> float:
        """Wall time spent training in this output folder so far, over every resumed run, evaluations left out."""
        return self.throughput.trained_seconds() if self.throughput is not None else self.trained_seconds

    # ---------------------------------------------------------------------------------------------- k-NN

    def _knn_due(self) -> bool:
        if not self.knn_every_steps:
            return False
        if self.step == self.schedules.total_steps:
            return not self.cfg.eval.at_end  # the evaluation at the end takes the last pass
        return self.step % self.knn_every_steps == 0

    def _periodic_knn(self, writer: MetricsWriter) -> None:
        with self.throughput.paused():
            backbone = self.teacher_backbone()
            try:
                row = self.evaluate_knn(backbone)
            except KNNDataError as error:  # the data will not change: off for the rest of the run
                logger.warning("periodic k-NN off: %s", error)
                self.knn_every_steps = 0
                return
            if self.rank == 0:
                logger.info(format_knn_row(row, self.cfg.eval.knn_k))
                writer.append(row)
                self.attention_to_tensorboard(writer, backbone)

    def attention_to_tensorboard(self, writer: MetricsWriter, backbone: torch.nn.Module) -> None:
        """The attention maps of the val split's first image (when it is a folder) in TensorBoard, at this step."""
        from fastdino.engine.visualize import attention_image, first_val_image

        image = first_val_image(self.cfg.data.path) if writer.tensorboard_dir is not None else None
        if image is not None:
            writer.add_image("attention", attention_image(backbone, image)[0], self.step)

    def evaluate_knn(self, teacher_backbone: torch.nn.Module) -> dict:
        """k-NN of `teacher_backbone` (see `teacher_backbone()`) on the val split, collective: a metrics row with
        the step, the epoch, top-1 / top-5 and the training minutes so far."""
        minutes = self.training_seconds() / 60  # read before the evaluation, which is not training time
        result = knn_accuracy(teacher_backbone, self.cfg, self.device)
        return {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "knn_top1": result["top1"],
                "knn_top5": result["top5"], "minutes": round(minutes, 3)}

    def teacher_backbone(self) -> torch.nn.Module:
        """A plain (unsharded) backbone holding the teacher's weights, on every rank (collective under FSDP2)."""
        with torch.random.fork_rng(devices=[]):  # building draws initial weights from the training's CPU RNG
            backbone = build_model(self.cfg, student=False).backbone
        backbone.load_state_dict(full_backbone_state_dict(self.teacher, rank=self.rank, everywhere=True))
        return backbone

    def restore_rng(self) -> None:
        """Set `next_step_rng` (loaded from a checkpoint, or taken by the time budget), once, right before the next
        step: creating the loader's iterator may draw from the global RNG (torch's DataLoader does), which an
        uninterrupted run does not do at this point."""
        if self.next_step_rng is not None:
            set_rng_states(self.next_step_rng, self.device)
            self.next_step_rng = None

    def _checkpoint_due(self) -> bool:
        # A checkpoint holds the loader's position, so a run resumes mid-epoch: with every_steps set, epoch ends
        # need no checkpoint of their own (on a small dataset they would come every few dozen steps).
        every = self.cfg.checkpoint.every_steps or self.steps_per_epoch
        return self.step == self.stop_step or self.step % every == 0

    def _writes(self) -> bool:
        return self.rank == 0 and self.output_dir is not None

    def _log(self, writer: MetricsWriter, collapse: CollapseWatch, throughput: Throughput, *,
             partial: bool = False) -> dict:
        """Read the step accumulators (host sync, all ranks), write a metrics row (rank 0) and stop the run when
        too many steps in a row were skipped. A `partial` row (the run stops between two log steps) leaves the
        accumulators as they are, so a resumed run's rows equal an uninterrupted run's."""
        stats = self.stats.read(self.mesh.get_group() if self.mesh is not None else None, reset=not partial)
        if self.ema.storage_moved():  # what the EMA plan cannot see per step
            raise RuntimeError("a parameter got new storage without trainer.ema.rebuild(): the teacher missed updates")
        values = self.schedules.at(self.step - 1)
        img_per_s, eta_s = throughput.tick(self.step, self.cfg.data.batch_size, self.stop_step)
        row = {
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "loss": stats["loss"],
            "lr": values.lr, "wd": values.weight_decay, "teacher_momentum": values.teacher_momentum,
            "teacher_temp": values.teacher_temp, "teacher_entropy": stats["teacher_entropy"],
            "grad_norm": stats["grad_norm"], "skipped_steps": stats["skipped_steps"],
            "nonfinite_in_a_row": stats["nonfinite_in_a_row"],
            "images_seen": self.step * self.cfg.data.batch_size, "img_per_s": img_per_s,
            "max_memory_gib": max_memory_gib(self.device), "eta_s": eta_s,
        }
        for name in self.loss_terms():
            row[name] = stats[name]
        if partial:
            row["partial"] = True
        if stats["max_nonfinite_in_a_row"] >= self.cfg.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{stats['max_nonfinite_in_a_row']} steps in a row up to step {self.step} had a non-finite loss or "
                f"gradient norm and were skipped. Likely causes: fp16 with small patches overflowing "
                f"(parallel.precision={self.precision.name}; try bf16 or fp32), a learning rate too high "
                f"(optim.base_lr={self.cfg.optim.base_lr}), a teacher temperature too low "
                f"(loss.teacher_temp={self.cfg.loss.teacher_temp}, "
                f"loss.warmup_teacher_temp={self.cfg.loss.warmup_teacher_temp}), or non-finite input images.")
        if stats["skipped_steps"]:
            logger.warning("step %d: %d step(s) skipped since the last log (non-finite loss or gradient norm)",
                           self.step, stats["skipped_steps"])
        warning = collapse.check(self.step, row["teacher_entropy"])
        if warning and self.rank == 0:
            logger.warning(warning)
        if self.patch_collapse is not None:
            warning = self.patch_collapse.check(self.step, row["teacher_patch_entropy"])
            if warning and self.rank == 0:
                logger.warning(warning)
        if self.rank != 0:
            return {}
        writer.write(row)
        return row

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.output_dir / "checkpoints", keep_last=self.cfg.checkpoint.keep_last, rank=self.rank,
                            process_group=self.mesh.get_group() if self.mesh is not None else None)

    def checkpoint_state(self, loader) -> dict:
        """Everything a resumed run needs, under the fixed keys of the run-directory contract."""
        return {
            "student": ModelState(self.student),
            "teacher": ModelState(self.teacher),
            "optimizer": OptimizerState(self.student, self.optimizer),
            "loss": {"center": self.loss_fn.center,
                     **({"ibot_center": self.ibot_fn.center} if self.ibot_fn is not None else {})},
            "train_state": TrainState(self),
            "dataloader": PerRank(loader, self.rank),
        }

    def save_checkpoint(self, loader) -> Path:
        """Checkpoint (collective) and export the teacher backbone as DIR/teacher_backbone.safetensors."""
        path = self.checkpointer().save(self.step, self.checkpoint_state(loader), self.identity())
        self.export_teacher_backbone()
        return path

    def identity(self) -> dict:
        """What this run's checkpoints are (checkpoint.py: identity): its config and its number of processes."""
        return {"config": to_dict(self.run_config), "world_size": self.world_size}

    def resume(self, loader) -> bool:
        """Load the latest checkpoint of the output folder, if any (collective); True when resumed."""
        checkpointer = self.checkpointer()
        latest = checkpointer.latest()
        if latest is None:
            return False
        checkpointer.load(latest, self.checkpoint_state(loader))
        if self.cfg.minutes is not None:
            logger.info("time budget %g min: the schedules keep the %d steps measured when the run started",
                        self.cfg.minutes, self.schedules.total_steps)
        return True

    def export_teacher_backbone(self) -> Path | None:
        """Gather the teacher backbone (collective) and write it with EVAL's save_backbone on rank 0."""
        from fastdino.engine.backbone_io import save_backbone

        state = full_backbone_state_dict(self.teacher, rank=self.rank)
        if state is None or self.output_dir is None:
            return None
        m = self.cfg.model
        return save_backbone(state, self.output_dir / "teacher_backbone.safetensors", arch=m.arch,
                             patch_size=m.patch_size, img_size=m.img_size,
                             extra={"step": self.step, "model": to_dict(m)})


if __name__ == "__main__":
    # `torchrun ... -m fastdino.engine.train ARGS`, the older launch line, hands this process over to
    # `python -m fastdino train ARGS`: importing cli.py here would make this module depend on its own caller.
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "fastdino", "train", *sys.argv[1:]])
