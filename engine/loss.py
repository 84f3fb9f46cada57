"""DINOLoss: the module around the fused loss kernel, a drop-in for the official DINO `DINOLoss`.

It owns what the kernel must not: the center buffer and its momentum update, the teacher-temperature schedule, the
collectives (all-reduce of the teacher column sum; Sinkhorn-Knopp sums), and option checks. The math lives in
`fastdino.kernels.dino_loss` (reference: `fastdino.kernels.reference.dino_loss_ref`).
"""
import logging
import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from fastdino.engine.schedules import linear_warmup
from fastdino.kernels import dino_loss, fused_head_loss, sinkhorn_center
from fastdino.kernels._launch import select_impl

logger = logging.getLogger(__name__)

TEACHER_NORMS = ("centering", "sinkhorn_knopp")
SINKHORN_ITERATIONS = 3  # as DINOv2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_temperature(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def all_reduce_hook(process_group=None):
    """`sinkhorn_center`'s all_reduce(tensor, op) over `process_group`, or None on one process."""
    if not _distributed():
        return None
    ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    return lambda tensor, op: dist.all_reduce(tensor, op=ops[op], group=process_group)


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float,
                           n_iterations: int = SINKHORN_ITERATIONS, process_group=None, *,
                           valid: torch.Tensor | None = None,
                           n_samples: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher probabilities by Sinkhorn-Knopp (SwAV, Caron et al. 2020, Sec. 3.1; DINOv2 `sinkhorn_knopp_teacher`).

    teacher_output (2*B, K) logits on this rank. Alternately rescales exp(logits / teacher_temp) so that every
    prototype gets total weight 1/K and every sample 1/B_global, with the sums all-reduced across ranks when
    torch.distributed is initialised. Returns fp32 (2*B, K) whose rows sum to 1. DINOv2 works on the transpose;
    here rows are samples, so its "sum of rows" is a sum over dim 0.

    Same math as DINOv2, arranged for fp32: each prototype's column is first shifted by its max over all ranks'
    samples. The per-prototype normalisation that follows cancels any per-prototype factor, including DINOv2's
    division by the global sum (hence dropped), so Q is unchanged, but exp never overflows (DINOv2 gives inf, then
    NaN, once logits / teacher_temp > 88) and a prototype's weights no longer sink into fp32 subnormals.

    valid (rows,) bool: the rows that are samples (iBOT's padded masked patches); the others get probability 0.
    n_samples: the number of samples over all ranks (a device tensor: iBOT's all-reduced masked-patch count);
    default rows * world size. Only the scale of the intermediate sums depends on it.
    """
    world_size = dist.get_world_size(process_group) if _distributed() else 1
    logits = teacher_output.float() / teacher_temp  # (2*B, K)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None], -math.inf)
    prototype_max = logits.amax(dim=0, keepdim=True)  # (1, K)
    if world_size > 1:
        dist.all_reduce(prototype_max, op=dist.ReduceOp.MAX, group=process_group)
    prototype_max = prototype_max.nan_to_num(neginf=0.0)  # no valid row anywhere: exp(-inf) = 0, not NaN
    q = torch.exp(logits - prototype_max)  # (2*B, K)
    n_prototypes = q.shape[1]
    if n_samples is None:
        n_samples = q.shape[0] * world_size
    # A sample whose weights all underflowed keeps weight 0 instead of turning into 0/0 = NaN.
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(n_iterations):
        per_prototype = q.sum(dim=0, keepdim=True)  # (1, K)
        if world_size > 1:
            dist.all_reduce(per_prototype, group=process_group)
        q /= per_prototype.clamp_min_(tiny)  # 0 only when no rank has a valid row
        q /= n_prototypes
        q /= q.sum(dim=1, keepdim=True).clamp_min_(tiny)  # per sample, local
        q /= n_samples
    q *= n_samples  # each row is now a probability distribution
    return q


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centered teacher softmax and the student softmax over multi-crops.

    Constructor and `forward(student_output, teacher_output, epoch)` are those of the official DINO `DINOLoss`
    (Caron et al. 2021, Sec. 3.1 and Algorithm 1), and so is the buffer `center` (1, out_dim), so official
    checkpoints' `dino_loss` state loads. Extra keyword options:
    - impl: "auto" | "triton" | "torch", passed to `fastdino.kernels.dino_loss`.
    - teacher_norm: "centering" (DINO) or "sinkhorn_knopp" (DINOv2: 3 Sinkhorn-Knopp iterations on the teacher
      logits instead of centering; the center is then not used nor updated).
    - process_group: the group for the all-reduces (default: the world) when torch.distributed is initialised.
    After each forward, `last_teacher_entropy` holds the 0-d mean entropy of the teacher probability rows (logging).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, impl: str = "auto", teacher_norm: str = "centering",
                 process_group=None):
        super().__init__()
        for name, value, low in (("out_dim", out_dim, 1), ("ncrops", ncrops, 2), ("nepochs", nepochs, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        warmup = warmup_teacher_temp_epochs
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real) or not warmup >= 0:
            raise ValueError(f"warmup_teacher_temp_epochs must be a number >= 0, got {warmup!r}")
        _check_temperature("warmup_teacher_temp", warmup_teacher_temp)
        _check_temperature("teacher_temp", teacher_temp)
        _check_temperature("student_temp", student_temp)
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f'impl must be "auto", "triton" or "torch", got {impl!r}')
        if teacher_norm not in TEACHER_NORMS:
            raise ValueError(f"teacher_norm must be one of {TEACHER_NORMS}, got {teacher_norm!r}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self.teacher_norm = teacher_norm
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("last_teacher_entropy", torch.zeros(()), persistent=False)
        # The official per-epoch warmup of the teacher temperature, for forward(..., epoch) without teacher_temp
        # (the trainer passes its Schedules' value). A fractional warmup rounds up to whole epochs.
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs, self.nepochs = math.ceil(warmup), nepochs
        logger.info("DINOLoss: K=%d, %d crops, teacher_norm=%s, impl=%s", out_dim, ncrops, teacher_norm, impl)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                teacher_temp: float | None = None) -> torch.Tensor:
        """Loss of student_output (ncrops*B, K) against teacher_output (2*B, K), crops in the same order.

        The teacher temperature is `teacher_temp` when given (the trainer's value from schedules.py), else the
        official per-epoch warmup's value at `epoch`. Updates the center afterwards (centering mode), without
        syncing the host.
        """
        teacher_temp = self._teacher_temp(epoch, teacher_temp)
        for name, t in (("student_output", student_output), ("teacher_output", teacher_output)):
            if t.shape[-1] != self.out_dim:
                raise ValueError(f"{name} has K={t.shape[-1]} columns but the loss (and its center) has "
                                 f"out_dim={self.out_dim}")

        if self.teacher_norm == "sinkhorn_knopp":
            probs = sinkhorn_knopp_teacher(teacher_output, teacher_temp, process_group=self.process_group)
            loss, _, entropy = dino_loss(student_output, probs, None, self.student_temp, teacher_temp, self.ncrops,
                                         teacher_is_probs=True, impl=self.impl, return_entropy=True)
        else:
            loss, colsum, entropy = dino_loss(student_output, teacher_output, self.center, self.student_temp,
                                              teacher_temp, self.ncrops, impl=self.impl, return_entropy=True)
            self._update_center(colsum, teacher_output.shape[0])
        self.last_teacher_entropy = entropy.detach()
        return loss

    def forward_fused_head(self, student_features: torch.Tensor, student_weight_v: torch.Tensor,
                           teacher_features: torch.Tensor, teacher_weight_v: torch.Tensor, epoch: int,
                           teacher_temp: float | None = None, *, student_gain: torch.Tensor | None = None,
                           teacher_gain: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` on the logits features @ normalize(weight_v)^T without building them (`fused_head_loss`,
        pairing="crops"): student_features (ncrops*B, D) and teacher_features (2*B, D) are the heads' L2-normalised
        bottleneck features, *_weight_v (K, D) their un-normalised last-layer weights and *_gain (K, 1) the gains
        (`weight_g`; None: fixed at 1, norm_last_layer=True).
        Centering updates the center; Sinkhorn-Knopp passes `sinkhorn_center`'s center of the teacher logits (the
        same teacher as `sinkhorn_knopp_teacher`, its sums all-reduced across ranks). Sets `last_teacher_entropy`
        as `forward` does."""
        if student_weight_v.shape[0] != self.out_dim:
            raise ValueError(f"student_weight_v has K={student_weight_v.shape[0]} rows but the loss (and its center) "
                             f"has out_dim={self.out_dim}")
        teacher_temp = self._teacher_temp(epoch, teacher_temp)
        sinkhorn = self.teacher_norm == "sinkhorn_knopp"
        center = (sinkhorn_center(teacher_features, teacher_weight_v, teacher_temp, teacher_gain=teacher_gain,
                                  all_reduce=all_reduce_hook(self.process_group), impl=self.impl)
                  if sinkhorn else self.center)
        loss, colsum, entropy = fused_head_loss(student_features, student_weight_v, teacher_features,
                                                teacher_weight_v, center, self.student_temp, teacher_temp,
                                                pairing="crops", ncrops=self.ncrops, student_gain=student_gain,
                                                teacher_gain=teacher_gain, impl=self.impl)
        if not sinkhorn:
            self._update_center(colsum, teacher_features.shape[0])
        self.last_teacher_entropy = entropy.detach()
        return loss

    def _teacher_temp(self, epoch: int, teacher_temp: float | None) -> float:
        """`teacher_temp` when given, else the official per-epoch warmup's value at `epoch`."""
        if teacher_temp is not None:
            return teacher_temp
        if not 0 <= epoch < self.nepochs:
            raise ValueError(f"epoch {epoch} is outside the {self.nepochs}-epoch teacher temperature schedule; "
                             f"pass teacher_temp=")
        return linear_warmup(self.warmup_teacher_temp, self.teacher_temp, epoch, self.warmup_teacher_temp_epochs)

    def resolve_impl(self, device: torch.device) -> str:
        """Fix impl="auto" to what it selects on `device` (logged once, here), so that a compiled forward does not
        trace the selection; returns the implementation."""
        if self.impl == "auto":
            self.impl = select_impl("dino_loss", "auto", device, "torch", kernel=None)
        return self.impl

    @torch.no_grad()
    def _update_center(self, colsum: torch.Tensor, n_rows: int) -> None:
        """center <- m * center + (1 - m) * mean of the teacher logits over all ranks' rows (in place)."""
        world_size = 1
        if _distributed():
            dist.all_reduce(colsum, group=self.process_group)
            world_size = dist.get_world_size(self.process_group)
        batch_center = colsum.reshape(1, -1) / (n_rows * world_size)  # (1, K)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
