"""What the host issues per step, counted without a GPU (the step model's fake-CUDA trace: every aten op on a CUDA
tensor, Triton launches recorded, not run), and that the paths which cut it change no number:
- after backward, the Triton update (optim.impl=triton, the CUDA default) takes <= 10 launches where torch's path
  takes ~200 (the per-tensor clip's `_foreach_mul_` with 0-d tensors runs one kernel per tensor);
- the eager ViT-S/16 step stays within 1,000 aten ops, the weights cast once per model and step (weight_cast.py);
- the Triton update equals torch's update, and the casts equal autocast's, over steps on the CPU."""
import copy

import pytest
import torch

from fastdino.engine import config as C
from fastdino.engine.estimate import estimate_step

from _helpers import assert_close
from test_train import make_trainer, synthetic_batches, tiny_config

MAX_LAUNCHES_AFTER_BACKWARD = 10
MAX_ATEN_OPS = 1000
# Same math, another order: the clip's sums and the bias corrections round differently (fp32 ulps per step), and
# AdamW's m / sqrt(v) magnifies that for gradients near zero: up to ~1e-3 of lr (0.05 here) per step.
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def traced():
    """{optim.impl: the step model's fastdino result} for the paper's ViT-S/16 step, one image per crop (the counts
    do not depend on the batch)."""
    cfg = C.apply_overrides(C.vit_small16_imagenet(), overrides=["data.batch_size=1"])
    return {impl: estimate_step(C.apply_overrides(cfg, overrides=[f"optim.impl={impl}"]), "h200",
                                which=("fastdino",))["fastdino"] for impl in ("auto", "torch")}


def test_after_backward_in_a_handful_of_launches(traced):
    update = traced["auto"]["by_phase"]["update"]
    assert update["launches"] <= MAX_LAUNCHES_AFTER_BACKWARD, update
    assert update["triton_launches"] == 4 and update["aten_ops"] == 0, update  # clip, AdamW, statistics, EMA
    torch_path = traced["torch"]["by_phase"]["update"]
    assert torch_path["launches"] > 150, torch_path  # the per-tensor path is what the count sees


def test_eager_step_within_the_aten_op_budget(traced):
    result = traced["auto"]
    assert result["aten_ops"] <= MAX_ATEN_OPS, {k: v["count"] for k, v in result["by_op"].items()}
    assert result["by_op"]["aten._foreach_copy_"]["count"] == 3  # the weight casts: teacher, student, gradients
    assert result["by_op"]["aten._to_copy"]["count"] < 20


@pytest.mark.parametrize("clip_mode", C.CLIP_GRAD_MODES)
def test_triton_update_equals_torch_update(clip_mode):
    """Five steps (the last layer frozen in the first two), fp32: the same losses, weights, teacher, center,
    moments and step counts on both paths."""
    trainers, losses = {}, {}
    for impl in ("torch", "triton"):
        cfg = tiny_config(f"optim.impl={impl}", f"optim.clip_grad_mode={clip_mode}", "optim.clip_grad=0.3",
                          "optim.weight_decay=0.3", "optim.warmup_epochs=0", "optim.base_lr=0.05")
        torch.manual_seed(0)
        trainers[impl] = trainer = make_trainer(cfg)
        assert trainer.update_impl == impl
        losses[impl] = []
        for crops in synthetic_batches(cfg, 5):
            trainer.train_step(crops)
            losses[impl].append(trainer.stats.read()["loss"])
    assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), **TOL, name="losses")
    ours, theirs = trainers["triton"], trainers["torch"]
    for name in ("params", "teacher_params"):
        for i, (a, e) in enumerate(zip(getattr(ours, name), getattr(theirs, name), strict=True)):
            assert_close(a, e, **TOL, name=f"{name}[{i}]")
    assert_close(ours.loss_fn.center, theirs.loss_fn.center, **TOL, name="center")
    for p, q in zip(ours.params, theirs.params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_close(ours.optimizer.state[p][key], theirs.optimizer.state[q][key], **TOL, name=key)


def test_weight_casts_change_no_number():
    """bf16 autocast on the CPU, three steps: running the models on one cast of their weights gives exactly the
    losses, weights and teacher of autocast's own per-use casts."""
    cfg = tiny_config("parallel.precision=bf16")
    results = []
    for casts in (True, False):
        torch.manual_seed(0)
        trainer = make_trainer(cfg)
        assert trainer.weight_casts is not None
        if not casts:
            trainer.weight_casts = None
        for crops in synthetic_batches(cfg, 3):
            trainer.train_step(crops)
        results.append(trainer)
    cast, plain = results
    assert cast.stats.read()["loss"] == plain.stats.read()["loss"]
    for name in ("params", "teacher_params"):
        for i, (a, e) in enumerate(zip(getattr(cast, name), getattr(plain, name), strict=True)):
            assert_close(a, e, atol=0, rtol=0, name=f"{name}[{i}]")


def test_triton_update_follows_a_loaded_optimizer_state():
    """A checkpoint load gives AdamW new state tensors: the next Triton update writes those, not the old ones."""
    cfg = tiny_config("optim.impl=triton", "optim.freeze_last_layer_epochs=0")
    trainer = make_trainer(cfg)
    batches = synthetic_batches(cfg, 2)
    trainer.train_step(batches[0])
    old = trainer.optimizer.state[trainer.params[0]]
    trainer.optimizer.load_state_dict(copy.deepcopy(trainer.optimizer.state_dict()))  # as from a checkpoint
    new = trainer.optimizer.state[trainer.params[0]]
    assert new["exp_avg"] is not old["exp_avg"]
    old_moment = old["exp_avg"].clone()
    trainer.train_step(batches[1])
    assert all(float(trainer.optimizer.state[p]["step"]) == 2 for p in trainer.params)
    assert torch.equal(old["exp_avg"], old_moment) and not torch.equal(new["exp_avg"], old_moment)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the step's shapes run compiled on CUDA (GPU check)")
@pytest.mark.parametrize("mode", C.CLIP_GRAD_MODES)
def test_update_kernels_at_the_step_shapes(mode):
    """The clip coefficients and AdamW over ViT-S/16 + its K=65536 head on CUDA, ~7,000 programs racing for the
    tickets of the last block of each tensor, three launches in a row (the tickets reset themselves): the torch
    references' coefficients, norm and torch's fused AdamW with the clipped gradients."""
    from fastdino.engine.head import DINOHead
    from fastdino.engine.vit import build_backbone
    from fastdino.kernels import adamw_step_, clip_coefficients
    from fastdino.kernels.reference import clip_coefficients_ref

    with torch.device("cuda"):
        shapes = [p.shape for m in (build_backbone("vit_small", 16), DINOHead(384, 65536)) for p in m.parameters()]
        expected = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        actual = [torch.nn.Parameter(p.detach().clone()) for p in expected]
        optimizer = torch.optim.AdamW(expected, lr=1e-3, weight_decay=0.04, fused=True)
        states = [{"step": torch.zeros(()), "exp_avg": torch.zeros(s), "exp_avg_sq": torch.zeros(s)} for s in shapes]
        lr, wd = torch.tensor(1e-3), torch.tensor(0.04)
    for step in range(3):
        grads = [torch.randn(s, device="cuda") * (10.0 if i % 3 == 0 else 0.01) for i, s in enumerate(shapes)]
        coefficients, norm, skip = clip_coefficients(grads, 3.0, mode, impl="triton")
        # In fp64: over millions of squares torch's fp32 norm may be the one that is off (1e-4 seen on the CPU).
        ref_coefficients, ref_norm, _ = clip_coefficients_ref([g.double() for g in grads], 3.0, mode)
        assert_close(coefficients, ref_coefficients, atol=1e-6, rtol=1e-5, name=f"coefficients, step {step}")
        assert_close(norm, ref_norm, atol=1e-6, rtol=1e-5, name=f"norm, step {step}")
        ref_coefficients = ref_coefficients.float()
        assert float(skip) == 0.0
        for p, g, c in zip(expected, grads, ref_coefficients):
            p.grad = g * c
        optimizer.step()
        adamw_step_(actual, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states], [lr] * len(shapes), [wd] * len(shapes), betas=(0.9, 0.999),
                    eps=1e-8, grad_coefficients=coefficients, skip=skip, impl="triton")
    assert all(float(s["step"]) == 3 for s in states), "a step count missed its ticket"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=f"param {i} {tuple(a.shape)}")
