"""How the student and the teacher are compiled, checkpointed, spread over ranks (FSDP2, DDP or one process), and
in which precision. Applied in torchtitan's order (torchtitan/models/llama3/infra/parallelize.py): activation
checkpointing, then per-block torch.compile, then FSDP2.

Compile (`apply_compile`): each block's, the head's and the torch loss's `forward` is replaced by its
`torch.compile(..., fullgraph=True)`, in place. The modules keep their parameter names (state dicts, DCP and the
EMA see the same model), and FSDP2's hooks, which run in `__call__` around `forward`, stay outside the graphs. All
blocks share one code object, so they share graphs (see vit.py's docstring on stochastic depth).

FSDP2 (torchtitan: torchtitan/models/llama3/infra/parallelize.py, `apply_fsdp`): `fully_shard` each transformer
`Block`, then the head, then the root. The teacher gets the same layout, so the EMA update runs on matching
local shards without an all-gather; it never runs backward, so every one of its units reshards right after
forward (left unsharded, the root and head would keep stale copies of parameters the EMA just changed).

Precision is decided in `resolve_precision` only: bf16 compute with fp32 master weights and fp32 gradient
reduction on CUDA (`MixedPrecisionPolicy` under FSDP2, autocast otherwise), fp32 on the CPU, fp16 with
`DynamicLossScale` on request.
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str
    """fp32, bf16 or fp16."""
    mp_policy: MixedPrecisionPolicy
    """FSDP2 policy: compute dtype for parameters, fp32 gradient reduction."""
    autocast_dtype: torch.dtype | None
    """Compute dtype under torch.autocast in the single and ddp modes; None = no autocast."""
    loss_scaling: bool
    """fp16 needs dynamic loss scaling."""


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The one place where compute, reduction and master dtypes are chosen ("auto": bf16 on CUDA, else fp32)."""
    name = ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision
    if name not in _DTYPES:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    low = None if name == "fp32" else _DTYPES[name]
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    return Precision(name=name, mp_policy=policy, autocast_dtype=low, loss_scaling=name == "fp16")


def resolve_mode(mode: str, world_size: int, *, process_group: bool = False) -> str:
    """"auto" -> fsdp with several ranks, single with one; single needs one rank; fsdp and ddp need a process
    group: several ranks, or one rank of an initialised group (`process_group`, e.g. FSDP2 on one GPU)."""
    if mode == "auto":
        return "fsdp" if world_size > 1 else "single"
    if mode == "single" and world_size > 1:
        raise ValueError(f"parallel.mode=single cannot run on {world_size} processes; use fsdp or ddp")
    if mode != "single" and world_size == 1 and not process_group:
        raise ValueError(f"parallel.mode={mode} needs several processes (torchrun --nproc_per_node=N); "
                         f"one process runs parallel.mode=single")
    return mode


def resolve_compile(setting: str, device: torch.device) -> bool:
    """model.compile: "auto" compiles on CUDA only (inductor on the CPU is slow to build and gains little there);
    the choice is logged once, by the caller's rank."""
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"model.compile must be auto, true or false, got {setting!r}")
    enabled = device.type == "cuda" if setting == "auto" else setting == "true"
    logger.info("torch.compile %s (model.compile=%s, %s device)", "on" if enabled else "off", setting, device.type)
    return enabled


def apply_ac(model: nn.Module, every: int) -> nn.Module:
    """Activation checkpointing of every `every`-th block of a DINOModel's backbone (1 = all, 0 = none)."""
    model.backbone.checkpoint_blocks(every)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block and the head of a DINOModel in place."""
    for module in [*model.backbone.blocks, model.head]:
        compile_forward(module)
    return model


def compile_forward(module: nn.Module) -> nn.Module:
    """Replace `module.forward` by its torch.compile with fullgraph=True (a graph break raises)."""
    module.forward = torch.compile(module.forward, fullgraph=True)
    return module


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, *, trains: bool) -> nn.Module:
    """Shard a DINOModel (`backbone.blocks`, `head`, root) in place with FSDP2.

    The student (`trains=True`) keeps its head and root unsharded after forward: backward starts there and
    would all-gather them again at once. The teacher (`trains=False`) reshards everything after forward.
    """
    for block in model.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    fully_shard(model.head, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not trains)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not trains)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Replicate the student with DDP (gradients all-reduced in buckets during backward)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=mesh.get_group())


def last_layer_weights(student: nn.Module, teacher: nn.Module) -> tuple[torch.Tensor, ...]:
    """The whole last-layer weights v (K, D) and gains g (K, 1) (None with norm_last_layer: fixed at 1) of the
    student's and the teacher's heads, read after their forward passes, for the fused head + loss:
    (student_v, teacher_v, student_g, teacher_g). Under FSDP2 the student's head stays unsharded after forward
    (`apply_fsdp`), so its module holds the all-gathered parameters, whose gradients FSDP2 reduce-scatters in
    backward as usual; the teacher's head is resharded after forward, so its weights are all-gathered here
    (collective, no gradient)."""
    student_layer, teacher_layer = student.head.last_layer, teacher.head.last_layer
    if isinstance(student_layer.weight_v, DTensor):
        raise RuntimeError("the student's last layer is sharded after its forward; loss.fused_head needs its FSDP2 "
                           "head unit kept unsharded after forward (apply_fsdp with trains=True)")
    teacher_v, teacher_g = teacher_layer.weight_v, teacher_layer.weight_g
    with torch.no_grad():
        teacher_v, teacher_g = (t.full_tensor() if isinstance(t, DTensor) else t for t in (teacher_v, teacher_g))
    return student_layer.weight_v, teacher_v, student_layer.weight_g, teacher_g


def local_tensors(params) -> list[torch.Tensor]:
    """The local shard of each parameter (the parameter itself when it is not a DTensor), for foreach ops."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


class DynamicLossScale:
    """fp16 loss scaling that never syncs the host: skip, back off and grow are device-side `torch.where`s.

    torch.amp.GradScaler decides to skip from the gradients each rank holds, which under FSDP2 are shards: ranks
    could disagree. Here the caller passes the skip flag computed from the global gradient norm (identical on
    every rank) to `update`.
    """

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale = torch.tensor(init_scale, device=device)
        self.good_steps = torch.zeros((), device=device)
        self.growth_interval = growth_interval

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        torch._foreach_mul_(grads, self.scale.reciprocal())

    def update(self, skipped: torch.Tensor) -> None:
        """Halve the scale after a skipped step; double it after `growth_interval` good steps in a row."""
        good = torch.where(skipped, 0.0, self.good_steps + 1)
        grow = good >= self.growth_interval
        # In place: a CUDA graph of the step keeps reading and writing these tensors.
        self.scale.copy_(torch.where(skipped, self.scale * 0.5, torch.where(grow, self.scale * 2.0, self.scale)))
        self.good_steps.copy_(torch.where(grow, 0.0, good))

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.good_steps.copy_(state["good_steps"])
