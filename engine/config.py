"""The whole training configuration as one dataclass tree, its presets, and how files and overrides change it.

Every field has a type, a default and a one-line docstring (the string literal after it); `__post_init__` checks
values and raises `ValueError` naming the bad one. Named runs are functions returning a full `TrainConfig`
(`PRESETS`). A YAML file and `section.field=value` overrides are applied on top of a preset by
`apply_overrides`, which rebuilds the tree so every value is validated again.

Lengths are in epochs and the schedules are built from `epochs * steps_per_epoch` steps (see schedules.py), or,
with a time budget (`minutes`), from the number of steps that fit in it, measured once when the run starts.
`max_steps` stops a run early without changing the schedules: a run stopped at step k and resumed with a larger
`max_steps` is the same run.
"""
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastdino.engine.families import FAMILY_MODELS
from fastdino.pipelines.config import MultiCropConfig

# The DINO ViT sizes that `model.arch` names; vit.py builds them (and registers each with patch 16 and 8, MODELS).
ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}

PARALLEL_MODES = ("auto", "fsdp", "ddp", "single")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLIP_GRAD_MODES = ("global", "per_tensor")
CUDA_GRAPH_MODES = ("auto", "false", "true", "step")
TEACHER_TEMP_SCHEDULES = ("per_step", "per_epoch")
LR_SCALINGS = ("linear_256", "sqrt_1024")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_choice(name: str, value, choices) -> None:
    _check(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    """Backbone: a DINO size (vit_tiny, vit_small, vit_base, vit_large) or a DINOv2 / DINOv3 model by its timm name
    (vit_small_patch14_dinov2, vit_small_patch16_dinov3, ...; engine/families.py), which fixes patch_size."""
    patch_size: int = 16
    """Side of a square patch in pixels."""
    img_size: int = 224
    """Image side the position embedding is built for (other crop sizes resample it)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the student (the teacher shares the value; it only matters in training mode)."""
    attention: str = "auto"
    """Attention backend: auto, xformers, sdpa or varlen (one call over all crops, CUDA; see engine/attention.py)."""
    pos_embed_resample: str = "timm"
    """Position embeddings of other crop sizes: timm (bicubic, antialiased) or dino (the official code's)."""
    embed_dim: int | None = None
    """Override of the arch's embedding width (tiny test models); None keeps the arch's."""
    depth: int | None = None
    """Override of the arch's number of blocks; None keeps the arch's."""
    num_heads: int | None = None
    """Override of the arch's number of attention heads; None keeps the arch's."""
    compile: str = "auto"
    """torch.compile of each block, the head and the loss: auto (on for CUDA, off elsewhere), true or false."""
    mlp_impl: str = "auto"
    """The GELU MLP branch with its residual add: triton (one Triton pass in backward that recomputes GELU's output
    instead of keeping it, and folds in the stochastic-depth scale and fc1's bias gradient: 3.4 GiB less at the
    peak and 0.5 ms less at ViT-S/16, batch 128, modelled; kernels/gelu_mlp.py), torch (autograd's composition), or
    auto: triton on CUDA where the block is neither checkpointed nor compiled (a checkpoint's recompute would rerun
    fc2; the compiler fuses the composition itself)."""
    activation_checkpointing: str = "none"
    """Blocks whose activations are recomputed in backward to save memory: none, all, every-N (every N-th), or
    selective (every block keeps its matmul and attention outputs and recomputes the rest: norms, GELU, casts,
    adds; engine/parallelize.py, `selective_checkpoint_contexts`)."""
    init: str | None = None
    """Backbone weights to start student and teacher from (`fastdino train --init PATH`: a timm, Meta DINOv2 /
    DINOv3, official DINO or fastdino checkpoint); null = random, from `seed`. The heads start fresh."""

    def __post_init__(self):
        _check_choice("model.arch", self.arch, [*ARCHS, *FAMILY_MODELS])
        if self.arch in FAMILY_MODELS:
            own = FAMILY_MODELS[self.arch]["patch_size"]
            _check(self.patch_size == own, f"model.patch_size must be {own} for model.arch={self.arch}, "
                                           f"got {self.patch_size}")
        _check(self.patch_size > 0, f"model.patch_size must be > 0, got {self.patch_size}")
        _check(self.img_size % self.patch_size == 0,
               f"model.img_size ({self.img_size}) must be a multiple of model.patch_size ({self.patch_size})")
        _check(0 <= self.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check_choice("model.attention", self.attention, ("auto", "xformers", "sdpa", "varlen"))
        _check_choice("model.pos_embed_resample", self.pos_embed_resample, ("timm", "dino"))
        _check_choice("model.mlp_impl", self.mlp_impl, ("auto", "triton", "torch"))
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"model.{name} must be > 0 or null, got {value}")
        _check_choice("model.compile", self.compile, ("auto", "true", "false"))
        checkpoint_every(self.activation_checkpointing)


def checkpoint_every(spec: str) -> int:
    """model.activation_checkpointing as a block period: none -> 0, all and selective -> 1, every-N -> N."""
    if spec in ("none", "all", "selective"):
        return int(spec != "none")
    number = spec.removeprefix("every-")
    if number != spec and number.isdigit() and int(number) > 0:
        return int(number)
    raise ValueError(f"model.activation_checkpointing must be none, all, selective or every-N with N >= 1, "
                     f"got {spec!r}")


@dataclass
class HeadConfig:
    out_dim: int = 65536
    """K, the number of prototypes (DINO paper Sec. 3.1)."""
    use_bn: bool = False
    """Batch norm in the head's MLP."""
    norm_last_layer: bool = True
    """Weight-normalise the last layer with its norm fixed to 1 (more stable, DINO README)."""
    nlayers: int = 3
    """Layers of the head's MLP."""
    hidden_dim: int = 2048
    """Width of the head's hidden layers."""
    bottleneck_dim: int = 256
    """Width of the L2-normalised bottleneck before the prototypes."""
    ibot_separate: bool = False
    """With loss.ibot_weight > 0: a head of its own for the patch tokens (DINOv2 ibot.separate_head), same sizes."""
    ibot_out_dim: int | None = None
    """Prototypes of the separate iBOT head; null = out_dim."""

    def __post_init__(self):
        for name in ("out_dim", "nlayers", "hidden_dim", "bottleneck_dim"):
            _check(getattr(self, name) > 0, f"head.{name} must be > 0, got {getattr(self, name)}")
        _check(self.ibot_out_dim is None or self.ibot_out_dim > 0,
               f"head.ibot_out_dim must be > 0 or null, got {self.ibot_out_dim}")


@dataclass
class LossConfig:
    student_temp: float = 0.1
    """Temperature of the student softmax."""
    teacher_temp: float = 0.07
    """Teacher softmax temperature after the warmup (sharpening, paper Sec. 3.1)."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0, raised linearly to teacher_temp."""
    warmup_teacher_temp_epochs: float = 30
    """Length of the teacher temperature warmup in epochs."""
    teacher_temp_schedule: str = "per_step"
    """The warmup moves the temperature every step (per_step) or once per epoch, as the official code (per_epoch)."""
    center_momentum: float = 0.9
    """EMA rate of the teacher center (centering, paper Sec. 3.1)."""
    impl: str = "auto"
    """Loss kernel: auto (Triton on CUDA, torch otherwise), triton or torch."""
    teacher_norm: str = "centering"
    """How teacher outputs are normalised: centering (DINO) or sinkhorn_knopp."""
    fused_head: bool = False
    """Fold the head's last layer into the loss (kernels/fused_head_loss.py, Triton on CUDA): the logits are built
    tile by tile with tl.dot and never exist in memory (any parallel.mode). Cost: it computes them twice, forward
    and backward (223 vs 163 GFLOP at ViT-S/16, batch 128, K=65536), to save their memory and traffic. Modelled
    (`fastdino estimate`, batch 128, H200): step 59.1 vs 59.7 ms, peak 15.96 vs 16.18 GiB; head + loss alone 0.67
    vs 1.22 ms (benchmarks/model_head_loss.py). Off by default until the GPU check has measured it (step `head`).
    With head.norm_last_layer=false the trained gains go into the kernel too; with teacher_norm=sinkhorn_knopp the
    teacher's Sinkhorn sums are sweeps of the recomputed logits as well (kernels: `sinkhorn_center`)."""
    ibot_weight: float = 0.0
    """Weight of iBOT's masked-patch loss (DINOv2: 1.0); 0 = off: no masks, no mask token, no patch tokens."""
    koleo_weight: float = 0.0
    """Weight of the KoLeo regulariser on the student's global-crop CLS features (DINOv2: 0.1); 0 = off."""
    ibot_impl: str = "auto"
    """iBOT loss implementation: torch (DINOv2's formulation: (M, K) logits of the M masked patches through
    log-softmax), fused (the patches' bottleneck features and the iBOT head's last layer into the fused head + loss,
    kernels/fused_head_loss.py: no (M, K) tensor) or auto (fused on CUDA, torch elsewhere). Modelled (`fastdino
    estimate --preset dinov2_vit_small14 --gpu h200 data.batch_size=128`): step 78.2 vs 99.5 ms, peak 19.15 vs
    28.38 GiB, fused vs torch. The Triton kernels follow loss.impl (triton: also in the CPU interpreter)."""
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)
    """Range of the masked share of a masked global crop's patches (DINOv2 ibot.mask_ratio_min_max)."""
    ibot_mask_probability: float = 0.5
    """Share of the global crops that are masked (DINOv2 ibot.mask_sample_probability)."""

    def __post_init__(self):
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _check(getattr(self, name) > 0, f"loss.{name} must be > 0, got {getattr(self, name)}")
        _check(self.warmup_teacher_temp_epochs >= 0,
               f"loss.warmup_teacher_temp_epochs must be >= 0, got {self.warmup_teacher_temp_epochs}")
        _check(0 <= self.center_momentum < 1, f"loss.center_momentum must be in [0, 1), got {self.center_momentum}")
        _check_choice("loss.teacher_temp_schedule", self.teacher_temp_schedule, TEACHER_TEMP_SCHEDULES)
        _check(self.teacher_temp_schedule == "per_step" or float(self.warmup_teacher_temp_epochs).is_integer(),
               f"loss.warmup_teacher_temp_epochs must be a whole number with teacher_temp_schedule=per_epoch, got "
               f"{self.warmup_teacher_temp_epochs}")
        _check_choice("loss.impl", self.impl, ("auto", "triton", "torch"))
        _check_choice("loss.teacher_norm", self.teacher_norm, ("centering", "sinkhorn_knopp"))
        for name in ("ibot_weight", "koleo_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        _check_choice("loss.ibot_impl", self.ibot_impl, ("auto", "torch", "fused"))
        self.ibot_mask_ratio = tuple(self.ibot_mask_ratio)
        low, high = self.ibot_mask_ratio
        _check(len(self.ibot_mask_ratio) == 2 and 0 <= low <= high <= 1,
               f"loss.ibot_mask_ratio must be (low, high) with 0 <= low <= high <= 1, got {self.ibot_mask_ratio}")
        _check(0 < self.ibot_mask_probability <= 1,
               f"loss.ibot_mask_probability must be in (0, 1], got {self.ibot_mask_probability}")


@dataclass
class OptimConfig:
    base_lr: float = 5e-4
    """Peak AdamW learning rate for a global batch of 256 (or 1024: see lr_scaling); by default the run uses
    base_lr * batch_size / 256."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = 10
    """Linear learning-rate warmup from 0, in epochs."""
    weight_decay: float = 0.04
    """Weight decay at step 0 of weights, tokens and pos_embed (biases and norms never decay, as in the official)."""
    weight_decay_end: float = 0.4
    """Weight decay at the last step (cosine schedule)."""
    teacher_momentum: float = 0.996
    """Teacher EMA momentum at step 0."""
    teacher_momentum_end: float = 1.0
    """Teacher EMA momentum at the last step (cosine schedule)."""
    clip_grad: float = 3.0
    """Maximum gradient norm (see clip_grad_mode); 0 disables clipping (the norm is still measured and logged)."""
    clip_grad_mode: str = "global"
    """global: the norm of all gradients together; per_tensor: each tensor's own norm, as the official code."""
    freeze_last_layer_epochs: float = 1
    """The head's last layer gets no update for this many epochs (DINO: helps the first epoch)."""
    cuda_graph: str = "auto"
    """CUDA graphs: auto (true on CUDA outside FSDP2, else false), false, true (the step's part after backward --
    clip, AdamW, EMA, center, counters -- replayed as graphs), step (the whole step captured as one graph while
    its shapes and scalars stay the same: the teacher temperature, the last-layer freeze; CUDA only)."""
    impl: str = "auto"
    """The update after backward: triton (the clip, AdamW and the step statistics one Triton launch each), torch
    (torch's clip and fused AdamW) or auto (triton on CUDA outside FSDP2, else torch)."""
    lr_scaling: str = "linear_256"
    """Peak lr from base_lr: linear_256 = base_lr * batch / 256 (DINO), sqrt_1024 = base_lr * sqrt(batch / 1024)
    (DINOv2 scaling_rule sqrt_wrt_1024)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay (DINOv2 layerwise_decay 0.9): block i of L gets lr * decay^(L - i), the embeddings and
    tokens decay^(L + 1), the final norm and the heads 1; 1 = off."""
    patch_embed_lr_mult: float = 1.0
    """Extra lr factor of the patch embedding (DINOv2 patch_embed_lr_mult 0.2); 1 = off."""

    def __post_init__(self):
        _check(self.base_lr > 0, f"optim.base_lr must be > 0, got {self.base_lr}")
        _check(0 <= self.min_lr <= self.base_lr,
               f"optim.min_lr ({self.min_lr}) must be in [0, optim.base_lr ({self.base_lr})]")
        for name in ("warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "freeze_last_layer_epochs"):
            _check(getattr(self, name) >= 0, f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("teacher_momentum", "teacher_momentum_end"):
            _check(0 <= getattr(self, name) <= 1, f"optim.{name} must be in [0, 1], got {getattr(self, name)}")
        _check_choice("optim.clip_grad_mode", self.clip_grad_mode, CLIP_GRAD_MODES)
        _check_choice("optim.lr_scaling", self.lr_scaling, LR_SCALINGS)
        for name in ("layer_decay", "patch_embed_lr_mult"):
            _check(0 < getattr(self, name) <= 1, f"optim.{name} must be in (0, 1], got {getattr(self, name)}")
        _check_choice("optim.cuda_graph", self.cuda_graph, CUDA_GRAPH_MODES)
        _check_choice("optim.impl", self.impl, ("auto", "triton", "torch"))


@dataclass(frozen=True)
class DataConfig(MultiCropConfig):
    """The multi-crop views (fields declared by the pipelines' MultiCropConfig, which the loader takes as is), then
    the dataset, batch and loader."""

    path: str | None = None
    """ImageFolder root (or with train/ and val/ inside) or tar shards; null = the built-in shapes dataset."""
    batch_size: int = 1024
    """Global batch size in images, summed over all ranks."""
    backend: str = "auto"
    """Decoding and augmentation backend: auto, dali or torchvision."""
    num_workers: int = 8
    """Loader worker processes (or DALI threads) per rank."""
    shapes_train_images: int = 2000
    """Training images of the built-in shapes dataset (when path is null)."""
    shapes_val_images: int = 500
    """Validation images of the built-in shapes dataset."""
    shapes_image_size: int = 64
    """Side of the built-in shapes dataset's images in pixels."""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as error:  # its messages start with the field's name
            raise ValueError(f"data.{error}") from None
        _check(self.path is None or self.path != "", "data.path must be a folder or null, got ''")
        for name in ("batch_size", "shapes_train_images", "shapes_val_images", "shapes_image_size"):
            _check(getattr(self, name) > 0, f"data.{name} must be > 0, got {getattr(self, name)}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check_choice("data.backend", self.backend, ("auto", "dali", "torchvision"))


@dataclass
class ParallelConfig:
    mode: str = "auto"
    """auto (fsdp with several processes, else single), fsdp, ddp or single."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (with dynamic loss scaling)."""

    def __post_init__(self):
        _check_choice("parallel.mode", self.mode, PARALLEL_MODES)
        _check_choice("parallel.precision", self.precision, PRECISIONS)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every this many steps and when the run stops; 0 = at each epoch end and when the run stops."""
    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted."""

    def __post_init__(self):
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class EvalConfig:
    at_end: bool = False
    """After training: k-NN of the teacher and of the untrained network, and an attention map (needs val/)."""
    knn_k: int = 20
    """Neighbours voting in the k-NN evaluation."""
    knn_temperature: float = 0.07
    """Temperature of the k-NN vote weights exp(sim / T)."""
    batch_size: int = 256
    """Images per batch in feature extraction."""
    knn_every_epochs: float = 0
    """k-NN of the teacher on the val split every this many epochs and at the last step; 0 = off."""

    def __post_init__(self):
        _check(self.knn_k > 0, f"eval.knn_k must be > 0, got {self.knn_k}")
        _check(self.knn_every_epochs >= 0, f"eval.knn_every_epochs must be >= 0, got {self.knn_every_epochs}")
        _check(self.knn_temperature > 0, f"eval.knn_temperature must be > 0, got {self.knn_temperature}")
        _check(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")


TENSORBOARD_CHOICES = ("auto", "true", "false")


@dataclass
class LoggingConfig:
    tensorboard: str = "auto"
    """TensorBoard event files in DIR/tb/ (every metrics.jsonl column): auto = when the package is installed."""

    def __post_init__(self):
        _check_choice("logging.tensorboard", self.tensorboard, TENSORBOARD_CHOICES)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The DINO projection head."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The DINO loss and its teacher temperature."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, its schedules and the teacher momentum."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset, batch and multi-crop views."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism and precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save and how many to keep."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during and after training."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where metrics go besides DIR/metrics.jsonl."""
    epochs: int = 100
    """Length of the run; all schedules span it (unless `minutes` is set)."""
    minutes: float | None = None
    """Wall-time budget replacing `epochs`: the schedules span the steps that fit, measured at the start."""
    max_steps: int | None = None
    """Stop after this many steps without changing the schedules (resume later with a larger value)."""
    seed: int = 0
    """Seed of the initial weights, the data order and the augmentations."""
    log_every: int = 10
    """Steps between progress lines and metrics.jsonl rows (the only host-device syncs of the loop)."""
    max_nonfinite_in_a_row: int = 5
    """Stop the run after this many consecutive skipped steps with a non-finite loss or gradient."""

    def __post_init__(self):
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.minutes is None or self.minutes > 0, f"minutes must be > 0 or null, got {self.minutes}")
        _check(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0 or null, got {self.max_steps}")
        _check(self.log_every > 0, f"log_every must be > 0, got {self.log_every}")
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        patch = self.model.patch_size
        views = [("global_crops_size", self.data.global_crops_size)]
        views += [("local_crops_size", self.data.local_crops_size)] if self.data.local_crops_number else []
        for name, size in views:
            _check(size % patch == 0, f"data.{name} ({size}) must be a multiple of model.patch_size ({patch})")
        _check(self.max_nonfinite_in_a_row > 0,
               f"max_nonfinite_in_a_row must be > 0, got {self.max_nonfinite_in_a_row}")
        simple = self.plain_update()
        _check(self.optim.cuda_graph in ("auto", "false") or simple,
               f"optim.cuda_graph={self.optim.cuda_graph} captures one lr for every parameter and DINO's statistics "
               "only (no iBOT/KoLeo terms, layer decay or patch-embed lr multiplier): set optim.cuda_graph=auto|false")
        _check(self.optim.impl != "triton" or simple,
               "optim.impl=triton sets one lr for every parameter and sums DINO's statistics only (no iBOT/KoLeo "
               "terms, layer decay or patch-embed lr multiplier): set optim.impl=auto|torch")
        _check(self.loss.koleo_weight == 0 or self.data.batch_size >= 2,
               "loss.koleo_weight > 0 needs data.batch_size >= 2 (a nearest neighbour in each rank's batch)")

    def plain_update(self) -> bool:
        """Whether the step is DINO's with one lr for every parameter: what CUDA graphs and the Triton update
        take (`auto` turns them on for such runs only)."""
        return (self.loss.ibot_weight == 0 and self.loss.koleo_weight == 0 and self.optim.layer_decay == 1
                and self.optim.patch_embed_lr_mult == 1)


# Settings a resumed run may change (prefixes of dotted keys): when to stop, how often and where to log, when to
# evaluate and save, where the data lies and how many workers read it, and how the run maps onto the hardware (the
# checkpoint reshards).
# Any other difference from the run's config.json would resume silently wrong (new random blocks, other schedules,
# another loss), so it is refused.
# How the same step is computed may change too (kernels, compilation, recomputation): only rounding differs.
MAY_CHANGE_ON_RESUME = ("max_steps", "log_every", "eval.", "checkpoint.", "data.path", "data.num_workers",
                        "parallel.", "model.attention", "model.compile", "model.activation_checkpointing",
                        "loss.impl", "loss.fused_head", "loss.ibot_impl", "optim.cuda_graph", "optim.impl",
                        "max_nonfinite_in_a_row", "logging.")


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every leaf where two `to_dict` trees differ. A key missing from
    `old` (a config.json written before the field existed) counts as the field's default, the behaviour of then."""
    def changes(old, new, default, prefix):
        if isinstance(old, dict) and isinstance(new, dict):
            default = default if isinstance(default, dict) else {}
            return {key: change for k in sorted(set(old) | set(new))
                    for key, change in changes(old.get(k, default.get(k)), new.get(k), default.get(k),
                                               f"{prefix}{k}.").items()}
        return {} if old == new else {prefix.rstrip("."): (old, new)}

    return changes(old, new, to_dict(TrainConfig()), "")


def may_change_on_resume(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
               for allowed in MAY_CHANGE_ON_RESUME)


# ---------------------------------------------------------------------------------------------------- presets

def vit_small16_imagenet() -> TrainConfig:
    """The DINO paper's ViT-S/16 recipe for 100 epochs: K=65536, global batch 1024, lr 5e-4 * 1024/256 with 10
    warmup epochs, 2x224 + 10x96 crops, teacher temp 0.04 -> 0.07 over 30 epochs; everything else is
    facebookresearch/dino main_dino.py's default (local crops' position embeddings resampled as its
    interpolate_pos_encoding does, momentum 0.996 -> 1, weight decay 0.04 -> 0.4, clip 3.0, last
    layer frozen for 1 epoch, drop path 0.1, min lr 1e-6). Its step is the official one: each gradient tensor is
    clipped on its own (utils.clip_gradients) and the teacher temperature moves once per epoch (DINOLoss)."""
    return TrainConfig(
        model=ModelConfig(arch="vit_small", patch_size=16, img_size=224, drop_path_rate=0.1,
                          pos_embed_resample="dino"),
        head=HeadConfig(out_dim=65536),
        loss=LossConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                        teacher_temp_schedule="per_epoch"),
        optim=OptimConfig(base_lr=5e-4, min_lr=1e-6, warmup_epochs=10, teacher_momentum=0.996, clip_grad=3.0,
                          clip_grad_mode="per_tensor"),
        data=DataConfig(batch_size=1024, global_crops_size=224, local_crops_number=10, local_crops_size=96),
        epochs=100,
        checkpoint=CheckpointConfig(every_steps=2500),
    )


def small() -> TrainConfig:
    """Datasets of 5k-100k images (issue 8): the paper's ViT-S/16 and augmentations with the parts that stall on
    small sets changed, for `--minutes M` or `epochs=E`; k-NN on the val split every 10 epochs shows progress.

    Changes from vit_small16_imagenet, and why (GPU runs of this preset have not been made yet; RESULTS.md):
    - K = 4096, not 65536: with a few thousand images per epoch most of 65536 prototypes never win a sample, and
      users report that out_dim 65536 stalls on custom data.
    - teacher momentum 0.99 -> 1, not 0.996: a short run has a few thousand steps, and at 0.996 the teacher
      averages over ~250 of them, a large share of the run.
    - global batch 128 (the benchmark batch of one GPU), lr 5e-4 x 128/256 with a 10-epoch warmup, 8 local crops.
    Everything else is the paper's. What runs of it scaled down to CPUs gave is in benchmarks/RESULTS.md
    ("Learning quality on small data")."""
    cfg = vit_small16_imagenet()
    return dataclasses.replace(
        cfg,
        head=HeadConfig(out_dim=4096),
        optim=dataclasses.replace(cfg.optim, teacher_momentum=0.99),
        data=DataConfig(batch_size=128, local_crops_number=8),
        eval=EvalConfig(at_end=True, knn_every_epochs=10),
        checkpoint=CheckpointConfig(every_steps=1000),
    )


def demo() -> TrainConfig:
    """A few minutes on 2 CPU cores: a 4-block ViT (D=96) with 8-px patches on 32-px global and 16-px local crops
    of the built-in 64-px shapes dataset, then k-NN of the trained and the untrained network and an attention map.

    Tuned on that budget (benchmarks/RESULTS.md): teacher temperature 0.02, as at 0.04 the teacher sat at ln K
    (uniform) from step ~40 on; batch 32, as it gives twice the updates of batch 64 at the same img/s (peak lr
    5e-4 either way: base_lr * 32 / 256); teacher momentum 0.99, as 0.98 did not learn. Its time and k-NN
    accuracy on 2 CPU cores are in benchmarks/RESULTS.md ("CPU figures")."""
    return TrainConfig(
        model=ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.0, depth=4, embed_dim=96,
                          num_heads=3),
        head=HeadConfig(out_dim=512, hidden_dim=512, bottleneck_dim=128),
        loss=LossConfig(teacher_temp=0.02, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0),
        optim=OptimConfig(base_lr=4e-3, min_lr=1e-5, warmup_epochs=1, teacher_momentum=0.99,
                          freeze_last_layer_epochs=0),
        data=DataConfig(batch_size=32, global_crops_size=32, global_crops_scale=(0.4, 1.0), local_crops_number=6,
                        local_crops_size=16, local_crops_scale=(0.05, 0.4), num_workers=2),
        checkpoint=CheckpointConfig(every_steps=400, keep_last=1),
        eval=EvalConfig(at_end=True, batch_size=250),
        epochs=20,
        log_every=40,
    )


def dinov2_vit_small14() -> TrainConfig:
    """DINOv2's default recipe (dinov2/configs/ssl_default_config.yaml) at ViT-S/14: DINO + iBOT (weight 1,
    shared head, half the global crops masked at ratios 0.1-0.5) + KoLeo (0.1) with centering, K = 65536, 2 x 224 +
    8 x 98 px crops at scales (0.32, 1) / (0.05, 0.32), global batch 1024, lr 4e-3 * sqrt(batch / 1024) with 10
    warmup epochs, min lr 1e-6, weight decay 0.04 -> 0.4, teacher momentum 0.992 -> 1, teacher temperature 0.04 ->
    0.07 over 30 epochs, layer decay 0.9, patch embedding lr x 0.2, last layer frozen 1 epoch, 100 epochs, the heads'
    last-layer gain trained (dinov2 leaves `weight_g` trainable: head.norm_last_layer=false), drop path 0.3, clip 3.

    The backbone is DINOv2's ViT-S/14 (`vit_small_patch14_dinov2`: LayerScale 1e-5, no registers, as
    ssl_default_config.yaml's student) built at the global crop size, as dinov2 builds it (models/__init__.py:
    img_size=crops.global_crops_size), with DINOv2's position-embedding resampling (interpolate_offset 0.1, no
    antialias: `pos_embed_resample=dino`). What still differs: local crops are 98 px, not 96 (crops here must be
    multiples of the patch, 98 = 7 x 14); stochastic depth is linear in depth, not uniform (drop_path_uniform). And
    in the step: the gradient norm is clipped over all gradients together (dinov2 clips the backbone's and each
    head's on its own, train.py:250-259). The augmentations are DINO's, which dinov2/data/augmentations.py repeats."""
    return TrainConfig(
        model=ModelConfig(arch="vit_small_patch14_dinov2", patch_size=14, img_size=224, drop_path_rate=0.3,
                          pos_embed_resample="dino"),
        head=HeadConfig(out_dim=65536, norm_last_layer=False),
        loss=LossConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                        ibot_weight=1.0, koleo_weight=0.1),
        optim=OptimConfig(base_lr=4e-3, lr_scaling="sqrt_1024", min_lr=1e-6, warmup_epochs=10, weight_decay=0.04,
                          weight_decay_end=0.4, teacher_momentum=0.992, clip_grad=3.0, freeze_last_layer_epochs=1,
                          layer_decay=0.9, patch_embed_lr_mult=0.2),
        data=DataConfig(batch_size=1024, global_crops_size=224, global_crops_scale=(0.32, 1.0), local_crops_number=8,
                        local_crops_size=98, local_crops_scale=(0.05, 0.32)),
        epochs=100,
        checkpoint=CheckpointConfig(every_steps=2500),
    )


def adaptation(arch: str, patch_size: int, img_size: int, local_crops_size: int) -> TrainConfig:
    """Continued self-supervised pretraining of a released backbone on one's own images (`fastdino train --init
    PATH`): the `small` preset's data, head and evaluation with a schedule that moves a trained network gently.

    The schedule, and why (reasoning from the from-scratch recipes, not a published adaptation recipe; GPU runs of
    it have not been made yet, the CPU measurement is in benchmarks/RESULTS.md, issue 25):
    - peak lr 5e-5 x batch/256, a tenth of DINO's from-scratch 5e-4 (facebookresearch/dino main_dino.py; DINOv2's
      ssl_default_config.yaml: 4e-3 at batch 1024, sqrt scaling): the usual fine-tuning ratio, so that the first
      updates, driven by a fresh head, do not undo the pretrained features.
    - warmup 1 epoch, not 10: the warmup of a from-scratch run protects random weights; here only the head is new,
      and its last layer is frozen for the first epoch as in DINO.
    - teacher momentum 0.999 -> 1, not DINO's 0.996 / DINOv2's 0.992: the teacher starts as good as the student,
      so it should follow the student's early, head-driven updates slowly (a low momentum would copy them into the
      target at once); DINOv2's schedule also ends at 1 (its 518-px adaptation phase at the end of pretraining runs
      at momentum near 1).
    - weight decay 0.04 constant, not 0.04 -> 0.4: decay pulls the weights towards 0, away from where they start.
    - teacher temperature 0.04 -> 0.07 over 5 epochs, not 30: the warmup exists for random features.
    - 30 epochs; batch 128 as `small`; drop path 0.1 (DINO ViT-S); gradients clipped at 3.0 on their global norm.
    The CPU run of benchmarks/adaptation_quality.py found these values too slow for a 124-step run (RESULTS.md):
    the teacher momentum's horizon, 1 / (1 - m) = 1000 steps, is meant for runs of thousands of steps."""
    cfg = small()
    return dataclasses.replace(
        cfg,
        model=ModelConfig(arch=arch, patch_size=patch_size, img_size=img_size, drop_path_rate=0.1),
        loss=dataclasses.replace(cfg.loss, warmup_teacher_temp_epochs=5, teacher_temp_schedule="per_step"),
        optim=dataclasses.replace(cfg.optim, base_lr=5e-5, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04,
                                  weight_decay_end=0.04, teacher_momentum=0.999, clip_grad_mode="global"),
        data=dataclasses.replace(cfg.data, local_crops_size=local_crops_size),
        epochs=30,
    )


def dinov2_vit_small14_adapt() -> TrainConfig:
    """`adaptation` for DINOv2's ViT-S/14 (vit_small_patch14_dinov2, img_size 518 as released; 224 / 98 crops)."""
    return adaptation("vit_small_patch14_dinov2", 14, 518, 98)


def dinov3_vit_small16_adapt() -> TrainConfig:
    """`adaptation` for DINOv3's ViT-S/16 (vit_small_patch16_dinov3; 224 / 96 crops)."""
    return adaptation("vit_small_patch16_dinov3", 16, 224, 96)


PRESETS = {"demo": demo, "small": small, "vit_small16_imagenet": vit_small16_imagenet,
           "dinov2_vit_small14": dinov2_vit_small14, "dinov2_vit_small14_adapt": dinov2_vit_small14_adapt,
           "dinov3_vit_small16_adapt": dinov3_vit_small16_adapt}


def preset(name: str) -> TrainConfig:
    """The named preset's full config."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------------------------- dicts, files, overrides

def to_dict(cfg) -> dict:
    """The config tree as nested plain dicts (tuples become lists), as written to DIR/config.json."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in items})


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, checking keys and types; ValueError names the bad key."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix + key!r}; valid keys here: {names}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, prefix + key)
    return cls(**kwargs)


def _coerce(value, kind, name: str):
    """`value` as type `kind` (int, float, bool, str, X | None, tuple[float, float]) or a ValueError."""
    if isinstance(kind, types.UnionType):  # only `X | None` is used
        if value is None:
            return None
        (kind,) = [k for k in kind.__args__ if k is not type(None)]
    if typing.get_origin(kind) is tuple:
        inner = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(inner):
            raise ValueError(f"{name} must be a list of {len(inner)} numbers, got {value!r}")
        return tuple(_coerce(v, k, name) for v, k in zip(value, inner))
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)
    elif kind is str:
        if isinstance(value, bool):  # YAML reads true / false (model.compile=true) as booleans
            value = str(value).lower()
        if isinstance(value, str):
            return value
    raise ValueError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], object]:
    """'optim.base_lr=1e-3' -> (['optim', 'base_lr'], 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    return key.split("."), yaml.safe_load(raw) if raw else None


def merge(base: dict, update: dict) -> dict:
    """Nested dict `base` with `update`'s values (recursively) on top."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_yaml(path) -> dict:
    """The mapping in a YAML config file (ValueError when missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def apply_overrides(cfg: TrainConfig, *, file_values: dict | None = None, overrides=()) -> TrainConfig:
    """`cfg` with a YAML file's mapping and then `key=value` overrides on top, validated as a whole."""
    values = merge(to_dict(cfg), file_values or {})
    for text in overrides:
        path, value = parse_override(text)
        update = value
        for part in reversed(path):
            update = {part: update}
        values = merge(values, update)
    return from_dict(TrainConfig, values)
