"""The training step where it only runs on a GPU: bf16 on CUDA in one process and under FSDP2 on one NCCL rank,
per-block torch.compile on CUDA, SDPA's fused backends for the model's attention (never the math path; cuDNN on
Hopper), torch's varlen attention, the bf16 residual stream under CUDA autocast, and selective activation
checkpointing.

Every test marked `gpu` here is named in benchmarks/gpu_check.py, which runs them whenever a GPU is lent. The
FSDP2-on-one-rank test also runs on the CPU (gloo), so CI checks everything but the device.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from _helpers import assert_close
from test_train import synthetic_batches, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = [pytest.mark.gpu, needs_cuda]
STEPS = 4
# bf16 compute against fp32, or against bf16 rounded at other points (autocast vs FSDP2's parameter cast, Inductor's
# fusions): the per-step losses differ by bf16 rounding, as in test_distributed's bf16 test (measured <= 0.7 %).
BF16_LOSS_RTOL = 3e-2
FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def config(*overrides):
    # No stochastic depth: its draws come from each device's own RNG. A large lr and a low teacher momentum make a
    # step that skipped a piece (EMA, center, clipping) show in the next losses.
    # Eager unless a test compiles (model.compile=auto would compile on CUDA).
    return tiny_config("model.drop_path_rate=0.0", "optim.base_lr=0.05", "optim.teacher_momentum=0.5",
                       "optim.warmup_epochs=0", "loss.impl=auto", "model.compile=false", *overrides)


def trainer_on(cfg, device: str, mesh=None):
    from fastdino.engine.train import Trainer

    return Trainer(cfg, steps_per_epoch=4, device=torch.device(device), mesh=mesh)


def losses_of(trainer, batches) -> list[float]:
    losses = []
    for crops in batches:
        trainer.train_step([c.to(trainer.device) for c in crops])
        losses.append(trainer.stats.read(trainer.mesh.get_group() if trainer.mesh else None)["loss"])
    return losses


@pytest.mark.gpu
@needs_cuda
def test_bf16_step_on_cuda_follows_fp32():
    """One process on CUDA: bf16 autocast, the Triton loss and EMA kernels, fused AdamW. The losses follow an fp32
    run of the same batches within bf16 rounding, yet differ from it (bf16 really ran); master weights stay fp32."""
    cfg = config()
    batches = synthetic_batches(cfg, STEPS)
    bf16 = trainer_on(cfg, "cuda")
    assert bf16.precision.name == "bf16" and bf16.mode == "single"
    actual = torch.tensor(losses_of(bf16, batches))
    fp32 = trainer_on(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, precision="fp32")), "cuda")
    expected = torch.tensor(losses_of(fp32, batches))
    assert torch.isfinite(actual).all(), actual
    assert not torch.allclose(actual, expected, rtol=1e-6, atol=0), "bf16 losses equal fp32 ones: no bf16 compute"
    assert_close(actual, expected, atol=0, rtol=BF16_LOSS_RTOL, name="bf16 losses")
    assert {p.dtype for p in bf16.params} == {torch.float32}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_fsdp2_on_one_rank_matches_one_process(device, tmp_path):
    """FSDP2 (`fully_shard`) on a process group of one rank (gloo on the CPU, NCCL on CUDA) against the plain
    one-process step in the same precision (fp32 on the CPU, bf16 on CUDA): same losses, same student."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this process")
    cfg = config()
    batches = synthetic_batches(cfg, STEPS)
    single = trainer_on(cfg, device)
    expected = torch.tensor(losses_of(single, batches))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else None)
    try:
        mesh = init_device_mesh(device, (1,))
        fsdp_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode="fsdp"))
        sharded = trainer_on(fsdp_cfg, device, mesh=mesh)
        assert sharded.mode == "fsdp" and all(hasattr(p, "to_local") for p in sharded.params), "not sharded"
        actual = torch.tensor(losses_of(sharded, batches))
        student = {k: v.full_tensor() for k, v in sharded.student.state_dict().items()}
    finally:
        dist.destroy_process_group()
    tol = FP32_TOL if device == "cpu" else dict(atol=0, rtol=BF16_LOSS_RTOL)
    assert torch.isfinite(actual).all(), actual
    assert_close(actual, expected, **tol, name=f"fsdp2 x1 {backend} losses")
    if device == "cpu":  # in bf16 the weights drift apart by rounding step after step: the losses say enough
        for key, value in single.student.state_dict().items():
            assert_close(student[key], value, **FP32_TOL, name=f"student {key}")


@pytest.mark.gpu
@needs_cuda
def test_compiled_blocks_match_eager_on_cuda():
    """model.compile=true (every block of student and teacher and the head through Inductor, as bench_e2e's
    fastdino-compile) gives the losses of the eager step."""
    cfg = config("optim.base_lr=5e-4")  # a small lr: Inductor's bf16 rounding must not be amplified over steps
    batches = synthetic_batches(cfg, STEPS)
    eager = torch.tensor(losses_of(trainer_on(cfg, "cuda"), batches))
    compiled = trainer_on(config("optim.base_lr=5e-4", "model.compile=true"), "cuda")
    assert compiled.compile
    actual = torch.tensor(losses_of(compiled, batches))
    assert torch.isfinite(actual).all(), actual
    assert_close(actual, eager, atol=0, rtol=BF16_LOSS_RTOL, name="compiled losses")


FUSED_SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sdpa_backend", FUSED_SDPA)
def test_each_fused_sdpa_backend_runs_vit_s16_attention(sdpa_backend):
    """Each fused SDPA kernel (flash, memory-efficient, cuDNN) runs ViT-S/16's global-crop attention in bf16
    forward and backward and matches the explicit softmax; `sdpa_kernel` raises if the kernel cannot."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastdino.engine.attention import attention, attention_probs

    q, k, v = (torch.randn(8, 197, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel([getattr(SDPBackend, sdpa_backend)]):
        out = attention(q, k, v, "sdpa")  # (B, N, H, hd)
        out.float().square().sum().backward()
    expected = torch.einsum("bhnm,bmhd->bnhd", attention_probs(q, k), v.float())
    assert_close(out.float(), expected, atol=5e-3, rtol=5e-2, name=f"sdpa {sdpa_backend}")
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
@needs_cuda
def test_model_attention_never_takes_the_math_path_on_cuda():
    """The backend chosen by "auto" on CUDA bf16 runs; with SDPA, the packed multi-crop forward and backward of a
    ViT-S/16 (2 global + 2 local crops) run with only the fused kernels allowed, so no step builds softmax(QKᵀ)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastdino.engine.attention import select_attention_backend
    from fastdino.engine.vit import create_model

    backend, reason = select_attention_backend("auto", "cuda", torch.bfloat16)
    assert backend in ("xformers", "sdpa") and reason
    model = create_model("vit_small_patch16", depth=2, drop_path_rate=0.1).cuda()
    crops = [torch.randn(4, 3, s, s, device="cuda") for s in (224, 224, 96, 96)]
    with sdpa_kernel([getattr(SDPBackend, name) for name in FUSED_SDPA]), torch.autocast("cuda", torch.bfloat16):
        features = model(crops)
        features.float().square().sum().backward()
    assert features.shape == (16, model.embed_dim) and torch.isfinite(features).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _vit_s16_step(attention: str, *, depth: int = 1):
    """A ViT-S/16 (`depth` blocks, stochastic depth on) forward + backward under bf16 autocast on 2 global 224² and
    2 local 96² crops of 4 images (attention over 197 and 37 tokens): the model, its features, the kernels run."""
    from test_attention import SDPAKernels

    from fastdino.engine.vit import create_model

    torch.manual_seed(0)
    model = create_model("vit_small_patch16", depth=depth, drop_path_rate=0.1, attention=attention).cuda()
    crops = [torch.randn(4, 3, s, s, device="cuda") for s in (224, 224, 96, 96)]
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        model.eval()(crops)  # the backend is selected (its probes run) outside the recorded step
    model.train()
    torch.manual_seed(1)
    with SDPAKernels() as kernels, torch.autocast("cuda", torch.bfloat16):
        features = model(crops)
        features.float().square().sum().backward()
    return model, features, kernels.seen


@pytest.mark.gpu
@needs_cuda
def test_vit_s16_attention_runs_cudnn_on_hopper():
    """On an H100/H200 the model's SDPA attention runs cuDNN's kernel for ViT-S/16's global and local crops, forward
    and backward, and the selection says so."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"not a Hopper GPU: {torch.cuda.get_device_name()}")
    model, features, seen = _vit_s16_step("sdpa")
    device = torch.device("cuda", torch.cuda.current_device())
    assert model._backend[device, torch.bfloat16] == "sdpa:cudnn,flash,efficient,math"
    assert seen == [("cudnn", "forward")] * 2 + [("cudnn", "backward")] * 2, seen  # 2 groups
    assert torch.isfinite(features).all()


@pytest.mark.gpu
@needs_cuda
def test_varlen_attention_runs_one_call_and_matches_sdpa():
    """attention="varlen": one varlen_attn call per block over both groups, forward and backward, with the features
    and gradients of the per-group SDPA model (bf16: kernels accumulate in another order)."""
    reference, expected, _ = _vit_s16_step("sdpa", depth=2)
    model, features, seen = _vit_s16_step("varlen", depth=2)
    assert seen == [("varlen", "forward")] * 2 + [("varlen", "backward")] * 2, seen
    assert_close(features.float(), expected.float(), atol=5e-3, rtol=5e-2, name="varlen features")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = q.grad.abs().max().item()
        assert_close(p.grad, q.grad, atol=5e-2 * scale, rtol=5e-2, name=f"varlen grad {name}")


@pytest.mark.gpu
@needs_cuda
def test_residual_stream_is_bf16_under_cuda_autocast():
    """CUDA autocast runs layer_norm in fp32 and returns fp32; the model's LayerNorms do not, so every block takes
    and returns bf16, and the features equal a bf16-parameter model's (FSDP2's numerics) bit for bit."""
    from fastdino.engine.vit import create_model

    model = create_model("vit_small_patch16", depth=2, drop_path_rate=0.1).cuda()
    low = create_model("vit_small_patch16", depth=2, drop_path_rate=0.1).cuda()
    low.load_state_dict(model.state_dict())
    low.to(torch.bfloat16)
    crops = [torch.randn(4, 3, s, s, device="cuda") for s in (224, 224, 96, 96)]
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: dtypes.append((args[0].dtype, out.dtype)))
    torch.manual_seed(0)
    with torch.autocast("cuda", torch.bfloat16):
        features = model(crops)
    torch.manual_seed(0)
    expected = low([c.bfloat16() for c in crops])
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * 2 and features.dtype == torch.bfloat16
    assert torch.equal(features, expected)


def _checkpointed_vit_s16_step(spec: str, depth: int = 2):
    """A ViT-S/16 (`depth` blocks, stochastic depth on, SDPA attention) forward + backward under bf16 autocast with
    model.activation_checkpointing=`spec`, on 2 global 224² and 2 local 96² crops of 16 images: the model, its
    features, the attention kernels run, the bytes the forward left allocated, the peak over the step."""
    from types import SimpleNamespace

    from test_attention import SDPAKernels

    from fastdino.engine.parallelize import apply_ac
    from fastdino.engine.vit import create_model

    torch.manual_seed(0)
    model = create_model("vit_small_patch16", depth=depth, drop_path_rate=0.1, attention="sdpa").cuda()
    apply_ac(SimpleNamespace(backbone=model), spec)
    crops = [torch.randn(16, 3, s, s, device="cuda") for s in (224, 224, 96, 96)]
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        model.eval()(crops)  # the backend is selected (its probes run) outside the measured step
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(1)
    with SDPAKernels() as kernels, torch.autocast("cuda", torch.bfloat16):
        features = model(crops)
        kept = torch.cuda.memory_allocated() - before
        features.float().square().sum().backward()
    return model, features, kernels.seen, kept, torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@needs_cuda
def test_selective_checkpointing_on_cuda_recomputes_no_attention_and_keeps_less():
    """model.activation_checkpointing=selective on CUDA (bf16, the SDPA kernel chosen: cuDNN on Hopper): the features
    and gradients of no checkpointing; the same attention kernels, none recomputed in backward; and per block at
    least 7 (tokens x width) units less left allocated by the forward (LayerNorm's two outputs, the groups'
    concatenation, the first residual add, GELU's 4, against the projection's output kept), and a lower peak."""
    reference, expected, seen_none, kept_none, peak_none = _checkpointed_vit_s16_step("none")
    model, features, seen, kept, peak = _checkpointed_vit_s16_step("selective")
    assert seen == seen_none, (seen, seen_none)
    assert torch.equal(features, expected)  # the forward is the same computation
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = q.grad.abs().max().item()  # attention's backward kernels may accumulate in another order
        assert_close(p.grad, q.grad, atol=1e-2 * scale, rtol=1e-2, name=f"selective grad {name}")
    unit = 16 * (2 * 197 + 2 * 37) * model.embed_dim * 2  # bf16 (tokens, width)
    assert kept_none - kept >= 7 * len(model.blocks) * unit, (kept_none, kept, unit)
    assert peak < peak_none, (peak, peak_none)
