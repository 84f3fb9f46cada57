"""Meta's DINOv2 and DINOv3 checkpoint layouts, mapped by name onto fastdino's (= timm's ViT) parameter names.

DINOv2 (facebookresearch/dinov2: models/vision_transformer.py `DinoVisionTransformer`, hub/backbones.py; the hub
files `dinov2_vits14_pretrain.pth`, `dinov2_vits14_reg4_pretrain.pth`, ...):
- `cls_token` (1, 1, D), `pos_embed` (1, 1 + 37², D) with a CLS slot, `register_tokens` (1, 4, D) in the reg4
  models (placed after the CLS token, after the position embeddings are added), `mask_token` (1, D) (iBOT's, used
  only in pretraining: dropped), `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
  mlp.fc1, mlp.fc2, ls2.gamma}` (`mlp.w12` / `mlp.w3` for giant's `SwiGLUFFNFused`), `norm`. Training checkpoints
  built with `block_chunks > 0` name blocks `blocks.C.N` (C the FSDP chunk, N the global index).
- With registers the CLS position embedding is folded into the CLS token and the position embeddings keep the
  patches only: the CLS token gets the same embedding at every resolution (it is never resampled), so this is
  exact, and it is what timm does (`_convert_dinov2`).
- Resampling to other crop sizes: the models without registers interpolate with `interpolate_offset=0.1` and no
  antialiasing, DINO's formula (fastdino's `pos_embed_resample="dino"`); the reg4 models with antialiasing to the
  exact size (`interpolate_offset=0`, `interpolate_antialias=True`: timm's `resample_abs_pos_embed`, "timm").

DINOv3 (facebookresearch/dinov3: models/vision_transformer.py, layers/attention.py, layers/ffn_layers.py,
layers/rope_position_encoding.py):
- `cls_token`, `storage_tokens` (1, 4, D) (the registers), `mask_token` (dropped), `rope_embed.periods` (hd/4,),
  a buffer checked against temperature 100 and dropped (fastdino computes it), `patch_embed.proj`,
  `blocks.N.{norm1, attn.qkv.weight, attn.qkv.bias, attn.qkv.bias_mask, attn.proj, ls1.gamma, norm2, mlp, ls2.gamma}`
  with `mlp.fc1/fc2` or SwiGLUFFN's `mlp.w1/w2/w3` (= timm's fc1_g / fc1_x / fc2), `norm`; `local_cls_norm`
  (used only on local crops in pretraining) is dropped, as timm drops it.
- `qkv.bias` is masked on its key third (`LinearKMaskedBias`, bias_mask 1, 0, 1): it becomes timm's q_bias and
  v_bias (the `_qkvb` models); where both are zero (the distilled models) it is dropped (the plain models).
"""
import re

import torch

from fastdino.engine.layers import rope_periods

DINOV3_ROPE_TEMPERATURE = 100.0  # every DINOv3 hub model (pos_embed_rope_base=100)


def meta_family(state_dict: dict) -> str | None:
    """'dinov2' or 'dinov3' when `state_dict` has Meta's layout of that family, else None."""
    if "storage_tokens" in state_dict or "rope_embed.periods" in state_dict:
        return "dinov3"
    if "register_tokens" in state_dict or "mask_token" in state_dict:
        return "dinov2"
    return None


def from_meta(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(fastdino-named state dict, what was dropped and why) of a Meta DINOv2 / DINOv3 backbone state dict."""
    family = meta_family(state_dict)
    if family is None:
        raise ValueError("not a Meta DINOv2 / DINOv3 state dict (no register_tokens, storage_tokens, mask_token or "
                         "rope_embed.periods)")
    return (_from_dinov3 if family == "dinov3" else _from_dinov2)(dict(state_dict))


_FFN_NAMES = {"dinov2": {"mlp.w12.": "mlp.fc1.", "mlp.w3.": "mlp.fc2."},
              "dinov3": {"mlp.w1.": "mlp.fc1_g.", "mlp.w2.": "mlp.fc1_x.", "mlp.w3.": "mlp.fc2."}}


def _rename_ffn(key: str, family: str) -> str:
    for old, new in _FFN_NAMES[family].items():
        key = key.replace(old, new)
    return key


def _from_dinov2(sd: dict) -> tuple[dict, list[str]]:
    dropped = []
    if sd.pop("mask_token", None) is not None:
        dropped.append("mask_token (iBOT's, pretraining only)")
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block_chunks: blocks.C.N -> blocks.N
        out[_rename_ffn(key, "dinov2")] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        if "cls_token" in out and "pos_embed" in out:
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:]
    return out, dropped


def _from_dinov3(sd: dict) -> tuple[dict, list[str]]:
    dropped = []
    for key in ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias"):
        if sd.pop(key, None) is not None:
            dropped.append(f"{key} (pretraining only)")
    periods = sd.pop("rope_embed.periods", None)
    out = {}
    for key, value in sd.items():
        if key.endswith("attn.qkv.bias_mask"):
            continue
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            mask = sd.get(key + "_mask")
            if mask is not None and not torch.equal(mask.chunk(3)[1], torch.zeros_like(k)):
                raise ValueError(f"{key}_mask does not mask the key bias: not DINOv3's LinearKMaskedBias")
            if q.any() or v.any():
                out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q, v
            continue
        out[_rename_ffn(key.replace("storage_tokens", "reg_token"), "dinov3")] = value
    if any(key.endswith("attn.qkv.bias") for key in sd) and not any(key.endswith("q_bias") for key in out):
        dropped.append("attn.qkv.bias (all zero)")
    if periods is not None:
        head_dim = periods.numel() * 4
        expected = rope_periods(head_dim, DINOV3_ROPE_TEMPERATURE)
        if not torch.allclose(periods.float(), expected, rtol=1e-2):  # bf16 buffers in some checkpoints
            raise ValueError(f"rope_embed.periods are not DINOv3's base-{DINOV3_ROPE_TEMPERATURE:g} periods "
                             f"(min/max-period RoPE is not supported)")
        dropped.append("rope_embed.periods (recomputed)")
    return out, dropped
