"""AdamW over a list of tensors in one Triton launch (interpreter on CPU) against torch's fused AdamW: two groups
(decay and none), per-tensor gradient coefficients, a skipped step, gradients zeroed in place."""
import pytest
import torch
from _helpers import assert_close

from fastdino.kernels.adamw import BLOCK, adamw_step_
from fastdino.kernels.reference import adamw_step_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Bias corrections by exp2/log2 here, by pow in torch: a few fp32 ulps of the update per step.
TOL = dict(atol=2e-6, rtol=1e-5)
SHAPES = [(384,), (), (BLOCK,), (BLOCK + 1,), (3, 100), (0,)]
DECAYED = 3  # the first three tensors are in the decayed group
LR, WD = 0.01, 0.3


def make(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]
    optimizer = torch.optim.AdamW([{"params": params[:DECAYED]}, {"params": params[DECAYED:], "weight_decay": 0.0}],
                                  lr=LR, weight_decay=WD, fused=True)
    for p in params:  # torch's state layout for the fused path: fp32 0-d step on the device
        optimizer.state[p] = {"step": torch.zeros((), device=DEVICE), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    return params, optimizer


def columns(params, optimizer):
    states = [optimizer.state[p] for p in params]
    lr, wd, zero = (torch.tensor(v, device=DEVICE) for v in (LR, WD, 0.0))
    return (params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], [lr] * len(params), [wd] * DECAYED + [zero] * (len(params) - DECAYED))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_equals_torch_fused_adamw_with_coefficients_and_a_skip(impl):
    expected, torch_opt = make()
    actual, ours = make()
    for step in range(4):
        grads = [torch.randn(s, device=DEVICE) for s in SHAPES]
        coefficients = torch.rand(len(SHAPES), device=DEVICE)
        skip = torch.tensor(1.0 if step == 2 else 0.0, device=DEVICE)
        if step != 2:
            for p, g, c in zip(expected, grads, coefficients):
                p.grad = g * c
            torch_opt.step()
        for p, g in zip(actual, grads):
            p.grad = g.clone()
        assert adamw_step_(*columns(actual, ours), betas=(0.9, 0.999), eps=1e-8, grad_coefficients=coefficients,
                           skip=skip, zero_grads=True, impl=impl) == impl
        assert all(not p.grad.any() for p in actual), "zero_grads left a gradient"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, **TOL, name=f"param {i} after step {step}")
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert_close(ours.state[a][key], torch_opt.state[e][key], **TOL, name=f"{key} {i} step {step}")


def test_reference_is_torch_adamw():
    expected, torch_opt = make()
    actual, ours = make()
    grads = [torch.randn(s, device=DEVICE) for s in SHAPES]
    for p, q, g in zip(expected, actual, grads):
        p.grad, q.grad = g.clone(), g.clone()
    torch_opt.step()
    adamw_step_ref(*columns(actual, ours), betas=(0.9, 0.999), eps=1e-8)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, **TOL, name=f"param {i}")


def test_misuse_names_the_argument():
    params, optimizer = make()
    for p in params:
        p.grad = torch.zeros_like(p)
    cols = list(columns(params, optimizer))
    cols[2] = cols[2][:-1]
    with pytest.raises(ValueError, match="6 params but 5 exp_avg tensors"):
        adamw_step_(*cols, betas=(0.9, 0.999), eps=1e-8)
    cols = list(columns(params, optimizer))
    cols[1] = [g.double() for g in cols[1]]
    with pytest.raises(ValueError, match=r"grad\[0\] must be a float32"):
        adamw_step_(*cols, betas=(0.9, 0.999), eps=1e-8)
    with pytest.raises(ValueError, match=r"grad_coefficients must be a \(6,\) float32"):
        adamw_step_(*columns(params, optimizer), betas=(0.9, 0.999), eps=1e-8, grad_coefficients=torch.ones(5))
