"""EMA teacher update over a whole list of tensors of mixed sizes in one Triton launch.

Math (DINO, Caron et al. 2021, Sec. 3.1 "Teacher network"): teacher <- m * teacher + (1 - m) * student, written as
teacher + (1 - m) * (student - teacher) like `torch.lerp` and the reference (`kernels/reference.py: ema_update_ref`).
fp32 math; teacher and student each load in their own dtype (fp32 teacher with fp32 or bf16 student in practice).
Memory traffic: numel * (2 * bytes(teacher) + bytes(student)), one read of each and one write of the teacher.

One launch: the host builds, once per set of tensor storages (`_plan_for`: cached on their data pointers), a table
with the teacher and student address and the numel of every tensor, and one (tensor index, block index) row per
program; a call with the same tensors then only reads their data pointers and launches. `EMAUpdate` (the trainer's)
holds its plan for fixed parameter lists: it compares the pointers with the plan's, or reads nothing at all.
Each program casts the addresses to typed pointers and updates one BLOCK of one tensor. Full blocks take an
unmasked path, and the pointers are hinted 16-byte aligned when the host has checked that they are, so that loads
and stores vectorize.
FSDP2 parameters (DTensors) are updated through their local shards; teacher and student are sharded alike.
"""
import math
import numbers

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import ema_update_ref

BLOCK = 4096
# 16 elements per thread: under triton 3.6 (the GPU machine's) 4 warps took 144-178 registers, 2 blocks per SM; 8 warps
# take 80-82 there, 55-80 under 3.8 (benchmarks/aot_report.py), with the same 4096 elements in flight per block.
NUM_WARPS = 8
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


def _check_tensors(teachers, students) -> None:
    """ValueError naming the argument and index unless each pair is two floating-point tensors of one shape on one
    device (the update mixes their dtypes, never their devices)."""
    for i, pair in enumerate(zip(teachers, students)):
        for name, x in zip(("teacher_params", "student_params"), pair):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
                raise ValueError(f"ema_update_: {name}[{i}] must be a floating-point torch.Tensor, got {got}")
        t, s = pair
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: teacher_params[{i}] has shape {tuple(t.shape)}, student_params[{i}] "
                             f"{tuple(s.shape)}")
        if t.device != s.device:
            raise ValueError(f"ema_update_: teacher_params[{i}] is on {t.device}, student_params[{i}] on {s.device}")


def _check_momentum(momentum) -> None:
    """ValueError unless `momentum` is a number in [0, 1] or a 0-d floating-point tensor. A tensor on the CPU is
    read and range-checked too (no device to wait for); one on an accelerator is not: reading it would wait for
    the device on every call, and its value is what the kernel reads on the device (CUDA graphs). Keeping a device
    momentum in [0, 1] is the caller's part (the trainer's is torch.where of two checked numbers)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"ema_update_: momentum tensor must be 0-d floating point, got {tuple(momentum.shape)} "
                             f"{momentum.dtype}")
        if momentum.device.type == "cpu" and not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"ema_update_: momentum must be in [0, 1], got a tensor holding {float(momentum)}")
    elif isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_: momentum must be a number in [0, 1] or a 0-d tensor, got {momentum!r}")


def _triton_blocker(teachers, students) -> str | None:
    """Why the Triton path cannot take these tensors, or None when it can."""
    devices = {t.device for t in teachers + students}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    for i, (t, s) in enumerate(zip(teachers, students)):
        if t.dtype not in TL_DTYPES or s.dtype not in TL_DTYPES:
            return f"tensor {i} has dtypes {t.dtype}/{s.dtype}; supported: {sorted(map(str, TL_DTYPES))}"
        if not (t.is_contiguous() and s.is_contiguous()):
            return f"tensor {i} is not contiguous"
    return None


class _LaunchPlan:
    """What the launches need for one set of tensors: per dtype pair the device tables, the grid and whether every
    address is 16-byte aligned. It holds aliases of the tensors' storages, so that while it lives they stay alive
    and no other tensor can take their addresses (the cache key; the addresses its launches write)."""

    def __init__(self, teachers, students, device):
        # Aliases of the storages, not the parameters: `p.data = ...` leaves them alive and in place.
        self.tensors = ([t.detach() for t in teachers], [s.detach() for s in students])
        self.device = device
        self.pointers = (tuple(map(_data_ptr, teachers)), tuple(map(_data_ptr, students)))
        groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
        for i, (t, s) in enumerate(zip(teachers, students)):
            groups.setdefault((t.dtype, s.dtype), []).append(i)
        self.launches = []  # one per dtype pair, in practice exactly one
        for (t_dtype, s_dtype), members in groups.items():
            addrs = [p.data_ptr() for i in members for p in (teachers[i], students[i])]
            numels = [teachers[i].numel() for i in members]
            # Built from Python lists (shapes known without running a tensor op, so the AOT report can build it
            # on fake tensors): one (tensor, block) row per program.
            rows = [(i, b) for i, n in enumerate(numels) for b in range(math.ceil(n / BLOCK))]
            if not rows:  # only empty tensors
                continue
            table = torch.tensor(rows, dtype=torch.int32)  # (n_programs, 2)
            addr = torch.tensor(addrs, dtype=torch.int64).reshape(-1, 2)  # (n_tensors, 2) teacher, student
            self.launches.append(dict(
                grid=(table.shape[0],), table=table.to(device), addr=addr.to(device),
                numel=torch.tensor(numels, dtype=torch.int64).to(device), T_DTYPE=TL_DTYPES[t_dtype],
                S_DTYPE=TL_DTYPES[s_dtype], ALIGNED=all(a % 16 == 0 for a in addrs),
            ))


class _Unsupported(Exception):
    """The Triton path cannot take these tensors (the message says why)."""


# A few plans, keyed on the data pointers of the teacher and student tensors (see `_plan_for`).
MAX_PLANS = 4
_plans: dict[tuple, _LaunchPlan] = {}
_data_ptr = torch.Tensor.data_ptr


def _plan_for(teachers, students, device) -> _LaunchPlan:
    """The launch plan of these tensors, built (after the full checks) only when their storage changed.

    The key is the tuple of data pointers, one C-level call per tensor and nothing else: the same pointers mean the
    same live storages (a cached plan keeps them alive), so shapes, dtypes and alignment are those checked when the
    plan was built. Resizing a tensor in place (`resize_`) without moving it is the one change it cannot see.
    """
    key = (tuple(map(_data_ptr, teachers)), tuple(map(_data_ptr, students)))
    plan = _plans.get(key)
    if plan is None:
        _check_tensors(teachers, students)
        blocker = _triton_blocker(teachers, students)
        if blocker is not None:
            raise _Unsupported(blocker)
        if len(_plans) >= MAX_PLANS:
            _plans.pop(next(iter(_plans)))  # the oldest
        plan = _plans[key] = _LaunchPlan(teachers, students, device)
    return plan


@torch.no_grad()
def ema_update_(teacher_params, student_params, momentum, *, impl: str = "auto") -> str:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place, over two lists of tensors.

    Tensors may have mixed sizes and be plain tensors or DTensors (updated through `.to_local()`). `momentum` is a
    number in [0, 1] or a 0-d tensor on the tensors' device (read on device, so CUDA graphs can capture the update).
    impl: "auto" (Triton for CUDA tensors, else `torch._foreach_lerp_`), "triton" (CUDA, or CPU with
    TRITON_INTERPRET=1; a ValueError when it cannot take the tensors), "foreach". Returns the path taken:
    "triton" or "foreach".
    """
    if len(teacher_params) != len(student_params):
        raise ValueError(f"ema_update_: {len(teacher_params)} teacher tensors but {len(student_params)} student "
                         f"tensors")
    _check_momentum(momentum)
    teachers, students = _local_pairs(teacher_params, student_params)
    if not teachers:
        return ema_update_ref(teachers, students, momentum)
    device = teachers[0].device
    chosen = _launch.select_impl("ema_update_", impl, device, "foreach", _ema_update_kernel)
    if chosen == "triton":
        chosen, momentum = _momentum_on(device, momentum, impl)
    if chosen == "triton":
        try:
            plan = _plan_for(teachers, students, device)
        except _Unsupported as blocker:
            chosen = _fallback(impl, str(blocker))
    if chosen == "foreach":
        _check_tensors(teachers, students)
        return ema_update_ref(teachers, students, momentum)

    _launch_plan(plan, momentum)
    return "triton"


def _launch_plan(plan: _LaunchPlan, momentum) -> None:
    """The plan's launches with `momentum`, a number or a 0-d tensor on the tensors' device."""
    from_ptr = isinstance(momentum, torch.Tensor)
    weight = 0.0 if from_ptr else 1.0 - float(momentum)
    for launch in plan.launches:
        _ema_update_kernel[launch["grid"]](
            launch["table"], launch["addr"], launch["numel"], weight, momentum if from_ptr else launch["table"],
            T_DTYPE=launch["T_DTYPE"], S_DTYPE=launch["S_DTYPE"], MOMENTUM_FROM_PTR=from_ptr,
            ALIGNED=launch["ALIGNED"], BLOCK=BLOCK, num_warps=NUM_WARPS,
        )


def ema_launch_bytes(numel: int, teacher_bytes: int, student_bytes: int) -> dict[str, int]:
    """HBM traffic of the update of `numel` elements, {kernel name: bytes}: each teacher and student element read
    once, each teacher element written once."""
    return {_ema_update_kernel.fn.__name__: numel * (2 * teacher_bytes + student_bytes)}


class EMAUpdate:
    """`ema_update_(teacher_params, student_params, momentum)` for two fixed lists of parameters, with the launch
    plan held here instead of looked up in a cache on every call. For the trainer, where ~150 tensors make that
    look-up most of the host time.

    The plan is built at the first call (after FSDP2's lazy init, which may give a shard new storage). Each call
    then compares the tensors' data pointers with the plan's (one C call per tensor, no device work) and rebuilds
    the plan when a storage moved (`teacher.to(dtype)`, `p.data = ...`) or the lists grew, so the tensors the
    caller holds are the ones updated. `check_storage=False` skips that walk (what a call costs is then the
    momentum check and the launch; DTensors make the walk cost a `to_local()` each): for a caller that checks
    `storage_moved()` itself, as the trainer does at log steps, and calls `rebuild()` after moving parameters.
    The plan keeps the storages it was built on alive, so a stale plan updates the old storages, never freed memory.
    """

    def __init__(self, teacher_params, student_params, *, impl: str = "auto", check_storage: bool = True):
        if len(teacher_params) != len(student_params):
            raise ValueError(f"ema_update_: {len(teacher_params)} teacher tensors but {len(student_params)} "
                             f"student tensors")
        self.teacher_params, self.student_params, self.impl = teacher_params, student_params, impl
        self.check_storage = check_storage
        self._lengths = (len(teacher_params), len(student_params))
        self._plan = None

    def rebuild(self) -> None:
        """Rebuild the plan at the next call (after parameters moved or were replaced)."""
        self._plan = None

    def storage_moved(self) -> bool:
        """True when a tensor's storage differs from the plan's (a walk over every tensor)."""
        if self._plan is None:
            return False
        teachers, students = _local_pairs(self.teacher_params, self.student_params)
        return self._plan.pointers != (tuple(map(_data_ptr, teachers)), tuple(map(_data_ptr, students)))

    def _build(self):
        """(path, device plan or the local tensors for foreach), with ema_update_'s checks and choice."""
        teachers, students = _local_pairs(self.teacher_params, self.student_params)
        _check_tensors(teachers, students)
        if not teachers:
            return "foreach", _PlanForeach(teachers, students)
        device = teachers[0].device
        chosen = _launch.select_impl("ema_update_", self.impl, device, "foreach", _ema_update_kernel)
        if chosen == "triton":
            blocker = _triton_blocker(teachers, students)
            if blocker is None:
                return "triton", _LaunchPlan(teachers, students, device)
            chosen = _fallback(self.impl, blocker)
        return chosen, _PlanForeach(teachers, students)

    @torch.no_grad()
    def __call__(self, momentum) -> str:
        """teacher <- momentum * teacher + (1 - momentum) * student in place; returns the path taken."""
        _check_momentum(momentum)
        lengths = (len(self.teacher_params), len(self.student_params))
        if self._plan is None or self._lengths != lengths or (self.check_storage and self.storage_moved()):
            if lengths[0] != lengths[1]:
                raise ValueError(f"ema_update_: {lengths[0]} teacher tensors but {lengths[1]} student tensors")
            self._lengths = lengths
            self._path, self._plan = self._build()
        path = self._path
        if path == "triton":
            path, momentum = _momentum_on(self._plan.device, momentum, self.impl)
        if path == "foreach":
            ema_update_ref(*self._plan.tensors, momentum)
        else:
            _launch_plan(self._plan, momentum)
        return path


class _PlanForeach:
    """The foreach path's plan: the local tensors (what `_locals` would return on every call)."""

    def __init__(self, teachers, students):
        self.tensors = (teachers, students)
        self.pointers = (tuple(map(_data_ptr, teachers)), tuple(map(_data_ptr, students)))


def _momentum_on(device: torch.device, momentum, impl: str):
    """("triton", momentum the kernel can read on `device`), or ("foreach", momentum) when it is a tensor on
    another GPU (see `_fallback`). A CPU tensor becomes a float: reading it does not wait for the GPU."""
    if not isinstance(momentum, torch.Tensor) or momentum.device == device:
        return "triton", momentum
    if momentum.device.type == "cpu":
        return "triton", float(momentum)
    return _fallback(impl, f"momentum is on {momentum.device}, the tensors on {device}"), momentum


def _fallback(impl: str, reason: str) -> str:
    """"foreach" for impl="auto" (logged once); for an explicit impl="triton" a ValueError naming the fallback."""
    if impl == "triton":
        raise ValueError(f'ema_update_: impl="triton" cannot take these tensors ({reason}); use impl="foreach"')
    _launch.log_choice_once("ema_update_", "foreach", reason)
    return "foreach"


_PLAIN_TYPES = {torch.Tensor, torch.nn.Parameter}


def _local_pairs(teacher_params, student_params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return _locals(teacher_params, "teacher_params"), _locals(student_params, "student_params")


def _locals(params, name: str) -> list[torch.Tensor]:
    """The tensors to update: DTensors' local shards, plain tensors as they are (one type scan, no per-tensor
    attribute probe, when the list holds no DTensor: the common case outside FSDP2). ValueError naming `name` and
    the index for anything that is no tensor (a numpy array, a nested list)."""
    types = set(map(type, params))
    if types <= _PLAIN_TYPES:
        return list(params)
    if not all(issubclass(kind, torch.Tensor) for kind in types):
        i, bad = next((i, p) for i, p in enumerate(params) if not isinstance(p, torch.Tensor))
        raise ValueError(f"ema_update_: {name}[{i}] must be a floating-point torch.Tensor, got a "
                         f"{type(bad).__name__}")
    return [_launch.local_shard(p) for p in params]
