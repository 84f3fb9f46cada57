"""k-NN: hand-computed cases, a brute-force per-image reference, chunking, argument checks; feature extraction
on 2 gloo ranks with uneven shards."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_close
from fastdino.engine import eval as fd_eval
from fastdino.engine.eval import knn_classify

TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4)}


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


class _FlattenBackbone(torch.nn.Module):
    """Stands in for a ViT: features = a fixed linear map of the flattened image."""

    embed_dim = 5

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, self.embed_dim)

    def forward(self, images):
        return self.proj(images.flatten(1))


def _shards(world_size):
    """11 images, labels 0..10, split unevenly: rank r gets images r, r + world, ... in batches of 2."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(11, 3, 2, 2, generator=g), torch.arange(11)
    return [[(images[i:i + 2], labels[i:i + 2]) for i in range(0, 11, 2)][r::world_size] for r in range(world_size)]


def _extract_on_rank(rank, world_size, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        torch.manual_seed(0)
        feats, labels = fd_eval.extract_features(_FlattenBackbone(), _shards(world_size)[rank], "cpu")
        torch.save((feats, labels), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_extract_features_all_gathers_uneven_shards(tmp_path):
    torch.multiprocessing.spawn(_extract_on_rank, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    torch.manual_seed(0)
    single = fd_eval.extract_features(_FlattenBackbone(), _shards(1)[0], "cpu")
    for rank in range(2):
        feats, labels = torch.load(tmp_path / f"rank{rank}.pt")
        # Rank-major order: rank 0's batches 0, 2, 4 (6 images), then rank 1's batches 1, 3, 5 (5 images).
        assert labels.tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10], labels
        assert_close(feats, single[0][labels], name=f"rank {rank} features", **TOL[torch.float32])
        assert_close(feats.norm(dim=1), torch.ones(11), name="feature norms", **TOL[torch.float32])


def test_feature_extraction_logs_progress(caplog):
    batches = [(torch.randn(2, 3, 2, 2), torch.tensor([0, 1])) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="fastdino.engine.eval"):
        feats, _ = fd_eval.extract_features(_FlattenBackbone(), batches, "cpu", name="the val split",
                                            progress_every_s=0)
    lines = [r.getMessage() for r in caplog.records]
    assert feats.shape[0] == 6 and len(lines) == 2  # after batches 1 and 2; the last one needs no line
    assert lines[0].startswith("features of the val split: batch 1/3,") and "img/s, ETA" in lines[0]
