"""DINO loss with the weight-normalised last layer folded in, against the unfused reference (head layer + loss)."""
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close

from fastdino.kernels import dino_loss_fused_head
from fastdino.kernels.reference import dino_loss_fused_head_ref

# fp32 both sides; the fused path sums the loss and the weight gradient chunk by chunk (another reduction order).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4)}
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def make_inputs(ncrops, batch, dim, k, center):
    h_s = F.normalize(torch.randn(ncrops * batch, dim), dim=-1)
    h_t = F.normalize(torch.randn(2 * batch, dim), dim=-1)
    v_s, v_t = torch.randn(k, dim) * 0.3, torch.randn(k, dim) * 0.3
    c = torch.randn(1, k) * 0.1 if center else None
    return h_s, v_s, h_t, v_t, c


def run(fn, h_s, v_s, h_t, v_t, c, ncrops, grad_scale, **kwargs):
    h, v = h_s.clone().requires_grad_(True), v_s.clone().requires_grad_(True)
    loss, colsum, entropy = fn(h, v, h_t, v_t, c, STUDENT_TEMP, TEACHER_TEMP, ncrops, **kwargs)
    (loss * grad_scale).backward()
    return loss, colsum, entropy, h.grad, v.grad


@pytest.mark.parametrize("center", [True, False], ids=["center", "no_center"])
@pytest.mark.parametrize("ncrops, batch, k, chunk", [(2, 1, 1000, 256), (4, 3, 777, 100), (10, 2, 512, 512)],
                         ids=["V2_B1", "V4_B3_odd_K", "V10_B2_one_chunk"])
def test_matches_unfused_reference(ncrops, batch, k, chunk, center):
    inputs = make_inputs(ncrops, batch, 32, k, center)
    expected = run(dino_loss_fused_head_ref, *inputs, ncrops, 3.0)
    actual = run(dino_loss_fused_head, *inputs, ncrops, 3.0, chunk_size=chunk)
    for name, a, e in zip(("loss", "colsum", "entropy", "grad_features", "grad_weight_v"), actual, expected):
        assert_close(a, e, **TOL[torch.float32], name=name)


def test_no_logits_or_normalised_weight_saved():
    """What backward keeps: no (V*B, K) logits, no (2B, K) teacher logits and no normalised (K, D) weight beyond the
    inputs themselves (the reference saves all three)."""
    ncrops, batch, dim, k = 4, 2, 16, 600
    h_s, v_s, h_t, v_t, c = make_inputs(ncrops, batch, dim, k, True)
    v = v_s.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dino_loss_fused_head(h_s.requires_grad_(True), v, h_t, v_t, c, STUDENT_TEMP, TEACHER_TEMP, ncrops,
                             chunk_size=128)
    inputs = {t.data_ptr() for t in (h_s, v, h_t, v_t)}  # saved as such or as detached aliases
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs and t.dim() == 2]
    assert not [s for s in extra if k in s], f"saved (.., K) or (K, ..) tensors besides the inputs: {extra}"


def test_bad_arguments():
    h_s, v_s, h_t, v_t, c = make_inputs(4, 2, 16, 100, True)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        dino_loss_fused_head(h_s, v_s, h_t, v_t, c, 0.1, 0.04, 4, chunk_size=0)
    with pytest.raises(ValueError, match=r"teacher_weight_v must be \(K, D\)"):
        dino_loss_fused_head(h_s, v_s, h_t, v_t[:, :8], c, 0.1, 0.04, 4)
    with pytest.raises(ValueError, match="not a positive multiple of ncrops"):
        dino_loss_fused_head(h_s, v_s, h_t, v_t, c, 0.1, 0.04, 3)
