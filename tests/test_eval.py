"""k-NN: hand-computed cases, a brute-force per-image reference, chunking, and argument checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdino.engine import eval as fd_eval
from fastdino.engine.eval import knn_classify


def _toy():
    # Train: one class-0 point that matches the query exactly, two class-1 points at cos 0.6.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    return train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([0])


def test_knn_weighting_beats_majority_at_low_temperature():
    train, labels, test, test_labels = _toy()
    # k=3 at T=0.07: class 0 gets exp(1/0.07) = 1.6e6, class 1 gets 2 exp(0.6/0.07) = 1.0e4 -> class 0.
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07)
    res = knn_classify(train, labels, test, test_labels, ks=(1, 3), temperature=0.07)
    assert res == {1: {"top1": 100.0, "top5": 100.0}, 3: {"top1": 100.0, "top5": 100.0}}
    # At T=1000 every weight is ~1: the two class-1 neighbours outvote the exact match (top-5 = top-2 here).
    res = knn_classify(train, labels, test, test_labels, ks=(1, 3), temperature=1000.0)
    assert res[1]["top1"] == 100.0 and res[3]["top1"] == 0.0 and res[3]["top5"] == 100.0


def test_knn_top5_counts_the_fifth_class_but_not_unvoted_ones():
    # 6 classes; class c sits at angle angles[c], the query at 0.5, so its neighbours in order are classes
    # 5, 4, 3, 2, 1, 0. Label 1: top-1 misses; top-5 hits with k=5; with k=4 class 1 has no vote, so no hit.
    angles = torch.tensor([1.5, 0.1, 0.2, 0.3, 0.4, 0.5])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    query = torch.tensor([[math.cos(0.5), math.sin(0.5)]])
    res = knn_classify(train, torch.arange(6), query, torch.tensor([1]), ks=(4, 5))
    assert res == {4: {"top1": 0.0, "top5": 0.0}, 5: {"top1": 0.0, "top5": 100.0}}


def _knn_reference(train, train_labels, test, test_labels, k, temperature, num_classes):
    """One query at a time, straight from the definition."""
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        order = sorted(range(len(train)), key=lambda j: -sims[j].item())[:k]
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for j in order:
            votes[train_labels[j]] += math.exp(sims[j].item() / temperature)
        ranked = [c for c in votes.argsort(descending=True).tolist() if votes[c] > 0]
        top1 += ranked[0] == y.item()
        top5 += y.item() in ranked[:5]
    return {"top1": 100.0 * top1 / len(test), "top5": 100.0 * top5 / len(test)}


@pytest.mark.parametrize("block_elements", [1 << 26, 37])  # default, and 1 test row per block
def test_knn_matches_reference(monkeypatch, block_elements):
    monkeypatch.setattr(fd_eval, "_SIM_BLOCK_ELEMENTS", block_elements)
    num_classes, dim = 7, 16
    centers = F.normalize(torch.randn(num_classes, dim), dim=1)
    train_labels = torch.randint(num_classes, (37,))
    test_labels = torch.randint(num_classes, (23,))
    train = F.normalize(centers[train_labels] + 0.9 * torch.randn(37, dim), dim=1)
    test = F.normalize(centers[test_labels] + 0.9 * torch.randn(23, dim), dim=1)
    res = knn_classify(train, train_labels, test, test_labels, ks=(20, 1, 5), temperature=0.07,
                       num_classes=num_classes)
    assert list(res) == [1, 5, 20]
    for k in (1, 5, 20):
        assert res[k] == pytest.approx(_knn_reference(train, train_labels, test, test_labels, k, 0.07, num_classes))


@pytest.mark.parametrize("kwargs, match", [
    (dict(ks=(4,)), "k=4 exceeds the 3 training images"),
    (dict(ks=(0,)), "k must be >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_knn_rejects_bad_arguments(kwargs, match):
    train, labels, test, test_labels = _toy()
    with pytest.raises(ValueError, match=match):
        knn_classify(train, labels, test, test_labels, **kwargs)
