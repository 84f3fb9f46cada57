"""Single-device kernels for DINO: the fused loss, the head's last layer + loss (DINO and iBOT pairings) and the EMA
update, and the HBM bytes (and FLOPs) each of their launches moves (for the step model, engine/estimate.py, and
bytes_floor.py)."""
from .dino_loss import dino_loss, dino_loss_launch_bytes
from .ema import EMAUpdate, ema_launch_bytes, ema_update_
from .fused_head_loss import (fused_head_loss, fused_head_loss_launch_cost, sinkhorn_center, sinkhorn_launch_cost,
                              weight_norm_bwd_bytes)

__all__ = ["EMAUpdate", "dino_loss", "dino_loss_launch_bytes", "ema_launch_bytes", "ema_update_", "fused_head_loss",
           "fused_head_loss_launch_cost", "sinkhorn_center", "sinkhorn_launch_cost", "weight_norm_bwd_bytes"]
