"""EMA teacher update (one Triton launch, interpreter on CPU) against the `torch._foreach_lerp_` reference."""
import math

import pytest
import torch
from _helpers import assert_close

from fastdino.kernels import EMAUpdate, _launch, ema_update_
from fastdino.kernels.reference import ema_update_ref

# Keyed by the student dtype. The math is fp32 either way (a bf16 student converts to fp32 exactly), and both sides
# round teacher + (1 - m) * (student - teacher) once to fp32: a few fp32 ulps at most.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-6, rtol=1e-6)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ViT-like mix: a bias, a 0-d scalar, an empty tensor, one full 4096-element block, one block + 1, matrices.
SHAPES = [(384,), (), (0,), (4096,), (4097,), (3, 1000), (65, 65), (2, 3, 7)]


GAP = 1234.5  # fills the memory between packed tensors; any write there changes it


def packed(shapes, dtype, offset):
    """Tensors as views into one buffer, `offset` (+1 gap) elements apart, and the buffer to check the gaps."""
    numels = [math.prod(s) for s in shapes]
    buf = torch.full((sum(numels) + (offset + 1) * len(shapes),), GAP, dtype=dtype, device=DEVICE)
    views, start = [], 0
    for shape, n in zip(shapes, numels):
        start += offset
        views.append(buf[start:start + n].view(shape))
        views[-1].copy_(torch.randn(shape))
        start += n + 1
    return views, buf


def gaps_untouched(buf, views):
    written = torch.zeros_like(buf, dtype=torch.bool)
    for v in views:
        if v.numel():
            start = (v.data_ptr() - buf.data_ptr()) // buf.element_size()
            written[start:start + v.numel()] = True
    return bool((buf[~written] == GAP).all())


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_matches_reference_mixed_sizes(offset, student_dtype):
    """Two updates in a row (the second reuses the cached launch table), float then 0-d tensor momentum; nothing
    outside the tensors is written (gaps keep GAP), every element inside is (compared with the reference)."""
    teachers, buf = packed(SHAPES, torch.float32, offset)
    students = [torch.randn(s, device=DEVICE).to(student_dtype) for s in SHAPES]
    expected = [t.clone() for t in teachers]
    for momentum in (0.996, torch.tensor(0.9, device=DEVICE)):
        assert ema_update_(teachers, students, momentum, impl="triton") == "triton"
        ema_update_ref(expected, students, momentum)
        for i, (a, e) in enumerate(zip(teachers, expected)):
            assert_close(a, e, **TOL[student_dtype], name=f"teacher[{i}] {tuple(a.shape)}")
    assert gaps_untouched(buf, teachers), "the kernel wrote outside the teacher tensors"


def test_new_storage_rebuilds_the_launch_plan():
    """The cached plan is keyed on the tensors' storage: after `p.data = ...` (new storage, same parameter object)
    the update goes to the new storage, not the old one."""
    teachers = [torch.nn.Parameter(torch.randn(s, device=DEVICE), requires_grad=False) for s in SHAPES]
    students = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]
    ema_update_(teachers, students, 0.9, impl="triton")
    old = teachers[3].data
    teachers[3].data = torch.randn(SHAPES[3], device=DEVICE)
    old_before, expected = old.clone(), [t.detach().clone() for t in teachers]
    ema_update_(teachers, students, 0.5, impl="triton")
    ema_update_ref(expected, students, 0.5)
    for i, (a, e) in enumerate(zip(teachers, expected)):
        assert_close(a, e, **TOL[torch.float32], name=f"teacher[{i}]")
    assert torch.equal(old, old_before), "the old storage was updated"


@pytest.mark.parametrize("impl", ["triton", "foreach"])
def test_plan_object_matches_reference_and_is_rebuilt_when_told(impl):
    """EMAUpdate (the trainer's, plan held between calls) equals the reference over calls with float and tensor
    momentum; after `p.data = ...` it says its storage moved, updates nothing freed, and `rebuild()` follows the
    new storage; a parameter appended to the lists is picked up without being told."""
    teachers = [torch.nn.Parameter(torch.randn(s, device=DEVICE), requires_grad=False) for s in SHAPES]
    students = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]
    expected = [t.detach().clone() for t in teachers]
    update = EMAUpdate(teachers, students, impl=impl)
    for momentum in (0.996, torch.tensor(0.9, device=DEVICE), 0.5):
        assert update(momentum) == impl
        ema_update_ref(expected, students, momentum)
        for i, (a, e) in enumerate(zip(teachers, expected)):
            assert_close(a, e, **TOL[torch.float32], name=f"teacher[{i}] after momentum {momentum}")
    assert not update.storage_moved()
    old = teachers[3].data
    old_before = old.clone()
    teachers[3].data = torch.randn(SHAPES[3], device=DEVICE)
    expected[3] = teachers[3].detach().clone()
    assert update.storage_moved()
    update.rebuild()
    assert update(0.7) == impl and not update.storage_moved()
    ema_update_ref(expected, students, 0.7)
    teachers.append(torch.nn.Parameter(torch.randn(7, device=DEVICE), requires_grad=False))
    students.append(torch.nn.Parameter(torch.randn(7, device=DEVICE)))
    expected.append(teachers[-1].detach().clone())
    update(0.3)
    ema_update_ref(expected, students, 0.3)
    for i, (a, e) in enumerate(zip(teachers, expected)):
        assert_close(a, e, **TOL[torch.float32], name=f"teacher[{i}] after the rebuilds")
    assert torch.equal(old, old_before), "the rebuilt plan updated the old storage"
    with pytest.raises(ValueError, match="momentum must be a number in"):
        update(1.5)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds_exact(momentum):
    teachers = [torch.randn(s, device=DEVICE) for s in SHAPES]
    students = [torch.randn(s, device=DEVICE) for s in SHAPES]
    expected = [(s if momentum == 0.0 else t).clone() for t, s in zip(teachers, students)]
    ema_update_(teachers, students, momentum, impl="triton")
    for i, (a, e) in enumerate(zip(teachers, expected)):
        assert_close(a, e, atol=0.0, rtol=0.0, name=f"teacher[{i}]")


def test_reference_is_the_official_update():
    """The reference equals DINO's per-parameter `param_k.mul_(m).add_((1 - m) * param_q)` loop."""
    teachers = [torch.randn(s) for s in SHAPES]
    students = [torch.randn(s) for s in SHAPES]
    official = [t.clone() for t in teachers]
    momentum = 0.996
    ema_update_ref(teachers, students, momentum)
    for param_k, param_q in zip(official, students):
        param_k.mul_(momentum).add_((1 - momentum) * param_q)
    for i, (a, e) in enumerate(zip(teachers, official)):
        assert_close(a, e, **TOL[torch.float32], name=f"teacher[{i}]")


def test_dtensor_local_shards(tmp_path):
    """FSDP2 parameters are DTensors: the update goes through their local shards."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    backend = "nccl" if DEVICE == "cuda" else "gloo"  # the compiled kernel takes CUDA shards only
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(DEVICE, (1,))
        shapes = [(384,), (65, 65), (4097,)]
        teachers = [torch.nn.Parameter(distribute_tensor(torch.randn(s, device=DEVICE), mesh, [Shard(0)]),
                                       requires_grad=False) for s in shapes]
        students = [torch.nn.Parameter(distribute_tensor(torch.randn(s, device=DEVICE), mesh, [Shard(0)]))
                    for s in shapes]
        expected = [t.to_local().clone() for t in teachers]
        assert ema_update_(teachers, students, 0.99, impl="triton") == "triton"
        ema_update_ref(expected, [s.to_local() for s in students], 0.99)
        for i, (a, e) in enumerate(zip(teachers, expected)):
            assert_close(a.to_local(), e, **TOL[torch.float32], name=f"teacher[{i}]")
    finally:
        dist.destroy_process_group()


def test_paths():
    teachers = [torch.randn(5, device=DEVICE)]
    students = [torch.randn(5, device=DEVICE)]
    assert ema_update_(teachers, students, 0.9, impl="foreach") == "foreach"
    expected_auto = "triton" if DEVICE == "cuda" else "foreach"
    assert ema_update_(teachers, students, 0.9) == expected_auto
    doubles = [t.double() for t in teachers], [s.double() for s in students]
    with pytest.raises(ValueError, match='impl="foreach"'):  # float64 has no Triton path
        ema_update_(*doubles, 0.9, impl="triton")
    assert ema_update_(*doubles, 0.9) == "foreach"  # auto takes the fallback (and logs why)
    with pytest.raises(ValueError, match='impl="foreach"'):  # a GPU-compiled kernel cannot take CPU tensors
        _launch.select_impl("ema_update_", "triton", torch.device("cpu"), "foreach", object())


@pytest.mark.parametrize(
    "teachers, students, momentum, message",
    [
        ([torch.zeros(3)], [], 0.9, "1 teacher tensors but 0 student"),
        ([torch.zeros(3)], [torch.zeros(4)], 0.9, r"teacher_params\[0\] has shape \(3,\), student_params\[0\] \(4,\)"),
        ([torch.zeros(3)], [torch.zeros(3)], 1.5, "momentum must be a number in"),
        ([torch.zeros(3)], [torch.zeros(3)], torch.zeros(2), "momentum tensor must be 0-d"),
    ],
    ids=["length", "shape", "momentum_range", "momentum_shape"],
)
def test_bad_arguments(teachers, students, momentum, message):
    with pytest.raises(ValueError, match=message):
        ema_update_(teachers, students, momentum)
