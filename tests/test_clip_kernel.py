"""Clip coefficients in one Triton launch (interpreter on CPU) against the torch reference, and the reference
against the official DINO `utils.clip_gradients` applied by hand."""
import pytest
import torch
from _helpers import assert_close

from fastdino.kernels.clip import BLOCK, clip_coefficients
from fastdino.kernels.reference import clip_coefficients_ref
from fastdino.official_dino import clip_gradients as official_clip_gradients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sums of squares in another order than torch's norm: a few fp32 ulps of the norms.
TOL = dict(atol=1e-6, rtol=1e-5)
# A bias, a 0-d scalar, an empty tensor, one full block, a block + 1, matrices; scales put some above max_norm.
SHAPES = [(384,), (), (0,), (BLOCK,), (BLOCK + 1,), (3, 1000), (3 * BLOCK + 5,)]
SCALES = [5.0, 1.0, 1.0, 0.01, 3.0, 0.1, 10.0]


def gradients(dtype=torch.float32):
    return [(torch.randn(s) * k).to(DEVICE, dtype) for s, k in zip(SHAPES, SCALES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["per_tensor", "global"])
@pytest.mark.parametrize("max_norm", [3.0, 0.0])
def test_matches_reference_twice_in_a_row(mode, max_norm, dtype):
    """The second call reuses the launch plan and the tickets the first one reset."""
    grads = gradients(dtype)
    expected = clip_coefficients_ref(grads, max_norm, mode)
    for call in range(2):
        actual = clip_coefficients(grads, max_norm, mode, impl="triton")
        for name, a, e in zip(("coefficients", "norm", "skip"), actual, expected):
            assert_close(a, e, **TOL, name=f"{name} (call {call})")
    if max_norm:
        assert 0 < int((expected[0] < 1).sum()) < len(SHAPES) or mode == "global"


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_gradient_sets_the_skip_flag(poison):
    grads = gradients()
    grads[4][7] = poison
    coefficients, norm, skip = clip_coefficients(grads, 3.0, "per_tensor", impl="triton")
    assert not torch.isfinite(norm) and float(skip) == 1.0
    grads[4][7] = 0.0
    assert float(clip_coefficients(grads, 3.0, "per_tensor", impl="triton")[2]) == 0.0


def test_reference_is_the_official_clip_gradients():
    """Gradients multiplied by the per-tensor coefficients equal the official in-place clip; the norm is the total
    before clipping."""
    grads = [g for g in gradients() if g.numel()]
    model = torch.nn.Module()
    for i, g in enumerate(grads):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros_like(g, device="cpu")))
        getattr(model, f"p{i}").grad = g.cpu().clone()
    coefficients, norm, _ = clip_coefficients_ref(grads, 3.0, "per_tensor")
    official_clip_gradients(model, 3.0)
    for i, (g, c) in enumerate(zip(grads, coefficients)):
        assert_close(g * c, getattr(model, f"p{i}").grad, atol=1e-7, rtol=1e-6, name=f"clipped gradient {i}")
    assert_close(norm, torch.cat([g.flatten() for g in grads]).norm(), **TOL, name="norm")


def test_misuse_names_the_argument():
    with pytest.raises(ValueError, match="grads must be a non-empty list"):
        clip_coefficients([], 3.0, "per_tensor")
    with pytest.raises(ValueError, match=r"grads\[1\] must be a floating-point"):
        clip_coefficients([torch.zeros(3), torch.zeros(3, dtype=torch.int64)], 3.0, "per_tensor")
    with pytest.raises(ValueError, match="max_norm must be a number >= 0"):
        clip_coefficients([torch.zeros(3)], -1.0, "per_tensor")
    with pytest.raises(ValueError, match="mode must be one of"):
        clip_coefficients([torch.zeros(3)], 3.0, "per_layer")
    with pytest.raises(ValueError, match='impl="triton" cannot take these gradients'):
        clip_coefficients([torch.zeros(3), torch.zeros(3, dtype=torch.float16)], 3.0, "global", impl="triton")
