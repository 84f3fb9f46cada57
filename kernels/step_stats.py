"""The training step's bookkeeping after the optimizer in one Triton launch: the step-statistics accumulators (the
trainer's StepStats), the teacher momentum of this step (1 on a skipped step: the teacher stays) and, on a skipped
step, the loss center put back. Before this launch they were ~30 tiny torch ops (where, isfinite, stack, copy_).

Accumulators, a (7,) fp32 tensor: loss sum, entropy sum and count of the finite steps, skipped steps, the current
and the longest run of non-finite steps, the last gradient norm. A step is skipped when `skip` is 1 and non-finite
when its loss is (or, with `skip_is_nonfinite`, when it was skipped). Reference: `kernels/reference.py:
step_stats_ref`. Program 0 updates the accumulators and the momentum; every program restores one block of the
center.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from .reference import N_STEP_STATS, step_stats_ref

BLOCK = 4096


@triton.jit
def _step_stats_kernel(values_ptr, loss_ptr, entropy_ptr, norm_ptr, skip_ptr, momentum_ptr, momentum_out_ptr,
                       center_ptr, center_before_ptr, n_center, SKIP_IS_NONFINITE: tl.constexpr,
                       HAS_CENTER: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    skipped = tl.load(skip_ptr) != 0
    if pid == 0:
        loss = tl.load(loss_ptr).to(tl.float32)
        nonfinite = (loss != loss) | (tl.abs(loss) == float("inf"))
        if SKIP_IS_NONFINITE:
            nonfinite = nonfinite | skipped
        entropy = tl.load(entropy_ptr).to(tl.float32)
        in_a_row = tl.where(nonfinite, tl.load(values_ptr + 4) + 1.0, 0.0)
        tl.store(values_ptr, tl.load(values_ptr) + tl.where(nonfinite, 0.0, loss))
        tl.store(values_ptr + 1, tl.load(values_ptr + 1) + tl.where(nonfinite, 0.0, entropy))
        tl.store(values_ptr + 2, tl.load(values_ptr + 2) + tl.where(nonfinite, 0.0, 1.0))
        tl.store(values_ptr + 3, tl.load(values_ptr + 3) + tl.where(skipped, 1.0, 0.0))
        tl.store(values_ptr + 4, in_a_row)
        tl.store(values_ptr + 5, tl.maximum(tl.load(values_ptr + 5), in_a_row))
        tl.store(values_ptr + 6, tl.load(norm_ptr).to(tl.float32))
        tl.store(momentum_out_ptr, tl.where(skipped, 1.0, tl.load(momentum_ptr).to(tl.float32)))
    if HAS_CENTER:
        if skipped:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_center
            tl.store(center_ptr + offs, tl.load(center_before_ptr + offs, mask=mask), mask=mask)


def _check(values, scalars: dict, center, center_before) -> None:
    if not isinstance(values, torch.Tensor) or values.shape != (N_STEP_STATS,) or values.dtype != torch.float32:
        raise ValueError(f"step_stats_update_: values must be a ({N_STEP_STATS},) float32 tensor")
    for name, t in scalars.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 0 or t.device != values.device:
            raise ValueError(f"step_stats_update_: {name} must be a 0-d tensor on {values.device}")
    if (center is None) != (center_before is None):
        raise ValueError("step_stats_update_: center and center_before go together")
    if center is not None and (center.shape != center_before.shape or center.dtype != torch.float32
                               or center_before.dtype != torch.float32 or not center.is_contiguous()
                               or not center_before.is_contiguous()):
        raise ValueError(f"step_stats_update_: center and center_before must be contiguous float32 tensors of one "
                         f"shape, got {tuple(center.shape)} {center.dtype} and {tuple(center_before.shape)} "
                         f"{center_before.dtype}")


@torch.no_grad()
def step_stats_update_(values, loss, entropy, grad_norm, skip, momentum, momentum_out, center=None,
                       center_before=None, *, skip_is_nonfinite: bool = True, impl: str = "auto") -> str:
    """Add one step to `values` in place and write this step's teacher momentum (1 when skipped, else `momentum`)
    into `momentum_out`; on a skipped step copy `center_before` into `center`. loss, entropy, grad_norm, skip (1.0 =
    skipped), momentum, momentum_out: 0-d tensors on the device of `values`. No host sync. impl: "auto" (Triton on
    CUDA, else the torch reference), "triton", "torch". Returns the path taken."""
    scalars = dict(loss=loss, entropy=entropy, grad_norm=grad_norm, skip=skip, momentum=momentum,
                   momentum_out=momentum_out)
    _check(values, scalars, center, center_before)
    chosen = _launch.select_impl("step_stats_update_", impl, values.device, "torch", _step_stats_kernel)
    if chosen == "torch":
        step_stats_ref(values, loss, entropy, grad_norm, skip, momentum, momentum_out, center, center_before,
                       skip_is_nonfinite=skip_is_nonfinite)
        return "torch"
    n_center = center.numel() if center is not None else 0
    _step_stats_kernel[(max(1, triton.cdiv(n_center, BLOCK)),)](
        values, loss, entropy, grad_norm, skip, momentum, momentum_out,
        center if center is not None else values, center_before if center is not None else values, n_center,
        SKIP_IS_NONFINITE=skip_is_nonfinite, HAS_CENTER=center is not None, BLOCK=BLOCK,
    )
    return "triton"
