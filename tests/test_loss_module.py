"""DINOLoss module: drop-in equivalence with the official DINO module, Sinkhorn-Knopp as DINOv2, distributed sums."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import assert_close

from fastdino.engine.loss import TEACHER_NORMS, DINOLoss, sinkhorn_knopp_teacher
from fastdino.kernels.reference import dino_loss_ref
from fastdino.official_dino import DINOLoss as OfficialDINOLoss

TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4)}
IMPLS = ["torch", "triton"]


def dinov2_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    """facebookresearch/dinov2 dinov2/loss/dino_clstoken_loss.py `sinkhorn_knopp_teacher`, for one process."""
    teacher_output = teacher_output.float()
    world_size = 1
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


ARGS = dict(out_dim=1000, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
            nepochs=5)


def batch(ncrops=4, b=3, k=1000, shift=0.0):
    """Student (V*B, K) and teacher (2*B, K) outputs; the teacher gets a per-prototype offset for the center."""
    student = torch.randn(ncrops * b, k)
    teacher = torch.randn(2 * b, k) + shift * torch.randn(1, k)
    return student, teacher


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_in_for_official_module(impl):
    """Same loss, gradient and center as the official module over several calls, the center carried across, at
    epochs in and after the teacher temperature's warmup (3 epochs)."""
    official = OfficialDINOLoss(**ARGS)
    ours = DINOLoss(**ARGS, impl=impl)
    ours.load_state_dict(official.state_dict())  # official checkpoints' dino_loss state loads
    for epoch in (0, 1, 4):
        student, teacher = batch(shift=2.0)
        results = []
        for module in (official, ours):
            s = student.clone().requires_grad_(True)
            loss = module(s, teacher, epoch)
            loss.backward()
            results.append((loss, s.grad))
        (loss_o, grad_o), (loss_f, grad_f) = results
        assert_close(loss_f, loss_o, **TOL[torch.float32], name=f"loss epoch {epoch}")
        assert_close(grad_f, grad_o, **TOL[torch.float32], name=f"grad epoch {epoch}")
        assert_close(ours.center, official.center, **TOL[torch.float32], name=f"center epoch {epoch}")


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_temp_override_and_entropy(impl):
    ours = DINOLoss(**ARGS, impl=impl)
    ours.center.copy_(torch.randn(1, ARGS["out_dim"]))
    center = ours.center.clone()
    student, teacher = batch()
    loss = ours(student, teacher, epoch=0, teacher_temp=0.065)
    expected, _ = dino_loss_ref(student, teacher, center, 0.1, 0.065, ARGS["ncrops"])
    assert_close(loss, expected, **TOL[torch.float32], name="loss")
    q = torch.softmax((teacher - center) / 0.065, dim=-1)
    assert_close(ours.last_teacher_entropy, torch.special.entr(q).sum(-1).mean(), **TOL[torch.float32],
                 name="entropy")


def test_sinkhorn_knopp_matches_dinov2():
    teacher = torch.randn(6, 1000)
    probs = sinkhorn_knopp_teacher(teacher, 0.05)
    assert_close(probs, dinov2_sinkhorn_knopp_teacher(teacher, 0.05), **TOL[torch.float32], name="probs")
    # Logits / temperature up to ~240: DINOv2's plain exp overflows to NaN, the per-prototype shift keeps Q finite.
    assert dinov2_sinkhorn_knopp_teacher(teacher * 3, 0.05).isnan().any()
    big = sinkhorn_knopp_teacher(teacher * 3, 0.05)
    assert torch.isfinite(big).all()
    assert_close(big.sum(dim=1), torch.ones(6), **TOL[torch.float32], name="row sums")


@pytest.mark.parametrize("impl", IMPLS)
def test_sinkhorn_knopp_loss(impl):
    ours = DINOLoss(**ARGS, impl=impl, teacher_norm="sinkhorn_knopp")
    student, teacher = batch()
    s = student.clone().requires_grad_(True)
    loss = ours(s, teacher, epoch=4)
    loss.backward()
    q = dinov2_sinkhorn_knopp_teacher(teacher, 0.07)
    r = student.clone().requires_grad_(True)
    expected, _ = dino_loss_ref(r, q, None, 0.1, 0.07, ARGS["ncrops"], teacher_is_probs=True)
    expected.backward()
    assert_close(loss, expected, **TOL[torch.float32], name="loss")
    assert_close(s.grad, r.grad, **TOL[torch.float32], name="grad")
    assert_close(ours.last_teacher_entropy, torch.special.entr(q).sum(-1).mean(), **TOL[torch.float32],
                 name="entropy")
    assert not ours.center.any(), "Sinkhorn-Knopp mode must not update the center"


BAD_FORWARD = {
    "rows_not_divisible_by_ncrops": ((torch.randn(7, 1000), torch.randn(4, 1000)), "not a positive multiple"),
    "teacher_rows_not_2B": ((torch.randn(8, 1000), torch.randn(3, 1000)), r"teacher must have shape \(2\*B, K\)"),
    "K_mismatching_center": ((torch.randn(8, 999), torch.randn(4, 999)), "out_dim=1000"),
    "epoch_past_schedule": ((torch.randn(8, 1000), torch.randn(4, 1000), 5), "outside the 5-epoch"),
    "non_positive_teacher_temp": ((torch.randn(8, 1000), torch.randn(8, 1000), 0, 0.0), "teacher_temp must be"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_forward_arguments(case):
    args, message = BAD_FORWARD[case]
    ours = DINOLoss(**{**ARGS, "ncrops": 2})
    args = args + (0,) if len(args) == 2 else args
    with pytest.raises(ValueError, match=message):
        ours(*args)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(teacher_temp=0.0), "teacher_temp must be a positive number"),
        (dict(warmup_teacher_temp=-0.04), "warmup_teacher_temp must be a positive number"),
        (dict(student_temp=0), "student_temp must be a positive number"),
        (dict(ncrops=1), "ncrops must be an int >= 2"),
        (dict(center_momentum=1.5), "center_momentum must be in"),
        (dict(impl="cuda"), "impl must be"),
        (dict(teacher_norm="softmax"), "teacher_norm must be one of"),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else "",
)
def test_bad_constructor_arguments(override, message):
    with pytest.raises(ValueError, match=message):
        DINOLoss(**{**ARGS, **override})


# --- two ranks (gloo) against one process on the same global batch ---

WORLD, B_LOCAL, V, K = 2, 2, 3, 64


def local_rows(x, ncrops, rank):
    """This rank's rows of a crop-major (ncrops * WORLD * B_LOCAL, K) global batch."""
    return torch.cat([chunk[rank * B_LOCAL:(rank + 1) * B_LOCAL] for chunk in x.chunk(ncrops)])


def run_steps(rank, norm):
    """Two loss calls on this rank's share of two fixed global batches; rank None means the whole batch."""
    torch.manual_seed(0)
    loss_fn = DINOLoss(K, V, 0.04, 0.07, 1, 2, impl="torch", teacher_norm=norm)
    losses = []
    for epoch in range(2):
        student, teacher = batch(V, WORLD * B_LOCAL, K, shift=1.0)
        if rank is not None:
            student, teacher = local_rows(student, V, rank), local_rows(teacher, 2, rank)
        losses.append(loss_fn(student, teacher, epoch))
    probs = sinkhorn_knopp_teacher(teacher, 0.05)
    return dict(losses=torch.stack(losses), center=loss_fn.center, probs=probs)


def _distributed_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save({norm: run_steps(rank, norm) for norm in TEACHER_NORMS}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    """Center (all-reduced column sums) and Sinkhorn-Knopp (all-reduced sums) see the global batch; the mean of
    the rank losses is the single-process loss."""
    mp.spawn(_distributed_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for norm in TEACHER_NORMS:
        single = run_steps(None, norm)
        assert_close(torch.stack([r[norm]["losses"] for r in ranks]).mean(0), single["losses"],
                     **TOL[torch.float32], name=f"{norm} losses")
        for rank, result in enumerate(ranks):
            assert_close(result[norm]["center"], single["center"], **TOL[torch.float32], name=f"{norm} center")
            assert_close(result[norm]["probs"], local_rows(single["probs"], 2, rank), **TOL[torch.float32],
                         name=f"rank {rank} Sinkhorn-Knopp probabilities")
