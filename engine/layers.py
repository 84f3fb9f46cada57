"""The layers DINOv2 and DINOv3 add to DINO's ViT, under timm's parameter names and computing what timm computes.

- `LayerScale` (timm: layers/layer_scale.py; DINOv2's `ls1`/`ls2`): a learned per-channel scale `gamma` of each
  residual branch. The block folds it into the branch's last Linear (`scaled_linear`: x W'ᵀ + b' with W' = gamma W,
  b' = gamma b, the same product as gamma (x Wᵀ + b)): no (T, D) multiply in forward or backward and no (T, D)
  activation saved for it, and the branch leaves the Linear in the stream's dtype. (timm multiplies by the fp32
  gamma, which under autocast promotes the bf16 residual stream to fp32 for the rest of the network; here it stays
  in bf16, vit.py's precision rule.)
- `Mlp` (timm: layers/mlp.py `Mlp`): fc2(gelu(fc1(x))), as DINO's ViTs have it, taking its LayerScale.
- `SwiGLU` (timm: layers/mlp.py `SwiGLU`, DINOv3's `SwiGLUFFN` with w1/w2/w3 renamed fc1_g/fc1_x/fc2):
  fc2(silu(fc1_g(x)) * fc1_x(x)), the hidden width rounded up to a multiple of `align_to`.
- `SwiGLUPacked` (timm: `SwiGLUPacked` = `GluMlp(act_layer=SiLU, gate_last=False)`, DINOv2's `SwiGLUFFNFused`
  with w12/w3 renamed fc1/fc2): one fc1 of twice the hidden width, split in two halves a, b; fc2(silu(a) * b).
- `rope_tables` / `apply_rope`: DINOv3's 2-D rotary position embedding as timm's `RotaryEmbeddingDinoV3` with
  dinov3 Eva's settings (temperature 100, "separate" coordinate normalisation, rotate-half layout): patch (i, j) of
  an h x w grid sits at ((i + 0.5) / h, (j + 0.5) / w) mapped to [-1, 1]; a quarter of each head's channels turn
  with the row coordinate and a quarter with the column one, at periods temperature^(2k / (hd/2)), k < hd/4. The
  prefix tokens (CLS, registers) are not rotated: their rows of the tables are cos 1, sin 0, so one elementwise
  expression covers every token without splitting and re-concatenating q and k. timm's rotate_half(x) * sin, with
  rotate_half(x) = cat(-x2, x1) for the halves x1, x2, is computed as roll(x, hd/2) * cat(-s, s) for sin =
  cat(s, s): the same products (a negation is exact), one op instead of three. The tables are made in fp32 and
  the rotation runs in the dtype they are given in: fp32 (timm's, and Meta's hub models') in fp32, the residual
  stream's bf16 under autocast, as DINOv3's own training ran it (ssl_default_config.yaml: pos_embed_rope_dtype
  bf16), so that q and k are not copied to fp32 and back in every block.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerScale(nn.Module):
    """The per-channel scale gamma (D,) of a residual branch, initialised to `init_values`; applied by the branch's
    last Linear (`scaled_linear`), so it has no forward of its own."""

    def __init__(self, dim: int, init_values: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)


def scaled_parameters(linear: nn.Linear, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear's weight and bias with the per-output-channel `scale` folded in (as they are for None)."""
    if scale is None:
        return linear.weight, linear.bias
    return linear.weight * scale[:, None], linear.bias * scale if linear.bias is not None else None


def scaled_linear(linear: nn.Linear, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x) * scale (per output channel), the scale folded into the weight and bias."""
    if scale is None:
        return linear(x)
    return F.linear(x, *scaled_parameters(linear, scale))


class Mlp(nn.Module):
    """fc2(gelu(fc1(x))), as timm's Mlp (no norm, no dropout); `scale` is the LayerScale of its output."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return scaled_linear(self.fc2, F.gelu(self.fc1(x)), scale)


def swiglu_hidden(dim: int, mlp_ratio: float, align_to: int) -> int:
    """timm's SwiGLU hidden width: int(dim * mlp_ratio), rounded up to a multiple of align_to (0: as is)."""
    hidden = int(dim * mlp_ratio)
    return hidden + (-hidden % align_to) if align_to else hidden


class SwiGLU(nn.Module):
    """fc2(silu(fc1_g(x)) * fc1_x(x)), as timm's SwiGLU (no norm, no dropout)."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1_g = nn.Linear(dim, hidden, **dd)
        self.fc1_x = nn.Linear(dim, hidden, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return scaled_linear(self.fc2, F.silu(self.fc1_g(x)) * self.fc1_x(x), scale)


class SwiGLUPacked(nn.Module):
    """fc2(silu(a) * b) for (a, b) the halves of fc1(x), as timm's SwiGLUPacked; `hidden` is fc1's full width."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        if hidden % 2:
            raise ValueError(f"SwiGLUPacked: hidden must be even (two halves), got {hidden}")
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden // 2, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return scaled_linear(self.fc2, F.silu(gate) * value, scale)


def rope_periods(head_dim: int, temperature: float) -> torch.Tensor:
    """(hd/4,) fp32 periods temperature^(2k / (hd/2)), as timm's RotaryEmbeddingDinoV3 and DINOv3's `base`."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dim divisible by 4 (two axes, sin and cos), got {head_dim}")
    exponents = 2.0 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return temperature ** exponents


@torch.no_grad()
def rope_tables(h: int, w: int, head_dim: int, num_prefix: int, temperature: float = 100.0,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed sin, cos), each (num_prefix + h*w, 1, hd) fp32, for tokens laid out as `num_prefix` unrotated prefix
    tokens and then the h x w patches in row-major order (the 1 broadcasts over heads); the sin table's first half
    is negated, for `apply_rope`."""
    coords = [torch.arange(0.5, s, dtype=torch.float32) / float(s) for s in (h, w)]  # centred, "separate"
    grid = 2.0 * torch.stack(torch.meshgrid(coords, indexing="ij"), dim=-1) - 1.0  # (h, w, 2) in [-1, 1]
    angles = 2 * math.pi * grid.flatten(0, 1)[:, :, None] / rope_periods(head_dim, temperature)  # (hw, 2, hd/4)
    angles = angles.flatten(1)  # (hw, hd/2): the row angles, then the column angles
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)  # rotate-half layout, signed: (hw, hd)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([torch.zeros(num_prefix, head_dim), sin])
    cos = torch.cat([torch.ones(num_prefix, head_dim), cos])
    return sin[:, None].to(device), cos[:, None].to(device)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin = x * cos + roll(x, hd/2) * signed sin (`rope_tables`) for x (..., N, ..., hd)
    and tables broadcasting to it, in x's dtype."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
