"""Fused DINO loss (Triton, interpreter on CPU) against the plain-PyTorch reference `dino_loss_ref`."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

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
    """Chunks of 256 columns: K=1000 spans several chunks and ends in a partial one. Two images per forward program
    (B*4 chunks / 6 target programs): with B = 3 the last image group is partial. Column sums combined 128 columns a
    program."""
    for device_type in dino_loss_module.MAX_BLOCK_K:
        monkeypatch.setitem(dino_loss_module.MAX_BLOCK_K, device_type, 256)
    monkeypatch.setattr(dino_loss_module, "TARGET_PROGRAMS", 6)
    monkeypatch.setattr(dino_loss_module, "MAX_IMAGES_PER_PROGRAM", 2)
    monkeypatch.setattr(dino_loss_module, "COMBINE_BLOCK_C", 128)


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
    "ncrops, batch, k", [(2, 1, 1000), (4, 3, 1000), (12, 2, 700), (3, 2, 1024)],
    ids=["V2_B1", "V4_B3", "V12_B2", "V3_B2_even_K"],  # even K: every chunk full, the unmasked path
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
def test_fp16_small_gradients_survive_loss_scale():
    """fp16 with a GradScaler-like grad_output of 2^16: most dS entries are below fp16's smallest subnormal before the
    scale and well inside fp16's range after it. The scale must be applied in fp32 before the cast to fp16 (as the
    reference's autograd does), or those entries flush to zero."""
    student, teacher, c = make_inputs(12, 4, 4096, torch.float16)
    expected = run("torch", student, teacher, c, 12, grad_scale=2.0**16)[3]
    tiny = (expected != 0) & (expected.abs() < 2.0**-8)  # entries that were < 2^-24 (fp16's min) before the scale
    assert tiny.float().mean() > 0.1, "the inputs must produce many gradient entries that need the scale"
    assert_matches_reference(student, teacher, c, 12, torch.float16, grad_scale=2.0**16)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_positions_match_reference(where, probs):
    """A NaN in one input element poisons exactly the outputs it poisons in the reference: the loss, the student
    rows paired with a NaN teacher row (or the NaN student row), one column of the teacher sum, one entropy."""
    student, teacher, c = make_inputs(4, 3, 1000, torch.float32, probs=probs)
    if where == "student":
        student[5, 17] = float("nan")
    else:
        teacher[4, 300] = float("nan")  # teacher row 4 = global crop 1 of image 1
    assert_matches_reference(student, teacher, c, 4, torch.float32, teacher_is_probs=probs)


@pytest.mark.usefixtures("small_blocks")
def test_no_grad_forward_matches():
    student, teacher, c = make_inputs(4, 2, 1000, torch.float32)
    with torch.no_grad():
        actual = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 4, impl="triton")
    expected = dino_loss_ref(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 4)
    for name, a, e in zip(("loss", "colsum"), actual, expected):
        assert_close(a, e, **TOL[torch.float32], name=name)


@pytest.mark.usefixtures("small_blocks")
def test_backward_twice_accumulates():
    """Backward recomputes dS from the saved statistics, so a retained graph can be run again (gradients add up),
    and the center updated in place after the forward (as DINOLoss does) does not change the gradient."""
    student, teacher, c = make_inputs(3, 2, 1000, torch.float32)
    expected = run("torch", student, teacher, c, 3)[3]
    s = student.detach().clone().requires_grad_(True)
    center = c.clone()
    loss, _ = dino_loss(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP, 3, impl="triton")
    center.mul_(0.9).add_(1.0)
    loss.backward(retain_graph=True)
    assert_close(s.grad, expected, **TOL[torch.float32], name="grad, first backward")
    loss.backward()
    assert_close(s.grad, 2 * expected, **TOL[torch.float32], name="grad, after the second backward")


def test_impl_selection():
    student, teacher, c = make_inputs(2, 1, 300, torch.float32)
    student.requires_grad_(True)
    fused = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2, impl="triton")[0]
    assert type(fused.grad_fn).__name__ == "DINOLossFunctionBackward"
    auto = dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2)[0]
    auto_is_fused = type(auto.grad_fn).__name__ == "DINOLossFunctionBackward"
    assert auto_is_fused == (DEVICE == "cuda"), "auto: Triton on CUDA tensors, the reference on CPU tensors"
    with pytest.raises(ValueError, match="impl must be"):
        dino_loss(student, teacher, c, STUDENT_TEMP, TEACHER_TEMP, 2, impl="cuda")
    # A kernel compiled for the GPU (not in the interpreter) cannot take CPU tensors: the error names the fallback.
    not_interpreted = object()
    with pytest.raises(ValueError, match='impl="torch"'):
        _launch.select_impl("dino_loss", "triton", torch.device("cpu"), "torch", not_interpreted)


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


def test_kernels_compile_for_h100():
    """All Triton kernels of fastdino.kernels (loss, EMA, the update) compile to sm_90 code without spills, and the
    EMA's aligned full blocks use 128-bit accesses, without a GPU, which the interpreter alone does not prove. Runs
    `benchmarks/aot_report.py --check` in a fresh process, where TRITON_INTERPRET is unset."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "aot_report.py"
    result = subprocess.run([sys.executable, str(script), "--check"], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "compiled" in result.stdout, (result.stdout + result.stderr)[-3000:]
