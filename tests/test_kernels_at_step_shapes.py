"""The Triton kernels at the exact shapes of the ViT-S/16 step (batch 128, 2 + 10 crops, K=65536; the EMA over the
model's own parameter list) against the plain-PyTorch references, on CUDA: the launch specialisations the training
step compiles, which the interpreter tests (tiny shapes, CPU) do not reach. GPU only: the GPU check runs them first
(benchmarks/gpu_check.py, step "kernels"), and their compiled kernels then sit in its shared Triton cache."""
import pytest
import torch
from _helpers import assert_close

from fastdino.engine.head import DINOHead
from fastdino.engine.vit import build_backbone
from fastdino.kernels import EMAUpdate, dino_loss
from fastdino.kernels.reference import dino_loss_ref, ema_update_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="the step's shapes run compiled on CUDA (GPU check)")]
BATCH, CROPS, K = 128, 12, 65536
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
# As tests/test_dino_loss.py: both sides round the student gradient to the storage dtype (one ulp apart at most).
LOSS_TOL = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.float16: dict(atol=1e-5, rtol=1e-3),
    torch.bfloat16: dict(atol=5e-3, rtol=5e-2),
}
# One rounding of teacher + (1 - m) * (student - teacher) to fp32 on each side (tests/test_ema.py).
EMA_TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dino_loss_at_the_step_shapes(dtype):
    student = torch.randn(CROPS * BATCH, K, device="cuda").to(dtype)  # (V*B, K)
    teacher = torch.randn(2 * BATCH, K, device="cuda").to(dtype)  # (2*B, K)
    center = torch.randn(1, K, device="cuda") * 0.1
    results = []
    for loss_fn in (dino_loss_ref, lambda *a, **kw: dino_loss(*a, impl="triton", **kw)):
        s = student.clone().requires_grad_(True)
        loss, colsum, entropy = loss_fn(s, teacher, center, STUDENT_TEMP, TEACHER_TEMP, CROPS, return_entropy=True)
        loss.backward()
        results.append((loss, colsum, entropy, s.grad))
    for name, actual, expected in zip(("loss", "colsum", "entropy", "grad"), results[1], results[0]):
        assert_close(actual, expected, **LOSS_TOL[dtype], name=name)


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_ema_at_the_step_shapes(student_dtype):
    """The trainer's EMAUpdate over ViT-S/16 + its head (fp32 teacher), momentum a 0-d CUDA tensor."""
    backbone = build_backbone("vit_small", 16)
    shapes = [p.shape for module in (backbone, DINOHead(backbone.embed_dim, K)) for p in module.parameters()]
    teacher = [torch.randn(s, device="cuda") for s in shapes]
    student = [torch.randn(s, device="cuda").to(student_dtype) for s in shapes]
    expected = [t.clone() for t in teacher]
    momentum = torch.tensor(0.996, device="cuda")
    assert EMAUpdate(teacher, student, impl="triton")(momentum) == "triton"
    ema_update_ref(expected, student, momentum)
    for i, (actual, want) in enumerate(zip(teacher, expected)):
        assert_close(actual, want, **EMA_TOL, name=f"teacher tensor {i} {tuple(actual.shape)}")
