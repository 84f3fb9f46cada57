"""The benchmarks' baseline (fastdino/official_dino.py, the official DINO step restated) computes what fastdino
computes, so that bench_e2e.py and quality_run.py compare speed and accuracy on the same math:
its DINOLoss gives fastdino's DINOLoss(impl="torch") loss, gradient and center; its ViT with the same weights gives
fastdino's CLS features; the paper preset's Trainer step is the official train_one_epoch step (loss, gradients as the
optimizer sees them, center, student, teacher) over 6 steps across 3 epochs, with per-tensor clipping, the per-epoch
teacher temperature warmup and the last-layer freeze on; bench_e2e.py's FLOP count is exactly the matmul work of the
baseline step.

Position embeddings of non-native crops are resampled by timm's antialiased bicubic by default, and exactly as the
official code does (bicubic without antialiasing, at scale (n + 0.1) / n0) with model.pos_embed_resample="dino",
which the paper preset sets; both are pinned here. The weight-decay groups are the official ones.
"""
import importlib
import math
from pathlib import Path

import pytest
import torch
from _helpers import assert_close, without_key_bias
from timm.layers import resample_abs_pos_embed

from fastdino import official_dino as od
from fastdino.engine import config as C
from fastdino.engine.loss import DINOLoss
from fastdino.engine.train import Trainer, param_groups
from fastdino.engine.vit import create_model

TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4)}
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def bench_e2e():
    """The bench_e2e.py script as a module; it imports its sibling scripts by name, as when it is run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
        yield importlib.import_module("bench_e2e")


def timm_resampling(backbone) -> None:
    """Replace the official `interpolate_pos_encoding` of `backbone` by timm's resampling, as fastdino does."""
    grid = int(math.sqrt(backbone.pos_embed.shape[1] - 1))
    p = backbone.patch_embed.patch_size

    def interpolate(x, w, h):
        return resample_abs_pos_embed(backbone.pos_embed, new_size=[w // p, h // p], old_size=[grid, grid],
                                      num_prefix_tokens=1)

    backbone.interpolate_pos_encoding = interpolate


@pytest.mark.parametrize("batch, ncrops, out_dim", [(3, 4, 257), (1, 2, 64)])
def test_loss_gradient_and_center_match_fastdino(batch, ncrops, out_dim):
    official = od.DINOLoss(out_dim, ncrops, 0.04, 0.07, 3, 10)
    ours = DINOLoss(out_dim, ncrops, 0.04, 0.07, 3, 10, impl="torch")
    center = torch.randn(1, out_dim)
    official.center.copy_(center)
    ours.center.copy_(center)
    student = torch.randn(ncrops * batch, out_dim) * 3
    teacher = torch.randn(2 * batch, out_dim) * 3
    s_official, s_ours = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss_official, loss_ours = official(s_official, teacher, epoch=1), ours(s_ours, teacher, epoch=1)
    loss_official.backward()
    loss_ours.backward()
    assert_close(loss_ours, loss_official, **TOL[torch.float32], name="loss")
    assert_close(s_ours.grad, s_official.grad, **TOL[torch.float32], name="student gradient")
    assert_close(ours.center, official.center, **TOL[torch.float32], name="center")


@pytest.mark.parametrize("resample", ["dino", "timm"])
def test_vit_gives_fastdino_cls_features(resample):
    official = od.vit("vit_tiny", 8, img_size=32, **TINY_VIT).eval()
    ours = create_model("vit_tiny_patch16", patch_size=8, img_size=32, attention="sdpa", pos_embed_resample=resample,
                        **TINY_VIT).eval()
    ours.load_state_dict(official.state_dict())  # strict: the same parameter names
    glob, local = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert_close(ours(glob), official(glob), **TOL[torch.float32], name="CLS features at the native size")
        if resample == "timm":
            # At another size timm resamples the position embeddings differently from the official code ...
            assert not torch.allclose(ours(local), official(local), atol=1e-3)
            timm_resampling(official)  # ... and that is the only difference
        # fastdino's packed multi-crop forward against the official per-resolution one, crop order kept
        assert_close(ours([glob[:2], glob[2:], local[:3], local[3:]]),
                     torch.cat([official(glob), official(local)]), **TOL[torch.float32],
                     name="multi-crop CLS features")


def paper_preset() -> C.TrainConfig:
    """The paper preset `vit_small16_imagenet` as shipped (per-tensor clipping at 3.0, the teacher temperature's
    30-epoch warmup moving once per epoch, the last layer frozen for epoch 0, 100 epochs, its lr, weight decay and
    momentum schedules, stochastic depth at 0.1), only smaller: a tiny ViT on 32/16-px crops, K=64, batch 4;
    precision is fp32."""
    cfg = C.apply_overrides(C.vit_small16_imagenet(), overrides=[
        *(f"model.{k}={v}" for k, v in TINY_VIT.items()), "model.patch_size=8", "model.img_size=32",
        "head.out_dim=64", "head.hidden_dim=48", "head.bottleneck_dim=16",
        "data.batch_size=4", "data.global_crops_size=32", "data.local_crops_number=2", "data.local_crops_size=16",
        "parallel.precision=fp32"])
    o, lo = cfg.optim, cfg.loss
    assert cfg.model.drop_path_rate == 0.1
    assert (o.clip_grad, o.clip_grad_mode, o.freeze_last_layer_epochs) == (3.0, "per_tensor", 1)
    assert (lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs, lo.teacher_temp_schedule) == (
        0.04, 0.07, 30, "per_epoch")
    return cfg


def optimizer_gradients(model, optimizer) -> list[dict]:
    """The gradients `optimizer` sees at each of its steps from now on, by parameter name (None: no gradient)."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []

    def record(opt, args, kwargs):
        seen.append({names[id(p)]: None if p.grad is None else p.grad.clone()
                     for group in opt.param_groups for p in group["params"]})

    optimizer.register_step_pre_hook(record)
    return seen


def test_paper_preset_step_is_the_official_step(bench_e2e, monkeypatch):
    """6 steps over 3 epochs of 2 steps: the official train_one_epoch step and fastdino's Trainer step give the same
    loss, the same gradients to the optimizer (clipped per tensor, the last layer's dropped in epoch 0), the same
    center, and the same student and teacher. The teacher temperature changes at each epoch, and clipping scales
    some tensors and leaves others. Stochastic depth is on: both steps start from the same RNG state, and fastdino
    draws the official per-resolution forward's uniforms in its order, so the same images are dropped."""
    cfg = paper_preset()
    steps_per_epoch, steps = 2, 6
    trainer = Trainer(cfg, steps_per_epoch, device=torch.device("cpu"))
    run = od.build(od.args_from_config(cfg, use_fp16=False), steps_per_epoch, "cpu")
    missing, unexpected = run.student.load_state_dict(trainer.model.state_dict(), strict=False)
    assert missing == ["head.last_layer.weight_g"] and not unexpected  # the official fixed gain, 1
    run.teacher.load_state_dict(run.student.state_dict())
    initial = {k: v.clone() for k, v in run.student.state_dict().items()}
    ours_seen = optimizer_gradients(trainer.model, trainer.optimizer)
    official_seen = optimizer_gradients(run.student, run.optimizer)
    official_norms = []  # the per-tensor norms official clip_gradients measured, per step
    clip_gradients = od.clip_gradients
    monkeypatch.setattr(od, "clip_gradients", lambda *a: official_norms.append(clip_gradients(*a)))
    official_drops = []  # per official drop_path call: the number of samples it dropped
    drop_path = od.drop_path

    def counting_drop_path(x, drop_prob=0.0, training=False):
        out = drop_path(x, drop_prob, training)
        official_drops.append(int((out.flatten(1) == 0).all(1).sum()))
        return out

    monkeypatch.setattr(od, "drop_path", counting_drop_path)

    d = cfg.data
    sizes = [d.global_crops_size] * 2 + [d.local_crops_size] * d.local_crops_number
    for it in range(steps):
        crops = [torch.randn(d.batch_size, 3, s, s) for s in sizes]
        rng = torch.get_rng_state()
        loss_official = od.train_step(run, crops, it, epoch=it // steps_per_epoch)
        torch.set_rng_state(rng)
        trainer.train_step(crops)
        loss_ours = trainer.stats.read()["loss"]
        assert loss_ours == pytest.approx(loss_official, rel=1e-5), f"loss of step {it}"
        ours, official = ours_seen[it], official_seen[it]
        assert ours.keys() == official.keys()
        frozen = {n for n, g in official.items() if g is None}
        assert frozen == ({"head.last_layer.weight_v"} if it < steps_per_epoch else set()), f"step {it}"
        for name, grad in official.items():
            assert (ours[name] is None) == (grad is None), f"step {it} {name}"
            if grad is not None:
                assert_close(ours[name], grad, **TOL[torch.float32], name=f"step {it} gradient of {name}")
        assert_close(trainer.loss_fn.center, run.dino_loss.center, **TOL[torch.float32], name=f"step {it} center")

    # 2 blocks (rates 0 and 0.1) and 2 resolution groups of 8 images: 2 draws of 8 per group and step
    assert len(official_drops) == 4 * steps and 0 < sum(official_drops) < 8 * len(official_drops) / 2
    temps = [trainer.schedules.at(it).teacher_temp for it in range(steps)]
    assert temps[0] == temps[1] == 0.04 < temps[2] == temps[3] < temps[4] == temps[5]
    for it, norms in enumerate(official_norms):
        clipped = sum(n > cfg.optim.clip_grad for n in norms)
        assert 0 < clipped < len(norms), f"step {it}: {clipped} of {len(norms)} gradient tensors above the clip"

    ours = trainer.model.state_dict()
    for name, value in run.student.state_dict().items():
        if name != "head.last_layer.weight_g":
            assert_close(ours[name], value, **TOL[torch.float32], name=f"student {name}")
            # The lr warms up from 0 over 10 epochs: parameters move by ~1e-6, below TOL's atol, so their updates
            # are compared too. Each side rounds its new parameter to fp32, so the updates can differ by an ulp of
            # the parameter (1.2e-7 for a LayerNorm weight of 1) beyond AdamW's own rounding (rtol).
            update, official_update = (without_key_bias(name, v - initial[name]) for v in (ours[name], value))
            ulp = torch.finfo(torch.float32).eps * value.abs().max().item()
            assert_close(update, official_update, atol=ulp, rtol=1e-3, name=f"student {name} update")
    ours = trainer.teacher.state_dict()
    for name, value in run.teacher.state_dict().items():
        if name != "head.last_layer.weight_g":
            assert_close(ours[name], value, **TOL[torch.float32], name=f"teacher {name}")


def test_weight_decay_groups_are_the_official_ones(bench_e2e):
    cfg = paper_preset()
    trainer = Trainer(cfg, 2, device=torch.device("cpu"))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    ours = {names[id(p)] for p in param_groups(trainer.model)[0]["params"]}
    official = od.build(od.args_from_config(cfg, use_fp16=False), 2, "cpu").student
    names = {id(p): n for n, p in official.named_parameters()}
    theirs = {names[id(p)] for p in od.get_params_groups(official)[0]["params"]}
    assert ours == theirs


def test_flop_count_is_the_matmul_work_of_the_baseline_step(bench_e2e):
    """bench_e2e's model FLOPs per image = what torch's FlopCounterMode counts in the official step's student
    forward + backward and teacher forward (the loss, norms and the EMA have no matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = paper_preset()
    run = od.build(od.args_from_config(cfg, use_fp16=False), 2, "cpu")
    sizes = [32, 32, 16, 16]
    batch = 3
    crops = [torch.randn(batch, 3, s, s) for s in sizes]
    with FlopCounterMode(display=False) as counter:
        run.student(crops).sum().backward()
        with torch.no_grad():
            run.teacher(crops[:2])
    assert counter.get_total_flops() == batch * bench_e2e.step_flops_per_image(run.student, sizes, teacher_crops=2)


@pytest.mark.parametrize("patch, native, crop", [(16, 224, 96), (8, 224, 96), (16, 224, 160), (8, 32, 24)])
def test_dino_resampling_is_the_official_interpolate_pos_encoding(patch, native, crop):
    """The paper's grids (14 -> 6, 28 -> 12) and others: fastdino's cached matrix times pos_embed equals the
    official interpolate_pos_encoding."""
    official = od.vit("vit_tiny", patch, img_size=native, **TINY_VIT)
    ours = create_model("vit_tiny_patch16", patch_size=patch, img_size=native, pos_embed_resample="dino", **TINY_VIT)
    ours.load_state_dict(official.state_dict())
    n = crop // patch
    tokens = torch.zeros(1, 1 + n * n, TINY_VIT["embed_dim"])
    with torch.no_grad():
        assert_close(ours._pos_embed(ours.pos_embed, n, n), official.interpolate_pos_encoding(tokens, crop, crop),
                     **TOL[torch.float32], name=f"position embeddings {native // patch} -> {n}")
