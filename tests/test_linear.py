"""Linear probe on cached features: separates a separable toy set, resumes exactly, refuses other settings."""
import json

import pytest
import torch

from fastdino.engine import linear as linear_module
from fastdino.engine.linear import CHECKPOINT, RESULTS, accuracy, default_pooling, train_linear


def _blobs(n_per_class: int, num_classes: int = 4, dim: int = 8, seed: int = 0):
    """Gaussian blobs around orthogonal centres 6 sigma apart: linearly separable with overwhelming probability."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = 3.0 * torch.eye(num_classes, dim)[labels] + 0.25 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_linear_probe_separates_separable_toy_set(tmp_path):
    train, val = _blobs(32), _blobs(16, seed=1)
    res = train_linear(*train, *val, num_classes=4, epochs=8, lr=0.5, batch_size=16, output_dir=tmp_path)
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert len(res["history"]) == 8 and res["history"][0]["loss"] > res["history"][-1]["loss"]
    assert res["history"][-1]["lr"] < res["history"][0]["lr"] == 0.5  # cosine schedule, epoch 0 at the base lr
    assert json.loads((tmp_path / RESULTS).read_text())["top1"] == 100.0


def test_linear_probe_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    train, val = _blobs(8), _blobs(4, seed=1)
    kwargs = dict(num_classes=4, epochs=4, lr=0.05, batch_size=5)
    straight = train_linear(*train, *val, output_dir=tmp_path / "straight", **kwargs)

    calls = []

    def crash_in_epoch_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after training epoch 3, before its checkpoint
        return accuracy(*args)

    monkeypatch.setattr(linear_module, "accuracy", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_linear(*train, *val, output_dir=tmp_path / "resumed", **kwargs)
    monkeypatch.undo()
    assert len(torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["history"]) == 2
    resumed = train_linear(*train, *val, output_dir=tmp_path / "resumed", **kwargs)
    assert resumed["history"] == straight["history"]
    weights = [torch.load(tmp_path / d / CHECKPOINT, weights_only=True)["linear"] for d in ("straight", "resumed")]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_linear_probe_refuses_a_checkpoint_with_other_settings(tmp_path):
    train, val = _blobs(4), _blobs(2, seed=1)
    train_linear(*train, *val, num_classes=4, epochs=1, lr=0.1, batch_size=4, output_dir=tmp_path)
    with pytest.raises(ValueError, match="probe with other settings"):
        train_linear(*train, *val, num_classes=4, epochs=1, lr=0.2, batch_size=4, output_dir=tmp_path)


def test_accuracy_top5_is_capped_by_classes():
    linear = torch.nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        linear.bias.zero_()
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert accuracy(linear, feats, torch.tensor([0, 1, 1])) == pytest.approx((200 / 3, 100.0))


def test_default_pooling_follows_dino():
    assert default_pooling(384) == "cls4" and default_pooling(768) == "cls_avgpool"
