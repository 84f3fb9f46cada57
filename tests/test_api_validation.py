"""The public API validates what it accepts, with a ValueError naming the argument: a tensor momentum out of
[0, 1] or NaN (read when it is on the CPU; one on an accelerator is the kernel's to read, see kernels/ema.py),
numpy arrays or integer tensors given as tensors; `EMAUpdate` follows parameters whose storage moved
(`teacher.to(dtype)`, `p.data = ...`) on the next call. fp16 / bf16 backbone weights load for evaluation."""
import numpy as np
import pytest
import torch
from _helpers import assert_close

from fastdino.engine.backbone_io import RUN_FILE, save_backbone
from fastdino.engine.vit import build_backbone
from fastdino.kernels import EMAUpdate, dino_loss, ema_update_, fused_head_loss
from fastdino.kernels.reference import ema_update_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pairs(n=3):
    teachers = [torch.randn(5, 7, device=DEVICE) for _ in range(n)]
    return teachers, [torch.randn(5, 7, device=DEVICE) for _ in range(n)]


@pytest.mark.parametrize("value", [2.0, -0.1, float("nan"), float("inf")])
@pytest.mark.parametrize("api", ["ema_update_", "EMAUpdate"])
def test_a_cpu_tensor_momentum_out_of_range_is_refused(api, value):
    teachers, students = _pairs()
    before = [t.clone() for t in teachers]
    update = (lambda m: ema_update_(teachers, students, m)) if api == "ema_update_" else EMAUpdate(teachers, students)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got a tensor holding"):
        update(torch.tensor(value))
    assert all(torch.equal(t, b) for t, b in zip(teachers, before)), "a refused call changed the teacher"
    update(torch.tensor(0.5))  # in range: accepted


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.numpy(force=True), r"teacher_params\[1\] must be a floating-point torch.Tensor, got a ndarray"),
    (lambda t: t.long(), r"teacher_params\[1\] must be a floating-point torch.Tensor, got a torch.int64 tensor"),
])
@pytest.mark.parametrize("api", ["ema_update_", "EMAUpdate"])
def test_ema_inputs_that_are_no_float_tensors_are_refused(api, bad, message):
    teachers, students = _pairs()
    teachers[1] = bad(teachers[1])
    with pytest.raises(ValueError, match=message):
        if api == "ema_update_":
            ema_update_(teachers, students, 0.9)
        else:
            EMAUpdate(teachers, students)(0.9)


@pytest.mark.parametrize("impl", ["triton", "foreach"])
@pytest.mark.parametrize("move", ["module.to(float16)", "p.data = ..."])
def test_ema_update_follows_parameters_whose_storage_moved(impl, move):
    teacher, student = torch.nn.Linear(7, 5).to(DEVICE), torch.nn.Linear(7, 5).to(DEVICE)
    update = EMAUpdate(list(teacher.parameters()), list(student.parameters()), impl=impl)
    update(0.9)
    if move == "module.to(float16)":
        teacher.to(torch.float16)
    else:
        teacher.weight.data = torch.randn(5, 7, device=DEVICE)
    expected = [p.detach().clone() for p in teacher.parameters()]
    assert update(0.5) == impl
    ema_update_ref(expected, list(student.parameters()), 0.5)
    for i, (p, e) in enumerate(zip(teacher.parameters(), expected)):
        tol = dict(atol=1e-3, rtol=1e-3) if p.dtype == torch.float16 else dict(atol=1e-6, rtol=1e-6)  # fp16 rounding
        assert_close(p, e, **tol, name=f"teacher param {i} after the move")


def test_dino_loss_names_an_argument_that_is_no_tensor():
    student, teacher = torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="student_logits must be a torch.Tensor, got a ndarray; torch.from_numpy"):
        dino_loss(student.numpy(), teacher, None, 0.1, 0.04, 4)
    with pytest.raises(ValueError, match="teacher must be a torch.Tensor, got a ndarray"):
        dino_loss(student, teacher.numpy(), None, 0.1, 0.04, 4)
    with pytest.raises(ValueError, match="center must be a torch.Tensor or None, got a ndarray"):
        dino_loss(student, teacher, np.zeros(16, np.float32), 0.1, 0.04, 4)
    with pytest.raises(ValueError, match="center must be a floating-point tensor, got torch.int64"):
        dino_loss(student, teacher, torch.zeros(16, dtype=torch.long), 0.1, 0.04, 4)
    features, weight = torch.nn.functional.normalize(torch.randn(8, 6), dim=1), torch.randn(16, 6)
    with pytest.raises(ValueError, match="teacher_features must be a torch.Tensor, got a ndarray"):
        fused_head_loss(features, weight, features[:4].numpy(), weight, None, 0.1, 0.04, ncrops=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_evaluate_like_their_float32_values(tmp_path, tiny_dataset, fastdino_here, dtype):
    from safetensors import safe_open

    torch.manual_seed(0)
    weights = build_backbone("vit_tiny", 16, img_size=32, embed_dim=32, depth=1, num_heads=2).state_dict()
    features = {}
    for name, stored in (("half", dtype), ("float", torch.float32)):
        run = tmp_path / name
        state = {k: v.to(dtype).to(stored) for k, v in weights.items()}  # the same values, stored two ways
        save_backbone(state, run / RUN_FILE, arch="vit_tiny", patch_size=16, img_size=32,
                      extra={"model": {"num_heads": 2}})
        out = tmp_path / f"{name}.safetensors"
        args = ["--checkpoint", run, "--data", tiny_dataset, "--num-workers", "0", "--batch-size", "16"]
        knn = fastdino_here("knn", *args)
        assert knn.returncode == 0 and "top-1" in knn.stdout, knn.stderr
        exported = fastdino_here("export", *args, "--output", out)
        assert exported.returncode == 0, exported.stderr
        with safe_open(str(out), framework="pt") as f:
            features[name] = f.get_tensor("val_features")
    assert torch.equal(features["half"], features["float"])
