"""Single-device kernels for DINO: the fused loss, the head's last layer + loss (DINO and iBOT pairings), a block's
MLP branch with its residual add, the EMA update and the update after backward (clip coefficients, AdamW, step
statistics), and the HBM bytes (and FLOPs) each of their launches moves (for the step model, engine/estimate.py,
and bytes_floor.py)."""
from .adamw import adamw_launch_bytes, adamw_step_
from .clip import clip_coefficients, clip_launch_bytes
from .dino_loss import dino_loss, dino_loss_launch_bytes
from .ema import EMAUpdate, ema_launch_bytes, ema_update_
from .fused_head_loss import (fused_head_loss, fused_head_loss_launch_cost, sinkhorn_center, sinkhorn_launch_cost,
                              weight_norm_bwd_bytes)
from .gelu_mlp import gelu_mlp_launch_bytes, gelu_mlp_residual
from .step_stats import step_stats_update_

__all__ = ["EMAUpdate", "adamw_launch_bytes", "adamw_step_", "clip_coefficients", "clip_launch_bytes", "dino_loss",
           "dino_loss_launch_bytes", "ema_launch_bytes", "ema_update_", "fused_head_loss", "fused_head_loss_launch_cost",
           "gelu_mlp_launch_bytes", "gelu_mlp_residual", "sinkhorn_center", "sinkhorn_launch_cost",
           "step_stats_update_", "weight_norm_bwd_bytes"]
