"""Attention backends: xformers memory-efficient attention where its operator runs, torch SDPA otherwise.

`attention(q, k, v, backend)` is the only attention the model runs in training. It takes q, k, v as
(B, N, H, hd) — the layout a (B, N, 3, H, hd) view of the qkv projection gives for free, and the one
xformers wants — and returns (B, N, H, hd). `attention_probs` is the explicit softmax(q kᵀ / sqrt(hd)): the
reference the tests compare against and what attention maps are drawn from; it never runs in training.

Which backend runs is decided once per (device, dtype) by `select_attention_backend`, which the model calls
at its first forward (the first time it sees the real inputs' device and dtype), never at import:
- "xformers": `xformers.ops.memory_efficient_attention`. Importing is not enough: a wheel built for another
  torch imports and then answers "No operator found" (this is the case on the project's H100 machine), and
  there is no CPU operator at all. So "auto" runs a tiny forward and backward on the real device and dtype.
- "sdpa": `torch.nn.functional.scaled_dot_product_attention`, which itself dispatches to cuDNN / flash /
  memory-efficient kernels on the GPU and to its fused CPU kernels or the math path on the CPU.
"""
import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa")


def _xformers_failure(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when xformers' memory_efficient_attention runs forward and backward here, else the reason it does not."""
    try:
        import xformers.ops as xops
    except (ImportError, OSError) as err:
        return f"xformers does not import ({type(err).__name__}: {err})"
    # The probe needs autograd even when the first forward is the teacher's, under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        q = torch.zeros(1, 8, 1, head_dim, device=device, dtype=dtype, requires_grad=True)  # (B, N, H, hd)
        try:
            xops.memory_efficient_attention(q, q, q).sum().backward()
        except (NotImplementedError, RuntimeError, ValueError) as err:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            return f"xformers memory_efficient_attention does not run on {device.type} {dtype}: {lines[0]}"
    return None


def select_attention_backend(
    requested: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
) -> tuple[str, str]:
    """(backend, reason) for `requested` in BACKENDS on tensors of this device, dtype and head size.

    "auto" picks xformers when its operator runs forward and backward on a tiny probe, else SDPA. An explicit
    "xformers" that does not run raises ValueError naming what is missing. Logs the choice and the reason.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {requested!r}")
    if requested == "sdpa":
        name, reason = "sdpa", "requested with attention='sdpa'"
    else:
        failure = _xformers_failure(torch.device(device), dtype, head_dim)
        if failure is None:
            name, reason = "xformers", f"memory_efficient_attention runs on {torch.device(device).type} {dtype}"
        elif requested == "xformers":
            raise ValueError(f"attention='xformers' is unavailable: {failure}. Use attention='sdpa' or 'auto'.")
        else:
            name, reason = "sdpa", f"{failure}; using torch scaled_dot_product_attention"
    logger.info("attention backend: %s (%s)", name, reason)
    return name, reason


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd)) v for q, k, v of shape (B, N, H, hd); returns (B, N, H, hd)."""
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, hd)
    return out.transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit attention matrix softmax(q kᵀ / sqrt(hd)) in fp32, (B, H, N, N), for q, k of shape (B, N, H, hd)."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    return scores.softmax(dim=-1)
