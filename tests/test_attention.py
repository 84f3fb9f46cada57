"""Attention backends: SDPA against the explicit softmax reference, and the backend selection logic.

xformers has no CPU operator (and is not installed here), so its paths are exercised with stand-in modules:
one whose operator is missing ("No operator found", as on the project's H100 machine), one whose backward
is missing, and one that works.
"""
import logging
import sys
import types

import pytest
import torch

from _helpers import assert_close
from fastdino.engine.attention import attention, attention_probs, select_attention_backend

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
