"""The DINOv2 and DINOv3 backbones under timm's model names, as VisionTransformer arguments (vit.py builds them).

Each entry restates timm's registration (timm 1.0: models/vision_transformer.py `vit_*_patch14_*dinov2`,
models/eva.py `vit_*_patch16_dinov3*`), which restates Meta's hub models (facebookresearch/dinov2 hub/backbones.py,
facebookresearch/dinov3 hub/backbones.py):

- DINOv2: patch 14, learned position embeddings for a 37 x 37 grid (img_size 518), LayerScale 1e-5, LayerNorm eps
  1e-6, GELU MLP of ratio 4, except giant's packed SwiGLU (fc1 8192 = twice the 4096 hidden). The reg4 models add
  4 register tokens and keep position embeddings for the patches only (timm's `no_embed_class`: the CLS position
  embedding is folded into the CLS token, which is how timm converts Meta's checkpoints).
- DINOv3: patch 16, RoPE (temperature 100) instead of position embeddings, 4 registers ("storage tokens"),
  LayerScale 1e-5, LayerNorm eps 1e-5, no qkv bias, or with `_qkvb` q and v biases and none on k (Meta's
  `mask_k_bias`: a k bias would not cancel in the softmax once RoPE rotates k). small_plus / huge_plus / 7b use
  SwiGLU with the hidden width rounded up to a multiple of 8 / 8 / 64.
"""

_DINOV2 = dict(patch_size=14, img_size=518, layer_scale=1e-5)
_DINOV2_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}
_DINOV2_GIANT_MLP = dict(mlp="swiglu_packed", mlp_ratio=2.66667 * 2)  # timm's ratio: int(1536 * 5.33334) = 8192

_DINOV3 = dict(patch_size=16, img_size=224, layer_scale=1e-5, reg_tokens=4, position="rope", norm_eps=1e-5,
               qkv_bias=False)
# name part: (embed_dim, depth, num_heads, MLP arguments, which of the plain / _qkvb variants timm registers)
_DINOV3_SIZES = {
    "tiny": (192, 12, 3, {}, ("_qkvb",)),
    "small": (384, 12, 6, {}, ("", "_qkvb")),
    "small_plus": (384, 12, 6, dict(mlp="swiglu", swiglu_align_to=8), ("", "_qkvb")),
    "base": (768, 12, 12, {}, ("", "_qkvb")),
    "large": (1024, 24, 16, {}, ("", "_qkvb")),
    "huge_plus": (1280, 32, 20, dict(mlp="swiglu", swiglu_align_to=8), ("", "_qkvb")),
    "7b": (4096, 40, 32, dict(mlp="swiglu", mlp_ratio=2.0, swiglu_align_to=64), ("",)),
}


def _family_models() -> dict[str, dict]:
    models = {}
    for size, (dim, depth, heads) in _DINOV2_SIZES.items():
        args = dict(_DINOV2, embed_dim=dim, depth=depth, num_heads=heads, **(_DINOV2_GIANT_MLP if size == "giant" else {}))
        models[f"vit_{size}_patch14_dinov2"] = args
        models[f"vit_{size}_patch14_reg4_dinov2"] = dict(args, reg_tokens=4, position="learned_patches")
    for size, (dim, depth, heads, mlp, variants) in _DINOV3_SIZES.items():
        for variant in variants:
            models[f"vit_{size}_patch16_dinov3{variant}"] = dict(
                _DINOV3, embed_dim=dim, depth=depth, num_heads=heads, **mlp,
                **(dict(qkv_bias=True, k_bias=False) if variant else {}))
    return models


# timm name -> VisionTransformer arguments (img_size is the position embedding's native size, as timm builds it).
FAMILY_MODELS = _family_models()


def family(name: str) -> str:
    """'dinov2' or 'dinov3' for a FAMILY_MODELS name."""
    return "dinov3" if "_dinov3" in name else "dinov2"
