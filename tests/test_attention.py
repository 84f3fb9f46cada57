"""Attention backends: SDPA against the explicit softmax reference, the backend selection logic, and which SDPA
kernel runs.

xformers has no CPU operator (and is not installed here), so its paths are exercised with stand-in modules:
one whose operator is missing ("No operator found", as on the project's H100 machine), one whose backward
is missing, and one that works. torch's varlen_attn has no CPU kernel either: its wiring (one call over all
crops, the sequence offsets) is checked with a stand-in that computes each sequence with the reference, and its
kernel on the GPU by tests/test_cuda.py.
"""
import logging
import sys
import types

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import assert_close
from fastdino.engine import attention as attention_module
from fastdino.engine.attention import attention, attention_probs, select_attention_backend, sequence_offsets

TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4), torch.bfloat16: dict(atol=5e-3, rtol=5e-2)}


def _reference(q, k, v):
    return torch.einsum("bhnm,bmhd->bnhd", attention_probs(q, k), v.float()).to(q.dtype)  # (B, N, H, hd)


@pytest.mark.parametrize("shape", [(2, 197 // 4, 3, 16), (1, 7, 1, 8)], ids=["B2-N49-H3", "B1-N7-H1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_explicit_softmax(shape, dtype):
    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    assert_close(attention(q, k, v, "sdpa"), _reference(q, k, v), **TOL[dtype], name="sdpa")


def test_attention_probs_rows_are_distributions():
    probs = attention_probs(torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8))
    assert probs.shape == (2, 3, 5, 5)
    assert_close(probs.sum(-1), torch.ones(2, 3, 5), **TOL[torch.float32], name="row sums")


def _install_fake_xformers(monkeypatch, memory_efficient_attention):
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def _no_operator(q, k, v):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n  query ...")


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return _reference(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("No operator found for `memory_efficient_attention_backward`")


def _no_backward(q, k, v):
    return _NoBackward.apply(q, k, v)


def test_auto_falls_back_to_sdpa_when_xformers_does_not_import(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    with caplog.at_level(logging.INFO, logger="fastdino.engine.attention"):
        name, reason = select_attention_backend("auto", "cpu", torch.float32)
    assert name == "sdpa" and "does not import" in reason
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()  # the choice and why, once
    with pytest.raises(ValueError, match="xformers.*does not import"):
        select_attention_backend("xformers", "cpu", torch.float32)


@pytest.mark.parametrize("broken", [_no_operator, _no_backward], ids=["forward", "backward"])
def test_auto_detects_an_xformers_operator_that_does_not_run(monkeypatch, broken):
    _install_fake_xformers(monkeypatch, broken)
    name, reason = select_attention_backend("auto", "cpu", torch.bfloat16)
    assert name == "sdpa" and "No operator found" in reason and "bfloat16" in reason
    with pytest.raises(ValueError, match="attention='xformers' is unavailable.*No operator found"):
        select_attention_backend("xformers", "cpu", torch.bfloat16)


def test_working_xformers_is_chosen_and_used(monkeypatch):
    calls = []

    def fake(q, k, v):
        calls.append(q.shape)
        return _reference(q, k, v)

    _install_fake_xformers(monkeypatch, fake)
    with torch.no_grad():  # the probe still runs a backward when the first forward is the teacher's
        assert select_attention_backend("auto", "cpu", torch.float32)[0] == "xformers"
    assert select_attention_backend("xformers", "cpu", torch.float32)[0] == "xformers"
    q = torch.randn(2, 5, 3, 8)
    assert_close(attention(q, q, q, "xformers"), _reference(q, q, q), **TOL[torch.float32], name="xformers")
    assert calls[-1] == q.shape


def test_explicit_sdpa_never_probes_xformers(monkeypatch):
    _install_fake_xformers(monkeypatch, lambda q, k, v: pytest.fail("probed xformers for attention='sdpa'"))
    assert select_attention_backend("sdpa", "cpu", torch.float32) == ("sdpa", "requested with attention='sdpa'")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="'flash'"):
        select_attention_backend("flash")


class SDPAKernels(TorchDispatchMode):
    """Records the attention kernels that run, forward and backward, by their aten op names: "cudnn", "flash",
    "efficient", "varlen" (torch's custom op), or "math" (SDPA's math path decomposes into a softmax)."""

    KERNELS = {"_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_flash_attention": "flash",
               "_scaled_dot_product_flash_attention_for_cpu": "flash",
               "_scaled_dot_product_efficient_attention": "efficient", "_varlen_attn": "varlen",
               "_softmax": "math", "_safe_softmax": "math"}

    def __init__(self):
        super().__init__()
        self.seen = []  # (kernel, "forward" | "backward")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        base = name.removesuffix("_backward")
        if base in self.KERNELS:
            self.seen.append((self.KERNELS[base], "backward" if base != name else "forward"))
        return func(*args, **(kwargs or {}))


def test_selection_names_the_sdpa_kernel_that_runs(caplog):
    """The logged reason names the kernel SDPA dispatches to for the given shape, and that kernel is the one that
    runs forward and backward (on the CPU: its fused flash kernel)."""
    shape = (2, 17, 3, 16)  # (B, N, H, hd)
    with caplog.at_level(logging.INFO, logger="fastdino.engine.attention"):
        name, reason = select_attention_backend("sdpa", "cpu", torch.float32, 16, shape=shape)
    assert name == "sdpa" and len(caplog.records) == 1 and reason in caplog.records[0].getMessage()
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    with SDPAKernels() as kernels:
        attention(q, k, v, name).sum().backward()
    ran = {kernel for kernel, _ in kernels.seen}
    assert len(ran) == 1 and f"kernel {ran.pop()} for (B, N, H, hd) = {shape}" in reason
    assert {phase for _, phase in kernels.seen} == {"forward", "backward"}


@pytest.mark.parametrize("capability, expected", [((9, 0), "sdpa:cudnn,flash,efficient,math"), ((8, 0), "sdpa"),
                                                  ((10, 0), "sdpa")])
def test_cudnn_comes_first_on_hopper_only(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert attention_module._sdpa_backend(torch.device("cuda", 0)) == expected
    assert attention_module._sdpa_backend(torch.device("cpu")) == "sdpa"
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):  # a caller's restriction stays
        restricted = attention_module._sdpa_backend(torch.device("cuda", 0))
    assert restricted == ("sdpa:flash,efficient" if capability == (9, 0) else "sdpa")


def test_a_priority_backend_runs_its_kernels_in_order():
    """A resolved "sdpa:..." backend only orders SDPA's kernels: where cuDNN cannot run (the CPU), the next one
    does, and a list without it runs what it names (math here)."""
    q, k, v = (torch.randn(2, 9, 3, 8, requires_grad=True) for _ in range(3))
    expected = _reference(q, k, v)
    for backend, kernel in (("sdpa:cudnn,flash,efficient,math", "flash"), ("sdpa:math", "math")):
        with SDPAKernels() as kernels:
            out = attention(q, k, v, backend)
        assert {name for name, _ in kernels.seen} == {kernel}, backend
        assert_close(out, expected, **TOL[torch.float32], name=backend)


def test_varlen_is_explicit_only_and_says_why_it_cannot_run():
    assert select_attention_backend("auto", "cpu", torch.float32)[0] == "sdpa"
    with pytest.raises(ValueError, match="attention='varlen' is unavailable: torch varlen_attn does not run on cpu"):
        select_attention_backend("varlen", "cpu", torch.float32)


def test_sequence_offsets_of_a_packed_layout():
    assert sequence_offsets(((2, 5), (3, 2)), torch.device("cpu")).tolist() == [0, 5, 10, 12, 14, 16]
    assert sequence_offsets(((2, 5), (3, 2)), torch.device("cpu")).dtype == torch.int32


def _install_fake_varlen(monkeypatch, calls: list):
    """torch.nn.attention.varlen with a varlen_attn that attends within each sequence by the reference."""

    def varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):  # (T, H, hd) each
        calls.append((tuple(q.shape), cu_seq_q.tolist(), max_q))
        assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
        bounds = cu_seq_q.tolist()
        return torch.cat([_reference(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(bounds, bounds[1:])])

    module = types.ModuleType("torch.nn.attention.varlen")
    module.varlen_attn = varlen_attn
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", module)


def test_varlen_backend_is_one_call_per_block_equal_to_per_group_sdpa(monkeypatch):
    """With a working varlen_attn, attention="varlen" runs one call per block over every image of every group, with
    the images' offsets, and gives the per-group SDPA model's features and gradients."""
    from fastdino.engine.vit import VisionTransformer

    calls = []
    _install_fake_varlen(monkeypatch, calls)
    models = {}
    for backend in ("sdpa", "varlen"):
        torch.manual_seed(0)
        models[backend] = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                            attention=backend)
        models[backend].init_weights()
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    outputs = {}
    for backend, model in models.items():
        out = model(crops)
        out.square().sum().backward()
        outputs[backend] = out
    layout_offsets = sequence_offsets(((6, 17), (2, 5)), torch.device("cpu")).tolist()
    assert calls[1:] == [((6 * 17 + 2 * 5, 2, 16), layout_offsets, 17)] * 2  # calls[0]: the probe
    assert_close(outputs["varlen"], outputs["sdpa"], **TOL[torch.float32], name="varlen features")
    for (name, p), q in zip(models["varlen"].named_parameters(), models["sdpa"].parameters()):
        # Relative to the gradient's norm: the fake varlen attends by the naive reference, SDPA by its CPU kernel,
        # and their fp32 differences (~1e-6) grow through two blocks' backward to ~1e-4 of the norm (torch 2.11 and
        # 2.14); elementwise, small entries of summed gradients (biases) are cancellations that a fixed rtol fails.
        error = torch.linalg.vector_norm(p.grad - q.grad) / torch.linalg.vector_norm(q.grad)
        assert error <= 5e-4, f"varlen grad {name}: relative error {error:.2e}"
