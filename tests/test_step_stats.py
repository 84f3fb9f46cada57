"""The step statistics in one Triton launch (interpreter on CPU) against the torch reference and against
StepStats.update, over a finite, a skipped and a non-finite step; the momentum and the center of a skipped step."""
import pytest
import torch
from _helpers import assert_close

from fastdino.engine.metrics import StepStats
from fastdino.kernels.reference import step_stats_ref
from fastdino.kernels.step_stats import BLOCK, step_stats_update_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = [  # loss, skip
    (2.5, 0.0), (2.0, 1.0), (float("nan"), 1.0), (1.5, 0.0), (float("inf"), 0.0),
]


@pytest.mark.parametrize("skip_is_nonfinite", [True, False])
def test_matches_reference_and_step_stats(skip_is_nonfinite):
    values = {impl: torch.zeros(7, device=DEVICE) for impl in ("triton", "torch")}
    centers = {impl: torch.randn(1, BLOCK + 3, device=DEVICE) for impl in ("triton", "torch")}
    centers["torch"].copy_(centers["triton"])
    stats = StepStats(torch.device(DEVICE))
    for i, (loss, skip) in enumerate(STEPS):
        scalars = [torch.tensor(v, device=DEVICE) for v in (loss, 0.1 * i, 3.0 + i, skip, 0.996)]
        before = torch.randn_like(centers["torch"])
        moments = {}
        for impl in ("triton", "torch"):
            moments[impl] = torch.zeros((), device=DEVICE)
            centers_before = centers[impl].clone()
            assert step_stats_update_(values[impl], *scalars, moments[impl], centers[impl], before,
                                      skip_is_nonfinite=skip_is_nonfinite, impl=impl) == impl
            assert torch.equal(centers[impl], before if skip else centers_before)
            assert float(moments[impl]) == (1.0 if skip else pytest.approx(0.996))
        assert_close(values["triton"], values["torch"], atol=0, rtol=0, name=f"values after step {i}")
        loss_t, entropy, norm, skip_t, _ = scalars
        nonfinite = ~torch.isfinite(loss_t) | ((skip_t != 0) if skip_is_nonfinite else torch.tensor(False))
        stats.update(loss_t, entropy, norm, skip_t != 0, nonfinite)
        assert_close(values["torch"], stats.fields, atol=1e-7, rtol=1e-7, name=f"StepStats after step {i}")


def test_misuse_names_the_argument():
    scalars = [torch.zeros(()) for _ in range(6)]
    with pytest.raises(ValueError, match=r"values must be a \(7,\) float32"):
        step_stats_ref  # noqa: B018 (the reference is the spec; the checks are the launcher's)
        step_stats_update_(torch.zeros(6), *scalars)
    with pytest.raises(ValueError, match="loss must be a 0-d tensor"):
        step_stats_update_(torch.zeros(7), torch.zeros(2), *scalars[1:])
    with pytest.raises(ValueError, match="center and center_before go together"):
        step_stats_update_(torch.zeros(7), *scalars, torch.zeros(3))
