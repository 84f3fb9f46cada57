"""The DINOv2 objective (DINO + iBOT, shared and separate iBOT heads) under FSDP2 on 2 gloo processes against 1
process on the same global batches and masks: same losses, iBOT term, student, teacher and iBOT center.

Each rank's masks are the same pattern, so both ranks have as many masked patches: dinov2 averages the ranks'
iBOT centers with equal weights (ibot_patch_loss.py: apply_center_update), which is the global mean only then.
KoLeo is left out: like dinov2, it looks for nearest neighbours in each rank's batch, not in the global one."""
import dataclasses
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from _helpers import assert_close, without_key_bias
from fastdino.engine.train import masking_config
from fastdino.pipelines.masking import MaskBatch, draw_masks
from test_distributed import full_states, rank_slice
from test_train import make_trainer, synthetic_batches, tiny_config

STEPS = 3
WORLD = 2
TOL = dict(atol=1e-5, rtol=1e-4)
HEADS = ("shared", "separate")


def config(head: str):
    return tiny_config("model.drop_path_rate=0.0", "optim.base_lr=0.05", "optim.teacher_momentum=0.5",
                       "optim.warmup_epochs=0", "loss.ibot_weight=1.0", "loss.ibot_mask_probability=1.0",
                       f"head.ibot_separate={str(head == 'separate').lower()}")


def masks_per_step(cfg) -> list[tuple[torch.Tensor, int]]:
    """Per step, the (2B, N) masks of the global batch, each of the WORLD ranks' slices the same pattern, and a
    padding bound."""
    config_, world = masking_config(cfg), WORLD
    local = 2 * cfg.data.batch_size // world
    out = []
    for step in range(STEPS):
        pattern = torch.as_tensor(draw_masks(config_, local, random.Random(step)))  # (2 Bl, N), view-major
        whole = torch.cat([pattern.view(2, local // 2, -1)] * world, dim=1).flatten(0, 1)
        out.append((whole, world * config_.upper_bound(local)))
    return out


def rank_masks(masks: torch.Tensor, bound: int, rank: int, world: int) -> MaskBatch:
    per_view = masks.view(2, -1, masks.shape[-1])
    per_rank = per_view.shape[1] // world
    return MaskBatch.from_masks(per_view[:, rank * per_rank:(rank + 1) * per_rank].flatten(0, 1), bound)


def run(trainer, cfg, rank: int, world: int) -> dict:
    losses, ibot = [], []
    for crops, (masks, bound) in zip(synthetic_batches(cfg, STEPS), masks_per_step(cfg)):
        trainer.train_step(rank_slice(crops, rank, world), rank_masks(masks, bound, rank, world))
        stats = trainer.stats.read(trainer.mesh.get_group() if trainer.mesh else None)
        losses.append(stats["loss"])
        ibot.append(stats["ibot_loss"])
    return {"losses": losses, "ibot": ibot, "ibot_center": trainer.ibot_fn.center.clone(), **full_states(trainer)}


def _worker(rank: int, store_path: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for head in HEADS:
            cfg = config(head)
            cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode="fsdp"))
            results[head] = run(make_trainer(cfg, mesh=mesh), cfg, rank, WORLD)
        if rank == 0:
            torch.save(results, f"{out_dir}/results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dinov2_distributed")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt")


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_fsdp2_on_two_ranks_matches_one_process(distributed_results, head):
    actual, expected = distributed_results[head], run(make_trainer(config(head)), config(head), 0, 1)
    for key in ("losses", "ibot"):
        assert_close(torch.tensor(actual[key]), torch.tensor(expected[key]), **TOL, name=f"{head} {key}")
    assert_close(actual["ibot_center"], expected["ibot_center"], **TOL, name=f"{head} ibot center")
    for model in ("student", "teacher"):
        assert actual[model].keys() == expected[model].keys()
        assert any(k.startswith("ibot_head.") for k in expected[model]) == (head == "separate")
        for key, value in expected[model].items():
            assert_close(without_key_bias(key, actual[model][key]), without_key_bias(key, value), **TOL,
                         name=f"{head} {model} {key}")
