"""Gradient clipping for the training step, in one of two modes (config `optim.clip_grad_mode`):

- "global": all gradients together are scaled so that their joint norm is at most `max_norm`
  (torch's `clip_grad_norm_`, the modern default).
- "per_tensor": each gradient tensor whose own norm exceeds `max_norm` is scaled to norm `max_norm`; the others
  are left alone. This is the official DINO code's `utils.clip_gradients`, without its host sync per tensor.

The Triton update (update.py, optim.impl=triton) computes the same coefficients in one launch (kernels/clip.py)
and applies them inside AdamW.

Both return the norm of all gradients together before clipping, a 0-d tensor that is the same on every rank. It is
non-finite exactly when some gradient is, so the step uses it as its skip flag. Nothing here syncs the host.

Under FSDP2 a gradient is a DTensor sharded over the ranks, so a tensor's norm spans its shards. The per-tensor mode
takes the squared norm of every local shard in one foreach op, sums the vector over the ranks in one all-reduce, and
scales each local shard by its tensor's coefficient.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fastdino.engine.config import CLIP_GRAD_MODES
from fastdino.engine.parallelize import local_tensors
from fastdino.kernels.reference import CLIP_EPS as EPS  # the Triton path's (kernels/clip.py) as well


@torch.no_grad()
def clip_gradients_(params: list[torch.Tensor], max_norm: float, mode: str) -> torch.Tensor:
    """Clip the gradients of `params` in place (those without a gradient are left out); `max_norm` 0 measures the
    norm without clipping. Returns the norm of all gradients together before clipping (0-d, on their device)."""
    if mode == "global":
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), foreach=True)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    if mode != "per_tensor":
        raise ValueError(f"clip mode must be one of {CLIP_GRAD_MODES}, got {mode!r}")
    grads = [p.grad for p in params if p.grad is not None]
    shards = local_tensors(grads)
    squares = torch.stack(torch._foreach_norm(shards)).square()  # (n_tensors,) this rank's part of each norm²
    if isinstance(grads[0], DTensor):
        mesh = grads[0].device_mesh
        # FSDP2 on a 1-D mesh shards every gradient: the norm² of a tensor is the sum of its shards' norm².
        assert all(isinstance(g, DTensor) and g.device_mesh == mesh and all(p.is_shard() for p in g.placements)
                   for g in grads)
        dist.all_reduce(squares, group=mesh.get_group())
    if max_norm > 0:
        coefficients = (max_norm / (squares.sqrt() + EPS)).clamp(max=1.0)  # 1: not clipped, exactly
        torch._foreach_mul_(shards, list(coefficients.unbind()))
    return squares.sum().sqrt()
