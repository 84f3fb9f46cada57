"""Gradient clipping coefficients of a whole list of tensors in one Triton launch (DINO's `utils.clip_gradients`).

Math: per tensor i, norm_i = ||g_i||_2; the total norm is sqrt(sum_i norm_i²). The coefficient of tensor i is
min(1, max_norm / (norm_i + 1e-6)) in mode "per_tensor" (the official code scales a gradient only when its norm
exceeds max_norm), min(1, max_norm / (total + 1e-6)) in mode "global" (torch's clip_grad_norm_), and 1 with
max_norm 0 (measure only). The launch returns the coefficients, the total norm and a skip flag (1.0 when the total
is not finite) on the device; it scales nothing: the optimizer step (kernels/adamw.py) multiplies each gradient by
its coefficient as it reads it, so the clip costs one read of the gradients and no write. Reference:
`kernels/reference.py: clip_coefficients_ref`.

One launch, deterministic: every program writes the squared sum of one block of one tensor; the program that
finishes a tensor's last block (an atomic ticket per tensor) adds that tensor's partial sums in block order, and
the program that finishes the last tensor computes the total, the coefficients and the flag. Each finisher resets
its ticket, so the next launch (or CUDA graph replay) starts from zero.
"""
import operator

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import CLIP_EPS, CLIP_MODES, clip_coefficients_ref

BLOCK = 4096
FINISH_BLOCK = 1024  # partial sums or tensor norms added per iteration by a finisher
NUM_WARPS = 8
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _clip_coefficients_kernel(
    table_ptr, addr_ptr, numel_ptr, partial_ptr, square_ptr, ticket_ptr, coef_ptr, out_ptr, n_tensors, max_norm,
    G_DTYPE: tl.constexpr, PER_TENSOR: tl.constexpr, EPS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
):
    """table_ptr (n_programs, 2) int32 (tensor, block); addr_ptr (n_tensors,) int64 gradient addresses; numel_ptr
    (n_tensors,) int64; partial_ptr (n_programs,) fp32 scratch; square_ptr (n_tensors,) fp32 norm² out; ticket_ptr
    (n_tensors + 1,) int32, zero between launches; coef_ptr (n_tensors,) fp32 out; out_ptr (2,) fp32 out: total
    norm, skip flag. ALIGNED: the host checked that every gradient address is 16-byte aligned."""
    pid = tl.program_id(0)
    idx = tl.load(table_ptr + 2 * pid)
    block = tl.load(table_ptr + 2 * pid + 1)
    numel = tl.load(numel_ptr + idx)
    g_ptr = tl.load(addr_ptr + idx).to(tl.pointer_type(G_DTYPE))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if (block + 1) * BLOCK <= numel:  # full block: no mask, so that the loads vectorize
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))
    n_blocks = tl.maximum(tl.cdiv(numel, BLOCK), 1).to(tl.int32)
    # The barrier, then acq_rel: the partial sum stored before each ticket is visible to the program that takes
    # the last one (and the same for the norms² below).
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + idx, 1) == n_blocks - 1:
        first = pid - block  # the row of the tensor's block 0
        acc = tl.zeros([FINISH_BLOCK], dtype=tl.float32)
        for start in range(0, n_blocks, FINISH_BLOCK):
            rows = start + tl.arange(0, FINISH_BLOCK)
            acc += tl.load(partial_ptr + first + rows, mask=rows < n_blocks, other=0.0, cache_modifier=".cg")
        tl.store(square_ptr + idx, tl.sum(acc, axis=0))
        tl.atomic_xchg(ticket_ptr + idx, 0)
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + n_tensors, 1) == n_tensors - 1:
            total = tl.zeros([FINISH_BLOCK], dtype=tl.float32)
            for start in range(0, n_tensors, FINISH_BLOCK):
                rows = start + tl.arange(0, FINISH_BLOCK)
                total += tl.load(square_ptr + rows, mask=rows < n_tensors, other=0.0, cache_modifier=".cg")
            norm = tl.sqrt(tl.sum(total, axis=0))
            tl.store(out_ptr, norm)
            tl.store(out_ptr + 1, tl.where((norm == norm) & (norm != float("inf")), 0.0, 1.0))
            for start in range(0, n_tensors, FINISH_BLOCK):
                rows = start + tl.arange(0, FINISH_BLOCK)
                if PER_TENSOR:
                    square = tl.load(square_ptr + rows, mask=rows < n_tensors, other=0.0, cache_modifier=".cg")
                    tensor_norm = tl.sqrt(square)
                else:
                    tensor_norm = tl.zeros([FINISH_BLOCK], dtype=tl.float32) + norm
                coef = tl.where(max_norm > 0, tl.minimum(max_norm / (tensor_norm + EPS), 1.0), 1.0)
                tl.store(coef_ptr + rows, coef, mask=rows < n_tensors)
            tl.atomic_xchg(ticket_ptr + n_tensors, 0)


class _ClipPlan:
    """Device tables and scratch of one list of gradients, cached on their addresses. It does not keep them alive
    (the trainer frees its gradients every step, and the allocator hands the same addresses back): a cached plan
    is used only for live tensors at exactly its addresses, with its shapes and dtype."""

    def __init__(self, grads: list[torch.Tensor]):
        self.layout = _layout(grads)
        device = grads[0].device
        numels = [g.numel() for g in grads]
        rows = _launch.block_rows([max(n, 1) for n in numels], BLOCK)  # an empty tensor: one masked program
        self.grid = (len(rows),)
        self.table = torch.tensor(rows, dtype=torch.int32).to(device)
        self.addr = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64).to(device)
        self.numel = torch.tensor(numels, dtype=torch.int64).to(device)
        n = len(grads)
        # One allocation for the scratch and the results: partial sums, norms², coefficients, (norm, flag).
        self.buffer = torch.zeros(len(rows) + 2 * n + 2, dtype=torch.float32, device=device)
        self.partial, self.square, self.coef, self.out = self.buffer.split([len(rows), n, n, 2])
        self.ticket = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.g_dtype = TL_DTYPES[grads[0].dtype]
        self.aligned = all(g.data_ptr() % 16 == 0 for g in grads)


def _layout(grads) -> tuple:
    return tuple(map(_shape, grads)), tuple(map(_dtype, grads))


_shape, _dtype = operator.attrgetter("shape"), operator.attrgetter("dtype")


MAX_PLANS = 4
_plans: dict[tuple, _ClipPlan] = {}
_data_ptr = torch.Tensor.data_ptr


def _triton_blocker(grads) -> str | None:
    dtypes = {g.dtype for g in grads}
    if len(dtypes) > 1 or next(iter(dtypes)) not in TL_DTYPES:
        return f"gradient dtypes {sorted(map(str, dtypes))}; one of {sorted(map(str, TL_DTYPES))} needed"
    if len({g.device for g in grads}) > 1:
        return "gradients on several devices"
    if not all(g.is_contiguous() for g in grads):
        return "a gradient is not contiguous"
    return None


def _check(grads, max_norm, mode) -> None:
    if not isinstance(grads, (list, tuple)) or not grads:
        raise ValueError(f"clip_coefficients: grads must be a non-empty list of tensors, got {type(grads).__name__}"
                         f"{' (empty)' if isinstance(grads, (list, tuple)) else ''}")
    for i, g in enumerate(grads):
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            got = f"a {g.dtype} tensor" if isinstance(g, torch.Tensor) else f"a {type(g).__name__}"
            raise ValueError(f"clip_coefficients: grads[{i}] must be a floating-point torch.Tensor, got {got}")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"clip_coefficients: max_norm must be a number >= 0, got {max_norm!r}")
    if mode not in CLIP_MODES:
        raise ValueError(f"clip_coefficients: mode must be one of {CLIP_MODES}, got {mode!r}")


@torch.no_grad()
def clip_coefficients(grads: list[torch.Tensor], max_norm: float, mode: str, *,
                      impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coefficients (n,) fp32, total norm 0-d fp32, skip flag 0-d fp32: 1.0 when the norm is not finite) of the
    gradient tensors `grads`, nothing scaled (see the module docstring). impl: "auto" (Triton on CUDA, else the
    torch reference), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch". The Triton results live in a
    buffer of the launch plan, rewritten by the next call on the same gradients: copy them to keep them."""
    key = tuple(map(_data_ptr, grads)) if isinstance(grads, (list, tuple)) and impl != "torch" else None
    plan = _plans.get(key)
    if plan is not None and plan.layout == _layout(grads):  # the same live tensors as when the plan was checked
        _launch_plan(plan, grads, max_norm, mode)
        return plan.coef, plan.out[0], plan.out[1]
    _check(grads, max_norm, mode)
    chosen = _launch.select_impl("clip_coefficients", impl, grads[0].device, "torch", _clip_coefficients_kernel)
    if chosen == "triton":
        chosen = _launch.unless_blocked("clip_coefficients", impl, _triton_blocker(grads), "gradients")
    if chosen == "torch":
        return clip_coefficients_ref(grads, max_norm, mode)
    if len(_plans) >= MAX_PLANS:
        _plans.pop(next(iter(_plans)))
    plan = _plans[key] = _ClipPlan(grads)
    _launch_plan(plan, grads, max_norm, mode)
    return plan.coef, plan.out[0], plan.out[1]


def _launch_plan(plan: _ClipPlan, grads, max_norm: float, mode: str) -> None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"clip_coefficients: max_norm must be a number >= 0, got {max_norm!r}")
    if mode not in CLIP_MODES:
        raise ValueError(f"clip_coefficients: mode must be one of {CLIP_MODES}, got {mode!r}")
    _clip_coefficients_kernel[plan.grid](
        plan.table, plan.addr, plan.numel, plan.partial, plan.square, plan.ticket, plan.coef, plan.out, len(grads),
        float(max_norm), G_DTYPE=plan.g_dtype, PER_TENSOR=mode == "per_tensor", EPS=CLIP_EPS, ALIGNED=plan.aligned,
        BLOCK=BLOCK,
        FINISH_BLOCK=FINISH_BLOCK, num_warps=NUM_WARPS,
    )


def clip_launch_bytes(numel: int, grad_bytes: int) -> dict[str, int]:
    """HBM traffic of the launch over `numel` gradient elements: each read once (the scratch is negligible)."""
    return {_clip_coefficients_kernel.fn.__name__: numel * grad_bytes}
