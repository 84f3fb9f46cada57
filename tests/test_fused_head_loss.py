"""Fused head + loss (Triton, interpreter on CPU) against the unfused plain-PyTorch reference (last layer + loss), both
pairings, and `sinkhorn_center` against the Sinkhorn-Knopp teacher of the logits."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close

from fastdino.engine.loss import sinkhorn_knopp_teacher
from fastdino.kernels import _launch, fused_head_loss, sinkhorn_center
from fastdino.kernels.reference import fused_head_loss_ref

fused_module = importlib.import_module("fastdino.kernels.fused_head_loss")

# The fused path sums the logits chunk by chunk and the products reduce in another order. In fp16 the reference
# rounds the logits to fp16 (a 1e-2 change of x = S / tau at |S| ~ 1) and the fused path does not, so softmax
# entries differ by about 1 %. Gradients are sums of K terms that cancel (sum_k dS_ik = 0): their rounding follows
# the terms, not the result, so they are compared relative to their largest element.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("loss", "colsum", "entropy", "grad_features", "grad_weight_v", "grad_gain")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel output buffers start as NaN, so any element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_launch, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                    device=device))


@pytest.fixture(params=["split", "one_split"])
def splits(request, monkeypatch):
    """K split over many programs (one chunk each), or one program walking every chunk (the online rescaling)."""
    if request.param == "one_split":
        monkeypatch.setattr(fused_module, "TARGET_PROGRAMS", 1)


def make_inputs(student_rows, teacher_rows, dim, k, dtype, center=True, gain=False, scale=1.0):
    h_s = F.normalize(torch.randn(student_rows, dim, device=DEVICE), dim=-1) * scale
    h_t = F.normalize(torch.randn(teacher_rows, dim, device=DEVICE), dim=-1) * scale
    v_s, v_t = torch.randn(k, dim, device=DEVICE) * 0.3, torch.randn(k, dim, device=DEVICE) * 0.3
    c = torch.randn(1, k, device=DEVICE) * 0.1 if center else None
    g = torch.rand(k, 1, device=DEVICE) + 0.5 if gain else None
    return dict(h_s=h_s.to(dtype), v_s=v_s, h_t=h_t.to(dtype), v_t=v_t, c=c, g=g)


def run(fn, inputs, grad_scale=1.0, **kwargs):
    h, v = inputs["h_s"].clone().requires_grad_(True), inputs["v_s"].clone().requires_grad_(True)
    g = None if inputs["g"] is None else inputs["g"].clone().requires_grad_(True)
    loss, colsum, entropy = fn(h, v, inputs["h_t"], inputs["v_t"], inputs["c"], STUDENT_TEMP, TEACHER_TEMP,
                               student_gain=g, teacher_gain=None if g is None else inputs["g"] * 0.9, **kwargs)
    (loss * grad_scale).backward()
    return loss, colsum, entropy, h.grad, v.grad, None if g is None else g.grad


def assert_matches_reference(inputs, dtype, grad_scale=1.0, **kwargs):
    expected = run(fused_head_loss_ref, inputs, grad_scale, **kwargs)
    actual = run(lambda *a, **kw: fused_head_loss(*a, impl="triton", **kw), inputs, grad_scale, **kwargs)
    for name, a, e in zip(NAMES, actual, expected):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        scale = e.abs().max().clamp_min(1e-30) if name.startswith("grad") else 1.0
        assert_close(a / scale, e / scale, **TOL[dtype], name=name)


@pytest.mark.usefixtures("splits")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ncrops, batch, dim, k, center, gain", [
    (2, 1, 32, 300, True, False), (4, 3, 40, 777, True, True), (10, 2, 24, 256, False, False)],
    ids=["V2_B1", "V4_B3_odd_D_K_gain", "V10_B2_no_center"])
def test_crops_pairing_matches_reference(ncrops, batch, dim, k, center, gain, dtype):
    inputs = make_inputs(ncrops * batch, 2 * batch, dim, k, dtype, center=center, gain=gain)
    assert_matches_reference(inputs, dtype, grad_scale=3.0, pairing="crops", ncrops=ncrops)


@pytest.mark.usefixtures("splits")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, dim, k, gain", [(1, 16, 200, False), (37, 40, 333, True), (70, 64, 256, False)],
                         ids=["one_row", "odd_rows_D_K_gain", "two_row_blocks"])
def test_rows_pairing_matches_reference(rows, dim, k, gain, dtype):
    """iBOT: student row i against teacher row i, per-row weights (dinov2's masks_weight / n_images)."""
    inputs = make_inputs(rows, rows, dim, k, dtype, gain=gain)
    weights = torch.rand(rows, device=DEVICE) / 3
    assert_matches_reference(inputs, dtype, grad_scale=2.0**10, pairing="rows", row_weights=weights)


def test_large_logits_and_chunked_backward(monkeypatch):
    """Logits up to 30 / tau (softmax stability) and a backward in chunks of 128 prototypes, the last partial."""
    monkeypatch.setattr(fused_module, "BACKWARD_CHUNK_BYTES", 4 * 5 * 128 * 4)  # (V*B, 128) fp32
    inputs = make_inputs(4 * 5, 2 * 5, 32, 300, torch.float32, scale=30.0)
    assert_matches_reference(inputs, torch.float32, pairing="crops", ncrops=4)


@pytest.mark.parametrize("pairing", ["crops", "rows"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_positions_match_reference(where, pairing):
    """A NaN in one feature poisons exactly what it poisons in the reference: its logits row, the loss, the dS rows
    that row reaches (then dH rows and every dv row), the teacher column sums and entropy for a teacher row."""
    rows_s, rows_t = (4 * 3, 2 * 3) if pairing == "crops" else (7, 7)
    inputs = make_inputs(rows_s, rows_t, 24, 300, torch.float32)
    inputs["h_s" if where == "student" else "h_t"][4, 5] = float("nan")
    kwargs = dict(ncrops=4) if pairing == "crops" else dict(row_weights=torch.full((7,), 0.2, device=DEVICE))
    assert_matches_reference(inputs, torch.float32, pairing=pairing, **kwargs)


def test_teacher_column_sums_stay_fp32_under_autocast():
    """Under fp16 autocast the logits are fp16 products, but the column sums (the center update) are formed in fp32
    from the fp16-rounded features, not by an fp16 matrix-vector product."""
    inputs = make_inputs(8, 4, 32, 300, torch.float32, scale=4.0)
    with torch.autocast(DEVICE, dtype=torch.float16):
        colsum = fused_head_loss(inputs["h_s"], inputs["v_s"], inputs["h_t"], inputs["v_t"], inputs["c"],
                                 STUDENT_TEMP, TEACHER_TEMP, ncrops=4, impl="triton")[1]
    expected = inputs["h_t"].half().float().sum(dim=0) @ F.normalize(inputs["v_t"], dim=1).T
    assert colsum.dtype == torch.float32
    assert_close(colsum, expected, atol=1e-5, rtol=1e-5, name="colsum")


def test_no_logits_saved():
    """What backward keeps: no (rows, K) logits beyond the inputs themselves (the reference saves them)."""
    ncrops, batch, dim, k = 4, 2, 16, 600
    inputs = make_inputs(ncrops * batch, 2 * batch, dim, k, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_head_loss(inputs["h_s"].requires_grad_(True), inputs["v_s"].requires_grad_(True), inputs["h_t"],
                        inputs["v_t"], inputs["c"], STUDENT_TEMP, TEACHER_TEMP, ncrops=ncrops, impl="triton")
    shapes = [tuple(t.shape) for t in saved]
    assert not [s for s in shapes if len(s) == 2 and s[1] == k], f"saved (rows, K) tensors: {shapes}"


@pytest.mark.usefixtures("splits")
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("rows, k", [(6, 300), (1, 50), (70, 257)])
def test_sinkhorn_center_gives_the_sinkhorn_teacher(rows, k, impl):
    """softmax((T - C) / tau) with C = sinkhorn_center(...) equals the Sinkhorn-Knopp teacher of the logits T."""
    inputs = make_inputs(rows, rows, 24, k, torch.float32, gain=True, scale=3.0)
    weight = F.normalize(inputs["v_t"], dim=1) * inputs["g"]
    logits = inputs["h_t"] @ weight.T
    center = sinkhorn_center(inputs["h_t"], inputs["v_t"], TEACHER_TEMP, teacher_gain=inputs["g"], impl=impl)
    assert center.shape == (k,) and center.dtype == torch.float32
    expected = sinkhorn_knopp_teacher(logits, TEACHER_TEMP)
    assert_close(torch.softmax((logits - center) / TEACHER_TEMP, dim=-1), expected, atol=1e-6, rtol=1e-4,
                 name="teacher probabilities")


def test_sinkhorn_center_trains_through_fused_head_loss():
    """The iBOT call with the Sinkhorn teacher: center from sinkhorn_center, pairing rows, equals the reference."""
    inputs = make_inputs(11, 11, 24, 300, torch.float32)
    inputs["c"] = sinkhorn_center(inputs["h_t"], inputs["v_t"], TEACHER_TEMP, impl="triton")
    assert_matches_reference(inputs, torch.float32, pairing="rows", row_weights=torch.full((11,), 0.5, device=DEVICE))


BAD = {
    "pairing": (dict(pairing="pairs"), "pairing must be one of"),
    "ncrops": (dict(ncrops=3), "not a positive multiple of ncrops"),
    "teacher_rows": (dict(h_t=torch.zeros(3, 16)), "teacher_features must have 2"),
    "weight_dim": (dict(v_t=torch.zeros(100, 8)), r"teacher_weight_v must be a 2-D .* D=16"),
    "weight_rows": (dict(v_t=torch.zeros(99, 16)), "teacher_weight_v has 99 rows"),
    "center": (dict(c=torch.zeros(1, 99)), "center must be a floating-point tensor of 100"),
    "gain": (dict(student_gain=torch.zeros(7)), "student_gain must be"),
    "row_weights_with_crops": (dict(row_weights=torch.ones(8)), 'row_weights is for pairing="rows"'),
    "temperature": (dict(student_temp=0.0), "student_temp must be a positive number"),
    "numpy": (dict(h_s=torch.zeros(8, 16).numpy()), "student_features must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments(case):
    args = dict(h_s=torch.zeros(8, 16), v_s=torch.ones(100, 16), h_t=torch.zeros(4, 16), v_t=torch.ones(100, 16),
                c=torch.zeros(1, 100), student_temp=0.1, teacher_temp=0.04, pairing="crops", ncrops=4)
    override, message = BAD[case]
    args.update(override)
    positional = [args.pop(name) for name in ("h_s", "v_s", "h_t", "v_t", "c", "student_temp", "teacher_temp")]
    with pytest.raises(ValueError, match=message):
        fused_head_loss(*positional, **args)


def test_rows_pairing_needs_matching_rows():
    with pytest.raises(ValueError, match='pairing="rows" needs as many teacher_features rows'):
        fused_head_loss(torch.zeros(5, 8), torch.ones(10, 8), torch.zeros(4, 8), torch.ones(10, 8), None, 0.1, 0.04,
                        pairing="rows")


def test_sinkhorn_center_across_ranks_equals_one_process():
    """Two ranks with half the rows each (threads, all_reduce by a barrier) get the center of all rows at once."""
    import threading

    inputs = make_inputs(10, 10, 24, 200, torch.float32, scale=3.0)
    expected = sinkhorn_center(inputs["h_t"], inputs["v_t"], TEACHER_TEMP, impl="torch")
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def all_reduce(tensor, op):
            slots[r] = tensor.clone()
            barrier.wait()
            tensor.copy_(torch.maximum(*slots) if op == "max" else slots[0] + slots[1])
            barrier.wait()
        results[r] = sinkhorn_center(inputs["h_t"][r * 5:(r + 1) * 5], inputs["v_t"], TEACHER_TEMP,
                                     all_reduce=all_reduce, impl="torch")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(2):
        assert_close(results[r], expected, atol=1e-5, rtol=1e-5, name=f"rank {r} center")
