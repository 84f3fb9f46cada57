"""A restatement of Meta's DINOv2 and DINOv3 backbone checkpoint layouts, to write test checkpoints in them.

Read from facebookresearch/dinov2 (dinov2/models/vision_transformer.py: `DinoVisionTransformer.__init__`,
`interpolate_pos_encoding`, `prepare_tokens_with_masks`; layers/swiglu_ffn.py `SwiGLUFFNFused` w12/w3;
`BlockChunk` names blocks `blocks.C.N`) and facebookresearch/dinov3 (dinov3/models/vision_transformer.py,
layers/attention.py `LinearKMaskedBias` and its `bias_mask`, layers/ffn_layers.py `SwiGLUFFN` w1/w2/w3,
layers/rope_position_encoding.py `periods`). The functions take a fastdino state dict (timm's ViT names) and write
what Meta's module of the same weights would hold in its state_dict().
"""
import math

import torch
import torch.nn.functional as F


def dinov2_state_dict(sd: dict, block_chunks: int = 0, cls_pos: torch.Tensor | None = None) -> dict:
    """Meta's DINOv2 layout: register_tokens, a CLS slot in pos_embed (with registers the CLS position embedding
    `cls_pos` (1, 1, D) is split off the CLS token again), mask_token, w12/w3 for the packed SwiGLU, chunked block
    names when `block_chunks` > 0."""
    out = {}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    packed = sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
    for key, value in sd.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            if packed:
                key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            if block_chunks:
                key = key.replace(f"blocks.{index}.", f"blocks.{index // (depth // block_chunks)}.{index}.", 1)
        out[key] = value
    if "reg_token" in sd:
        out["register_tokens"] = out.pop("reg_token")
        cls_pos = torch.randn_like(sd["cls_token"]) * 0.02 if cls_pos is None else cls_pos
        out["cls_token"] = sd["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def dinov2_interpolate_pos_encoding(pos_embed: torch.Tensor, h: int, w: int, offset: float,
                                    antialias: bool) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding for an h x w patch grid (pos_embed (1, 1 + M², D), CLS slot first)."""
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    m, dim = math.isqrt(patch_pos.shape[1]), patch_pos.shape[-1]
    kwargs = dict(scale_factor=((h + offset) / m, (w + offset) / m)) if offset else dict(size=(h, w))
    resized = F.interpolate(patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                            antialias=antialias, **kwargs)
    return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def dinov3_state_dict(sd: dict, head_dim: int, rope_dtype: torch.dtype = torch.bfloat16,
                      temperature: float = 100.0) -> dict:
    """Meta's DINOv3 layout: storage_tokens, mask_token, rope_embed.periods (bf16 in some released files), a masked
    qkv bias (zero where the fastdino model has no q/v bias: Meta's hub models all have one), w1/w2/w3 for SwiGLU."""
    dim = sd["cls_token"].shape[-1]
    swiglu = "blocks.0.mlp.fc1_g.weight" in sd
    out = {}
    for key, value in sd.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        key = key.replace("reg_token", "storage_tokens")
        if swiglu:
            key = key.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.").replace("mlp.fc2.", "mlp.w3.")
        out[key] = value
    for key in [k for k in sd if k.endswith("attn.qkv.weight")]:
        prefix = key.removesuffix("qkv.weight")
        q, v = sd.get(prefix + "q_bias", torch.zeros(dim)), sd.get(prefix + "v_bias", torch.zeros(dim))
        out[prefix + "qkv.bias"] = torch.cat([q, torch.randn(dim), v])  # the key third is masked off
        out[prefix + "qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = (temperature ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))).to(rope_dtype)
    return out


def teacher_checkpoint(backbone: dict) -> dict:
    """DINOv2 / DINOv3's `teacher_checkpoint.pth`: {"teacher": teacher.state_dict()}, teacher a ModuleDict of the
    backbone, dino_head and ibot_head."""
    dim = backbone["cls_token"].shape[-1]
    heads = {"dino_head.mlp.0.weight": torch.zeros(16, dim), "ibot_head.mlp.0.weight": torch.zeros(16, dim)}
    return {"teacher": {**{f"backbone.{k}": v for k, v in backbone.items()}, **heads}}
