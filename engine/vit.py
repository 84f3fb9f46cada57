"""Vision Transformer backbones for DINO, with a multi-crop forward that runs all crops in one pass.

Parameter names are exactly timm's `VisionTransformer` (timm: models/vision_transformer.py), so state dicts
move both ways between this model and `timm.create_model("vit_small_patch16_224", num_classes=0,
dynamic_img_size=True)`; official DINO ViT checkpoints use the same names.

Multi-crop forward. `forward([crops...])` groups consecutive crops of the same resolution (DINO's 2 global
224² and N local 96² crops make two groups), embeds each group, and lays the tokens of all groups end to
end as one (T, D) tensor, T = sum over groups of B·N. LayerNorm, qkv, projection and MLP run once on that
tensor. Attention runs per group: each group's rows of the qkv output are a contiguous slice, viewed as
(B, N, 3, H, hd) without a copy and given to SDPA (cuDNN first on Hopper, the fastest kernel measured on the
H100: shared/gpu/README.md) or xformers as one dense call; the groups' outputs are concatenated for the
projection. Both projections are autograd Functions (packed_linear.py) whose backward takes the groups' gradients as
they come, so neither the qkv gradient nor the concatenation is copied or kept twice. `attention="varlen"` instead
runs torch's variable-length attention once over every image of every group (CUDA only; engine/attention.py says
why it is not the default yet). Nothing is padded, and every shape depends only on the crop shapes (never on data),
so per-block `torch.compile` and CUDA graphs apply.

DINOv2 and DINOv3 (families.py, under timm's model names) are options of the same model, so the packed forward,
the attention backends, compile, FSDP2 and activation checkpointing apply to them unchanged: LayerScale, SwiGLU and
RoPE (layers.py) inside `Block`, register tokens after the CLS token (left out of every output), position
embeddings for the patches only (`position="learned_patches"`) or none and RoPE (`position="rope"`), whose
per-grid tables enter each block as arguments as the drop-path scales do. Parameter names are timm's
VisionTransformer ones also for DINOv3, whose timm Eva names two tensors differently (`gamma_1` / `gamma_2` for
`ls1.gamma` / `ls2.gamma`; backbone_io.py converts).

Position embeddings for a grid other than the native one are resampled in one of two ways
(`pos_embed_resample`): "timm" like timm's `dynamic_img_size` (`resample_abs_pos_embed`: bicubic, antialiased,
to the exact grid), or "dino" like the official DINO code (`interpolate_pos_encoding`: bicubic without
antialiasing, at the scale factor (n + 0.1) / n0 of its issue #8), which the paper preset uses to reproduce the
official step. Both are linear in `pos_embed`, so what is cached per grid is the interpolation matrix
(h·w, h0·w0) obtained by resampling an identity, not resampled values: the per-step cost is one small matmul,
gradients reach `pos_embed` as usual, and the cache never goes stale when the parameter changes (it depends only
on the grid sizes).

Precision. Under autocast the tokens leave the embedding in autocast's dtype (the CLS token and position
embeddings are cast to it, as FSDP2's bf16 `param_dtype` casts them), and the residual stream stays there: every
add, norm and matmul of a block moves 2-byte values. The LayerNorms keep their input's dtype (`LayerNorm`) with
fp32 statistics; CUDA autocast would run them in fp32 and return fp32, the stream with them. So one process or
DDP under autocast (fp32 master weights) and FSDP2 with bf16 parameters compute the same numbers.

Stochastic depth is DINO's `drop_path` (facebookresearch/dino: vision_transformer.py): per image, block and
residual branch, one uniform u, the branch kept when floor(keep + u) = 1 and then scaled by 1 / keep, so each
block equals the un-dropped one in expectation. The scale is folded into the residual add (`torch.addcmul`, one
kernel, which compile fuses further): nothing is gathered or copied, and every image goes through every branch.
The per-row scales of all blocks come from one `torch.rand` at the start of the forward, laid out in the order in
which the official per-resolution forward draws them, and enter each block as tensor arguments: the blocks hold
no random state and no per-block constant, so all student blocks with drop path share one compiled graph, and an
activation-checkpointed block recomputes with the same scales. The scale 1 / keep is rarely a bf16 number: a kept
image gets one of its two neighbours in the stream's dtype, chosen from the same u with the probabilities that
make the mean exactly 1 / keep (rounding it to the nearest would bias every branch by up to 0.4 % in bf16).
"""
import contextlib
import itertools
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from torch.utils.checkpoint import checkpoint, noop_context_fn

from fastdino.engine.attention import (BACKENDS, attention, attention_probs, select_attention_backend,
                                       varlen_attention)
from fastdino.engine.config import ARCHS
from fastdino.engine.families import FAMILY_MODELS
from fastdino.engine.layers import (LayerScale, Mlp, SwiGLU, SwiGLUPacked, apply_rope, rope_tables, scaled_linear,
                                    scaled_parameters, swiglu_hidden)
from fastdino.engine.packed_linear import concat_linear, group_qkv
from fastdino.kernels import gelu_mlp_residual

logger = logging.getLogger(__name__)

# Token layout of a packed multi-crop batch: one (B images, N tokens per image) pair per resolution group,
# in the order the groups' rows appear in the (T, D) token tensor.
Layout = tuple[tuple[int, int], ...]

# The timm-style registry: every DINO ViT size (config.ARCHS) with DINO's patch sizes 16 and 8, and the DINOv2 and
# DINOv3 backbones under timm's names (families.py).
MODELS = {f"{arch}_patch{patch}": dict(patch_size=patch, **size) for arch, size in ARCHS.items() for patch in (16, 8)}
MODELS.update(FAMILY_MODELS)
# Per resolution group, RoPE's (sin, cos) tables, each (N, 1, hd) (layers.rope_tables); None without RoPE.
Rope = tuple[tuple[torch.Tensor, torch.Tensor], ...] | None


# Device types autocast knows, read once: torch 2.11's dynamo cannot trace `torch.amp.is_autocast_available`.
AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(t))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """torch.autocast's compute dtype on `device` when autocast is on there, else None (also for the meta device)."""
    if device.type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def without_autocast(device: torch.device):
    """A context in which autocast is off on `device` (a no-op where it is not on)."""
    return torch.autocast(device.type, enabled=False) if autocast_dtype(device) else contextlib.nullcontext()


def autocast_operands(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` (None kept) in autocast's dtype when it is on on `device`, as it casts a matmul's operands; else as
    they are. For ops run with autocast off (`without_autocast`) on the operands autocast would have given them."""
    dtype = autocast_dtype(device)
    return tensors if dtype is None else tuple(t.to(dtype) if t is not None else None for t in tensors)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm in its input's dtype, also under autocast: statistics in fp32 (the CPU and CUDA kernels
    accumulate bf16/fp16 inputs in fp32), weight and bias cast to the input's dtype as FSDP2's param_dtype casts
    them, output in the input's dtype. (CUDA autocast runs layer_norm in fp32 and returns fp32; CPU autocast
    leaves it to its input's dtype.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with without_autocast(x.device):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def residual_add(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x + branch, the branch scaled per row by `scale` (T, 1) for stochastic depth: one kernel either way."""
    return x + branch if scale is None else torch.addcmul(x, branch, scale)


def drop_path_constants(keep: list[float], dtype: torch.dtype, device=None) -> tuple[torch.Tensor, ...]:
    """For keep probabilities keep[s]: (keep, cut, lo, hi), each (S, 1), for `drop_path_scales`. lo <= 1/keep < hi
    are neighbours in `dtype` (lo = 1/keep when it is exact); a kept sample takes hi when u >= cut, which happens with
    probability keep * p, p = (1/keep - lo) / (hi - lo), so that a scale's mean is keep * (lo + p (hi - lo)) = 1."""
    inverse = 1 / torch.tensor(keep, dtype=torch.float64)
    lo = inverse.to(dtype)
    lo = torch.where(lo.double() > inverse, torch.nextafter(lo, torch.zeros_like(lo)), lo)
    hi = torch.nextafter(lo, torch.full_like(lo, math.inf))
    p_hi = (inverse - lo.double()) / (hi.double() - lo.double())
    cut = 1 - torch.tensor(keep, dtype=torch.float64) * p_hi
    keep32, cut32 = torch.tensor(keep, dtype=torch.float32), cut.float()
    return tuple(t[:, None].to(device) for t in (keep32, cut32, lo, hi))


def drop_path_scales(draws: torch.Tensor, keep: torch.Tensor, cut: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor) -> torch.Tensor:
    """Stochastic-depth scales (S, n) from uniform draws (S, n) in [0, 1): 0 where DINO's drop_path drops
    (floor(keep + u) = 0, in fp32 as it computes it), else lo or hi (`drop_path_constants`), in their dtype."""
    kept = draws + keep >= 1  # (S, n)
    return torch.where(kept, torch.where(draws >= cut, hi, lo), 0)


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens: one dense attention call per resolution group, or one
    variable-length call over all of them (backend "varlen")."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, k_bias: bool = True, device=None,
                 dtype=None):
        """`k_bias=False` with `qkv_bias` gives q and v a bias and k none (timm's Eva `q_bias` / `v_bias`, DINOv3's
        masked k bias)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        separate = qkv_bias and not k_bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not separate, device=device, dtype=dtype)
        self.q_bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if separate else None
        self.v_bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if separate else None
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def _qkv_bias(self) -> torch.Tensor | None:
        """The qkv projection's bias (3*D,): qkv's own, or q_bias, zeros (k), v_bias; None without one."""
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The qkv projection (T, 3*D) of packed tokens (T, D), for varlen's one call over all groups."""
        if self.q_bias is None:
            return self.qkv(x)
        return F.linear(x, self.qkv.weight, self._qkv_bias())

    def _qkv(self, x: torch.Tensor, layout: Layout, rope: Rope = None) -> list[tuple[torch.Tensor, ...]]:
        """Per group, q, k, v as (B, N, H, hd) views of one qkv projection of the packed (T, D) tokens (q and k
        rotated, so no longer views, with RoPE); in backward their gradients reach the projection apart
        (packed_linear.group_qkv)."""
        x, weight, bias = autocast_operands(x.device, x, self.qkv.weight, self._qkv_bias())
        with without_autocast(x.device):
            qkvs = group_qkv(x, weight, bias, layout, self.num_heads, k_bias=self.q_bias is None)
        if rope is None:
            return qkvs
        # q and k rotated apart by tables (N, 1, hd), so that their gradients stay apart. v is copied out of the
        # projection: attention saves q, k, v for backward, and a view of v would keep the whole (T, 3*D)
        # projection alive beside the rotated q, k (5/3 of it; the copy makes it 1).
        return [(apply_rope(q, sin, cos), apply_rope(k, sin, cos), v.contiguous())
                for (q, k, v), (sin, cos) in zip(qkvs, rope)]

    def forward(self, x: torch.Tensor, layout: Layout, backend: str = "sdpa", rope: Rope = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens (T, D) -> (T, D); `scale`: the LayerScale of the output (folded into `proj`)."""
        if backend == "varlen":  # one call over every image of every group
            if rope is None:
                qkv = self._project(x)
            else:  # the rotated q, k packed back with v: a copy that only RoPE with varlen pays
                qkv = torch.cat([torch.stack(t, dim=2).flatten(0, 1).flatten(1) for t in self._qkv(x, layout, rope)])
            return scaled_linear(self.proj, varlen_attention(qkv, layout, self.num_heads), scale)  # (T, D)
        outs = [attention(q, k, v, backend).flatten(0, 1).flatten(1) for q, k, v in self._qkv(x, layout, rope)]
        weight, bias = autocast_operands(x.device, *scaled_parameters(self.proj, scale))
        with without_autocast(x.device):
            return concat_linear(outs, weight, bias)  # (T, D); saves the groups' outputs, not their concatenation

    def attention_weights(self, x: torch.Tensor, layout: Layout, rope: Rope = None) -> list[torch.Tensor]:
        """Per group, the explicit attention matrix (B, H, N, N); for visualisation, not training."""
        return [attention_probs(q, k) for q, k, _ in self._qkv(x, layout, rope)]


MLPS = ("gelu", "swiglu", "swiglu_packed")


def build_mlp(dim: int, mlp: str, mlp_ratio: float, swiglu_align_to: int = 0, device=None, dtype=None) -> nn.Module:
    """The feed-forward layer: GELU Mlp, SwiGLU (hidden int(dim * ratio) aligned) or SwiGLUPacked (fc1 of
    int(dim * ratio), two halves)."""
    if mlp not in MLPS:
        raise ValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
    dd = dict(device=device, dtype=dtype)
    if mlp == "swiglu":
        return SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, swiglu_align_to), **dd)
    if mlp == "swiglu_packed":
        return SwiGLUPacked(dim, int(dim * mlp_ratio), **dd)
    return Mlp(dim, int(dim * mlp_ratio), **dd)


class Block(nn.Module):
    """Pre-norm transformer block on packed tokens (T, D): x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))),
    the LayerScales `ls1`, `ls2` present when `layer_scale` (their initial value) is set (folded into each branch's
    last Linear: layers.scaled_linear)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
        *,
        k_bias: bool = True,
        norm_eps: float = 1e-6,
        layer_scale: float | None = None,
        mlp: str = "gelu",
        swiglu_align_to: int = 0,
        mlp_impl: str = "auto",
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.mlp_impl = mlp_impl  # the GELU MLP's residual branch (`_mlp_residual`)
        self.drop_path = drop_path  # the rate; VisionTransformer draws the scales (`drop_path_scales`)
        self.checkpoint_context_fn = None  # activation checkpointing's context_fn, set by checkpoint_blocks; None = off
        self.norm1 = LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, k_bias=k_bias, **dd)
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else None
        self.norm2 = LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = build_mlp(dim, mlp, mlp_ratio, swiglu_align_to, **dd)
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else None

    def forward(
        self,
        x: torch.Tensor,
        layout: Layout,
        backend: str = "sdpa",
        drop_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope: Rope = None,
    ) -> torch.Tensor:
        """Packed tokens (T, D) -> (T, D). `drop_scales`: the stochastic-depth scales (T, 1) of the attention and
        the MLP branch (VisionTransformer draws them), None for no drop path; `rope`: per group, RoPE's tables.

        Activation checkpointing covers all but the last residual add: that add keeps only its scale for backward,
        and inside the checkpoint the scale would be a saved tensor that the recompute must rebuild, so the
        recompute (which stops once it has rebuilt every saved tensor) would run the MLP's last matmul again."""
        attn_scale, mlp_scale = drop_scales if drop_scales is not None else (None, None)
        if self.checkpoint_context_fn is not None and torch.is_grad_enabled():
            # Dynamo takes a user function or functools.partial as context_fn, not torch's default passed explicitly.
            policy = {} if self.checkpoint_context_fn is noop_context_fn else {"context_fn": self.checkpoint_context_fn}
            x, mlp = checkpoint(self._attention_and_mlp, x, layout, backend, attn_scale, rope, use_reentrant=False,
                                **policy)
            return residual_add(x, mlp, mlp_scale)
        x = self._attention(x, layout, backend, attn_scale, rope)
        return self._mlp_residual(x, mlp_scale)

    def _attention(self, x: torch.Tensor, layout: Layout, backend: str, attn_scale: torch.Tensor | None,
                   rope: Rope = None) -> torch.Tensor:
        """The stream after the attention branch's residual add (LayerScale folded into the projection)."""
        gamma1 = self.ls1.gamma if self.ls1 is not None else None
        return residual_add(x, self.attn(self.norm1(x), layout, backend, rope, scale=gamma1), attn_scale)

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch's output on the stream `x` (LayerScale folded into its last matmul)."""
        return self.mlp(self.norm2(x), scale=self.ls2.gamma if self.ls2 is not None else None)

    def _attention_and_mlp(self, x: torch.Tensor, layout: Layout, backend: str, attn_scale: torch.Tensor | None,
                           rope: Rope = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream after the attention branch's residual add, and the MLP branch's output on it."""
        x = self._attention(x, layout, backend, attn_scale, rope)
        return x, self._mlp_branch(x)

    def _mlp_residual(self, x: torch.Tensor, mlp_scale: torch.Tensor | None) -> torch.Tensor:
        """x + the MLP branch (scaled by `mlp_scale`): for the GELU Mlp, `gelu_mlp_residual` by `mlp_impl`, whose
        Triton backward keeps no GELU output (auto: on CUDA, not under torch.compile, which fuses the composition
        itself); the weights cast as autocast casts them for F.linear."""
        impl = "torch" if torch.compiler.is_compiling() and self.mlp_impl == "auto" else self.mlp_impl
        if not isinstance(self.mlp, Mlp) or impl == "torch":
            return residual_add(x, self._mlp_branch(x), mlp_scale)
        gamma2 = self.ls2.gamma if self.ls2 is not None else None
        weights = autocast_operands(x.device, self.mlp.fc1.weight, self.mlp.fc1.bias,
                                    *scaled_parameters(self.mlp.fc2, gamma2))
        return gelu_mlp_residual(x, self.norm2(x), *weights, mlp_scale, impl=impl)


POS_EMBED_RESAMPLERS = ("timm", "dino")
# How tokens know their place: "learned" position embeddings for the CLS token and every patch (DINO, DINOv2),
# "learned_patches" for the patches only (DINOv2 with registers, timm's no_embed_class), "rope" (DINOv3).
POSITIONS = ("learned", "learned_patches", "rope")


@torch.no_grad()
def pos_embed_weights(h0: int, w0: int, h: int, w: int, method: str, device=None) -> torch.Tensor:
    """(h*w, h0*w0) matrix taking an h0 x w0 grid of position embeddings to an h x w one: an identity with one
    channel per source position, resampled by `method` (see the module docstring); row j holds target j's weights."""
    eye = torch.eye(h0 * w0, device=device)  # (h0*w0 channels, h0*w0 positions)
    if method == "timm":
        return resample_abs_pos_embed(eye[None], new_size=[h, w], old_size=[h0, w0], num_prefix_tokens=0)[0]
    grid = eye.reshape(1, h0 * w0, h0, w0)
    resampled = F.interpolate(grid, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic")
    return resampled.reshape(h0 * w0, h * w).T


class VisionTransformer(nn.Module):
    """ViT with a CLS token, optional register tokens (after the CLS token, as DINOv2 and DINOv3 lay them out), and
    learned position embeddings or RoPE; `forward` returns final-norm CLS features. Registers take part in every
    block, and are left out of every output: features, tokens and attention maps.

    The constructor only creates parameters (so the model can be built on the meta device); call
    `init_weights()` to set their values (`create_model` and `build_backbone` do).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attention: str = "auto",
        pos_embed_resample: str = "timm",
        mask_token: bool = False,
        k_bias: bool = True,
        norm_eps: float = 1e-6,
        layer_scale: float | None = None,
        mlp: str = "gelu",
        swiglu_align_to: int = 0,
        reg_tokens: int = 0,
        position: str = "learned",
        rope_temperature: float = 100.0,
        mlp_impl: str = "auto",
        device=None,
        dtype=None,
    ):
        """`mask_token`: a learned (1, D) token that replaces the masked patch embeddings of `forward(masks=)`
        (DINOv2's `mask_token`, iBOT). `mlp_impl`: the GELU MLP's residual branch, auto, triton or torch
        (`fastdino.kernels.gelu_mlp_residual`; auto takes Triton on CUDA in blocks neither checkpointed nor
        compiled)."""
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if reg_tokens < 0 or (reg_tokens and position == "learned"):
            raise ValueError(f"reg_tokens must be >= 0, and 0 with position='learned' (registers have no position "
                             f"embedding), got {reg_tokens} with position={position!r}")
        if attention not in BACKENDS:
            raise ValueError(f"attention must be one of {BACKENDS}, got {attention!r}")
        if pos_embed_resample not in POS_EMBED_RESAMPLERS:
            raise ValueError(f"pos_embed_resample must be one of {POS_EMBED_RESAMPLERS}, "
                             f"got {pos_embed_resample!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        dd = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.attention = attention
        self.pos_embed_resample = pos_embed_resample
        self.position = position
        self.num_reg_tokens = reg_tokens
        self.rope_temperature = rope_temperature
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, strict_img_size=False, output_fmt="NHWC", **dd
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        positions = self.patch_embed.num_patches + (position == "learned")
        self.pos_embed = nn.Parameter(torch.empty(1, positions, embed_dim, **dd)) if position != "rope" else None
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, **dd)) if mask_token else None
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # DINO's rates, linear in depth
        if mlp_impl not in ("auto", "triton", "torch"):
            raise ValueError(f"mlp_impl must be auto, triton or torch, got {mlp_impl!r}")
        block_options = dict(k_bias=k_bias, norm_eps=norm_eps, layer_scale=layer_scale, mlp=mlp,
                             swiglu_align_to=swiglu_align_to, mlp_impl=mlp_impl)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, **dd, **block_options)
            for rate in rates
        )
        self.norm = LayerNorm(embed_dim, eps=norm_eps, **dd)
        self._pos_interp: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # grid -> (h*w, h0*w0) weights
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (h, w, device, dtype) -> tables
        self._backend: dict[tuple[torch.device, torch.dtype], str] = {}  # resolved attention backend
        self._drop_constants: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (keep, dtype, device) -> drop_path_constants

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the CLS token and the registers."""
        return 1 + self.num_reg_tokens

    def init_weights(self) -> None:
        """DINO's initialisation: trunc-normal(std .02) pos_embed, cls_token, registers and Linear weights, zero
        biases (also q_bias / v_bias), unit LayerNorms, LayerScales at their initial value; the patch-embedding conv
        keeps PyTorch's default init, as in DINO."""
        for token in (self.pos_embed, self.cls_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)  # as DINOv2
        self.patch_embed.proj.reset_parameters()
        for module in self.modules():
            if isinstance(module, LayerScale):
                module.reset_parameters()
            elif isinstance(module, Attention) and module.q_bias is not None:
                nn.init.zeros_(module.q_bias)
                nn.init.zeros_(module.v_bias)
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def checkpoint_blocks(self, every: int, context_fn=noop_context_fn) -> None:
        """Activation checkpointing of every `every`-th block (blocks every-1, 2*every-1, ...; 1 = all, 0 = none):
        their activations are recomputed in backward instead of kept from forward, all of them, or those that
        `context_fn` (torch.utils.checkpoint's: e.g. a selective-checkpoint policy's contexts) does not keep."""
        for i, block in enumerate(self.blocks):
            block.checkpoint_context_fn = context_fn if every > 0 and (i + 1) % every == 0 else None

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay by name (timm's convention); DINO also exempts biases and norms."""
        return {name for name in ("pos_embed", "cls_token", "reg_token") if getattr(self, name) is not None}

    def _pos_embed(self, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embeddings `pos` (1, c + h0*w0, D), c = 1 with a CLS slot ("learned") else 0, for an h x w patch
        grid, (1, c + h*w, D); resampled in fp32, returned in pos's dtype."""
        h0, w0 = self.patch_embed.grid_size
        if (h, w) == (h0, w0):
            return pos
        key = (h, w, pos.device)
        if key not in self._pos_interp:
            self._pos_interp[key] = pos_embed_weights(h0, w0, h, w, self.pos_embed_resample, pos.device)
        c = int(self.position == "learned")
        with without_autocast(pos.device):
            patch_pos = self._pos_interp[key] @ pos[0, c:].float()  # (h*w, D)
        return torch.cat([pos[:, :c], patch_pos[None].to(pos.dtype)], dim=1)

    def _embed(self, images: torch.Tensor, prefix: torch.Tensor, pos_embed: torch.Tensor | None,
               masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, D), N = prefix tokens + (H/p)(W/p): the prefix (1, 1 + R, D) (CLS,
        then the registers) first, position embeddings added where the model has them; the patch embeddings where
        `masks` (B, (H/p)(W/p)) is True replaced by the mask token first (as DINOv2)."""
        x = self.patch_embed(images)  # (B, h, w, D)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype)[None], x)
        if self.position == "learned":  # CLS and patches have a position embedding (no registers here)
            return torch.cat([prefix.expand(b, -1, -1), x], dim=1) + self._pos_embed(pos_embed, h, w)
        if self.position == "learned_patches":
            x = x + self._pos_embed(pos_embed, h, w)
        return torch.cat([prefix.expand(b, -1, -1), x], dim=1)

    @staticmethod
    def _groups(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Consecutive crops of the same resolution."""
        return [list(g) for _, g in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]

    def rope(self, crops: list[torch.Tensor]) -> Rope:
        """Per resolution group of `crops`, RoPE's (sin, cos) tables (N, 1, hd) in the compute dtype (cached per grid
        and dtype); None without RoPE."""
        if self.position != "rope":
            return None
        device = crops[0].device
        dtype = autocast_dtype(device) or self.cls_token.dtype
        tables = []
        for group in self._groups(crops):
            h, w = (s // self.patch_size for s in group[0].shape[-2:])
            key = (h, w, device, dtype)
            if key not in self._rope:
                fp32 = rope_tables(h, w, self.embed_dim // self.num_heads, self.num_prefix_tokens,
                                   self.rope_temperature, device)
                self._rope[key] = tuple(t.to(dtype) for t in fp32)
            tables.append(self._rope[key])
        return tuple(tables)

    def _tokens(self, crops: list[torch.Tensor],
                masks: torch.Tensor | None = None) -> tuple[torch.Tensor, Layout, str]:
        """Packed tokens (T, D) of consecutive same-resolution crop groups, their layout, the attention backend.

        The tokens are in the compute dtype: autocast's, else the parameters'. The CLS token and position embeddings
        are cast to it once for all groups, so their gradients add up in that dtype, as they do from FSDP2's
        param_dtype copies (and as autocast's cached casts of the patch embedding's weights do)."""
        if not crops:
            raise ValueError("forward needs at least one crop, got an empty list")
        dtype = autocast_dtype(crops[0].device) or self.cls_token.dtype
        prefix = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], dim=1)
        prefix, pos_embed = prefix.to(dtype), self.pos_embed.to(dtype) if self.pos_embed is not None else None
        groups = self._groups(crops)
        if masks is not None:
            self._check_masks(masks, groups[0])
        embedded = [self._embed(torch.cat(g) if len(g) > 1 else g[0], prefix, pos_embed, masks if i == 0 else None)
                    for i, g in enumerate(groups)]
        tokens = torch.cat([e.flatten(0, 1) for e in embedded])  # (T, D)
        layout = tuple((e.shape[0], e.shape[1]) for e in embedded)
        return tokens, layout, self._attention_backend(tokens, layout)

    def drop_scales(self, tokens: torch.Tensor, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block, the stochastic-depth scales (T, 1) of its attention and MLP branches for packed `tokens`
        (T, D), in their dtype (`drop_path_scales`), or None: in eval mode, and for blocks of rate 0.

        One uniform per image, block with drop path and branch, from one torch.rand laid out as the official code
        draws them: its MultiCropWrapper runs the backbone once per resolution group, where each block draws one
        per image of the group for its attention branch, then one per image for its MLP branch. (On the CPU, one
        torch.rand of n + m values gives the numbers of torch.rand(n) then torch.rand(m).)
        """
        dropping = [i for i, block in enumerate(self.blocks) if self.training and block.drop_path > 0]
        scales: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.blocks)
        if not dropping:
            return scales
        keep = [1 - self.blocks[i].drop_path for i in dropping for _ in ("attn", "mlp")]
        key = (tuple(keep), tokens.dtype, tokens.device)
        if key not in self._drop_constants:
            self._drop_constants[key] = drop_path_constants(keep, tokens.dtype, tokens.device)
        images = [b for b, _ in layout]
        draws = torch.rand(len(keep) * sum(images), device=tokens.device).split([len(keep) * b for b in images])
        draws = torch.cat([d.view(len(keep), -1) for d in draws], dim=1)  # (S, sum B), S = 2 * len(dropping)
        per_image = drop_path_scales(draws, *self._drop_constants[key]).split(images, dim=1)
        per_row = torch.cat([s[:, :, None].expand(-1, b, n).reshape(len(keep), b * n)
                             for s, (b, n) in zip(per_image, layout)], dim=1)  # (S, T)
        rows = per_row[:, :, None].unbind(0)  # S x (T, 1)
        for j, i in enumerate(dropping):
            scales[i] = rows[2 * j], rows[2 * j + 1]
        return scales

    def _attention_backend(self, tokens: torch.Tensor, layout: Layout) -> str:
        """The backend for the tokens' device and dtype (the compute dtype), selected (and logged, with the SDPA
        kernel of the largest group of `layout`) the first time they are seen."""
        device, dtype = tokens.device, tokens.dtype
        if (device, dtype) not in self._backend:
            head_dim = self.embed_dim // self.num_heads
            b, n = max(layout, key=lambda group: group[0] * group[1] ** 2)  # the most attention work
            self._backend[device, dtype] = select_attention_backend(
                self.attention, device, dtype, head_dim, shape=(b, n, self.num_heads, head_dim))[0]
        return self._backend[device, dtype]

    def _check_masks(self, masks: torch.Tensor, first_group: list[torch.Tensor]) -> None:
        b = sum(c.shape[0] for c in first_group)
        n = (first_group[0].shape[-2] // self.patch_size) * (first_group[0].shape[-1] // self.patch_size)
        if self.mask_token is None:
            raise ValueError("masks need a mask token: build the backbone with mask_token=True")
        if masks.shape != (b, n) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool ({b}, {n}) (the first resolution group's images x patches), got "
                             f"{masks.dtype} {tuple(masks.shape)}")

    def forward(self, x: torch.Tensor | list[torch.Tensor], *, masks: torch.Tensor | None = None,
                patch_index: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Final-norm CLS features (sum of the crops' batch sizes, D), in crop order.

        masks (B0, N0) bool: the first resolution group's (the global crops') patches to replace by the mask token.
        patch_index (M,) int64: flat indices into that group's (B0 * N0) patch tokens; then returns (CLS features,
        final-norm patch tokens (M, D) at those positions), both from the one packed forward."""
        crops = [x] if isinstance(x, torch.Tensor) else list(x)
        tokens, layout, backend = self._tokens(crops, masks)
        rope = self.rope(crops)
        for block, scales in zip(self.blocks, self.drop_scales(tokens, layout)):
            tokens = block(tokens, layout, backend, scales, rope)
        groups = tokens.split([b * n for b, n in layout])
        cls = torch.cat([g.view(b, n, -1)[:, 0] for (b, n), g in zip(layout, groups)])  # (sum B, D)
        cls = self.norm(cls)  # LayerNorm is per token: norming only the CLS rows gives the same and is cheaper
        if patch_index is None:
            return cls
        if patch_index.ndim != 1 or patch_index.dtype != torch.int64:
            raise ValueError(f"patch_index must be 1-D int64, got {patch_index.dtype} {tuple(patch_index.shape)}")
        n_patches = layout[0][1] - self.num_prefix_tokens
        # past each image's CLS and register rows, in group 0's rows
        rows = patch_index + (patch_index // n_patches + 1) * self.num_prefix_tokens
        return cls, self.norm(groups[0].index_select(0, rows))

    def _without_registers(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x with the register positions of axis `dim` (tokens CLS, registers, patches) left out."""
        if not self.num_reg_tokens:
            return x
        cls, _, patches = x.split([1, self.num_reg_tokens, x.shape[dim] - self.num_prefix_tokens], dim=dim)
        return torch.cat([cls, patches], dim=dim)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normed tokens (B, 1 + hw, D), CLS then patches (registers left out), after each of the last n blocks,
        as in DINO's evaluation code."""
        tokens, layout, backend = self._tokens([x])
        rope = self.rope([x])
        outputs = []
        for i, (block, scales) in enumerate(zip(self.blocks, self.drop_scales(tokens, layout))):
            tokens = block(tokens, layout, backend, scales, rope)
            if i >= len(self.blocks) - n:
                outputs.append(self._without_registers(self.norm(tokens).view(*layout[0], -1), dim=1))
        return outputs

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention matrix (B, H, 1 + hw, 1 + hw) of the last block for images (B, C, H, W) over the CLS token and
        the patches (the registers' rows and columns left out, as DINOv2's maps do); eval mode only."""
        if self.training:
            raise RuntimeError("get_last_self_attention needs eval mode (drop path is random): call .eval() first")
        tokens, layout, backend = self._tokens([x])
        rope = self.rope([x])
        for block in self.blocks[:-1]:
            tokens = block(tokens, layout, backend, rope=rope)
        last = self.blocks[-1]
        probs = last.attn.attention_weights(last.norm1(tokens), layout, rope)[0]
        return self._without_registers(self._without_registers(probs, dim=2), dim=3)


def create_model(name: str, **overrides) -> VisionTransformer:
    """timm-style registry: the VisionTransformer named in MODELS, with `overrides`, weights initialised."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    model = VisionTransformer(**{**MODELS[name], **overrides})
    model.init_weights()
    return model


def build_backbone(
    arch: str,
    patch_size: int = 16,
    *,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    attention: str = "auto",
    pos_embed_resample: str = "timm",
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mask_token: bool = False,
    mlp_impl: str = "auto",
) -> VisionTransformer:
    """DINO backbone `arch` (one of ARCHS: vit_tiny / vit_small / vit_base / vit_large) with any patch size, or a
    DINOv2 / DINOv3 backbone by its timm name (FAMILY_MODELS) with its own patch size, initialised; `embed_dim`,
    `depth` and `num_heads` resize it (None keeps the arch's).

    Build under `with torch.device("meta"):` to defer allocation, then `to_empty(device=...)` and `init_weights()`.
    """
    if arch not in ARCHS and arch not in FAMILY_MODELS:
        raise ValueError(f"unknown backbone arch={arch!r}; known: {list(ARCHS) + list(FAMILY_MODELS)}")
    resized = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)  # None keeps the arch's
    for name, value in {"patch_size": patch_size, "img_size": img_size, **resized}.items():
        if (value is not None or name not in resized) and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 1):
            raise ValueError(f"build_backbone: {name} must be a positive int{' or None' if name in resized else ''}, "
                             f"got {value!r}")
    resized = {k: v for k, v in resized.items() if v is not None}
    if arch in FAMILY_MODELS:
        own = FAMILY_MODELS[arch]
        if patch_size != own["patch_size"]:
            raise ValueError(f"build_backbone: {arch} has patch size {own['patch_size']}, got patch_size={patch_size}")
        base = {k: v for k, v in own.items() if k not in ("patch_size", "img_size")}
    else:
        base = ARCHS[arch]
    model = VisionTransformer(**{**base, **resized}, patch_size=patch_size, img_size=img_size,
                              drop_path_rate=drop_path_rate, attention=attention, pos_embed_resample=pos_embed_resample,
                              mask_token=mask_token, mlp_impl=mlp_impl)
    model.init_weights()
    return model
