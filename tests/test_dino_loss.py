"""Fused DINO loss (Triton, interpreter on CPU) against the plain-PyTorch reference `dino_loss_ref`."""
import importlib

import pytest
import torch
from _helpers import assert_close

from fastdino.kernels import _launch, dino_loss
from fastdino.kernels.reference import dino_loss_ref

dino_loss_module = importlib.import_module("fastdino.kernels.dino_loss")

TOL = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    # Both sides round the student gradient to fp16, so they may differ by one fp16 ulp (2^-10 ~ 9.8e-4 relative).
    torch.float16: dict(atol=1e-5, rtol=1e-3),
    torch.bfloat16: dict(atol=5e-3, rtol=5e-2),
}
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU (interpreter bf16 is inexact)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, gpu])]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel output buffers start as NaN, so any element a kernel forgets to write fails the comparison."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_launch, "empty", nan_empty)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 student / 128 teacher columns: K=1000 spans several blocks and ends in a partial one."""
    monkeypatch.setitem(dino_loss_module.MAX_BLOCK_K, "cpu", 256)
    monkeypatch.setattr(dino_loss_module, "MAX_BLOCK_T", 128)


def make_inputs(ncrops, batch, k, dtype, center=True, probs=False, scale=1.0):
    student = (torch.randn(ncrops * batch, k, device=DEVICE) * scale).to(dtype)
    teacher = torch.randn(2 * batch, k, device=DEVICE) * scale
    if probs:  # e.g. Sinkhorn-Knopp output; rows scaled off 1 to check that sum_k q is not assumed
        teacher = torch.softmax(teacher / 0.3, dim=-1) * torch.rand(2 * batch, 1, device=DEVICE).add(0.5)
    c = torch.randn(1, k, device=DEVICE) * 0.1 if center else None
    return student, teacher.to(dtype), c


def run(impl, student, teacher, center, ncrops, grad_scale=1.0, **kwargs):
    """loss, colsum, entropy and d(grad_scale * loss)/d student for one implementation, on a fresh leaf."""
    s = student.detach().clone().requires_grad_(True)
    if impl == "torch":
        loss, colsum, entropy = dino_loss_ref(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP, ncrops,
                                              return_entropy=True, **kwargs)
    else:
        loss, colsum, entropy = dino_loss(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP, ncrops, impl="triton",
                                          return_entropy=True, **kwargs)
    (loss * grad_scale).backward()
    return loss, colsum, entropy, s.grad


def assert_matches_reference(student, teacher, center, ncrops, dtype, grad_scale=1.0, **kwargs):
    expected = run("torch", student, teacher, center, ncrops, grad_scale, **kwargs)
    actual = run("triton", student, teacher, center, ncrops, grad_scale, **kwargs)
    for name, a, e in zip(("loss", "colsum", "entropy", "grad"), actual, expected):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, **TOL[dtype], name=name)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", [True, False], ids=["center", "no_center"])
@pytest.mark.parametrize(
    "ncrops, batch, k", [(2, 1, 1000), (4, 3, 1000), (12, 2, 700)], ids=["V2_B1", "V4_B3", "V12_B2"]
)
def test_matches_reference(ncrops, batch, k, center, dtype):
    student, teacher, c = make_inputs(ncrops, batch, k, dtype, center=center)
    assert_matches_reference(student, teacher, c, ncrops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_size_k_default_blocks(dtype):
    """K = 65536 prototypes (the DINO default) with the launch heuristics as shipped."""
    student, teacher, c = make_inputs(3, 1, 65536, dtype)
    assert_matches_reference(student, teacher, c, 3, dtype)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_probabilities(dtype):
    """teacher_is_probs (Sinkhorn-Knopp path): center and teacher_temp unused, unnormalised rows handled exactly."""
    student, teacher, c = make_inputs(5, 2, 1000, dtype, probs=True)
    assert_matches_reference(student, teacher, c, 5, dtype, teacher_is_probs=True)


@pytest.mark.usefixtures("small_blocks")
def test_all_options_strided_large_logits_scaled_grad():
    """Every non-default at once: row-strided inputs, large logits (softmax stability), grad_output != 1."""
    student, teacher, c = make_inputs(6, 3, 1000 + 24, torch.float32, scale=30.0)
    student, teacher = student[:, 24:], teacher[:, :1000]  # row stride 1024 != K
    assert_matches_reference(student, teacher, c.reshape(-1)[:1000], 6, torch.float32, grad_scale=3.5)


@pytest.mark.usefixtures("small_blocks")
def test_no_grad_forward_matches():
    student, teacher, c = make_inputs(4, 2, 1000, torch.float32)
    with torch.no_grad():
        actual = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 4, impl="triton")
    expected = dino_loss_ref(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 4)
    for name, a, e in zip(("loss", "colsum"), actual, expected):
        assert_close(a, e, **TOL[torch.float32], name=name)


def test_backward_twice_is_an_error():
    student, teacher, c = make_inputs(2, 1, 300, torch.float32)
    student.requires_grad_(True)
    loss, _ = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2, impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_impl_selection(monkeypatch):
    student, teacher, c = make_inputs(2, 1, 300, torch.float32)
    student.requires_grad_(True)
    fused = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2, impl="triton")[0]
    assert type(fused.grad_fn).__name__ == "DINOLossFunctionBackward"
    if DEVICE == "cpu":  # auto takes the reference on CPU tensors, Triton on CUDA tensors
        auto = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2)[0]
        assert type(auto.grad_fn).__name__ != "DINOLossFunctionBackward"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match='impl="torch"'):
            dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2, impl="triton")
    with pytest.raises(ValueError, match="impl must be"):
        dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2, impl="cuda")


K = 64
BAD_ARGS = {
    "rows_not_divisible_by_ncrops": (dict(student=torch.zeros(7, K)), "not a positive multiple of ncrops"),
    "teacher_rows_not_2B": (dict(teacher=torch.zeros(3, K)), r"teacher must have shape \(2\*B, K\)"),
    "teacher_K_mismatch": (dict(teacher=torch.zeros(4, K + 1)), r"teacher must have shape"),
    "center_K_mismatch": (dict(center=torch.zeros(1, K + 1)), "center must have shape"),
    "zero_student_temp": (dict(student_temp=0.0), "student_temp must be a positive number, got 0.0"),
    "negative_teacher_temp": (dict(teacher_temp=-0.04), "teacher_temp must be a positive number, got -0.04"),
    "single_crop": (dict(ncrops=1, student=torch.zeros(2, K)), "ncrops must be an int >= 2"),
    "1d_student": (dict(student=torch.zeros(8 * K)), "student_logits must be a 2-D"),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(case, impl):
    args = dict(student=torch.zeros(8, K), teacher=torch.zeros(4, K), center=torch.zeros(1, K),
                student_temp=0.1, teacher_temp=0.04, ncrops=4)
    override, message = BAD_ARGS[case]
    args.update(override)
    with pytest.raises(ValueError, match=message):
        dino_loss(args["student"].to(DEVICE), args["teacher"].to(DEVICE), args["center"].to(DEVICE),
                  args["student_temp"], args["teacher_temp"], args["ncrops"], impl=impl)
