"""`fastdino train --init PATH`: continued pretraining from released weights (timm or Meta formats), the first log
line, the heads, and the result working with knn / attention / export (timm loads the export strictly)."""
import dataclasses

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import meta_vits
from fastdino.engine import config as C
from fastdino.engine.backbone_io import from_timm, load_backbone
from fastdino.engine.model import initial_state, init_settings

NAME = "vit_small_patch16_dinov3"
SIZE = dict(depth=1)  # ViT-S width (a timm file has no record of a resized width's heads), one block
# The adaptation preset scaled to the tiny dataset (32-px images).
TINY = ["data.batch_size=4", "data.global_crops_size=32", "data.local_crops_number=2", "data.local_crops_size=16",
        "head.out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32", "loss.impl=torch",
        "data.backend=torchvision", "data.num_workers=0", "eval.at_end=false", "eval.knn_every_epochs=0",
        "eval.batch_size=16", "model.drop_path_rate=0", "log_every=1"]


def _timm_file(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **SIZE)
    weights = {k: (torch.rand_like(v) + 0.5 if "gamma" in k else v + 0.02 * torch.randn_like(v)).contiguous()
               for k, v in model.state_dict().items()}
    save_file(weights, str(tmp_path / "timm.safetensors"))
    return tmp_path / "timm.safetensors", weights


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_init_trains_from_the_checkpoint_and_the_result_evaluates_and_exports_to_timm(tmp_path, fastdino_here,
                                                                                        tiny_dataset):
    path, weights = _timm_file(tmp_path)
    run = tmp_path / "run"
    proc = fastdino_here("train", "--init", path, "--preset", "dinov3_vit_small16_adapt", "--output", run, "--data",
                         tiny_dataset, "--max-steps", "2", *TINY)
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert "model.init: student and teacher start from" in first and f"{NAME} backbone loaded" in first, first
    assert "DINO head initialised from seed 0 (it has none)" in first

    teacher = load_backbone(run)  # two steps at teacher momentum 0.999: still the checkpoint, nearly
    start = from_timm(NAME, weights)
    drift = max(_relative(t, start[k]) for k, t in teacher.state_dict().items() if start[k].norm() > 0)
    assert 0 < drift < 1e-2

    assert fastdino_here("knn", "--checkpoint", run, "--data", tiny_dataset, "--image-size", "32").returncode == 0
    image = next((tiny_dataset / "val").rglob("*.jpg"))
    assert fastdino_here("attention", "--checkpoint", run, "--image", image, "--output",
                         tmp_path / "a.png").returncode == 0
    proc = fastdino_here("export", "--checkpoint", run, "--weights", "--output", tmp_path / "timm_out.safetensors")
    assert proc.returncode == 0 and "timm.create_model('vit_small_patch16_dinov3', num_classes=0, depth=1)" in proc.stdout
    ref = timm.create_model(NAME, pretrained=False, num_classes=0, **SIZE).eval()
    ref.load_state_dict(load_file(str(tmp_path / "timm_out.safetensors")), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _relative(teacher(x), ref.forward_features(x)[:, 0]) <= 1e-5


def test_init_loads_a_teacher_checkpoints_dino_head_when_it_fits(tmp_path):
    name = "vit_small_patch14_reg4_dinov2"
    cfg = C.preset("dinov2_vit_small14_adapt")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=1, img_size=70),
                              head=C.HeadConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=name))
    state = initial_state(cfg)
    backbone = {k.removeprefix("backbone."): v + 1 for k, v in state.items() if k.startswith("backbone.")}
    head = {k.replace("head.", "dino_head.", 1): v + 1 for k, v in state.items() if k.startswith("head.")}
    checkpoint = meta_vits.teacher_checkpoint(meta_vits.dinov2_state_dict(backbone))
    checkpoint["teacher"] = {**{k: v for k, v in checkpoint["teacher"].items() if not k.startswith("dino_head.")},
                             **{k: v for k, v in head.items()}}
    torch.save(checkpoint, tmp_path / "teacher_checkpoint.pth")
    settings = init_settings(tmp_path / "teacher_checkpoint.pth")
    assert (settings["arch"], settings["img_size"], settings["depth"]) == (name, 70, 1)
    started = initial_state(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, init=str(tmp_path / "teacher_checkpoint.pth"))))
    for key, value in state.items():
        assert torch.allclose(started[key], value + 1, atol=1e-6), key  # every tensor the checkpoint's


def test_an_init_that_does_not_fit_the_run_is_a_one_line_error_naming_the_tensors(tmp_path, fastdino_here):
    path, _ = _timm_file(tmp_path)
    proc = fastdino_here("train", "--init", path, "--preset", "dinov3_vit_small16_adapt", "--output", tmp_path / "run",
                         "--max-steps", "1", *TINY, "model.arch=vit_small_patch16_dinov3_qkvb")
    assert proc.returncode == 2
    assert "missing [blocks.0.attn.q_bias, blocks.0.attn.v_bias" in proc.stderr, proc.stderr
    missing = fastdino_here("train", "--init", tmp_path / "nothing.pth", "--output", tmp_path / "run2")
    assert missing.returncode == 2 and "--init" in missing.stderr and "no such file" in missing.stderr
