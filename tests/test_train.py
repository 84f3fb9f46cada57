"""The training step on a tiny ViT: finite losses, a non-finite step skipped without a host sync and counted,
the run stopped after too many; parameter groups, fp16 loss scaling, precision and mode resolution."""
import math

import pytest
import torch

from fastdino.engine import config as C
from fastdino.engine.metrics import CollapseWatch, MetricsWriter
from fastdino.engine.parallelize import DynamicLossScale, resolve_mode, resolve_precision

from _helpers import assert_close

TINY = ["model.arch=vit_tiny", "model.patch_size=4", "model.img_size=16", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.drop_path_rate=0.1", "head.out_dim=256", "head.hidden_dim=64",
        "head.bottleneck_dim=32", "loss.impl=torch", "data.batch_size=4", "data.global_crops_size=16",
        "data.local_crops_number=2", "data.local_crops_size=8", "epochs=2", "optim.warmup_epochs=1",
        "optim.freeze_last_layer_epochs=0.5", "loss.warmup_teacher_temp_epochs=1", "log_every=2"]


def tiny_config(*overrides) -> C.TrainConfig:
    return C.apply_overrides(C.demo(), overrides=TINY + list(overrides))


def synthetic_batches(cfg: C.TrainConfig, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """`steps` global batches of crops: 2 global then the local ones, each (B, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    sizes = [d.global_crops_size] * 2 + [d.local_crops_size] * d.local_crops_number
    return [[torch.randn(d.batch_size, 3, s, s, generator=g) for s in sizes] for _ in range(steps)]


def make_trainer(cfg, steps_per_epoch=4, **kwargs):
    from fastdino.engine.train import Trainer

    return Trainer(cfg, steps_per_epoch, device=torch.device("cpu"), **kwargs)


# ------------------------------------------------------------------------------------------------ the step

def test_steps_are_finite_and_update_student_teacher_and_center():
    cfg = tiny_config()
    trainer = make_trainer(cfg)
    student0 = [p.detach().clone() for p in trainer.params]
    teacher0 = [p.detach().clone() for p in trainer.teacher_params]
    assert all(torch.equal(s, t) for s, t in zip(student0, teacher0)), "the teacher starts as the student"
    center0 = trainer.loss_fn.center.clone()
    for crops in synthetic_batches(cfg, 3):
        trainer.train_step(crops)
    stats = trainer.stats.read()
    assert trainer.step == 3 and math.isfinite(stats["loss"]) and stats["skipped_steps"] == 0
    assert 0 < stats["teacher_entropy"] <= math.log(cfg.head.out_dim) + 1e-4
    assert all(not torch.equal(a, p) for a, p in zip(student0, trainer.params) if p.ndim > 1)
    assert not torch.equal(teacher0[0], trainer.teacher_params[0]) and not torch.equal(center0, trainer.loss_fn.center)


def test_last_layer_is_frozen_only_during_its_epochs():
    cfg = tiny_config("optim.freeze_last_layer_epochs=0.5")  # 2 of 4 steps per epoch
    trainer = make_trainer(cfg)
    last = trainer.model.head.last_layer.weight_v
    before = last.detach().clone()
    batches = synthetic_batches(cfg, 3)
    for crops in batches[:2]:
        trainer.train_step(crops)
    assert torch.equal(before, last), "the last layer moved during the freeze"
    trainer.train_step(batches[2])
    assert not torch.equal(before, last)


@pytest.mark.parametrize("impl", ["torch", "triton"])  # optim.impl: torch's update, or the Triton launches
@pytest.mark.parametrize("clip_mode", C.CLIP_GRAD_MODES)
def test_non_finite_loss_skips_the_update_counts_it_and_stops_the_run(monkeypatch, clip_mode, impl):
    from fastdino.engine.train import NonFiniteLossError

    cfg = tiny_config("max_nonfinite_in_a_row=3", f"optim.clip_grad_mode={clip_mode}", f"optim.impl={impl}")
    trainer = make_trainer(cfg)
    batches = synthetic_batches(cfg, 8)
    trainer.train_step(batches[0])
    student = [p.detach().clone() for p in trainer.params]
    teacher = [p.detach().clone() for p in trainer.teacher_params]
    center = trainer.loss_fn.center.clone()
    adam_steps = trainer.optimizer.state[trainer.params[0]]["step"].clone()
    poisoned = [c.clone() for c in batches[1]]
    poisoned[0][0, 0, 0, 0] = float("nan")  # one pixel of one global crop: teacher and student outputs turn NaN
    trainer.train_step(poisoned)
    assert all(torch.equal(a, b) for a, b in zip(student, trainer.params)), "a skipped step changed the student"
    assert all(torch.equal(a, b) for a, b in zip(teacher, trainer.teacher_params)), "...or the teacher"
    assert torch.equal(center, trainer.loss_fn.center), "...or the center"
    assert torch.equal(adam_steps, trainer.optimizer.state[trainer.params[0]]["step"]), "...or AdamW's step count"
    stats = trainer.stats.read()
    assert stats["skipped_steps"] == 1 and stats["max_nonfinite_in_a_row"] == 1 and math.isfinite(stats["loss"])
    trainer.train_step(batches[2])  # a finite step resets the run of skips
    assert not any(torch.equal(a, b) for a, b in zip(student, trainer.params) if b.ndim > 1)

    # Three in a row: the next log step raises with the likely causes.
    monkeypatch.setattr(trainer.loss_fn, "forward", _nan_loss(trainer.loss_fn.forward))
    for crops in batches[3:6]:
        trainer.train_step(crops)
    writer = MetricsWriter(None, trainer.schedules.total_steps)
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row .* fp16 .* learning rate .* teacher temp"):
        trainer._log(writer, CollapseWatch(256, 100), _Clock())


def _nan_loss(forward):
    return lambda *args, **kwargs: forward(*args, **kwargs) * float("nan")


class _Clock:
    def tick(self, step, images, total):
        return 1.0, 0.0


def test_param_groups_exempt_biases_and_norms_only():
    from fastdino.engine.model import build_model
    from fastdino.engine.train import param_groups

    model = build_model(tiny_config(), student=True)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias", "head.mlp.0.bias"} <= exempt
    assert {"backbone.blocks.0.attn.qkv.weight", "head.last_layer.weight_v", "backbone.patch_embed.proj.weight",
            "backbone.cls_token", "backbone.pos_embed"} <= {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_initial_weights_depend_only_on_the_seed():
    from fastdino.engine.model import initial_state

    a, b, c = initial_state(tiny_config()), initial_state(tiny_config()), initial_state(tiny_config("seed=1"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.blocks.0.attn.qkv.weight"], c["backbone.blocks.0.attn.qkv.weight"])


def test_fp16_loss_scale_skips_backs_off_and_grows():
    scale = DynamicLossScale(torch.device("cpu"), init_scale=8.0, growth_interval=2)
    grads = [torch.full((3,), 8.0)]
    scale.unscale_(grads)
    assert_close(grads[0], torch.ones(3), atol=0, rtol=0, name="unscaled")
    scale.update(torch.tensor(True))
    assert scale.scale.item() == 4.0
    scale.update(torch.tensor(False))
    scale.update(torch.tensor(False))
    assert scale.scale.item() == 8.0 and scale.good_steps.item() == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("clip_mode", C.CLIP_GRAD_MODES)
def test_fp16_overflows_back_off_the_loss_scale_without_counting_as_divergence(clip_mode, impl):
    cfg = tiny_config("parallel.precision=fp16", "max_nonfinite_in_a_row=1", f"optim.clip_grad_mode={clip_mode}",
                      f"optim.impl={impl}")
    trainer = make_trainer(cfg)
    for crops in synthetic_batches(cfg, 12):
        trainer.train_step(crops)
    stats = trainer.stats.read()
    # The initial scale 2^16 overflows the fp16 backward; each overflow halves it until steps go through.
    assert 0 < stats["skipped_steps"] < 12 and stats["max_nonfinite_in_a_row"] == 0
    assert trainer.loss_scale.scale.item() == 2.0**16 / 2 ** stats["skipped_steps"]
    assert math.isfinite(stats["loss"])


def test_precision_and_mode_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu).name == "fp32" and resolve_precision("auto", cpu).autocast_dtype is None
    bf16 = resolve_precision("auto", cuda)
    assert bf16.mp_policy.param_dtype == torch.bfloat16 and bf16.mp_policy.reduce_dtype == torch.float32
    assert resolve_precision("fp16", cuda).loss_scaling and not bf16.loss_scaling
    assert resolve_mode("auto", 1) == "single" and resolve_mode("auto", 4) == "fsdp" and resolve_mode("ddp", 2) == "ddp"
    with pytest.raises(ValueError, match="parallel.mode=single cannot run on 2 processes"):
        resolve_mode("single", 2)
    with pytest.raises(ValueError, match="parallel.mode=fsdp needs several processes"):
        resolve_mode("fsdp", 1)
