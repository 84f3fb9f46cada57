"""The MLP branch with its residual add (kernels/gelu_mlp.py): the Triton backward (interpreter on CPU) against
autograd's composition (`gelu_mlp_residual_ref`), in every gradient, and what it keeps for backward."""
import pytest
import torch
from _helpers import assert_close

from fastdino.kernels import _launch, gelu_mlp
from fastdino.kernels import gelu_mlp_residual
from fastdino.kernels.reference import gelu_mlp_residual_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the row scale applied after fc2's backward matmul instead of before it, a few ulps. In fp16 the two round
# at different places (g * s against s * a, gelu'(h) * da), so each is held to its error against fp64 instead.
TOL = dict(atol=2e-5, rtol=2e-4)
NAMES = ("x", "normed", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel output buffers start as NaN, so any element the kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_launch, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                    device=device))


def make_inputs(rows, dim, hidden, dtype, scale=True):
    """x, normed, fc1 (weight, bias), fc2 (weight, bias), each requiring grad, and a stochastic-depth row scale
    (0 for dropped rows, 1/keep for kept ones) or None."""
    tensors = [torch.randn(rows, dim), torch.randn(rows, dim), torch.randn(hidden, dim) / dim ** 0.5,
               torch.randn(hidden) * 0.5, torch.randn(dim, hidden) / hidden ** 0.5, torch.randn(dim) * 0.5]
    tensors = [t.to(DEVICE, dtype).requires_grad_() for t in tensors]
    row_scale = None
    if scale:
        row_scale = torch.where(torch.rand(rows, 1) < 0.25, 0.0, 1 / 0.75).to(DEVICE, dtype)
    return tensors, row_scale


def outputs_and_grads(fn, tensors, row_scale, grad_out):
    out = fn(*tensors, row_scale)
    grads = torch.autograd.grad(out, tensors, grad_out)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("rows, dim, hidden", [(70, 24, 96), (1, 8, 32), (33, 16, 200)])
def test_matches_the_composition(rows, dim, hidden, scale, dtype):
    """Odd row counts (not whole row blocks), one row, a hidden width that is not whole column blocks."""
    tensors, row_scale = make_inputs(rows, dim, hidden, dtype, scale)
    grad_out = torch.randn(rows, dim, device=DEVICE).to(dtype)
    fused = outputs_and_grads(lambda *a: gelu_mlp_residual(*a, impl="triton"), tensors, row_scale, grad_out)
    expected = outputs_and_grads(gelu_mlp_residual_ref, tensors, row_scale, grad_out)
    assert_close(fused[0], expected[0], atol=0, rtol=0, name="out (the same forward ops)")
    if dtype == torch.float32:
        for name, a, e in zip(NAMES, fused[1], expected[1]):
            assert_close(a, e, **TOL, name=f"grad {name}")
        return
    exact = outputs_and_grads(gelu_mlp_residual_ref, [t.detach().double().requires_grad_() for t in tensors],
                              None if row_scale is None else row_scale.double(), grad_out.double())
    for name, a, e, x in zip(NAMES, fused[1], expected[1], exact[1]):
        fused_err, composed_err = (a.double() - x).abs().max(), (e.double() - x).abs().max()
        assert fused_err <= 2 * composed_err + 1e-3 * x.abs().max(), (name, fused_err, composed_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels on the GPU (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("scale", [True, False])
def test_bf16_on_cuda_is_as_close_to_fp64_as_the_composition(scale):
    """At a ViT-S/16 block's widths (D = 384, hidden 1536) over 4,000 tokens, in bf16."""
    tensors, row_scale = make_inputs(4000, 384, 1536, torch.bfloat16, scale)
    grad_out = torch.randn(4000, 384, device=DEVICE).to(torch.bfloat16)
    fused = outputs_and_grads(lambda *a: gelu_mlp_residual(*a, impl="triton"), tensors, row_scale, grad_out)
    expected = outputs_and_grads(gelu_mlp_residual_ref, tensors, row_scale, grad_out)
    exact = outputs_and_grads(gelu_mlp_residual_ref, [t.detach().double().requires_grad_() for t in tensors],
                              None if row_scale is None else row_scale.double(), grad_out.double())
    assert torch.equal(fused[0], expected[0])
    for name, a, e, x in zip(NAMES, fused[1], expected[1], exact[1]):
        fused_err, composed_err = (a.double() - x).abs().max(), (e.double() - x).abs().max()
        assert fused_err <= 2 * composed_err + 1e-3 * x.abs().max(), (name, fused_err, composed_err)


def test_rows_split_over_many_programs(monkeypatch):
    """Several row programs, each walking several row blocks: the bias gradient's column sums add up."""
    monkeypatch.setattr(gelu_mlp, "ROW_PROGRAMS", 3)
    monkeypatch.setattr(gelu_mlp, "BLOCK_ROWS", 8)
    tensors, row_scale = make_inputs(101, 8, 40, torch.float32)
    grad_out = torch.randn(101, 8, device=DEVICE)
    fused = outputs_and_grads(lambda *a: gelu_mlp_residual(*a, impl="triton"), tensors, row_scale, grad_out)
    expected = outputs_and_grads(gelu_mlp_residual_ref, tensors, row_scale, grad_out)
    for name, a, e in zip(NAMES, fused[1], expected[1]):
        assert_close(a, e, **TOL, name=f"grad {name}")


def test_a_nan_poisons_what_it_poisons_in_the_composition():
    tensors, row_scale = make_inputs(40, 8, 48, torch.float32)
    with torch.no_grad():
        tensors[1][5, 3] = float("nan")  # one token's normed input: its fc1 row, and through the weights, more
    grad_out = torch.randn(40, 8, device=DEVICE)
    fused = outputs_and_grads(lambda *a: gelu_mlp_residual(*a, impl="triton"), tensors, row_scale, grad_out)
    expected = outputs_and_grads(gelu_mlp_residual_ref, tensors, row_scale, grad_out)
    assert torch.isnan(expected[1][1]).any() and not torch.isnan(expected[1][0]).all()
    for name, a, e in zip(NAMES, fused[1], expected[1]):
        assert_close(a, e, **TOL, name=f"grad {name}")


def saved_shapes(fn, tensors, row_scale):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*tensors, row_scale)
    return shapes


def test_keeps_one_hidden_activation_for_backward():
    """The composition keeps fc1's output and GELU's (two (T, hidden) tensors); the fused op keeps fc1's only."""
    tensors, row_scale = make_inputs(24, 8, 64, torch.float32)
    fused = saved_shapes(lambda *a: gelu_mlp_residual(*a, impl="triton"), tensors, row_scale)
    composed = saved_shapes(gelu_mlp_residual_ref, tensors, row_scale)
    assert composed.count((24, 64)) == 2
    assert fused.count((24, 64)) == 1


def test_a_second_backward_through_one_forward_is_refused():
    """The first backward writes s * gelu(h) over the saved h; a second one would read that as h."""
    tensors, row_scale = make_inputs(12, 8, 32, torch.float32)
    out = gelu_mlp_residual(*tensors, row_scale, impl="triton")
    torch.autograd.grad(out.sum(), tensors, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(out.sum(), tensors)


def test_auto_and_torch_take_the_composition_on_the_cpu():
    tensors, row_scale = make_inputs(10, 8, 32, torch.float32)
    for impl in ("auto", "torch"):
        out = gelu_mlp_residual(*tensors, row_scale, impl=impl)
        assert out.grad_fn.name() == "AddcmulBackward0"
    with torch.no_grad():
        assert gelu_mlp_residual(*tensors, row_scale, impl="triton").grad_fn is None


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__(1, t[1][:-1]), "normed must have shape"),
    (lambda t: t.__setitem__(2, t[2].double()), "fc1_weight must have x's dtype"),
    (lambda t: t.__setitem__(4, t[4].t()), "fc2_weight must have shape"),
    (lambda t: t.__setitem__(3, t[3][:-1]), "fc1_bias must have shape"),
    (lambda t: t.__setitem__(0, t[0][0]), "x must be a 2-D"),
    (lambda t: t.__setitem__(5, t[5].numpy()), "fc2_bias must be a torch.Tensor"),
])
def test_misuse_names_the_argument(change, message):
    tensors, row_scale = make_inputs(6, 4, 8, torch.float32)
    tensors = [t.detach() for t in tensors]
    change(tensors)
    with pytest.raises(ValueError, match=message):
        gelu_mlp_residual(*tensors, row_scale)


def test_a_scale_of_another_length_is_refused():
    tensors, _ = make_inputs(6, 4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \(6, 1\)"):
        gelu_mlp_residual(*tensors, torch.ones(5, 1))


def test_the_launch_bytes_count_what_the_kernel_moves():
    """h and da read, dh and s*a written, at bf16: 4 passes of T x hidden, plus the scale and the column sums."""
    rows, hidden = 97_792, 1536
    nbytes = gelu_mlp.gelu_mlp_launch_bytes(rows, hidden, 2, True)
    passes = 4 * rows * hidden * 2
    assert passes < nbytes < passes * 1.01
