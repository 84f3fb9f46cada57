"""iBOTPatchLoss and KoLeoLoss against dinov2's classes (restated in tests/dinov2_reference.py), plus the fixes."""
import pytest
import torch

import dinov2_reference as ref
from _helpers import assert_close
from fastdino.engine import KoLeoLoss, iBOTPatchLoss


def _masked_batch(n_crops=6, n_tokens=16, k=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_crops, n_tokens, generator=g) < 0.3
    masks[0] = False  # an unmasked crop, as half of dinov2's are
    m = int(masks.sum())
    student = torch.randn(m, k, generator=g, dtype=torch.float64).float() * 3
    teacher = torch.softmax(torch.randn(m, k, generator=g) * 2, dim=-1)
    return masks, student, teacher


def test_state_dict_is_dinov2s():
    loss = iBOTPatchLoss(37)
    assert list(loss.state_dict()) == ["center"] and loss.center.shape == (1, 1, 37)
    assert (loss.student_temp, loss.center_momentum) == (0.1, 0.9)
    loss.load_state_dict({"center": torch.randn(1, 1, 37)}, strict=True)


def test_forward_masked_values_and_gradients_match_dinov2():
    masks, student, teacher = _masked_batch()
    ours, theirs = student.clone().requires_grad_(), student.clone().requires_grad_()
    value = iBOTPatchLoss(37).forward_masked(ours, teacher, masks)
    expected = ref.iBOTPatchLoss(37).forward_masked(theirs, teacher, masks)
    value.backward()
    expected.backward()
    assert_close(value, expected, atol=1e-6, rtol=1e-6, name="loss")
    assert_close(ours.grad, theirs.grad, atol=1e-7, rtol=1e-5, name="grad")


def test_padded_rows_with_zero_weight_change_nothing():
    """The trainer pads the masked rows to the batch's static upper bound with weight 0."""
    masks, student, teacher = _masked_batch()
    w = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    pad = 5
    padded_s = torch.cat([student, student[:pad]]).requires_grad_()
    padded_t = torch.cat([teacher, teacher[:pad]])
    padded_w = torch.cat([w, torch.zeros(pad)])
    value = iBOTPatchLoss(37).forward_masked(padded_s, padded_t, masks, masks_weight=padded_w)
    value.backward()
    plain = student.clone().requires_grad_()
    expected = ref.iBOTPatchLoss(37).forward_masked(plain, teacher, masks)
    expected.backward()
    assert_close(value, expected, atol=1e-6, rtol=1e-6, name="loss")
    assert_close(padded_s.grad[:-pad], plain.grad, atol=1e-7, rtol=1e-5, name="grad")
    assert torch.all(padded_s.grad[-pad:] == 0)


def test_forward_over_all_patches_matches_dinov2():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, 11, generator=g), torch.softmax(torch.randn(4, 9, 11, generator=g), -1)
    masks = torch.rand(4, 9, generator=g) < 0.5
    assert_close(iBOTPatchLoss(11)(s, t, masks), ref.iBOTPatchLoss(11).forward(s, t, masks), atol=1e-6, rtol=1e-6)


def test_centering_and_its_update_match_dinov2():
    ours, theirs = iBOTPatchLoss(13), ref.iBOTPatchLoss(13)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        t = torch.randn(1, 20, 13, generator=g)
        assert_close(ours.softmax_center_teacher(t, 0.05), theirs.softmax_center_teacher(t, 0.05), atol=1e-7,
                     rtol=1e-5, name="probs")
        ours.update_center(t)
        theirs.update_center(t)
    ours.apply_center_update()
    theirs.apply_center_update()
    assert_close(ours.center, theirs.center, atol=1e-7, rtol=1e-6, name="center")


def test_center_update_of_padded_rows_counts_the_real_ones_only():
    ours, theirs = iBOTPatchLoss(13), ref.iBOTPatchLoss(13)
    t = torch.randn(1, 20, 13)
    padded = torch.cat([t, torch.full((1, 7, 13), 1e4)], dim=1)
    ours.update_center(padded, n_masked_patches_tensor=torch.tensor([20]))
    theirs.update_center(t)
    storage = ours.center.data_ptr()
    ours.apply_center_update()
    theirs.apply_center_update()
    assert_close(ours.center, theirs.center, atol=1e-7, rtol=1e-6, name="center")
    assert ours.center.data_ptr() == storage  # in place: checkpoints and graphs hold the buffer


def test_sinkhorn_matches_dinov2_without_a_process_group_and_leaves_its_argument():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(24, 17, generator=g)
    count = torch.tensor([24])
    probs = iBOTPatchLoss(17).sinkhorn_knopp_teacher(t, 0.07, count)
    assert_close(probs, ref.iBOTPatchLoss(17).sinkhorn_knopp_teacher(t, 0.07, torch.tensor([24])), atol=1e-7,
                 rtol=1e-4, name="sinkhorn")
    assert count.tolist() == [24]
    assert_close(probs.sum(-1), torch.ones(24), atol=1e-5, rtol=0, name="row sums")


def test_sinkhorn_padded_rows_are_zero_and_the_rest_unchanged():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(24, 17, generator=g)
    padded = torch.cat([t, 50 * torch.randn(6, 17, generator=g)])
    valid = torch.arange(30) < 24
    probs = iBOTPatchLoss(17).sinkhorn_knopp_teacher(padded, 0.07, torch.tensor([24]), valid=valid)
    expected = ref.iBOTPatchLoss(17).sinkhorn_knopp_teacher(t, 0.07, torch.tensor([24]))
    assert_close(probs[:24], expected, atol=1e-7, rtol=1e-4, name="valid rows")
    assert torch.all(probs[24:] == 0)


def test_sinkhorn_is_finite_where_dinov2s_overflows():
    t = torch.randn(16, 9) + 5  # / 0.04 = 125 +- 25: exp overflows fp32 in dinov2's formulation
    assert not torch.isfinite(ref.iBOTPatchLoss(9).sinkhorn_knopp_teacher(t, 0.04, torch.tensor([16]))).all()
    probs = iBOTPatchLoss(9).sinkhorn_knopp_teacher(t, 0.04, torch.tensor([16]))
    assert torch.isfinite(probs).all()
    assert_close(probs.sum(-1), torch.ones(16), atol=1e-5, rtol=0, name="row sums")


def test_sinkhorn_without_any_masked_patch_is_zero_not_nan():
    probs = iBOTPatchLoss(9).sinkhorn_knopp_teacher(torch.randn(4, 9), 0.07, torch.tensor([0]),
                                                    valid=torch.zeros(4, dtype=torch.bool))
    assert torch.all(probs == 0)


@pytest.mark.parametrize("bad", [dict(patch_out_dim=0), dict(patch_out_dim=8, student_temp=0),
                                 dict(patch_out_dim=8, impl="triton")])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        iBOTPatchLoss(**bad)


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="patch_out_dim=8"):
        iBOTPatchLoss(8).softmax_center_teacher(torch.randn(1, 3, 9), 0.04)


# ----------------------------------------------------------------------------------------------------- KoLeo

def test_koleo_matches_dinov2_in_fp32():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 24, generator=g)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    value, expected = KoLeoLoss()(ours), ref.KoLeoLoss()(theirs)
    value.backward()
    expected.backward()
    assert_close(value, expected, atol=1e-6, rtol=1e-6, name="koleo")
    assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, name="grad")


def test_koleo_is_fp32_and_finite_for_a_duplicated_fp16_image():
    x = torch.randn(8, 16).half()
    x[3] = x[5]
    assert not torch.isfinite(ref.KoLeoLoss()(x))  # dinov2: log(0 + 1e-8 in fp16) = -inf
    value = KoLeoLoss()(x)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert_close(value, ref.KoLeoLoss()(x.float()), atol=1e-5, rtol=1e-5, name="koleo")


def test_koleo_batch_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 8))


def test_center_stays_when_no_patch_is_masked():
    loss = iBOTPatchLoss(5)
    loss.center.fill_(0.3)
    loss.update_center(torch.randn(1, 4, 5), n_masked_patches_tensor=torch.tensor([0]))
    loss.apply_center_update()
    assert torch.allclose(loss.center, torch.full((1, 1, 5), 0.3))


# ------------------------------------------------------------------------------- the fused iBOT term (impl="fused")

def _fused_inputs(seed=5, n_crops=4, n_tokens=12, k=64, d=16, pad=7):
    """Masks, per-patch weights padded with `pad` zero-weight rows, and the heads' bottleneck features and last
    layers (trained gains) of M = masked + pad rows; the padding repeats row 0, as MaskBatch's indices do."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_crops, n_tokens, generator=g) < 0.4
    masks[0] = False
    m = int(masks.sum())
    weights = torch.cat([(1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks], torch.zeros(pad)])

    def features():
        h = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
        return torch.cat([h, h[:1].expand(pad, d)])

    h_s, h_t = features(), features()
    v_s, v_t = torch.randn(k, d, generator=g), torch.randn(k, d, generator=g)
    g_s, g_t = 1 + 0.5 * torch.rand(k, 1, generator=g), 1 + 0.5 * torch.rand(k, 1, generator=g)
    return masks, weights, torch.tensor([m]), h_s, v_s, g_s, h_t, v_t, g_t


def _logits(h, v, gain):
    return h @ (torch.nn.functional.normalize(v, dim=1) * gain).T


@pytest.mark.parametrize("sinkhorn", [False, True], ids=["centering", "sinkhorn_knopp"])
@pytest.mark.parametrize("kernel_impl", ["torch", "triton"])
def test_fused_term_equals_forward_masked_of_the_logits(sinkhorn, kernel_impl):
    """forward_fused_head of the bottleneck features = forward_masked of their logits (dinov2's formulation): loss,
    gradients of the features, last-layer weights and gains, and the center update; padding rows count nowhere."""
    masks, weights, n_masked, h_s, v_s, g_s, h_t, v_t, g_t = _fused_inputs()
    temp, valid = 0.05, torch.arange(h_s.shape[0]) < n_masked
    fused, torch_impl = iBOTPatchLoss(64), iBOTPatchLoss(64)
    fused.center.normal_()
    torch_impl.center.copy_(fused.center)
    leaves = [t.clone().requires_grad_() for t in (h_s, v_s, g_s)]
    loss, entropy = fused.forward_fused_head(leaves[0], leaves[1], h_t, v_t, temp, masks, weights, n_masked,
                                             sinkhorn=sinkhorn, student_gain=leaves[2], teacher_gain=g_t,
                                             kernel_impl=kernel_impl)
    loss.backward()
    expected_leaves = [t.clone().requires_grad_() for t in (h_s, v_s, g_s)]
    teacher = _logits(h_t, v_t, g_t)
    if sinkhorn:
        probs = torch_impl.sinkhorn_knopp_teacher(teacher, temp, n_masked, valid=valid)
    else:
        probs = torch_impl.softmax_center_teacher(teacher[None], temp)[0]
        torch_impl.update_center(teacher[None], n_masked)
        torch_impl.apply_center_update()
    expected = torch_impl.forward_masked(_logits(*expected_leaves), probs, masks, masks_weight=weights)
    expected.backward()
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    for name, ours, theirs in zip(("features", "weight_v", "gain"), leaves, expected_leaves):
        assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, name=name)
    assert torch.all(leaves[0].grad[~valid] == 0)
    assert_close(fused.center, torch_impl.center, atol=1e-6, rtol=1e-5, name="center")
    expected_entropy = (torch.special.entr(probs).sum(-1) * valid).sum() / valid.sum()
    assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5, name="entropy")


def test_fused_term_without_any_masked_patch_is_zero_and_keeps_the_center():
    masks, weights, _, h_s, v_s, g_s, h_t, v_t, g_t = _fused_inputs()
    loss_fn = iBOTPatchLoss(64)
    loss_fn.center.normal_()
    center = loss_fn.center.clone()
    for sinkhorn in (False, True):
        loss, entropy = loss_fn.forward_fused_head(h_s, v_s, h_t, v_t, 0.05, masks, torch.zeros_like(weights),
                                                   torch.tensor([0]), sinkhorn=sinkhorn, kernel_impl="triton")
        assert loss.item() == 0 and entropy.item() == 0
    assert_close(loss_fn.center, center, atol=1e-6, rtol=1e-6, name="center")  # m c + (1 - m) c: rounding


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sinkhorn_center_of_padded_rows_is_the_teacher_of_the_real_rows(impl):
    """sinkhorn_center(valid=): softmax((T - C) / temp) on the real rows is sinkhorn_knopp_teacher's teacher of
    those rows alone, whatever the padding rows hold."""
    from fastdino.kernels import sinkhorn_center

    g = torch.Generator().manual_seed(6)
    h = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=-1)
    h[24:] *= 40  # padding far from the real rows: it would dominate the column sums if it counted
    v, valid, temp = torch.randn(64, 16, generator=g), torch.arange(30) < 24, 0.05
    center = sinkhorn_center(h, v, temp, valid=valid, impl=impl)
    logits = _logits(h, v, 1.0)
    expected = iBOTPatchLoss(64).sinkhorn_knopp_teacher(logits[:24], temp, torch.tensor([24]))
    assert_close(torch.softmax((logits[:24] - center) / temp, dim=-1), expected, atol=1e-6, rtol=1e-4,
                 name="teacher")
    with pytest.raises(ValueError, match="valid"):
        sinkhorn_center(h, v, temp, valid=valid[:5], impl=impl)
