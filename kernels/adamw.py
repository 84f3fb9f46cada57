"""AdamW over a whole list of tensors in one Triton launch, with per-tensor gradient coefficients (the clip, see
kernels/clip.py), per-group learning rate and weight decay read on the device, and a skip flag.

Math: torch's fused AdamW (`torch._fused_adamw_`, decoupled weight decay), per element, in fp32:
    g = grad * coef;  p -= lr * wd * p;  m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g²
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)      with t = step + 1, then step = t.
A skip flag of 1 (a non-finite gradient norm) leaves everything untouched, step counts included, as the fused
AdamW's `found_inf`. Reference: `kernels/reference.py: adamw_step_ref`.

Why not torch's fused AdamW: its weight decay is a host float baked into a CUDA graph, and it cannot take one
coefficient per gradient, so clipping per tensor costs a scaling pass and the step counts two more launches. Here
lr, weight decay, coefficients and skip flag are device values, so the whole update after backward replays in a
CUDA graph with the schedules live.

One launch: the host builds, once per set of tensor addresses, a table with every tensor's parameter, gradient,
moments, step count, lr and weight-decay addresses and a (tensor, block) row per program. The program that
finishes a tensor's last block (an atomic ticket per tensor) writes its new step count and resets the ticket:
every program of the tensor has read the old count by then.
"""
import itertools
import operator

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import adamw_step_ref

BLOCK = 2048
NUM_WARPS = 8
ADDRESSES = ("param", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "weight_decay")


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef, lr, wd, beta1, beta2, eps, bias_correction1,
                 bias_correction2_sqrt, ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """The update of one block (`mask` None: a full block, unmasked, so that the accesses vectorize)."""
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask) * coef
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    p -= lr * wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p -= (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if ZERO_GRAD:
        tl.store(g_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


@triton.jit
def _adamw_kernel(
    table_ptr, addr_ptr, numel_ptr, ticket_ptr, coef_ptr, skip_ptr, beta1, beta2, eps,
    HAS_COEF: tl.constexpr, ZERO_GRAD: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """table_ptr (n_programs, 2) int32 (tensor, block); addr_ptr (n_tensors, 7) int64: fp32 param, grad, exp_avg,
    exp_avg_sq, then the fp32 0-d step, lr and weight decay; numel_ptr (n_tensors,) int64; ticket_ptr (n_tensors,)
    int32, zero between launches; coef_ptr (n_tensors,) fp32 gradient coefficients; skip_ptr 0-d fp32 (1: skip).
    ALIGNED: the host checked that the four tensor addresses of every row are 16-byte aligned."""
    pid = tl.program_id(0)
    idx = tl.load(table_ptr + 2 * pid)
    block = tl.load(table_ptr + 2 * pid + 1)
    numel = tl.load(numel_ptr + idx)
    row = addr_ptr + 7 * idx
    p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if tl.load(skip_ptr) != 0:  # nothing changes, but kept gradients start the next step from zero
        if ZERO_GRAD:
            tl.store(g_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < numel)
    else:
        step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        lr = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
        wd = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32)))
        coef = tl.load(coef_ptr + idx) if HAS_COEF else 1.0
        step = tl.load(step_ptr) + 1.0
        bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
        if (block + 1) * BLOCK <= numel:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, coef, lr, wd, beta1, beta2, eps,
                         bias_correction1, bias_correction2_sqrt, ZERO_GRAD, BLOCK)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < numel, coef, lr, wd, beta1, beta2, eps,
                         bias_correction1, bias_correction2_sqrt, ZERO_GRAD, BLOCK)
        tl.debug_barrier()  # every thread has read the old step count before the ticket is taken
        if tl.atomic_add(ticket_ptr + idx, 1) == tl.maximum(tl.cdiv(numel, BLOCK), 1).to(tl.int32) - 1:
            tl.store(step_ptr, step)
            tl.atomic_xchg(ticket_ptr + idx, 0)


class _AdamWPlan:
    """Device tables of one set of tensor addresses. Like the clip's plan it does not keep the tensors alive (the
    gradients are freed every step): it is used only for live tensors at exactly its addresses and shapes."""

    def __init__(self, columns: list[list[torch.Tensor]], device: torch.device):
        self.layout = _layout(columns[0])
        numels = [p.numel() for p in columns[0]]
        # An empty tensor gets one (masked) program too: its step count moves, as torch's does.
        rows = _launch.block_rows([max(n, 1) for n in numels], BLOCK)
        self.grid = (len(rows),)
        self.table = torch.tensor(rows, dtype=torch.int32).to(device)
        addresses = [[t.data_ptr() for t in tensors] for tensors in zip(*columns)]
        self.addr = torch.tensor(addresses, dtype=torch.int64).to(device)
        self.numel = torch.tensor(numels, dtype=torch.int64).to(device)
        self.ticket = torch.zeros(len(numels), dtype=torch.int32, device=device)
        self.no_skip = torch.zeros((), device=device)
        self.aligned = all(a % 16 == 0 for row in addresses for a in row[:4])


def _layout(params) -> tuple:
    return tuple(map(_shape, params))


_shape = operator.attrgetter("shape")


MAX_PLANS = 4
_plans: dict[tuple, _AdamWPlan] = {}
_data_ptr = torch.Tensor.data_ptr


def _check(columns: dict[str, list], coefficients, skip) -> None:
    n = len(columns["param"])
    for name, tensors in columns.items():
        if len(tensors) != n:
            raise ValueError(f"adamw_step_: {n} params but {len(tensors)} {name} tensors")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
                raise ValueError(f"adamw_step_: {name}[{i}] must be a float32 torch.Tensor, got {got}")
            if name in ("step", "lr", "weight_decay"):
                if t.dim() != 0:
                    raise ValueError(f"adamw_step_: {name}[{i}] must be 0-d, got shape {tuple(t.shape)}")
            elif t.shape != columns["param"][i].shape:
                raise ValueError(f"adamw_step_: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] "
                                 f"{tuple(columns['param'][i].shape)}")
    if coefficients is not None and (coefficients.shape != (n,) or coefficients.dtype != torch.float32):
        raise ValueError(f"adamw_step_: grad_coefficients must be a ({n},) float32 tensor, got "
                         f"{tuple(coefficients.shape)} {coefficients.dtype}")
    if skip is not None and (skip.dim() != 0 or skip.dtype != torch.float32):
        raise ValueError(f"adamw_step_: skip must be a 0-d float32 tensor, got {tuple(skip.shape)} {skip.dtype}")


def _triton_blocker(columns: dict[str, list], device: torch.device) -> str | None:
    if any(t.device != device for tensors in columns.values() for t in tensors):
        return "tensors on several devices"
    if not all(t.is_contiguous() for name in ADDRESSES[:4] for t in columns[name]):
        return "a tensor is not contiguous"
    return None


@torch.no_grad()
def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lrs, weight_decays, *, betas: tuple[float, float],
                eps: float, grad_coefficients: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                zero_grads: bool = False, impl: str = "auto") -> str:
    """One AdamW step in place over lists of fp32 tensors (see the module docstring): `steps`, `lrs` and
    `weight_decays` hold one 0-d fp32 tensor on the parameters' device per parameter (a group's tensors may be
    shared), `grad_coefficients` (n,) multiplies each gradient, `skip` (0-d, 1.0 = skip) leaves everything as it
    is; `zero_grads` zeroes the gradients after reading them (skipped or not). impl: "auto" (Triton on CUDA, else
    the torch reference), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch". Returns the path taken."""
    columns = dict(zip(ADDRESSES, (params, grads, exp_avgs, exp_avg_sqs, steps, lrs, weight_decays)))
    if not params:
        return "torch"
    device = params[0].device
    chosen = _launch.select_impl("adamw_step_", impl, device, "torch", _adamw_kernel)
    key = tuple(map(_data_ptr, itertools.chain.from_iterable(columns.values())))
    plan = _plans.get(key) if chosen == "triton" else None
    if plan is None or plan.layout != _layout(params):
        _check(columns, grad_coefficients, skip)
        if chosen == "triton":
            chosen = _launch.unless_blocked("adamw_step_", impl, _triton_blocker(columns, device))
        if chosen == "torch":
            adamw_step_ref(*columns.values(), betas=betas, eps=eps, grad_coefficients=grad_coefficients, skip=skip,
                           zero_grads=zero_grads)
            return "torch"
        if len(_plans) >= MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        plan = _plans[key] = _AdamWPlan(list(columns.values()), device)
    _adamw_kernel[plan.grid](
        plan.table, plan.addr, plan.numel, plan.ticket,
        grad_coefficients if grad_coefficients is not None else plan.numel, skip if skip is not None else plan.no_skip,
        float(betas[0]), float(betas[1]), float(eps), HAS_COEF=grad_coefficients is not None, ZERO_GRAD=zero_grads,
        ALIGNED=plan.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return "triton"


def adamw_launch_bytes(numel: int) -> dict[str, int]:
    """HBM traffic of the step over `numel` fp32 elements: param and both moments read and written, the gradient
    read (the tables and scalars are negligible)."""
    return {_adamw_kernel.fn.__name__: numel * 4 * 7}
