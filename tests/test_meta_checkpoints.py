"""Meta's DINOv2 / DINOv3 checkpoints (written in their layout by meta_vits.py) load by name into fastdino's backbone
and give timm's features for the same weights; a file that does not map says which tensors are missing and which
are unexpected."""
import pytest
import timm
import torch

import meta_vits
from fastdino.engine.backbone_io import infer_architecture, load_backbone, read_backbone, to_timm
from fastdino.engine.families import FAMILY_MODELS
from fastdino.engine.meta_checkpoints import from_meta
from fastdino.engine.vit import create_model

REL_TOL = 1e-5
SMALL = dict(depth=2, embed_dim=96, num_heads=4)  # head dim 24: RoPE's quarters stay whole


def _weights(name: str, **overrides) -> dict:
    """A fastdino state dict of `name`, moved off its init (see test_vit_families.py)."""
    torch.manual_seed(0)
    sd = create_model(name, **{**SMALL, **overrides}).state_dict()
    return {k: torch.rand_like(v) + 0.5 if "gamma" in k else v + 0.02 * torch.randn_like(v) for k, v in sd.items()}


def _timm_features(name: str, sd: dict, x: torch.Tensor, **overrides) -> torch.Tensor:
    ref = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True,
                            **{**SMALL, **overrides}).eval()
    ref.load_state_dict(to_timm(name, sd), strict=True)
    with torch.no_grad():
        return ref.forward_features(x)[:, 0]


def _relative_error(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name, chunks, teacher", [
    ("vit_small_patch14_dinov2", 0, False), ("vit_small_patch14_reg4_dinov2", 0, True),
    ("vit_giant_patch14_reg4_dinov2", 2, False),  # giant: SwiGLUFFNFused's w12 / w3; FSDP block chunks
])
def test_dinov2_checkpoint_loads_and_gives_timms_features(tmp_path, name, chunks, teacher):
    size = dict(img_size=70, embed_dim=FAMILY_MODELS[name]["embed_dim"], num_heads=FAMILY_MODELS[name]["num_heads"])
    sd = _weights(name, **size)  # the real width (a DINOv2 file has no record of its heads), a 5 x 5 native grid
    meta = meta_vits.dinov2_state_dict(sd, block_chunks=chunks)
    assert "mask_token" in meta and ("register_tokens" in meta) == ("reg4" in name)
    torch.save(meta_vits.teacher_checkpoint(meta) if teacher else meta, tmp_path / "dinov2.pth")
    _, info = read_backbone(tmp_path / "dinov2.pth")
    assert (info["arch"], info["source"], info["img_size"]) == (name, "meta-dinov2", 70)
    assert info["pos_embed_resample"] == ("timm" if "reg4" in name else "dino")
    model = load_backbone(tmp_path / "dinov2.pth")
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        assert _relative_error(model(x), _timm_features(name, sd, x, **size)) <= REL_TOL


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3_qkvb", "vit_small_patch16_dinov3",
                                  "vit_small_plus_patch16_dinov3_qkvb"])
def test_dinov3_checkpoint_loads_and_gives_timms_features(tmp_path, name):
    size = dict(embed_dim=FAMILY_MODELS[name]["embed_dim"], num_heads=FAMILY_MODELS[name]["num_heads"])
    sd = _weights(name, **size)  # the real width: a narrower one would be any DINOv3 size resized
    meta = meta_vits.dinov3_state_dict(sd, head_dim=64)
    assert {"storage_tokens", "mask_token", "rope_embed.periods", "blocks.0.attn.qkv.bias_mask"} <= set(meta)
    torch.save(meta, tmp_path / "dinov3.pth")
    _, info = read_backbone(tmp_path / "dinov3.pth")
    assert (info["arch"], info["source"]) == (name, "meta-dinov3")  # all-zero q/v biases: the plain model
    model = load_backbone(tmp_path / "dinov3.pth")
    for side in (224, 96):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            assert _relative_error(model(x), _timm_features(name, sd, x, **size)) <= REL_TOL, side


@pytest.mark.parametrize("reg4, offset, antialias, resample", [(False, 0.1, False, "dino"), (True, 0.0, True, "timm")])
def test_position_embeddings_resample_as_dinov2_does(reg4, offset, antialias, resample):
    name = "vit_small_patch14_reg4_dinov2" if reg4 else "vit_small_patch14_dinov2"
    model = create_model(name, **SMALL, pos_embed_resample=resample)  # the native 37 x 37 grid
    meta_pos = meta_vits.dinov2_state_dict(model.state_dict(), cls_pos=torch.zeros(1, 1, 96))["pos_embed"]
    for h, w in ((16, 16), (7, 7), (16, 11)):
        expected = meta_vits.dinov2_interpolate_pos_encoding(meta_pos, h, w, offset, antialias)
        ours = model._pos_embed(model.pos_embed, h, w)
        ours = torch.cat([torch.zeros_like(ours[:, :1]), ours], dim=1) if reg4 else ours
        assert _relative_error(ours[:, 1:], expected[:, 1:]) <= 1e-6, (h, w)


def test_a_dinov3_file_that_does_not_map_names_its_missing_and_unexpected_tensors(tmp_path):
    meta = meta_vits.dinov3_state_dict(_weights("vit_small_patch16_dinov3"), head_dim=24)
    meta["cls_norm.weight"] = meta.pop("norm.weight")  # untied CLS norm: no registered model has it
    torch.save(meta, tmp_path / "untied.pth")
    with pytest.raises(ValueError, match=r"closest, vit_small_patch16_dinov3, has missing \[norm.weight\] and "
                                         r"unexpected \[cls_norm.weight\]"):
        load_backbone(tmp_path / "untied.pth")


def test_every_dinov2_and_dinov3_name_is_recognised_from_its_meta_layout():
    for name in FAMILY_MODELS:
        with torch.device("meta"):
            sd = create_model(name, depth=1).state_dict()
        sd = {k: torch.zeros(v.shape) for k, v in sd.items()}
        args = FAMILY_MODELS[name]
        meta = (meta_vits.dinov3_state_dict(sd, head_dim=args["embed_dim"] // args["num_heads"])
                if "dinov3" in name else meta_vits.dinov2_state_dict(sd))
        if name.endswith("_qkvb"):  # non-zero q/v biases make it the _qkvb model
            meta["blocks.0.attn.qkv.bias"] = torch.ones_like(meta["blocks.0.attn.qkv.bias"])
        assert infer_architecture(from_meta(meta)[0])["arch"] == name
