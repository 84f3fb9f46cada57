"""loss.fused_head in the training step: a few steps on the bottleneck features and the last layers' weights (no
logits) equal the unfused step (losses, gradients, center, teacher entropy, student and teacher), also with the
Sinkhorn-Knopp teacher and trained gains. FSDP2 and DDP with fused_head against one process:
tests/test_distributed.py."""
import pytest
import torch

from _helpers import assert_close
from test_train import make_trainer, synthetic_batches, tiny_config

# The fused loss adds the logits chunk by chunk and the matmuls reduce in another order: fp32 rounding, amplified a
# little by Adam's normalisation over a few steps.
TOL = dict(atol=1e-5, rtol=1e-4)
STEPS = 3  # the last layer is frozen for 2 of them (freeze_last_layer_epochs=0.5 of 4 steps), then trains


def run(fused: bool, *overrides: str, steps: int = STEPS) -> dict:
    cfg = tiny_config("model.drop_path_rate=0.0", "optim.base_lr=0.05", "optim.teacher_momentum=0.5",
                      "optim.warmup_epochs=0", f"loss.fused_head={str(fused).lower()}", *overrides)
    trainer = make_trainer(cfg)
    grads, zero_grad = [], trainer.optimizer.zero_grad

    def record_then_zero(*args, **kwargs):
        grads.append([None if p.grad is None else p.grad.clone() for p in trainer.params])
        zero_grad(*args, **kwargs)

    trainer.optimizer.zero_grad = record_then_zero
    last_layer = trainer.model.head.last_layer.weight_v.detach().clone()
    losses, centers, entropies = [], [], []
    for crops in synthetic_batches(cfg, steps):
        trainer.train_step(crops)
        losses.append(trainer.stats.read()["loss"])
        centers.append(trainer.loss_fn.center.clone())
        entropies.append(trainer.loss_fn.last_teacher_entropy.clone())
    return dict(losses=torch.tensor(losses), grads=grads, centers=centers, entropies=torch.stack(entropies),
                student=trainer.student.state_dict(), teacher=trainer.teacher.state_dict(),
                last_layer_moved=not torch.equal(last_layer, trainer.model.head.last_layer.weight_v))


def test_fused_head_steps_equal_the_unfused_steps():
    fused, unfused = run(True), run(False)
    assert_close(fused["losses"], unfused["losses"], **TOL, name="losses")
    assert_close(fused["entropies"], unfused["entropies"], **TOL, name="teacher entropy")
    for step, (a, b) in enumerate(zip(fused["centers"], unfused["centers"])):
        assert_close(a, b, **TOL, name=f"center after step {step}")
    for step, (a, b) in enumerate(zip(fused["grads"], unfused["grads"])):
        assert [g is None for g in a] == [g is None for g in b], f"step {step}: different gradients are None"
        assert sum(g is not None for g in a) > 0
        for i, (ga, gb) in enumerate(zip(a, b)):
            if gb is not None:
                assert_close(ga, gb, **TOL, name=f"step {step} gradient {i}")
    for model in ("student", "teacher"):
        for key, value in unfused[model].items():
            assert_close(fused[model][key], value, **TOL, name=f"{model} {key}")
    assert fused["last_layer_moved"], "the last layer must have trained in the last step"


def test_fused_head_under_bf16_autocast_follows_the_unfused_step():
    """bf16 autocast (CPU): the fused loss's matmuls, forward and the backward's recompute, run in bf16 as the
    unfused head's do; one step's loss and gradients agree to bf16 rounding."""
    options = ("parallel.precision=bf16", "optim.freeze_last_layer_epochs=0")
    fused, unfused = run(True, *options, steps=1), run(False, *options, steps=1)
    # The two paths round the bf16 logits at different points (stored (V*B, K) vs recomputed per chunk): the
    # losses agree to about one bf16 ulp of the loss, not better.
    assert_close(fused["losses"], unfused["losses"], atol=0, rtol=torch.finfo(torch.bfloat16).eps, name="bf16 loss")
    for i, (a, b) in enumerate(zip(fused["grads"][0], unfused["grads"][0])):
        scale = b.abs().max()  # bf16 rounding is relative to the tensor's magnitude, not each element's
        assert_close(a / scale, b / scale, atol=3e-2, rtol=0, name=f"bf16 gradient {i}")


@pytest.mark.parametrize("option", ["loss.teacher_norm=sinkhorn_knopp", "head.norm_last_layer=false"],
                         ids=["sinkhorn_knopp", "trained_gain"])
def test_fused_head_options_follow_the_unfused_step(option):
    """teacher_norm=sinkhorn_knopp: the fused loss trains on sinkhorn_center's center, the same teacher.
    head.norm_last_layer=false: the gains (weight_g) go into the fused loss and get their gradients."""
    fused, unfused = run(True, option, steps=STEPS), run(False, option, steps=STEPS)
    assert_close(fused["losses"], unfused["losses"], **TOL, name="losses")
    assert_close(fused["entropies"], unfused["entropies"], **TOL, name="teacher entropy")
    for step, (a, b) in enumerate(zip(fused["grads"], unfused["grads"])):
        assert [g is None for g in a] == [g is None for g in b], f"step {step}: different gradients are None"
        for i, (ga, gb) in enumerate(zip(a, b)):
            if gb is not None:
                assert_close(ga, gb, **TOL, name=f"step {step} gradient {i}")


# ------------------------------------------------------------------ DINOv2's iBOT term on the fused head + loss

def run_dinov2(ibot_impl: str, *overrides: str, steps: int = 2) -> dict:
    """`steps` DINOv2 steps (iBOT + KoLeo) with loss.ibot_impl=`ibot_impl`, K = 64 and D = 16 (the Triton kernels
    run in the interpreter: loss.impl=triton for fused); the losses, named terms, gradients and both centers."""
    from test_dinov2_objective import DINOV2, batch_masks

    impl = "triton" if ibot_impl == "fused" else "torch"
    cfg = tiny_config(*DINOV2, "optim.base_lr=0.01", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
                      "head.out_dim=64", "head.bottleneck_dim=16", f"loss.ibot_impl={ibot_impl}",
                      f"loss.impl={impl}", *overrides)
    trainer = make_trainer(cfg)
    assert trainer.ibot_fn.impl == ibot_impl
    grads, zero_grad = [], trainer.optimizer.zero_grad

    def record_then_zero(*args, **kwargs):
        grads.append([None if p.grad is None else p.grad.clone() for p in trainer.params])
        zero_grad(*args, **kwargs)

    trainer.optimizer.zero_grad = record_then_zero
    rows, centers = [], []
    for i, crops in enumerate(synthetic_batches(cfg, steps)):
        trainer.train_step(crops, batch_masks(cfg, i))
        stats = trainer.stats.read()
        rows.append([stats[k] for k in ("loss", *trainer.loss_terms(), "teacher_patch_entropy")])
        centers.append(trainer.ibot_fn.center.clone())
    return dict(rows=torch.tensor(rows), grads=grads, centers=centers, student=trainer.student.state_dict())


@pytest.mark.parametrize("options", [
    (),
    ("head.ibot_separate=true", "head.ibot_out_dim=48", "head.norm_last_layer=false"),
    ("loss.teacher_norm=sinkhorn_knopp",),
    ("head.ibot_separate=true", "loss.teacher_norm=sinkhorn_knopp", "head.norm_last_layer=false"),
    ("loss.fused_head=true", "head.norm_last_layer=false"),
], ids=["shared", "separate_gain", "shared_sinkhorn", "separate_sinkhorn_gain", "with_fused_dino_head"])
def test_fused_ibot_steps_equal_the_torch_ibot_steps(options):
    """loss.ibot_impl=fused (the masked patches' bottleneck features into the fused head + loss, padding rows of the
    static mask bound at weight 0) against DINOv2's formulation: every term, the patch entropy, every gradient
    (the mask token's and both heads' last layers included), the iBOT center and the trained student."""
    fused, plain = run_dinov2("fused", *options), run_dinov2("torch", *options)
    assert_close(fused["rows"], plain["rows"], **TOL, name="loss, terms and patch entropy")
    for step, (a, b) in enumerate(zip(fused["grads"], plain["grads"])):
        assert [g is None for g in a] == [g is None for g in b], f"step {step}: different gradients are None"
        for i, (ga, gb) in enumerate(zip(a, b)):
            if gb is not None:
                scale = gb.abs().max().clamp_min(1e-3)  # the interpreter's tl.dot and cuBLAS's order: fp32 rounding
                assert_close(ga / scale, gb / scale, atol=1e-5, rtol=1e-4, name=f"step {step} gradient {i}")
    for step, (a, b) in enumerate(zip(fused["centers"], plain["centers"])):
        assert_close(a, b, **TOL, name=f"iBOT center after step {step}")
    for key, value in plain["student"].items():
        assert_close(fused["student"][key], value, **TOL, name=f"student {key}")
