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

`impl`: "auto" | "torch" | "fused". "torch" is DINOv2's formulation ((M, K) fp32 logits, log-softmax, product with
the teacher probabilities: `forward_masked`); "fused" takes the masked patches' bottleneck features and the last
layers' weights instead (`forward_fused_head`: kernels/fused_head_loss.py, pairing="rows", no (M, K) tensor).
"auto" is "fused" on CUDA (the step model: see config.py's loss.ibot_impl), "torch" elsewhere.
"""
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdino.engine.loss import (SINKHORN_ITERATIONS, _check_temperature, _distributed, all_reduce_hook,
                                  sinkhorn_knopp_teacher)
from fastdino.kernels import fused_head_loss, sinkhorn_center

logger = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "fused")


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
        """Fix impl="auto" to what it selects on `device` (fused on CUDA, torch elsewhere: on the CPU the fused
        path's reference builds the logits anyway); returns the implementation."""
        if self.impl == "auto":
            self.impl = "fused" if device.type == "cuda" else "torch"
            logger.info("iBOTPatchLoss: impl=auto chose %s (%s)", self.impl, device.type)
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

    def forward_fused_head(self, student_features: torch.Tensor, student_weight_v: torch.Tensor,
                           teacher_features: torch.Tensor, teacher_weight_v: torch.Tensor, teacher_temp: float,
                           student_masks_flat: torch.Tensor, masks_weight: torch.Tensor,
                           n_masked_patches_tensor: torch.Tensor, *, sinkhorn: bool = False,
                           student_gain: torch.Tensor | None = None, teacher_gain: torch.Tensor | None = None,
                           entropy_stride: int = 1, kernel_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv2's step for this term on the logits features @ normalize(weight_v)^T without building them:
        `forward_masked` of the teacher's softmax-centered (then `update_center` + `apply_center_update`) or, with
        `sinkhorn`, Sinkhorn-Knopp probabilities. *_features (M, D): the masked patches' L2-normalised bottleneck
        features, padded to a static M (the first `n_masked_patches_tensor` rows are patches; `masks_weight` is 0
        on the others); *_weight_v (K, D) and *_gain (K, 1) the last layers' (None: gain 1); student_masks_flat
        (n_crops, N). Returns the loss and the mean entropy of every `entropy_stride`-th real row's teacher
        probabilities (logging; computed from those rows' logits only). `kernel_impl`: `fused_head_loss`'s impl."""
        if student_weight_v.shape[0] != self.patch_out_dim:
            raise ValueError(f"student_weight_v has K={student_weight_v.shape[0]} rows but the loss (and its center) "
                             f"has patch_out_dim={self.patch_out_dim}")
        rows = teacher_features.shape[0]
        valid = torch.arange(rows, device=teacher_features.device) < n_masked_patches_tensor.reshape(())
        if sinkhorn:
            center = sinkhorn_center(teacher_features, teacher_weight_v, teacher_temp, teacher_gain=teacher_gain,
                                     n_iterations=SINKHORN_ITERATIONS, valid=valid,
                                     all_reduce=all_reduce_hook(self.process_group), impl=kernel_impl)
        else:
            self.apply_center_update()
            center = self.center
            # The padding repeats a real patch: zeroed, its logits are 0 and the column sums count the real rows.
            teacher_features = teacher_features * valid[:, None].to(teacher_features.dtype)
        loss, colsum, _ = fused_head_loss(student_features, student_weight_v, teacher_features, teacher_weight_v,
                                          center, self.student_temp, teacher_temp, pairing="rows",
                                          row_weights=masks_weight / student_masks_flat.shape[0],
                                          student_gain=student_gain, teacher_gain=teacher_gain, impl=kernel_impl)
        entropy = self._sampled_entropy(teacher_features[::entropy_stride], teacher_weight_v, teacher_gain, center,
                                        teacher_temp, valid[::entropy_stride])
        if not sinkhorn:
            self._start_center_update(colsum[None], n_masked_patches_tensor, n_sets=1)
            self.apply_center_update()
        return loss, entropy

    @staticmethod
    @torch.no_grad()
    def _sampled_entropy(features, weight_v, gain, center, teacher_temp, valid) -> torch.Tensor:
        """Mean entropy of softmax((logits - center) / teacher_temp) over the `valid` rows of `features`."""
        weight = F.normalize(weight_v.float(), dim=1) * (1.0 if gain is None else gain.float().reshape(-1, 1))
        probs = F.softmax((features.float() @ weight.T - center.reshape(1, -1)) / teacher_temp, dim=-1)
        return (torch.special.entr(probs).sum(-1) * valid).sum() / valid.sum().clamp_min(1)

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
        t = teacher_patch_tokens.float()
        if n_masked_patches_tensor is None:
            self._start_center_update(t.mean(1), None, len(t))
        else:
            count = n_masked_patches_tensor.reshape(()).to(t.device)
            valid = torch.arange(t.shape[1], device=t.device) < count
            self._start_center_update((t * valid[:, None]).sum(1), count, len(t))

    @torch.no_grad()
    def _start_center_update(self, row_stats: torch.Tensor, count: torch.Tensor | None, n_sets: int) -> None:
        """The pending batch center from (S, K) per-set row means (`count` None) or sums over `count` real rows."""
        self.updated = False
        self.len_teacher_patch_tokens = n_sets
        row_means = row_stats
        if count is not None:
            count = count.reshape(()).to(row_stats.device)
            # No masked patch (tiny crops): the center stays, where dinov2's mean of nothing would be NaN.
            row_means = torch.where(count > 0, row_stats / count.clamp_min(1), self.center.reshape(1, -1))
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
