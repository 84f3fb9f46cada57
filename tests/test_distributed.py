"""2 gloo processes (FSDP2, then DDP, also with loss.fused_head) against 1 process on the same global batches: same
losses, same student and teacher, with global-norm and with per-tensor clipping; FSDP2 in bf16 mixed precision close
to it, with the backbone's numbers of DDP and one process under bf16 autocast, and in fp16 skipping overflows alike
on every rank; FSDP2 with compiled blocks, head and loss and checkpointed (all, selective) blocks, and DDP with
selective checkpointing, equal to it; and an FSDP2 run saved (sharded DCP) and resumed mid-way ends like the
uninterrupted one."""
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from _helpers import assert_close, without_key_bias
from test_train import make_trainer, synthetic_batches, tiny_config

STEPS = 4
FP16_STEPS = 8
FP16_INIT_SCALE = 2.0**10  # x the first gradients (norm ~1.5e3) overflows fp16 (max 65504); a few halvings fit
WORLD = 2
# 2 ranks reduce gradients and the loss center in another order than 1 process: fp32 rounding, amplified a little
# by Adam's normalisation over a few steps.
TOL = dict(atol=1e-5, rtol=1e-4)


def config():
    # A large lr and a low teacher momentum make every step move the student, the teacher and the center a lot,
    # so that a stale or unsynchronised piece would show in the losses.
    return tiny_config("model.drop_path_rate=0.0", "optim.base_lr=0.05", "optim.teacher_momentum=0.5",
                       "optim.warmup_epochs=0")


def per_tensor_config():
    """config() with the official per-tensor clipping; at its clip_grad of 3.0 a step clips some gradient tensors
    and leaves others (from 28 of 36 tensors at step 0 to 1 of 37 at step 3)."""
    cfg = config()
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip_grad_mode="per_tensor"))


class _Position:
    """Stands in for the data loader in checkpoints."""

    def __init__(self):
        self.batch = 0

    def state_dict(self):
        return {"batch": self.batch}

    def load_state_dict(self, state):
        self.batch = state["batch"]


def rank_slice(crops: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """The `rank`-th of `world` equal slices of a global batch of crops."""
    per_rank = crops[0].shape[0] // world
    return [c[rank * per_rank:(rank + 1) * per_rank] for c in crops]


def run_steps(trainer, batches, rank: int, world: int) -> list[float]:
    """Train on each global batch's `rank`-th slice; the mean loss over ranks after every step."""
    losses = []
    for crops in batches:
        trainer.train_step(rank_slice(crops, rank, world))
        losses.append(trainer.stats.read(trainer.mesh.get_group() if trainer.mesh else None)["loss"])
    return losses


def full_states(trainer) -> dict:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"student": get_model_state_dict(trainer.student, options=options),
            "teacher": get_model_state_dict(trainer.teacher, options=options)}


def bf16_backbones(cfg, mesh, crops: list[torch.Tensor], rank: int) -> dict:
    """Per mode (one process, DDP, FSDP2) in bf16 with stochastic depth: the student backbone's features in a first
    step on this rank's slice of `crops` (all ranks' gathered, as fp32), and the dtypes in and out of each block."""
    results = {}
    for mode in ("single", "ddp", "fsdp"):
        parallel = dataclasses.replace(cfg.parallel, mode=mode, precision="bf16")
        model = dataclasses.replace(cfg.model, drop_path_rate=0.2)
        trainer = make_trainer(dataclasses.replace(cfg, parallel=parallel, model=model),
                               mesh=None if mode == "single" else mesh)
        backbone, seen = trainer.model.backbone, []
        hooks = [block.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
                 for block in backbone.blocks]
        hooks.append(backbone.register_forward_hook(lambda mod, args, out: seen.append(out.detach().float())))
        torch.manual_seed(100 + rank)  # every mode draws the same stochastic depth
        trainer.train_step(rank_slice(crops, rank, WORLD))
        for hook in hooks:
            hook.remove()
        *block_dtypes, features = seen
        gathered = [torch.zeros_like(features) for _ in range(WORLD)]
        dist.all_gather(gathered, features)
        results[mode] = {"features": torch.cat(gathered), "block_dtypes": block_dtypes}
    return results


def _compiled_trainer(cfg, mesh, checkpointing: str):
    """An FSDP2 trainer with model.compile=true and activation checkpointing (all or selective) on every block.
    Backend aot_eager: dynamo and AOTAutograd (graph breaks, FSDP2's hooks around the compiled forwards, the
    selective policy's tags) without inductor's C++ builds, whose numerics test_compile.py checks."""
    compile_ = torch.compile
    torch.compile = lambda fn, **kwargs: compile_(fn, backend="aot_eager", **kwargs)
    try:
        model = dataclasses.replace(cfg.model, compile="true", activation_checkpointing=checkpointing)
        return make_trainer(dataclasses.replace(cfg, model=model), mesh=mesh)
    finally:
        torch.compile = compile_


def _worker(rank: int, store_path: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        cfg = config()
        batches = synthetic_batches(cfg, STEPS)
        results = {}
        for mode in ("fsdp", "ddp"):
            parallel = dataclasses.replace(cfg.parallel, mode=mode)
            trainer = make_trainer(dataclasses.replace(cfg, parallel=parallel), mesh=mesh, output_dir=out_dir)
            losses = run_steps(trainer, batches[:2], rank, WORLD)
            if mode == "fsdp":
                trainer.save_checkpoint(_Position())
            losses += run_steps(trainer, batches[2:], rank, WORLD)
            results[mode] = {"losses": losses, **full_states(trainer)}
        for mode in ("fsdp", "ddp"):
            fused = make_trainer(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode=mode),
                                                     loss=dataclasses.replace(cfg.loss, fused_head=True)), mesh=mesh)
            results[f"{mode}_fused_head"] = {"losses": run_steps(fused, batches, rank, WORLD), **full_states(fused)}
        bf16 = make_trainer(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, precision="bf16")),
                            mesh=mesh)
        results["fsdp_bf16"] = {"losses": run_steps(bf16, batches, rank, WORLD), **full_states(bf16)}
        results["bf16_backbones"] = bf16_backbones(cfg, mesh, batches[0], rank)
        fp16 = make_trainer(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, precision="fp16")),
                            mesh=mesh)
        fp16.loss_scale.scale.fill_(FP16_INIT_SCALE)
        skips = []
        for crops in synthetic_batches(cfg, FP16_STEPS):
            fp16.train_step(rank_slice(crops, rank, WORLD))
            skips.append(fp16.stats.read()["skipped_steps"])  # this rank's skip flag of the step
        mine = torch.tensor(skips + [fp16.loss_scale.scale.item()])
        gathered = [torch.zeros_like(mine) for _ in range(WORLD)]
        dist.all_gather(gathered, mine)
        results["fsdp_fp16"] = {"skips_then_scale": gathered, "student": full_states(fp16)["student"]}
        for checkpointing in ("all", "selective"):
            compiled = _compiled_trainer(cfg, mesh, checkpointing)
            results[f"fsdp_compiled_{checkpointing}"] = {"losses": run_steps(compiled, batches, rank, WORLD),
                                                         **full_states(compiled)}
        ddp_selective = make_trainer(dataclasses.replace(
            cfg, parallel=dataclasses.replace(cfg.parallel, mode="ddp"),
            model=dataclasses.replace(cfg.model, activation_checkpointing="selective")), mesh=mesh)
        results["ddp_selective"] = {"losses": run_steps(ddp_selective, batches, rank, WORLD),
                                    **full_states(ddp_selective)}
        per_tensor = make_trainer(per_tensor_config(), mesh=mesh)
        results["fsdp_per_tensor"] = {"losses": run_steps(per_tensor, batches, rank, WORLD), **full_states(per_tensor)}
        poisoned = [c.clone() for c in batches[0]]
        poisoned[0][0, 0, 0, 0] = float("nan")  # one pixel in rank 0's slice
        per_tensor.train_step(rank_slice(poisoned, rank, WORLD))
        skipped = torch.tensor([per_tensor.stats.read()["skipped_steps"]])  # this rank's skip flag of the step
        gathered = [torch.zeros_like(skipped) for _ in range(WORLD)]
        dist.all_gather(gathered, skipped)
        results["fsdp_per_tensor"].update(skipped_nan_step=torch.cat(gathered).tolist(),
                                          student_after_nan_step=full_states(per_tensor)["student"])
        resumed = make_trainer(cfg, mesh=mesh, output_dir=out_dir)  # mode auto = fsdp
        assert resumed.resume(_Position()) and resumed.step == 2
        results["resumed"] = {"losses": run_steps(resumed, batches[2:], rank, WORLD), **full_states(resumed)}
        if rank == 0:
            torch.save(results, f"{out_dir}/results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt"), out


def single_run(cfg) -> dict:
    trainer = make_trainer(cfg)
    losses = run_steps(trainer, synthetic_batches(cfg, STEPS), 0, 1)
    return {"losses": losses, "student": trainer.student.state_dict(), "teacher": trainer.teacher.state_dict()}


@pytest.fixture(scope="module")
def single_results():
    return single_run(config())


def _compare(actual: dict, expected: dict, what: str):
    assert_close(torch.tensor(actual["losses"]), torch.tensor(expected["losses"]), **TOL, name=f"{what} losses")
    for model in ("student", "teacher"):
        assert actual[model].keys() == expected[model].keys()
        for key, value in expected[model].items():
            assert_close(without_key_bias(key, actual[model][key]), without_key_bias(key, value), **TOL,
                         name=f"{what} {model} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(distributed_results, single_results, mode):
    results, _ = distributed_results
    _compare(results[mode], single_results, f"{mode} x{WORLD}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_fused_head_on_two_ranks_matches_one_unfused_process(distributed_results, single_results, mode):
    """loss.fused_head: the last layers' weights are used outside the models' forward; the student's still gets
    its gradient reduced (DDP's autograd hooks; FSDP2's post-backward of the unsharded head), the teacher's is
    all-gathered under FSDP2."""
    results, _ = distributed_results
    _compare(results[f"{mode}_fused_head"], single_results, f"{mode} fused_head x{WORLD}")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["all", "selective"])
def test_compile_and_activation_checkpointing_under_fsdp2(distributed_results, single_results, checkpointing):
    compiled = distributed_results[0][f"fsdp_compiled_{checkpointing}"]
    _compare(compiled, single_results, f"fsdp x{WORLD} compiled and checkpointed ({checkpointing})")


@pytest.mark.slow
def test_selective_checkpointing_under_ddp(distributed_results, single_results):
    _compare(distributed_results[0]["ddp_selective"], single_results, f"ddp x{WORLD} selective checkpointing")


@pytest.mark.slow
def test_per_tensor_clipping_under_fsdp2(distributed_results, single_results):
    """optim.clip_grad_mode=per_tensor on 2 ranks: each tensor's norm spans its two shards (one all-reduce of the
    per-tensor norms²), so the run equals the 1-process one, which differs from global-norm clipping; a NaN in one
    rank's images makes both ranks skip the step, which leaves the student as it was."""
    per_tensor = distributed_results[0]["fsdp_per_tensor"]
    expected = single_run(per_tensor_config())
    _compare(per_tensor, expected, f"fsdp per_tensor x{WORLD}")
    assert not torch.allclose(torch.tensor(expected["losses"]), torch.tensor(single_results["losses"]), rtol=1e-3)
    assert per_tensor["skipped_nan_step"] == [1] * WORLD
    for key, value in per_tensor["student"].items():
        assert torch.equal(per_tensor["student_after_nan_step"][key], value), f"the skipped step changed {key}"


@pytest.mark.slow
def test_bf16_mixed_precision_under_fsdp2(distributed_results, single_results):
    """precision=bf16 (MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction) on 2 ranks: the losses move off
    the fp32 ones by bf16 rounding only (measured <= 0.7 %), and the student and teacher weights stay fp32."""
    bf16 = distributed_results[0]["fsdp_bf16"]
    actual, expected = torch.tensor(bf16["losses"]), torch.tensor(single_results["losses"])
    assert not torch.allclose(actual, expected, rtol=1e-5, atol=0), "bf16 losses equal fp32 ones: no bf16 compute"
    assert_close(actual, expected, rtol=3e-2, atol=0, name="bf16 losses")
    for model in ("student", "teacher"):
        assert {v.dtype for v in bf16[model].values()} == {torch.float32}, model


@pytest.mark.slow
def test_bf16_backbone_computes_the_same_in_every_mode(distributed_results):
    """bf16 with stochastic depth: one process and DDP (autocast over fp32 weights) and FSDP2 (bf16 parameters, no
    autocast) give the same backbone features bit for bit, with the residual stream in bf16 through every block."""
    runs = distributed_results[0]["bf16_backbones"]
    for mode, run in runs.items():
        assert run["block_dtypes"] == [(torch.bfloat16, torch.bfloat16)] * 2, mode
        assert torch.isfinite(run["features"]).all(), mode
    assert torch.equal(runs["ddp"]["features"], runs["single"]["features"])
    assert torch.equal(runs["fsdp"]["features"], runs["single"]["features"])


@pytest.mark.slow
def test_fp16_loss_scaling_under_fsdp2(distributed_results):
    """precision=fp16 on 2 ranks, from a loss scale that overflows: every rank skips the same steps and halves the
    same scale (the skip comes from the global gradient norm, not from each rank's shard) until steps go through;
    the weights stay finite fp32."""
    fp16 = distributed_results[0]["fsdp_fp16"]
    rank0, rank1 = (t.tolist() for t in fp16["skips_then_scale"])
    assert rank0 == rank1
    *skips, scale = rank0
    assert 0 < sum(skips) < FP16_STEPS and scale == FP16_INIT_SCALE / 2 ** sum(skips)
    for value in fp16["student"].values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()


@pytest.mark.slow
def test_sharded_checkpoint_resumes_the_same_run(distributed_results):
    results, out = distributed_results
    resumed, uninterrupted = results["resumed"], results["fsdp"]
    assert resumed["losses"] == uninterrupted["losses"][2:]
    for model in ("student", "teacher"):
        for key, value in uninterrupted[model].items():
            assert torch.equal(resumed[model][key], value), f"resumed {model} {key} differs"


@pytest.mark.slow
def test_teacher_backbone_export_gathers_the_shards(distributed_results, single_results):
    from safetensors import safe_open

    _, out = distributed_results
    with safe_open(str(out / "teacher_backbone.safetensors"), framework="pt") as f:  # written at the step-2 save
        state = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata()
    assert json.loads(metadata["extra"])["step"] == 2 and metadata["patch_size"] == "4"
    expected = {k.removeprefix("backbone."): v for k, v in full_teacher_after(2).items() if k.startswith("backbone.")}
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(state[key], value, **TOL, name=f"exported {key}")


def full_teacher_after(steps: int) -> dict:
    cfg = config()
    trainer = make_trainer(cfg)
    run_steps(trainer, synthetic_batches(cfg, steps), 0, 1)
    return trainer.teacher.state_dict()
