"""Vision Transformer backbones for DINO, with a multi-crop forward that runs all crops in one pass.

Parameter names are exactly timm's `VisionTransformer` (timm: models/vision_transformer.py), so state dicts
move both ways between this model and `timm.create_model("vit_small_patch16_224", num_classes=0,
dynamic_img_size=True)`; official DINO ViT checkpoints use the same names.

Multi-crop forward. `forward([crops...])` groups consecutive crops of the same resolution (DINO's 2 global
224² and N local 96² crops make two groups), embeds each group, and lays the tokens of all groups end to
end as one (T, D) tensor, T = sum over groups of B·N. LayerNorm, qkv, projection and MLP run once on that
tensor. Attention runs per group: each group's rows of the qkv output are a contiguous slice, viewed as
(B, N, 3, H, hd) without a copy and given to SDPA (or xformers) as one dense call. Nothing is padded, and
every shape depends only on the crop shapes and the drop-path rate (never on data), so per-block
`torch.compile` and CUDA graphs apply. A block-diagonal packed attention over all groups
(xformers BlockDiagonalMask, nested jagged SDPA, flex attention) would save one attention launch per block
but needs a variable-length kernel that does not run on the CPU, and the dense per-group call keeps
cuDNN/flash SDPA, the fastest kernels measured on the H100 (shared/gpu/README.md).

Position embeddings for a grid other than the native one are resampled in one of two ways
(`pos_embed_resample`): "timm" like timm's `dynamic_img_size` (`resample_abs_pos_embed`: bicubic, antialiased,
to the exact grid), or "dino" like the official DINO code (`interpolate_pos_encoding`: bicubic without
antialiasing, at the scale factor (n + 0.1) / n0 of its issue #8), which the paper preset uses to reproduce the
official step. Both are linear in `pos_embed`, so what is cached per grid is the interpolation matrix
(h·w, h0·w0) obtained by resampling an identity, not resampled values: the per-step cost is one small matmul,
gradients reach `pos_embed` as usual, and the cache never goes stale when the parameter changes (it depends only
on the grid sizes).

Stochastic depth skips the dropped images' compute as in DINOv2 (facebookresearch/dinov2:
dinov2/layers/block.py, drop_add_residual_stochastic_depth): each residual branch runs on a random subset
of each group's images, and its output is added back scaled by B / kept, so the expectation is the
un-dropped block. The subset size is fixed by B and the rate, so shapes never depend on data. The rate
grows with depth, so each student block keeps a different number of images; the counts reach each block
as integer arguments (`Block.kept_images`), which torch.compile's default automatic dynamic shapes turn
into symbols: `block.compile()` on every block gives one graph for the student's blocks 1.. (block 0 has
rate 0) and one for the teacher. `dynamic=False` compiles one graph per block instead and needs
`torch._dynamo.config.recompile_limit` above the depth.
"""
import itertools
import logging
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed
from torch.utils.checkpoint import checkpoint

from fastdino.engine.attention import BACKENDS, attention, attention_probs, select_attention_backend
from fastdino.engine.config import ARCHS

logger = logging.getLogger(__name__)

# Token layout of a packed multi-crop batch: one (B images, N tokens per image) pair per resolution group,
# in the order the groups' rows appear in the (T, D) token tensor.
Layout = tuple[tuple[int, int], ...]

# The timm-style registry: every DINO ViT size (config.ARCHS) with DINO's patch sizes 16 and 8.
MODELS = {f"{arch}_patch{patch}": dict(patch_size=patch, **size) for arch, size in ARCHS.items() for patch in (16, 8)}


def drop_add_residual(
    x: torch.Tensor,
    layout: Layout,
    keep: tuple[int, ...],
    branch: Callable[[torch.Tensor, Layout], torch.Tensor],
) -> torch.Tensor:
    """x + branch(x) with stochastic depth that skips the dropped images' compute.

    For each group of `layout`, a random subset of keep[g] of its B images goes through `branch` (a function of
    packed tokens and their layout); their output is added back scaled by B / keep[g], so the result equals
    x + branch(x) in expectation. The other images' tokens pass through unchanged.
    """
    rows, kept_layout, offset = [], [], 0
    for (b, n), k in zip(layout, keep):
        images = torch.randperm(b, device=x.device)[:k]  # (kept,)
        tokens = torch.arange(n, device=x.device)
        rows.append((offset + images[:, None] * n + tokens).flatten())  # (kept*N,) row indices into x
        kept_layout.append((k, n))
        offset += b * n
    out = branch(x.index_select(0, torch.cat(rows)), tuple(kept_layout))  # (sum kept*N, D)
    for group_rows, group_out, (b, _), k in zip(rows, out.split([k * n for k, n in kept_layout]), layout, keep):
        x = x.index_add(0, group_rows, group_out.to(x.dtype), alpha=b / k)
    return x


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens, one dense attention call per resolution group."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, q, k, v as (B, N, H, hd) views of one qkv projection of the packed (T, D) tokens."""
        qkv = self.qkv(x)  # (T, 3*D)
        groups = qkv.split([b * n for b, n in layout])
        return [g.view(b, n, 3, self.num_heads, self.head_dim).unbind(2) for (b, n), g in zip(layout, groups)]

    def forward(self, x: torch.Tensor, layout: Layout, backend: str = "sdpa") -> torch.Tensor:
        outs = [attention(q, k, v, backend).flatten(0, 1).flatten(1) for q, k, v in self._qkv(x, layout)]
        return self.proj(torch.cat(outs) if len(outs) > 1 else outs[0])  # (T, D)

    def attention_weights(self, x: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
        """Per group, the explicit attention matrix (B, H, N, N); for visualisation, not training."""
        return [attention_probs(q, k) for q, k, _ in self._qkv(x, layout)]


class Block(nn.Module):
    """Pre-norm transformer block on packed tokens (T, D): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.drop_path = drop_path
        self.checkpointed = False  # activation checkpointing, set by VisionTransformer.checkpoint_blocks
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), device=device, dtype=dtype)

    def _attn_branch(self, x: torch.Tensor, layout: Layout, backend: str) -> torch.Tensor:
        return self.attn(self.norm1(x), layout, backend)

    def _mlp_branch(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def kept_images(self, layout: Layout) -> tuple[int, ...] | None:
        """Per group, how many images go through the residual branches: int(B * (1 - drop_path)), at least 1,
        in training with stochastic depth; None (all of them) otherwise."""
        if not (self.training and self.drop_path > 0):
            return None
        return tuple(max(int(b * (1.0 - self.drop_path)), 1) for b, _ in layout)

    def forward(
        self, x: torch.Tensor, layout: Layout, backend: str = "sdpa", keep: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Packed tokens (T, D) -> (T, D). `keep` is `kept_images(layout)`, computed by the caller: as integer
        arguments the counts become dynamic under torch.compile, so blocks with different drop-path rates
        share one graph (float and int module attributes are specialised: one graph per block)."""
        if self.checkpointed and torch.is_grad_enabled():
            # Backward reruns the block with the RNG state of this forward, so it drops the same images.
            return checkpoint(self._forward, x, layout, backend, keep, use_reentrant=False)
        return self._forward(x, layout, backend, keep)

    def _forward(self, x: torch.Tensor, layout: Layout, backend: str, keep: tuple[int, ...] | None) -> torch.Tensor:
        if keep is not None:
            x = drop_add_residual(x, layout, keep, partial(self._attn_branch, backend=backend))
            return drop_add_residual(x, layout, keep, self._mlp_branch)
        x = x + self._attn_branch(x, layout, backend)
        return x + self._mlp_branch(x, layout)


POS_EMBED_RESAMPLERS = ("timm", "dino")


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
    """ViT with a CLS token and learned position embeddings; `forward` returns final-norm CLS features.

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
        device=None,
        dtype=None,
    ):
        super().__init__()
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
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, strict_img_size=False, output_fmt="NHWC", **dd
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # DINO: linear in depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, **dd) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self._pos_interp: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # grid -> (h*w, h0*w0) weights
        self._backend: dict[tuple[torch.device, torch.dtype], str] = {}  # resolved attention backend

    def init_weights(self) -> None:
        """DINO's initialisation: trunc-normal(std .02) pos_embed, cls_token and Linear weights, zero biases,
        unit LayerNorms; the patch-embedding conv keeps PyTorch's default init, as in DINO."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.patch_embed.proj.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def checkpoint_blocks(self, every: int) -> None:
        """Activation checkpointing of every `every`-th block (blocks every-1, 2*every-1, ...; 1 = all, 0 = none):
        their activations are recomputed in backward instead of kept from forward."""
        for i, block in enumerate(self.blocks):
            block.checkpointed = every > 0 and (i + 1) % every == 0

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay by name (timm's convention); DINO also exempts biases and norms."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid, (1, 1 + h*w, D)."""
        h0, w0 = self.patch_embed.grid_size
        if (h, w) == (h0, w0):
            return self.pos_embed
        key = (h, w, self.pos_embed.device)
        if key not in self._pos_interp:
            self._pos_interp[key] = pos_embed_weights(h0, w0, h, w, self.pos_embed_resample, self.pos_embed.device)
        patch_pos = self._pos_interp[key] @ self.pos_embed[0, 1:].float()  # (h*w, D)
        return torch.cat([self.pos_embed[:, :1], patch_pos[None].to(self.pos_embed.dtype)], dim=1)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, D), N = 1 + (H/p)(W/p), CLS first, position embeddings added."""
        x = self.patch_embed(images)  # (B, h, w, D)
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)  # (B, N, D)
        return x + self._pos_embed(h, w)

    def _tokens(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, Layout, str]:
        """Packed tokens (T, D) of consecutive same-resolution crop groups, their layout, the attention backend."""
        if not crops:
            raise ValueError("forward needs at least one crop, got an empty list")
        groups = [list(g) for _, g in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]
        embedded = [self._embed(torch.cat(g) if len(g) > 1 else g[0]) for g in groups]  # each (B, N, D)
        tokens = torch.cat([e.flatten(0, 1) for e in embedded])  # (T, D)
        return tokens, tuple((e.shape[0], e.shape[1]) for e in embedded), self._attention_backend(tokens)

    def _attention_backend(self, tokens: torch.Tensor) -> str:
        """The backend for this device and compute dtype, selected (and logged) the first time they are seen."""
        device = tokens.device
        autocast = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else tokens.dtype
        if (device, dtype) not in self._backend:
            head_dim = self.embed_dim // self.num_heads
            self._backend[device, dtype] = select_attention_backend(self.attention, device, dtype, head_dim)[0]
        return self._backend[device, dtype]

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Final-norm CLS features (sum of the crops' batch sizes, D), in crop order."""
        tokens, layout, backend = self._tokens([x] if isinstance(x, torch.Tensor) else list(x))
        for block in self.blocks:
            tokens = block(tokens, layout, backend, block.kept_images(layout))
        groups = tokens.split([b * n for b, n in layout])
        cls = torch.cat([g.view(b, n, -1)[:, 0] for (b, n), g in zip(layout, groups)])  # (sum B, D)
        return self.norm(cls)  # LayerNorm is per token: norming only the CLS rows gives the same and is cheaper

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normed tokens (B, N, D) after each of the last n blocks, as in DINO's evaluation code."""
        tokens, layout, backend = self._tokens([x])
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, layout, backend, block.kept_images(layout))
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(tokens).view(*layout[0], -1))  # (B, N, D)
        return outputs

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention matrix (B, H, N, N) of the last block for images (B, C, H, W); eval mode only."""
        if self.training:
            raise RuntimeError("get_last_self_attention needs eval mode (drop path is random): call .eval() first")
        tokens, layout, backend = self._tokens([x])
        for block in self.blocks[:-1]:
            tokens = block(tokens, layout, backend, block.kept_images(layout))
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(tokens), layout)[0]


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
) -> VisionTransformer:
    """DINO backbone `arch` (one of ARCHS: vit_tiny / vit_small / vit_base / vit_large) with any patch size,
    initialised; `embed_dim`, `depth` and `num_heads` resize it (None keeps the arch's).

    Build under `with torch.device("meta"):` to defer allocation, then `to_empty(device=...)` and `init_weights()`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch={arch!r}; known: {list(ARCHS)}")
    resized = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)  # None keeps the arch's
    for name, value in {"patch_size": patch_size, "img_size": img_size, **resized}.items():
        if (value is not None or name not in resized) and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 1):
            raise ValueError(f"build_backbone: {name} must be a positive int{' or None' if name in resized else ''}, "
                             f"got {value!r}")
    resized = {k: v for k, v in resized.items() if v is not None}
    model = VisionTransformer(**{**ARCHS[arch], **resized}, patch_size=patch_size, img_size=img_size,
                              drop_path_rate=drop_path_rate, attention=attention, pos_embed_resample=pos_embed_resample)
    model.init_weights()
    return model
