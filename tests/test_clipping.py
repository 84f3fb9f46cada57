"""Gradient clipping: per tensor as the official DINO `utils.clip_gradients`, globally as torch's `clip_grad_norm_`;
both return the norm of all gradients before clipping, non-finite when any gradient is."""
import pytest
import torch

from _helpers import assert_close
from fastdino.engine.clipping import clip_gradients_
from fastdino.official_dino import clip_gradients as official_clip_gradients

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6)}  # same math in the same order: rounding of the norm only


def parameters(scales, seed=0):
    """Parameters with odd shapes whose gradients have norms of about `scales` (None: no gradient)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, scale in enumerate(scales):
        p = torch.nn.Parameter(torch.zeros(3 + i, 5))
        if scale is not None:
            p.grad = torch.randn(p.shape, generator=g) * scale / (p.numel() ** 0.5)
        params.append(p)
    return params


def test_per_tensor_is_the_official_clip_gradients():
    scales = [0.5, 2.9, 3.1, 40.0, None, 7.0]
    ours, official = parameters(scales), parameters(scales)
    model = torch.nn.Module()
    for i, p in enumerate(official):
        model.register_parameter(f"p{i}", p)
    before = [p.grad.clone() for p in ours if p.grad is not None]
    norm = clip_gradients_(ours, 3.0, "per_tensor")
    norms = official_clip_gradients(model, 3.0)
    assert 0 < sum(n > 3.0 for n in norms) < len(norms)  # some tensors clipped, others left alone
    for p, q in zip(ours, official):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert_close(p.grad, q.grad, **TOL[torch.float32], name="clipped gradient")
    assert_close(norm, torch.cat([g.flatten() for g in before]).norm(), **TOL[torch.float32], name="returned norm")


def test_global_is_torch_clip_grad_norm():
    ours, expected = parameters([0.5, 2.9, 40.0]), parameters([0.5, 2.9, 40.0])
    norm = clip_gradients_(ours, 3.0, "global")
    assert_close(norm, torch.nn.utils.clip_grad_norm_(expected, 3.0), **TOL[torch.float32], name="norm")
    for p, q in zip(ours, expected):
        assert_close(p.grad, q.grad, **TOL[torch.float32], name="clipped gradient")


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
def test_zero_max_norm_measures_without_clipping(mode):
    params = parameters([0.5, 40.0])
    before = [p.grad.clone() for p in params]
    norm = clip_gradients_(params, 0.0, mode)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert_close(norm, torch.cat([b.flatten() for b in before]).norm(), **TOL[torch.float32], name="norm")


@pytest.mark.parametrize("mode", ["global", "per_tensor"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_gradient_gives_a_non_finite_norm(mode, poison):
    params = parameters([0.5, 4.0, 40.0])
    params[1].grad[2, 3] = poison
    assert not torch.isfinite(clip_gradients_(params, 3.0, mode))
