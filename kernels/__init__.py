"""Single-device Triton kernels for DINO: the fused loss and the EMA teacher update."""
from .dino_loss import dino_loss
from .ema import ema_update_

__all__ = ["dino_loss", "ema_update_"]
