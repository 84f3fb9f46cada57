"""The step model (engine/estimate.py, `fastdino estimate`): the official step's modelled peak memory against its
measured H100 figures, FLOPs against FlopCounterMode on real CPU steps, the model's response to simple changes,
and the command line (JSON keys, one-line errors, a help that does not import torch)."""
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, addmm_flop

from _helpers import help_without_torch
from fastdino import official_dino
from fastdino.engine import config as C
from fastdino.engine.estimate import estimate_step
from fastdino.engine.train import Trainer

# The official step measured on the lent H100 (shared/gpu/README.md): ViT-S/16, K=65536, 2x224² + 10x96² crops,
# peak GiB at batch 64 and 128 (main_dino.py defaults: fp16 autocast).
OFFICIAL_H100_PEAK_GIB = {64: 12.5, 128: 23.8}
TINY = ["model.patch_size=8", "model.img_size=32", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
        "head.out_dim=256", "head.hidden_dim=64", "head.bottleneck_dim=32", "data.batch_size=4",
        "data.global_crops_size=32", "data.local_crops_number=2", "data.local_crops_size=16"]
KEYS = {"peak_gib", "step_ms", "img_per_s", "gflop_per_image", "aten_ops", "peak_by_role_gib", "by_op", "gpu"}


def paper(batch: int, *overrides: str) -> C.TrainConfig:
    return C.apply_overrides(C.vit_small16_imagenet(), overrides=[f"data.batch_size={batch}", *overrides])


def tiny(*overrides: str) -> C.TrainConfig:
    return C.apply_overrides(C.vit_small16_imagenet(), overrides=[*TINY, *overrides])


@pytest.mark.parametrize("batch", sorted(OFFICIAL_H100_PEAK_GIB))
def test_official_peak_is_within_5_percent_of_its_h100_measurement(batch):
    peak = estimate_step(paper(batch), "h100", which=("official",))["official"]["peak_gib"]
    assert peak == pytest.approx(OFFICIAL_H100_PEAK_GIB[batch], rel=0.05)


def test_doubling_the_batch_doubles_activations_and_keeps_the_state():
    small, large = (estimate_step(paper(batch, "model.depth=2", "head.out_dim=4096"), "h100") for batch in (16, 32))
    for name in ("fastdino", "official"):
        roles = small[name]["peak_by_role_gib"], large[name]["peak_by_role_gib"]
        assert roles[1]["activations"] / roles[0]["activations"] == pytest.approx(2, rel=0.05), name
        for state in ("weights", "optimizer state"):
            assert roles[1][state] == pytest.approx(roles[0][state], rel=1e-3), (name, state)
        assert large[name]["gflop_per_image"] == pytest.approx(small[name]["gflop_per_image"], rel=0.02), name
        assert 1.5 < large[name]["step_ms"] / small[name]["step_ms"] < 2.0, name  # the weights' work stays
        assert large[name]["aten_ops"] == small[name]["aten_ops"], name  # the same program on twice the data
        assert KEYS <= small[name].keys()


def _attention_free_gflop(entry: dict) -> float:
    """Model GFLOP without the fused attention ops, which FlopCounterMode does not count on the CPU."""
    return sum(op["gflop"] for name, op in entry["by_op"].items() if "attention" not in name)


def test_flops_are_what_flop_counter_mode_counts_in_real_cpu_steps():
    cfg = tiny("parallel.precision=fp32")
    model = estimate_step(cfg, "h100")
    batch = cfg.data.batch_size
    sizes = [32, 32, 16, 16]
    crops = [torch.randn(batch, 3, s, s) for s in sizes]

    trainer = Trainer(cfg, 1000, device=torch.device("cpu"))
    trainer.step = 1000  # past the frozen last layer, as the model's step
    # FlopCounterMode has no formula for addmm_ (the attention's backward accumulates its products in place)
    in_place = {torch.ops.aten.addmm_: lambda c, a, b, *_, **__: addmm_flop(c, a, b)}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        trainer.train_step(crops)
    assert _attention_free_gflop(model["fastdino"]) * 1e9 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    attention = model["fastdino"]["by_op"]
    assert attention["aten._scaled_dot_product_efficient_attention"]["gflop"] > 0  # fp32: memory-efficient SDPA

    run = official_dino.build(official_dino.args_from_config(cfg, use_fp16=False), 1000, "cpu")
    with FlopCounterMode(display=False) as counter:
        official_dino.train_step(run, crops, 1000, 1)
    assert model["official"]["gflop_per_image"] * batch * 1e9 == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_checkpointing_trades_activations_for_recomputation():
    """all recomputes the student's blocks (FLOPs again) and keeps the least; selective recomputes no matmul and no
    attention (the FLOPs of none) and keeps less than none: the model costs the recompute and drops what the
    checkpoints do not keep."""
    plain, recomputed, selective = (
        estimate_step(tiny(f"model.activation_checkpointing={ac}"), which=("fastdino",))["fastdino"]
        for ac in ("none", "all", "selective"))
    activations = [run["peak_by_role_gib"]["activations"] for run in (recomputed, selective, plain)]
    assert activations == sorted(activations) and len(set(activations)) == 3
    assert 1.0 < recomputed["gflop_per_image"] / plain["gflop_per_image"] < 1.5  # the student forward again
    assert selective["gflop_per_image"] == plain["gflop_per_image"]
    assert plain["gbytes"] < selective["gbytes"] < recomputed["gbytes"]  # the recomputed norms, GELU, adds, casts


def test_bad_arguments_are_value_errors_naming_them():
    for kwargs, name in [(dict(gpu="v100"), "gpu"), (dict(world_size=3), "world_size"),
                         (dict(which=("timm",)), "which")]:
        with pytest.raises(ValueError, match=name):
            estimate_step(tiny(), **kwargs)


def fastdino_estimate(*args):
    return subprocess.run([sys.executable, "-m", "fastdino", "estimate", *args], capture_output=True, text=True,
                          timeout=600)


def test_json_is_one_object_with_both_formulations():
    proc = fastdino_estimate(*TINY, "--gpu", "a100", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"fastdino", "official"}
    for entry in result.values():
        assert KEYS <= entry.keys() and entry["gpu"]["name"].startswith("A100")
        assert entry["peak_gib"] > 0 and entry["img_per_s"] > 0 and entry["aten_ops"] > 0


@pytest.mark.parametrize("args, message", [
    (["optim.lr=1"], "fastdino: error: unknown config key 'optim.lr'"),
    (["--world-size", "3", *TINY], "fastdino: error: --world-size must be >= 1 and divide data.batch_size (4)"),
    (["--gpu", "v100"], "fastdino estimate: error: argument --gpu: invalid choice: 'v100'"),
])
def test_bad_values_are_one_line_with_exit_code_2(args, message):
    proc = fastdino_estimate(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_help_states_the_assumptions_without_importing_torch():
    text = " ".join(help_without_torch("estimate", "--help").split())
    for fact in ("HBM x 0.75", "peak x 0.60", "H100", "H200", "A100", "fp16 autocast", "flash attention"):
        assert fact in text, fact


def test_ibot_term_is_modelled_without_a_host_read():
    """The DINOv2 step (masks at their static upper bound) reads nothing back; iBOT adds memory and time. In
    DINOv2's formulation (loss.ibot_impl=torch) through a log-softmax; fused (auto on CUDA) in the fused head + loss
    kernels, with no log-softmax of its own."""
    plain, ibot, fused = (estimate_step(tiny(f"loss.ibot_weight={w}", "loss.koleo_weight=0.1",
                                             f"loss.ibot_impl={impl}"), which=("fastdino",))["fastdino"]
                          for w, impl in ((0, "torch"), (1, "torch"), (1, "auto")))
    assert ibot["host_reads"] == plain["host_reads"] == fused["host_reads"] == 0
    assert ibot["peak_gib"] > plain["peak_gib"] and ibot["step_ms"] > plain["step_ms"]
    log_softmax = [row["by_op"].get("aten._log_softmax", {"count": 0})["count"] for row in (plain, ibot, fused)]
    assert log_softmax[1] > log_softmax[0] == log_softmax[2]
    assert fused["by_op"]["triton._fused_head_loss_fwd_kernel"]["count"] == 1


def test_a_dinov3_preset_is_estimated_for_fastdino_alone_and_says_why():
    """DINO's code builds no DINOv2 / DINOv3 ViT: the table has fastdino's column and a line saying so."""
    proc = fastdino_estimate("--preset", "dinov3_vit_small16_adapt", *TINY, "model.patch_size=16", "data.global_crops_size=32",
                             "data.local_crops_size=16")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["fastdino"] and "official: not estimated" in lines[-1]
    assert "model.arch=vit_small_patch16_dinov3" in lines[-1]
