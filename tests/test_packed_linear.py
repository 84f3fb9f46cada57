"""The attention projections over crop groups (engine/packed_linear.py) against one plain projection of the packed
tokens split per group, in forward and in every gradient."""
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close

from fastdino.engine.packed_linear import concat_linear, group_qkv

LAYOUTS = [((3, 5), (2, 4)), ((1, 7),), ((1, 1), (2, 3), (1, 2))]  # two groups, batch 1, odd sizes
D, HEADS = 16, 2


def plain_qkv(x, weight, bias, layout):
    qkv = F.linear(x, weight, bias).split([b * n for b, n in layout])
    return [g.view(b, n, 3, HEADS, D // HEADS).unbind(2) for (b, n), g in zip(layout, qkv)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k_bias", [True, False])
def test_group_qkv_and_concat_linear_equal_the_plain_projections(layout, k_bias):
    rows = sum(b * n for b, n in layout)
    x = torch.randn(rows, D, requires_grad=True)
    weight, proj_w = torch.randn(3 * D, D, requires_grad=True), torch.randn(D, D, requires_grad=True)
    bias, proj_b = torch.randn(3 * D), torch.randn(D, requires_grad=True)
    if not k_bias:
        bias[D:2 * D] = 0
    bias.requires_grad_()
    inputs = (x, weight, bias, proj_w, proj_b)

    def run(qkv_fn, proj_fn):
        groups = qkv_fn(x, weight, bias, layout)
        outs = [(q * k.sin() + v).flatten(0, 1).flatten(1) for q, k, v in groups]  # every one of q, k, v used
        y = proj_fn(outs)
        grads = torch.autograd.grad(y, inputs, torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        return y, grads

    fused = run(lambda *a: group_qkv(*a, HEADS, k_bias=k_bias), lambda outs: concat_linear(outs, proj_w, proj_b))
    plain = run(plain_qkv, lambda outs: F.linear(torch.cat(outs), proj_w, proj_b))
    assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5, name="output")
    for name, a, e in zip(("x", "qkv weight", "qkv bias", "proj weight", "proj bias"), fused[1], plain[1]):
        if name == "qkv bias" and not k_bias:
            assert torch.all(a[D:2 * D] == 0)  # no k bias: no gradient for it
            a, e = torch.cat([a[:D], a[2 * D:]]), torch.cat([e[:D], e[2 * D:]])
        assert_close(a, e, atol=1e-5, rtol=1e-4, name=name)


def test_a_layout_that_does_not_cover_the_tokens_is_refused():
    with pytest.raises(ValueError):
        group_qkv(torch.randn(10, D), torch.randn(3 * D, D), torch.randn(3 * D), ((2, 4),), HEADS)
