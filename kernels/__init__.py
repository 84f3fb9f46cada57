"""Single-device kernels for DINO: the fused loss (also with the head's last layer folded in) and the EMA update."""
from .dino_loss import dino_loss
from .ema import ema_update_
from .fused_head_loss import dino_loss_fused_head

__all__ = ["dino_loss", "dino_loss_fused_head", "ema_update_"]
