"""How the student and the teacher are compiled, checkpointed, spread over ranks (FSDP2, DDP or one process), and
in which precision. Applied in torchtitan's order (torchtitan/models/llama3/infra/parallelize.py): activation
checkpointing, then per-block torch.compile, then FSDP2.

Activation checkpointing (`apply_ac`) wraps a student block's forward in torch's non-reentrant checkpoint: all of
its activations recomputed in backward (`all`, `every-N`), or, `selective`, a torch selective-checkpoint policy
(`selective_checkpoint_contexts`, in the manner of torchtitan's op-level SAC) that keeps the outputs of the
matmuls and of attention and recomputes the memory-bound rest (LayerNorm, GELU, casts, the groups' concatenation,
the residual adds): the recompute costs bytes, not FLOPs.

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
import functools
import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention import varlen  # noqa: F401 (registers torch_attn::_varlen_attn, named in _ATTENTION)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn

from fastdino.engine.config import checkpoint_every

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


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default,
              torch.ops.torch_attn._varlen_attn.default}


def selective_checkpoint_contexts(matmuls: int):
    """torch.utils.checkpoint's context_fn for `model.activation_checkpointing=selective`, for one call of a block
    with `matmuls` matmuls (its nn.Linear layers): the contexts of a policy that keeps the outputs of attention
    (torch's SDPA kernels, varlen, xformers' kernels, with their log-sum-exp) and of every matmul but the last,
    and recomputes everything else.

    The last matmul (the MLP's fc2) feeds only the residual add, which keeps nothing for backward, so backward
    never reads its output, and the recompute, which stops once it has rebuilt what backward reads (early stop),
    ends before it. The attention projection's output, which also feeds only its residual add, is kept: the add's
    output is LayerNorm's input in backward, and rebuilding it from the kept projection is one add, where keeping
    the add's output instead would recompute the projection (eager reruns every op up to the early stop).
    What a block keeps, in (tokens x width) units: qkv 3, attention 1, projection 1, fc1 4, against 16 without
    checkpointing (the norms' outputs, the concatenation, the first add's output, GELU's 4 besides), its input
    kept either way. Matmuls are told apart by their order in the block, counted per pass (forward, recompute) as
    torchtitan's op-level SAC counts its mm's."""
    seen = Counter()

    def policy(ctx, func, *args, **kwargs):
        if func in _ATTENTION or func.namespace.startswith("xformers"):
            return CheckpointPolicy.MUST_SAVE
        if func in _MATMULS:
            seen[ctx.is_recompute] += 1
            if seen[ctx.is_recompute] < matmuls:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: nn.Module, spec: str) -> nn.Module:
    """Activation checkpointing of a DINOModel's backbone blocks by `model.activation_checkpointing` `spec`: none,
    all, every-N (every N-th block) or selective (every block, by `selective_checkpoint_contexts`)."""
    every = checkpoint_every(spec)
    context_fn = noop_context_fn
    if spec == "selective":
        matmuls = sum(isinstance(m, nn.Linear) for m in model.backbone.blocks[0].modules())
        context_fn = functools.partial(selective_checkpoint_contexts, matmuls)  # fresh matmul counts per call
    model.backbone.checkpoint_blocks(every, context_fn)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block and the head of a DINOModel in place."""
    for module in [*model.backbone.blocks, model.head, *([model.ibot_head] if model.ibot_head is not None else [])]:
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
    if model.ibot_head is not None:
        fully_shard(model.ibot_head, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not trains)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=not trains)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Replicate the student with DDP (gradients all-reduced in buckets during backward)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=mesh.get_group())


def last_layer_weights(student: nn.Module, teacher: nn.Module, head: str = "head") -> tuple[torch.Tensor, ...]:
    """The whole last-layer weights v (K, D) and gains g (K, 1) (None with norm_last_layer: fixed at 1) of the
    student's and the teacher's heads (`head`: "head", or "ibot_head" for DINOv2's separate iBOT head), read after
    their forward passes, for the fused head + loss:
    (student_v, teacher_v, student_g, teacher_g). Under FSDP2 the student's head stays unsharded after forward
    (`apply_fsdp`), so its module holds the all-gathered parameters, whose gradients FSDP2 reduce-scatters in
    backward as usual; the teacher's head is resharded after forward, so its weights are all-gathered here
    (collective, no gradient)."""
    student_layer, teacher_layer = getattr(student, head).last_layer, getattr(teacher, head).last_layer
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
