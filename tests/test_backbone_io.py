"""Backbone files: fastdino safetensors round trip, official DINO .pth layouts, timm weights, and bad files."""
import argparse
import functools
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from fastdino.engine.backbone_io import RUN_FILE, load_backbone, read_backbone, save_backbone
from fastdino.engine.vit import build_backbone, create_model


@functools.cache
def _tiny(patch_size=16, img_size=32):
    """One initialised vit_tiny per shape for the whole file (initialisation dominates these tests' time)."""
    return build_backbone("vit_tiny", patch_size, img_size=img_size).eval()


def _assert_same_weights(model, state_dict):
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict)
    for name, t in state_dict.items():
        assert torch.equal(loaded[name], t), name


def test_save_load_round_trip_through_a_run_dir(tmp_path):
    model = _tiny()
    save_backbone(model.state_dict(), tmp_path / RUN_FILE, arch="vit_tiny", patch_size=16, img_size=32,
                  extra={"step": 7})
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]  # no temp file left behind
    loaded = load_backbone(tmp_path)
    _assert_same_weights(loaded, model.state_dict())
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert read_backbone(tmp_path)[1] == {"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "embed_dim": 192,
                                          "depth": 12, "num_heads": 3, "pos_embed_resample": "timm",
                                          "extra": {"step": 7}, "source": "as-is", "dropped": []}


def test_official_full_checkpoint_loads_the_teacher_backbone(tmp_path):
    teacher = _tiny().state_dict()
    student = {k: v + 1 for k, v in teacher.items()}
    head = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_g": torch.ones(16, 1)}
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    loaded = load_backbone(tmp_path / "checkpoint.pth")
    _assert_same_weights(loaded, teacher)
    assert loaded.pos_embed_resample == "dino"


@pytest.mark.parametrize("patch_size, img_size", [(16, 32), (8, 24)])
def test_bare_state_dict_architecture_is_inferred_from_shapes(tmp_path, patch_size, img_size):
    state = _tiny(patch_size, img_size).state_dict()
    torch.save(state, tmp_path / "dino_vittiny_pretrain.pth")
    state_dict, info = read_backbone(tmp_path / "dino_vittiny_pretrain.pth")
    assert info == {"arch": "vit_tiny", "patch_size": patch_size, "img_size": img_size, "embed_dim": 192, "depth": 12,
                    "num_heads": 3, "pos_embed_resample": "dino", "extra": {},  # official weights: official resampling
                    "source": "as-is", "dropped": []}
    _assert_same_weights(load_backbone(tmp_path / "dino_vittiny_pretrain.pth"), state)


def _resized():
    """The demo preset's model: a vit_tiny/8 narrowed to D=96, depth 4, 3 heads (head count not in any shape)."""
    return create_model("vit_tiny_patch8", img_size=48, embed_dim=96, depth=4, num_heads=3).eval()


def test_resized_model_takes_its_heads_from_extra_or_the_run_config(tmp_path):
    model = _resized()
    save = dict(arch="vit_tiny", patch_size=8, img_size=48)
    save_backbone(model.state_dict(), tmp_path / "a.safetensors",
                  extra={"model": {"num_heads": 3, "pos_embed_resample": "dino"}}, **save)
    loaded = load_backbone(tmp_path / "a.safetensors")
    assert (loaded.embed_dim, len(loaded.blocks), loaded.num_heads, loaded.pos_embed_resample) == (96, 4, 3, "dino")
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(loaded(x), model(x))

    save_backbone(model.state_dict(), tmp_path / "run" / RUN_FILE, **save)
    with pytest.raises(ValueError, match=r"resized to D=96, depth 4, and no record of its number of heads"):
        load_backbone(tmp_path / "run")
    config = {"model": {"arch": "vit_tiny", "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert load_backbone(tmp_path / "run").num_heads == 3
    config["model"]["arch"] = "vit_small"
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json trains a vit_small but .* holds a vit_tiny"):
        load_backbone(tmp_path / "run")


def test_timm_safetensors_weights_load_without_their_classifier(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = load_backbone(tmp_path / "model.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="vit_small"), r"holds a vit_tiny/16 backbone, but arch=vit_small was asked for"),
    (dict(patch_size=8), r"holds a vit_tiny/16 backbone, but patch_size=8 was asked for"),
])
def test_another_architecture_than_asked_is_refused(tmp_path, kwargs, match):
    save_backbone(_tiny().state_dict(), tmp_path / "b.safetensors", arch="vit_tiny", patch_size=16, img_size=32)
    with pytest.raises(ValueError, match=match):
        load_backbone(tmp_path / "b.safetensors", **kwargs)


def test_bad_files_are_value_or_not_found_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=f"has no {RUN_FILE}"):
        load_backbone(tmp_path)
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_backbone(tmp_path / "garbage.pth")
    state = dict(_tiny().state_dict())
    del state["blocks.3.mlp.fc1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"does not match vit_tiny/16: missing \[blocks.3.mlp.fc1.weight\]"):
        load_backbone(tmp_path / "partial.pth")
    torch.save({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16), "pos_embed": torch.zeros(1, 5, 100)},
               tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="a vit_tiny resized to D=100, depth 0, and no record of its number of heads"):
        load_backbone(tmp_path / "odd.pth")


def test_a_resized_dino_vit_in_timms_names_loads_with_its_recorded_heads(tmp_path):
    """A DINO ViT of no registered width and depth (the demo's D=96, 2 blocks, 3 heads), exported in timm's names
    (`fastdino export --weights`), loads as that resized ViT, heads from the export's record: the same features."""
    from fastdino.engine.backbone_io import export_timm_weights

    model = build_backbone("vit_tiny", 8, img_size=32, embed_dim=96, depth=2, num_heads=3).eval()
    own = save_backbone(model.state_dict(), tmp_path / "run.safetensors", arch="vit_tiny", patch_size=8, img_size=32,
                        extra={"model": {"num_heads": 3}})
    exported, _ = export_timm_weights(own, tmp_path / "timm.safetensors")
    loaded = load_backbone(exported)
    assert (loaded.embed_dim, len(loaded.blocks), loaded.num_heads) == (96, 2, 3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # A run's backbone whose config leaves the heads to the arch (num_heads: null, as `--init` records it): the arch's
    as_built = save_backbone(model.state_dict(), tmp_path / "init_run.safetensors", arch="vit_tiny", patch_size=8,
                             img_size=32, extra={"model": {"arch": "vit_tiny", "num_heads": None}})
    assert read_backbone(as_built)[1]["num_heads"] == 3
