"""Attention backends: xformers memory-efficient attention where its operator runs, torch SDPA otherwise, and torch's
variable-length attention over all crops in one call on request.

`attention(q, k, v, backend)` is the attention of one resolution group in training. It takes q, k, v as
(B, N, H, hd) — the layout a (B, N, 3, H, hd) view of the qkv projection gives for free, and the one xformers
wants — and returns (B, N, H, hd). `varlen_attention(qkv, layout, num_heads)` is the attention of every image of
every group in one call (`backend="varlen"`). `attention_probs` is the explicit softmax(q kᵀ / sqrt(hd)): the
reference the tests compare against and what attention maps are drawn from; it never runs in training.

Which backend runs is decided once per (device, dtype) by `select_attention_backend`, which the model calls
at its first forward (the first time it sees the real inputs' device and dtype), never at import:
- "xformers": `xformers.ops.memory_efficient_attention`. Importing is not enough: a wheel built for another
  torch imports and then answers "No operator found" (this is the case on the project's H100 machine), and
  there is no CPU operator at all. So "auto" runs a tiny forward and backward on the real device and dtype.
- "sdpa": `torch.nn.functional.scaled_dot_product_attention`, one call per resolution group, which dispatches to
  cuDNN / flash / memory-efficient kernels on the GPU and to its fused CPU kernel or the math path on the CPU. On
  Hopper (compute capability 9) it runs with cuDNN first (`sdpa_kernel(..., set_priority=True)` around each call;
  the resolved backend "sdpa:cudnn,flash,efficient,math", less the kernels disabled when it was chosen): cuDNN measured 0.34 ms against flash's 0.44 for ViT-S/16's global crops, forward and
  backward, on the H100 (shared/gpu/README.md); elsewhere torch's own order. The selection logs the kernel SDPA
  picks for the model's largest group and the chain it was picked from.
- "varlen": `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA): all images of all groups in one call,
  so no per-group split of the qkv projection (a copy of its gradient in backward) and no concatenation of the
  groups' outputs (a copy in forward). Explicit only, after a probe like xformers': "auto" does not take it, as
  its kernel (flash, or cuDNN's ragged layout in recent torch) has not been timed against dense cuDNN yet.
"""
import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "varlen")
# SDPA's kernels by the names of resolved SDPA backends: "sdpa" (torch's own order) or "sdpa:" and the kernels to
# try in order, e.g. "sdpa:cudnn,flash,efficient,math".
SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_SDPA_ENABLED = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled, "flash": torch.backends.cuda.flash_sdp_enabled,
                 "efficient": torch.backends.cuda.mem_efficient_sdp_enabled, "math": torch.backends.cuda.math_sdp_enabled}


def _probe_failure(run, what: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when `run(q, k, v)` (q, k, v of shape (B=1, N=8, H=1, head_dim)) runs forward and backward here, else why
    not, starting with `what`."""
    # The probe needs autograd even when the first forward is the teacher's, under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        q = torch.zeros(1, 8, 1, head_dim, device=device, dtype=dtype, requires_grad=True)  # (B, N, H, hd)
        try:
            run(q, q, q).sum().backward()
        except (NotImplementedError, RuntimeError, ValueError) as err:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            return f"{what} does not run on {device.type} {dtype}: {lines[0]}"
    return None


def _xformers_failure(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when xformers' memory_efficient_attention runs forward and backward here, else the reason it does not."""
    try:
        import xformers.ops as xops
    except (ImportError, OSError) as err:
        return f"xformers does not import ({type(err).__name__}: {err})"
    return _probe_failure(xops.memory_efficient_attention, "xformers memory_efficient_attention", device, dtype,
                          head_dim)


def _varlen_failure(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when torch's varlen_attn runs forward and backward here, else the reason it does not."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen ({err})"

    def run(q, k, v):  # (1, N, H, hd) -> one sequence of N tokens
        lengths = torch.tensor([0, q.shape[1]], device=device, dtype=torch.int32)
        return varlen_attn(q[0], k[0], v[0], lengths, lengths, q.shape[1], q.shape[1])

    return _probe_failure(run, "torch varlen_attn", device, dtype, head_dim)


def sdpa_priority(backend: str) -> list[SDPBackend] | None:
    """The SDPA kernels a resolved SDPA backend tries, in order; None for torch's own order."""
    _, _, kernels = backend.partition(":")
    return [SDPA_KERNELS[name] for name in kernels.split(",")] if kernels else None


def _priority(backend: str):
    """A context in which SDPA tries `backend`'s kernels in its order (and only those)."""
    priority = sdpa_priority(backend)
    return sdpa_kernel(priority, set_priority=True) if priority else contextlib.nullcontext()


def _sdpa_backend(device: torch.device) -> str:
    """The resolved SDPA backend for `device`: on Hopper, cuDNN first, then flash, memory-efficient and math, of
    those enabled now (an enclosing `sdpa_kernel` restriction stays); torch's own order elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9:
        enabled = [name for name in SDPA_KERNELS if _SDPA_ENABLED[name]()]
        if enabled:
            return "sdpa:" + ",".join(enabled)
    return "sdpa"


def _kernel_name(kernel: SDPBackend) -> str:
    """cudnn, flash, efficient or math."""
    return kernel.name.lower().removesuffix("_attention")


def sdpa_kernel_choice(backend: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> str:
    """The SDPA kernel that the resolved SDPA `backend` runs for q, k, v of `shape` (B, N, H, hd), by SDPA's own
    dispatch (`torch._fused_sdp_choice`), with the priority chain it chose from, for the log."""
    priority = sdpa_priority(backend)
    chain = " > ".join(_kernel_name(b) for b in priority) if priority else "torch's default order"
    b, n, h, hd = shape
    q = torch.zeros(b, h, n, hd, device=device, dtype=dtype)  # (B, H, N, hd)
    try:
        with _priority(backend):
            kernel = _kernel_name(SDPBackend(torch._fused_sdp_choice(q, q, q)))
    except RuntimeError as err:  # a device without a driver (fake tensors)
        kernel = f"unknown ({str(err).splitlines()[0]})"
    return f"kernel {kernel} for (B, N, H, hd) = {shape} {dtype}, chosen from {chain}"


def select_attention_backend(
    requested: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
    shape: tuple[int, int, int, int] | None = None,
) -> tuple[str, str]:
    """(backend, reason) for `requested` in BACKENDS on tensors of this device, dtype and head size; `shape`
    (B, N, H, hd) of the largest attention call, when known, names the SDPA kernel in the reason.

    The backend is "xformers", "varlen" or a resolved SDPA backend ("sdpa" or "sdpa:cudnn,flash,..."). "auto" picks xformers when its operator runs
    forward and backward on a tiny probe, else SDPA. An explicit "xformers" or "varlen" that does not run raises
    ValueError naming what is missing. Logs the choice and the reason.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {requested!r}")
    device = torch.device(device)
    if requested == "varlen":
        failure = _varlen_failure(device, dtype, head_dim)
        if failure is not None:
            raise ValueError(f"attention='varlen' is unavailable: {failure}. Use attention='sdpa' or 'auto'.")
        name, reason = "varlen", f"varlen_attn runs on {device.type} {dtype}: one call over all crops"
    elif requested == "sdpa":
        name, reason = _sdpa_backend(device), "requested with attention='sdpa'"
    else:
        failure = _xformers_failure(device, dtype, head_dim)
        if failure is None:
            name, reason = "xformers", f"memory_efficient_attention runs on {device.type} {dtype}"
        elif requested == "xformers":
            raise ValueError(f"attention='xformers' is unavailable: {failure}. Use attention='sdpa' or 'auto'.")
        else:
            name, reason = _sdpa_backend(device), f"{failure}; using torch scaled_dot_product_attention"
    if name.startswith("sdpa") and shape is not None:
        reason = f"{reason}; {sdpa_kernel_choice(name, device, dtype, shape)}"
    logger.info("attention backend: %s (%s)", name, reason)
    return name, reason


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd)) v for q, k, v of shape (B, N, H, hd); returns (B, N, H, hd)."""
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
    with _priority(backend):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def sequence_offsets(layout: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """Cumulative token offsets (sum B + 1,) int32 of the images of a packed layout ((B, N) per group): 0, N0, 2 N0,
    ..., B0 N0, B0 N0 + N1, ..."""
    starts, offset = [], 0
    for b, n in layout:
        starts.append(torch.arange(offset, offset + b * n, n, device=device, dtype=torch.int32))
        offset += b * n
    starts.append(torch.full((1,), offset, device=device, dtype=torch.int32))
    return torch.cat(starts)


def varlen_attention(qkv: torch.Tensor, layout: tuple[tuple[int, int], ...], num_heads: int) -> torch.Tensor:
    """Attention of every image of a packed layout in one call: qkv (T, 3*D) -> (T, D)."""
    from torch.nn.attention.varlen import varlen_attn

    t, d = qkv.shape[0], qkv.shape[1] // 3
    q, k, v = qkv.view(t, 3, num_heads, d // num_heads).unbind(1)  # each (T, H, hd), views
    offsets = sequence_offsets(layout, qkv.device)
    longest = max(n for _, n in layout)
    return varlen_attn(q, k, v, offsets, offsets, longest, longest).flatten(1)  # (T, D)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit attention matrix softmax(q kᵀ / sqrt(hd)) in fp32, (B, H, N, N), for q, k of shape (B, N, H, hd)."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    return scores.softmax(dim=-1)
