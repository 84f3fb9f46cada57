"""Single-device Triton kernels for DINO: the fused loss and the EMA teacher update."""
