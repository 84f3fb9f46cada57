"""EMA teacher update over a whole list of tensors of mixed sizes in one Triton launch.

Math (DINO, Caron et al. 2021, Sec. 3.1 "Teacher network"): teacher <- m * teacher + (1 - m) * student, written as
teacher + (1 - m) * (student - teacher) like `torch.lerp` and the reference (`kernels/reference.py: ema_update_ref`).
fp32 math; teacher and student each load in their own dtype (fp32 teacher with fp32 or bf16 student in practice).
Memory traffic: numel * (2 * bytes(teacher) + bytes(student)), one read of each and one write of the teacher.

One launch: the host builds, once per set of tensors (cached on their addresses and sizes), a table with the teacher
and student address and the numel of every tensor, and one (tensor index, block index) row per program. Each program
casts the addresses to typed pointers and updates one BLOCK of one tensor. Full blocks take an unmasked path, and the
pointers are hinted 16-byte aligned when the host has checked that they are, so that loads and stores vectorize.
FSDP2 parameters (DTensors) are updated through their local shards; teacher and student are sharded alike.
"""
import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import ema_update_ref

BLOCK = 4096
NUM_WARPS = 4
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _lerp(t, s, weight):
    """t + weight * (s - t) as torch.lerp computes it, from the nearer end: weight 0 gives t, 1 gives s exactly."""
    diff = s - t
    return tl.where(weight < 0.5, t + weight * diff, s - diff * (1.0 - weight))


@triton.jit
def _ema_update_kernel(
    table_ptr, addr_ptr, numel_ptr, weight, momentum_ptr,
    T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MOMENTUM_FROM_PTR: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """teacher += (1 - m) * (student - teacher) for block `table[pid, 1]` of tensor `table[pid, 0]`.

    table_ptr: (n_programs, 2) int32. addr_ptr: (n_tensors, 2) int64, teacher and student addresses. numel_ptr:
    (n_tensors,) int64. weight: 1 - m as a runtime float, or unused when MOMENTUM_FROM_PTR, where m is read from the
    0-d tensor at momentum_ptr (so a captured CUDA graph sees the current value). T_DTYPE / S_DTYPE: element types.
    """
    pid = tl.program_id(0)
    idx = tl.load(table_ptr + 2 * pid)
    block = tl.load(table_ptr + 2 * pid + 1).to(tl.int64)
    numel = tl.load(numel_ptr + idx)
    t_ptr = tl.load(addr_ptr + 2 * idx).to(tl.pointer_type(T_DTYPE))
    s_ptr = tl.load(addr_ptr + 2 * idx + 1).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if MOMENTUM_FROM_PTR:
        weight = 1.0 - tl.load(momentum_ptr).to(tl.float32)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    if (block + 1) * BLOCK <= numel:  # full block: no mask, so the accesses vectorize
        t = tl.load(t_ptr + offs).to(tl.float32)
        s = tl.load(s_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, _lerp(t, s, weight).to(T_DTYPE))
    else:
        mask = offs < numel
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(t_ptr + offs, _lerp(t, s, weight).to(T_DTYPE), mask=mask)


@functools.lru_cache(maxsize=16)
def _launch_tables(addrs: tuple[int, ...], numels: tuple[int, ...], device: torch.device, block: int):
    """(table, addr, numel) device tensors for `_ema_update_kernel`; addrs alternate teacher, student per tensor."""
    blocks = torch.tensor([math.ceil(n / block) for n in numels], dtype=torch.int64)
    idx = torch.repeat_interleave(torch.arange(len(numels)), blocks)
    first_program = torch.cumsum(blocks, 0) - blocks  # (n_tensors,) index of each tensor's first program
    block_in_tensor = torch.arange(len(idx)) - first_program[idx]
    table = torch.stack([idx, block_in_tensor], dim=1).to(torch.int32)  # (n_programs, 2)
    addr = torch.tensor(addrs, dtype=torch.int64).reshape(-1, 2)  # (n_tensors, 2)
    return table.to(device), addr.to(device), torch.tensor(numels, dtype=torch.int64).to(device)


def _check_args(teachers, students, momentum) -> None:
    if len(teachers) != len(students):
        raise ValueError(f"ema_update_: {len(teachers)} teacher tensors but {len(students)} student tensors")
    for i, (t, s) in enumerate(zip(teachers, students)):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: tensor {i}: teacher shape {tuple(t.shape)} != student {tuple(s.shape)}")
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"ema_update_: momentum tensor must be 0-d floating point, got {tuple(momentum.shape)} "
                             f"{momentum.dtype}")
    elif isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_: momentum must be a number in [0, 1] or a 0-d tensor, got {momentum!r}")


def _triton_blocker(teachers, students, momentum) -> str | None:
    """Why the Triton path cannot take these tensors, or None when it can."""
    devices = {t.device for t in teachers + students}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    for i, (t, s) in enumerate(zip(teachers, students)):
        if t.dtype not in TL_DTYPES or s.dtype not in TL_DTYPES:
            return f"tensor {i} has dtypes {t.dtype}/{s.dtype}; supported: {sorted(map(str, TL_DTYPES))}"
        if not (t.is_contiguous() and s.is_contiguous()):
            return f"tensor {i} is not contiguous"
    if isinstance(momentum, torch.Tensor) and momentum.device not in devices and momentum.device.type != "cpu":
        return f"momentum is on {momentum.device}, the tensors on {devices.pop()}"
    return None


@torch.no_grad()
def ema_update_(teacher_params, student_params, momentum, *, impl: str = "auto") -> str:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place, over two lists of tensors.

    Tensors may have mixed sizes and be plain tensors or DTensors (updated through `.to_local()`). `momentum` is a
    number in [0, 1] or a 0-d tensor on the tensors' device (read on device, so CUDA graphs can capture the update).
    impl: "auto" (Triton for CUDA tensors, else `torch._foreach_lerp_`), "triton" (CUDA, or CPU with
    TRITON_INTERPRET=1; a ValueError when it cannot take the tensors), "foreach". Returns the path taken:
    "triton" or "foreach".
    """
    teachers = [_launch.local_shard(t) for t in teacher_params]
    students = [_launch.local_shard(s) for s in student_params]
    _check_args(teachers, students, momentum)
    if not teachers:
        return ema_update_ref(teachers, students, momentum)
    device = teachers[0].device
    chosen = _launch.select_impl("ema_update_", impl, device, "foreach", _ema_update_kernel)
    blocker = _triton_blocker(teachers, students, momentum) if chosen == "triton" else None
    if blocker is not None:
        if impl == "triton":
            raise ValueError(f'ema_update_: impl="triton" cannot take these tensors ({blocker}); use impl="foreach"')
        _launch.log_choice_once("ema_update_", "foreach", blocker)
    if chosen == "foreach" or blocker is not None:
        return ema_update_ref(teachers, students, momentum)

    if isinstance(momentum, torch.Tensor) and momentum.device.type == "cpu" and device.type != "cpu":
        momentum = float(momentum)  # a CPU scalar: reading it does not wait for the GPU
    from_ptr = isinstance(momentum, torch.Tensor)
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (t, s) in enumerate(zip(teachers, students)):
        groups.setdefault((t.dtype, s.dtype), []).append(i)
    for (t_dtype, s_dtype), members in groups.items():  # one launch per dtype pair, in practice exactly one
        addrs = tuple(p.data_ptr() for i in members for p in (teachers[i], students[i]))
        numels = tuple(teachers[i].numel() for i in members)
        table, addr, numel = _launch_tables(addrs, numels, device, BLOCK)
        if table.shape[0] == 0:
            continue
        _ema_update_kernel[(table.shape[0],)](
            table, addr, numel, 0.0 if from_ptr else 1.0 - float(momentum), momentum if from_ptr else table,
            T_DTYPE=TL_DTYPES[t_dtype], S_DTYPE=TL_DTYPES[s_dtype], MOMENTUM_FROM_PTR=from_ptr,
            ALIGNED=all(a % 16 == 0 for a in addrs), BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    return "triton"
