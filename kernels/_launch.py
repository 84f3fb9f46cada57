"""Launch helpers shared by the kernels: implementation choice, block-size heuristics, local shards and input checks.

Nothing here imports Triton at module level, so `reference.py` (which uses the input checks) imports without it.
Device facts are computed per call from the tensors, never probed at import.
"""
import functools
import logging
import numbers

import torch

logger = logging.getLogger(__name__)

def triton_runs_on(device: torch.device, kernel) -> tuple[bool, str]:
    """Whether the Triton `kernel` can run on tensors of `device`, and why (or why not).

    On the CPU that takes the interpreter, which Triton picks when the kernel is defined (TRITON_INTERPRET=1 at
    import of fastdino.kernels), so the kernel object itself is the evidence, not the current environment.
    """
    if device.type == "cuda":
        return True, "CUDA tensors"
    from triton.runtime.interpreter import InterpretedFunction

    if device.type == "cpu" and isinstance(kernel, InterpretedFunction):
        return True, "CPU tensors, kernels in the Triton interpreter"
    return False, f"{device.type} tensors need CUDA, or TRITON_INTERPRET=1 set before fastdino.kernels is imported"


def select_impl(op: str, impl: str, device: torch.device, fallback: str, kernel) -> str:
    """Resolve `impl` ("auto" | "triton" | fallback) for `op` on `device`; returns "triton" or `fallback`.

    "auto" takes Triton on CUDA tensors and `fallback` elsewhere (the interpreter is for tests, not for speed), and
    logs the choice once. An explicit "triton" that cannot run here is a ValueError naming the fallback.
    """
    if impl not in ("auto", "triton", fallback):
        raise ValueError(f'{op}: impl must be "auto", "triton" or "{fallback}", got {impl!r}')
    if impl == "auto":
        chosen = "triton" if device.type == "cuda" else fallback
        log_choice_once(op, chosen, f"{device.type} tensors")
        return chosen
    if impl == "triton":
        ok, reason = triton_runs_on(device, kernel)
        if not ok:
            raise ValueError(f'{op}: impl="triton" cannot run here ({reason}); use impl="{fallback}"')
    return impl


@functools.lru_cache(maxsize=None)
def log_choice_once(op: str, chosen: str, reason: str) -> None:
    """Log, once per distinct message, which implementation impl="auto" took and why."""
    logger.info("%s: impl=auto chose %s (%s)", op, chosen, reason)


def unless_blocked(op: str, impl: str, blocker: str | None, what: str = "tensors") -> str:
    """"triton" when nothing blocks the Triton path, else "torch": logged under impl="auto", a ValueError naming
    the blocker under impl="triton"."""
    if blocker is None:
        return "triton"
    if impl == "triton":
        raise ValueError(f'{op}: impl="triton" cannot take these {what} ({blocker}); use impl="torch"')
    log_choice_once(op, "torch", blocker)
    return "torch"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel output buffer; tests replace it with a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def row_settings(n_cols: int, max_block: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that walks rows of `n_cols` elements in blocks (Liger `calculate_settings`)."""
    import triton

    block = min(triton.next_power_of_2(n_cols), max_block)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its rows are contiguous (kernels take explicit row strides), else one contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter), or the tensor itself: the ops work on one device's data."""
    return t.to_local() if hasattr(t, "to_local") else t


def check_is_tensor(name: str, value, *, optional: bool = False) -> None:
    """ValueError naming the argument unless `value` is a torch.Tensor (or None, when `optional`), before anything
    reads its device or shape: a numpy array would fail with an AttributeError deep inside."""
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return
    hint = "; torch.from_numpy converts a numpy array" if type(value).__module__ == "numpy" else ""
    raise ValueError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got a "
                     f"{type(value).__name__}{hint}")


def check_positive(name: str, value) -> None:
    """ValueError unless `value` is a positive real number (temperatures)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_dino_loss_args(student_logits, teacher, center, student_temp, teacher_temp, ncrops) -> tuple[int, int]:
    """Validate the `dino_loss` inputs (shapes only, no host sync) and return (B, K)."""
    if isinstance(ncrops, bool) or not isinstance(ncrops, int) or ncrops < 2:
        raise ValueError(f"ncrops must be an int >= 2 (2 global crops + local crops), got {ncrops!r}")
    for name, t in (("student_logits", student_logits), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {desc}")
    rows, k = student_logits.shape
    if rows == 0 or rows % ncrops:
        raise ValueError(f"student_logits has {rows} rows, not a positive multiple of ncrops={ncrops}")
    batch = rows // ncrops
    if teacher.shape != (2 * batch, k):
        raise ValueError(
            f"teacher must have shape (2*B, K) = ({2 * batch}, {k}) for student_logits {tuple(student_logits.shape)} "
            f"and ncrops={ncrops}, got {tuple(teacher.shape)}"
        )
    check_is_tensor("center", center, optional=True)
    if center is not None and (center.numel() != k or center.dim() > 2 or (center.dim() == 2 and center.shape[0] != 1)):
        raise ValueError(f"center must have shape (K,) or (1, K) with K={k}, got {tuple(center.shape)}")
    if center is not None and not center.is_floating_point():
        raise ValueError(f"center must be a floating-point tensor, got {center.dtype}")
    devices = {t.device for t in (student_logits, teacher, center) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"student_logits, teacher and center must be on one device, got {sorted(map(str, devices))}")
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    return batch, k


def block_rows(numels, block: int) -> list[tuple[int, int]]:
    """The (tensor index, block index) row of every program of a multi-tensor launch over tensors of `numels`
    elements in blocks of `block`: a tensor's blocks are consecutive rows. Built from Python ints, no tensor op."""
    return [(i, b) for i, n in enumerate(numels) for b in range(-(-n // block))]
