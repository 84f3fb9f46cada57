"""iBOTPatchLoss: DINOv2's masked-patch loss (iBOT, Zhou et al. 2022), a drop-in for dinov2's `iBOTPatchLoss`
(facebookresearch/dinov2: dinov2/loss/ibot_patch_loss.py) with its names, signatures, defaults and state: the
buffer `center` (1, 1, K), so a dinov2 `ibot_patch_loss` state dict loads strictly.

The student's patch tokens at the masked positions of its global crops predict the teacher's (unmasked) patch
distributions there: loss = -sum_m w_m sum_k t_mk log softmax(s_m / student_temp)_k / n_crops, with w_m = 1 / (masked
patches of m's crop), so that every masked crop weighs the same. The values and gradients are dinov2's; what dinov2
gets wrong is fixed:
- `sinkhorn_knopp_teacher` runs in one process without a process group (dinov2 all-reduces the patch count
  unconditionally), leaves its `n_masked_patches_tensor` argument alone (dinov2 all-reduces it in place), and stays
  finite for large logits (engine/loss.py: `sinkhorn_knopp_teacher`, per-prototype max shift).
- The center update is applied in place (the buffer keeps its storage: checkpoints and CUDA graphs hold it), and
  its cross-rank all-reduce runs only under torch.distributed.
- Padded rows: the trainer gives the loss a static number of rows (the batch's mask upper bound, pipelines/
  masking.py) so that shapes never depend on the data; `masks_weight` is 0 on the padding, and
  `update_center(..., n_masked_patches_tensor=)` / `sinkhorn_knopp_teacher(..., valid=)` leave it out, without a
  host sync.

`impl`: "auto" | "torch". The fused head + loss kernel for this term is not in yet, so "auto" is "torch", DINOv2's
formulation ((M, K) fp32 logits, log-softmax, product with the teacher probabilities).
"""
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdino.engine.loss import SINKHORN_ITERATIONS, _check_temperature, _distributed, sinkhorn_knopp_teacher

logger = logging.getLogger(__name__)

IMPLS = ("auto", "torch")


def cross_entropy_rows(t: torch.Tensor, s: torch.Tensor, temp: float) -> torch.Tensor:
    """sum_k t_k log softmax(s / temp)_k per row, in fp32 (dinov2's `lossfunc`; its xformers path casts to fp32
    too). Positive: the negative of the cross-entropy."""
    return torch.sum(t.float() * F.log_softmax(s.float() / temp, dim=-1), dim=-1)


class iBOTPatchLoss(nn.Module):  # noqa: N801 (dinov2's name)
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 impl: str = "auto", process_group=None):
        super().__init__()
        if isinstance(patch_out_dim, bool) or not isinstance(patch_out_dim, int) or patch_out_dim < 1:
            raise ValueError(f"patch_out_dim must be an int >= 1, got {patch_out_dim!r}")
        _check_temperature("student_temp", student_temp)
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_patch_tokens = None
        self.async_batch_center = None

    def resolve_impl(self, device: torch.device) -> str:
        """The implementation impl="auto" selects on `device`: torch until the fused iBOT kernel lands."""
        self.impl = "torch"
        return self.impl

    def _check_columns(self, name: str, t: torch.Tensor) -> None:
        if t.shape[-1] != self.patch_out_dim:
            raise ValueError(f"{name} has K={t.shape[-1]} columns but the loss (and its center) has "
                             f"patch_out_dim={self.patch_out_dim}")

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - center) / teacher_temp) over the last dim, fp32 (the center is fp32), after applying a
        pending center update."""
        self._check_columns("teacher_patch_tokens", teacher_patch_tokens)
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor, n_iterations: int = SINKHORN_ITERATIONS, *,
                               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Sinkhorn-Knopp teacher probabilities (M, K) of the masked patches' logits (M, K) (fp32, rows sum to 1),
        over `n_masked_patches_tensor` samples summed over ranks; `valid` (M,) bool marks the real rows of a padded
        input (the others come out 0)."""
        self._check_columns("teacher_output", teacher_output)
        n_samples = n_masked_patches_tensor.detach().clone().float().sum()  # dinov2 reduces its argument in place
        if _distributed():
            dist.all_reduce(n_samples, group=self.process_group)
        return sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations, self.process_group,
                                      valid=valid, n_samples=n_samples.clamp_min(1))  # 0 rows: 0, not 0/0

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor,
                student_masks_flat: torch.Tensor) -> torch.Tensor:
        """Over all patches: student_patch_tokens (B, N, K) logits, teacher_patch_tokens (B, N, K) probabilities,
        student_masks_flat (B, N) bool. Per crop the mean over its masked patches, then the mean over crops."""
        self._check_columns("student_patch_tokens", student_patch_tokens)
        loss = cross_entropy_rows(teacher_patch_tokens, student_patch_tokens, self.student_temp)  # (B, N)
        loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                       masks_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Over the masked patches only: student logits (M, K), teacher probabilities (M, K), the crops' masks
        (n_crops, N) bool; `masks_weight` (M,) the per-patch weights (default 1 / masked patches of the patch's
        crop), `n_masked_patches` the rows to keep. Returns -sum(w * sum_k t log softmax(s / T)) / n_crops."""
        self._check_columns("student_patch_tokens_masked", student_patch_tokens_masked)
        if student_patch_tokens_masked.shape != teacher_patch_tokens_masked.shape:
            raise ValueError(f"teacher_patch_tokens_masked has shape {tuple(teacher_patch_tokens_masked.shape)}, "
                             f"student_patch_tokens_masked {tuple(student_patch_tokens_masked.shape)}")
        loss = cross_entropy_rows(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0))
                            .unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        if masks_weight.shape != loss.shape:
            raise ValueError(f"masks_weight has shape {tuple(masks_weight.shape)}, the masked rows "
                             f"{tuple(loss.shape)}")
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor,
                      n_masked_patches_tensor: torch.Tensor | None = None) -> None:
        """Start the center update from the teacher logits (S, M, K) (dinov2 passes S = 1): the mean over M, summed
        over S, all-reduced over ranks; applied by `apply_center_update`. With `n_masked_patches_tensor` ((1,) or
        0-d), only the first that many of the M rows count (a padded input), and none leaves the center as it is."""
        self.reduce_center_update(teacher_patch_tokens, n_masked_patches_tensor)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: torch.Tensor,
                             n_masked_patches_tensor: torch.Tensor | None = None) -> None:
        self._check_columns("teacher_patch_tokens", teacher_patch_tokens)
        if teacher_patch_tokens.ndim != 3:
            raise ValueError(f"teacher_patch_tokens must be (S, M, K), got shape {tuple(teacher_patch_tokens.shape)}")
        self.updated = False
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        t = teacher_patch_tokens.float()
        if n_masked_patches_tensor is None:
            row_means = t.mean(1)
        else:
            count = n_masked_patches_tensor.reshape(()).to(t.device)
            valid = torch.arange(t.shape[1], device=t.device) < count
            row_means = (t * valid[:, None]).sum(1) / count.clamp_min(1)
            # No masked patch (tiny crops): the center stays, where dinov2's mean of nothing would be NaN.
            row_means = torch.where(count > 0, row_means, self.center.reshape(1, -1))
        self.async_batch_center = torch.sum(row_means, dim=0, keepdim=True)  # (1, K)
        if _distributed():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, group=self.process_group, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """center <- m * center + (1 - m) * the pending batch center (in place), if an update is pending."""
        if self.updated is False:
            world_size = dist.get_world_size(self.process_group) if _distributed() else 1
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
                self.reduce_handle = None
            batch_center = self.async_batch_center / (self.len_teacher_patch_tokens * world_size)
            self.center.mul_(self.center_momentum).add_(batch_center.reshape(self.center.shape),
                                                       alpha=1 - self.center_momentum)
            self.updated = True
