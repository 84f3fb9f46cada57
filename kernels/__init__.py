"""Single-device Triton kernels for DINO: the fused loss and the EMA teacher update."""
from .dino_loss import dino_loss

__all__ = ["dino_loss"]
