"""Frozen-feature evaluation: feature extraction (sharded under torch.distributed) and weighted k-NN.

k-NN follows DINO's `eval_knn.py` (Caron et al. 2021, Sec. 4.1 and App. D): features are L2-normalised, the
k nearest training features vote for their class with weight exp(cos_sim / T), T = 0.07, and top-1 / top-5
are read off the summed votes. Several k's share one similarity pass: the top max(k) neighbours are found once
and each k uses a prefix of them.
"""
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from fastdino.engine.config import TrainConfig
from fastdino.files import atomic_write

logger = logging.getLogger(__name__)


class KNNDataError(ValueError):
    """The dataset does not allow the k-NN asked for: val classes missing from train, or fewer train images than k.
    After training, the run skips its k-NN with one line rather than fail (cli.evaluate_at_end)."""

# What a feature vector is made of: "cls" = final-norm CLS (k-NN, DINO eval_knn.py); "cls4" = the CLS tokens of
# the last 4 blocks concatenated (DINO linear probe for ViT-S); "cls_avgpool" = last CLS + mean patch token
# (DINO linear probe for ViT-B).
POOLINGS = ("cls", "cls4", "cls_avgpool")

# Feature extraction logs a progress line at most this often.
PROGRESS_EVERY_S = 10.0

# Test rows per similarity block are chosen so one (rows, N_train) block holds at most this many fp32 values
# (256 MiB): the full (N_test, N_train) matrix is never built.
_SIM_BLOCK_ELEMENTS = 1 << 26


def feature_dim(backbone, pooling: str) -> int:
    """Length of one feature vector of `backbone` under `pooling`."""
    return backbone.embed_dim * {"cls": 1, "cls4": 4, "cls_avgpool": 2}[_check_pooling(pooling)]


def embed(backbone, images: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """(B, 3, S, S) images -> (B, F) features of a frozen backbone, F = feature_dim(backbone, pooling)."""
    if _check_pooling(pooling) == "cls":
        return backbone(images)  # (B, D)
    if pooling == "cls4":
        return torch.cat([tokens[:, 0] for tokens in backbone.get_intermediate_layers(images, 4)], dim=-1)  # (B, 4D)
    tokens = backbone.get_intermediate_layers(images, 1)[0]  # (B, N, D)
    patches = tokens[:, 1:]  # (B, N - 1, D): fastdino's ViT has one prefix token (CLS), no registers
    return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # (B, 2D)


@torch.no_grad()
def extract_features(backbone, loader, device, *, pooling: str = "cls", normalize: bool = True,
                     process_group=None, name: str = "images",
                     progress_every_s: float = PROGRESS_EVERY_S) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every image `loader` yields, as fp32 `(N, F)` and int64 `(N,)` on `device`.

    When torch.distributed is initialised, each rank passes the loader of its own shard and the shards are
    all-gathered (rank-major order), so every rank returns the features of the whole dataset.
    `normalize` L2-normalises each row (k-NN); the linear probe takes raw features. A progress line (batches,
    img/s, ETA) is logged every `progress_every_s` seconds, naming the images as `name`.
    """
    backbone.eval()
    feats, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    start = last_line = time.perf_counter()
    seen = 0
    for batch, (images, targets) in enumerate(loader, 1):
        feats.append(embed(backbone, images.to(device, non_blocking=True), pooling).float())
        labels.append(targets.to(device, non_blocking=True))
        seen += len(targets)
        now = time.perf_counter()
        if now - last_line >= progress_every_s and batch != total:
            last_line = now
            rate = seen / (now - start)
            eta = f", ETA {(now - start) * (total - batch) / batch:.0f} s" if total else ""
            logger.info("features of %s: batch %d%s, %.0f img/s%s", name, batch, f"/{total}" if total else "",
                        rate, eta)
    feats = torch.cat(feats) if feats else torch.empty(0, feature_dim(backbone, pooling), device=device)
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    if normalize:
        feats = F.normalize(feats, dim=1)
    if dist.is_initialized() and dist.get_world_size(process_group) > 1:
        feats, labels = _all_gather_rows(feats, process_group), _all_gather_rows(labels, process_group)
    return feats, labels


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0; ranks may hold different numbers of rows."""
    world = dist.get_world_size(group)
    rows = torch.tensor([x.shape[0]], device=x.device)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    all_rows = [int(r) for r in all_rows]  # host sync: sizes are needed to pad and trim
    padded = x.new_zeros((max(all_rows), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, all_rows)])


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, ks=(20,), temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy (%) of L2-normalised features: `{k: {"top1": %, "top5": %}}`.

    train_feats (N, D), train_labels (N,), test_feats (M, D), test_labels (M,). Runs on train_feats' device.
    Top-5 is top-min(5, num_classes). Classes come from the labels when `num_classes` is None.
    A class no neighbour voted for is never a hit; DINO's eval_knn.py lets such zero-vote classes fill the
    top-5 in arbitrary tie order, which is the only difference from it.
    """
    ks = sorted({int(k) for k in ks})
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    if ks[-1] > n_train:
        raise KNNDataError(f"k={ks[-1]} exceeds the {n_train} training images")
    if n_test == 0:
        raise ValueError("no test features to classify")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train and test feature sizes differ: {train_feats.shape[1]} vs {test_feats.shape[1]}")
    device = train_feats.device
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_t = train_feats.float().t()  # (D, N_train)
    train_labels = train_labels.to(device)
    top_n = min(5, num_classes)
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=device)  # (k, [top1, top5])
    rows = max(1, _SIM_BLOCK_ELEMENTS // n_train)
    for start in range(0, n_test, rows):
        feats = test_feats[start:start + rows].to(device).float()  # (b, D)
        targets = test_labels[start:start + rows].to(device)
        sims, idx = (feats @ train_t).topk(ks[-1], dim=1)  # (b, k_max), sorted by decreasing similarity
        neighbours = train_labels[idx]  # (b, k_max)
        weights = (sims / temperature).exp()
        for i, k in enumerate(ks):
            votes = feats.new_zeros(feats.shape[0], num_classes).scatter_add_(1, neighbours[:, :k], weights[:, :k])
            top_votes, top_classes = votes.topk(top_n, dim=1)  # (b, top_n)
            hits = (top_classes == targets[:, None]) & (top_votes > 0)
            correct[i, 0] += hits[:, 0].sum()
            correct[i, 1] += hits.sum()
    acc = (correct.double() * 100.0 / n_test).cpu()  # host sync: once, at the end
    return {k: {"top1": acc[i, 0].item(), "top5": acc[i, 1].item()} for i, k in enumerate(ks)}


def distributed_rank_world(process_group=None) -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without torch.distributed."""
    if dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


def split_features(backbone, data_path, splits=("train", "val"), *, image_size: int = 224, batch_size: int = 256,
                   device="cpu", num_workers: int = 2, pooling: str = "cls", normalize: bool = True,
                   need_labels: bool = True):
    """Extract the features of each split of an ImageFolder / tar-shard dataset.

    Returns `(features, classes)`: `features[split] = (feats (N, F), labels (N,))`, with every split's labels
    mapped onto the class indices of the first split (the training split); `classes` are that split's names.
    Every split is listed before any is embedded, so that a missing or (with `need_labels`) unlabeled split, or a
    later split with a class the first one lacks, is a ValueError before the work starts.
    """
    from fastdino.pipelines import build_eval_loader, resolve_split

    rank, world = distributed_rank_world()
    paths = {split: resolve_split(str(data_path), split) for split in splits}
    loaders = {split: build_eval_loader(path, image_size=image_size, batch_size=batch_size, rank=rank,
                                        world_size=world, num_workers=num_workers, device=str(device))
               for split, path in paths.items()}
    classes = list(loaders[splits[0]].classes)
    for split, loader in loaders.items():
        if need_labels and not loader.source.labelled:
            raise ValueError(f"the {split} split {paths[split]} has no class labels, which this evaluation needs: "
                             f"use class folders ({split}/CLASS/*.jpg, also inside a tar) or WebDataset .cls members")
        _check_classes(list(loader.classes), classes, data_path, split, splits[0])
    features = {}
    for split, loader in loaders.items():
        feats, labels = extract_features(backbone, loader, device, pooling=pooling, normalize=normalize,
                                         name=f"the {split} split ({loader.num_images} images)")
        if split != splits[0]:
            labels = _remap_labels(labels, list(loader.classes), classes)
        logger.info("extracted %d %s features of size %d", feats.shape[0], split, feats.shape[1])
        features[split] = (feats, labels)
    return features, classes


def _check_classes(split_classes, train_classes, data_path, split, train_split) -> None:
    """A later split's classes must all be the first split's (its images could never be classified else)."""
    missing = sorted(set(split_classes) - set(train_classes))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise KNNDataError(f"{data_path}: {len(missing)} class(es) of the {split} split are missing from the "
                         f"{train_split} split: {shown}")


def _remap_labels(labels, split_classes, train_classes):
    """Labels of a split (indices into split_classes) -> indices into train_classes, matched by class name."""
    if split_classes == train_classes:
        return labels
    index = torch.tensor([train_classes.index(name) for name in split_classes], device=labels.device)
    return index[labels]


def knn_evaluate(backbone, data_path, *, image_size: int = 224, ks=(20,), temperature: float = 0.07,
                 batch_size: int = 256, device="cpu", num_workers: int = 2) -> dict[int, dict[str, float]]:
    """k-NN top-1 / top-5 of a frozen backbone on `data_path` (train/ and val/ ImageFolder trees or tar shards)."""
    features, classes = split_features(backbone, data_path, ("train", "val"), image_size=image_size,
                                       batch_size=batch_size, device=device, num_workers=num_workers)
    (train_feats, train_labels), (val_feats, val_labels) = features["train"], features["val"]
    return knn_classify(train_feats, train_labels, val_feats, val_labels, ks=ks, temperature=temperature,
                        num_classes=len(classes))


def knn_accuracy(backbone: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """k-NN top-1 / top-5 (%) of a frozen backbone on a run's dataset's val split with the eval section's k,
    temperature and batch size. Collective under torch.distributed (each rank embeds its shard). Leaves the global
    RNG as it was: the eval loaders draw from it, and an evaluation during training must not change the training."""
    e = cfg.eval
    with torch.random.fork_rng(devices=[]):
        return knn_evaluate(backbone.to(device).eval(), cfg.data.path, image_size=cfg.model.img_size,
                            ks=(e.knn_k,), temperature=e.knn_temperature, batch_size=e.batch_size, device=device,
                            num_workers=cfg.data.num_workers)[e.knn_k]


def export_features(backbone, data_path, output, *, splits=("train", "val"), pooling: str = "cls",
                    image_size: int = 224, batch_size: int = 256, device="cpu", num_workers: int = 2) -> Path:
    """Write each split's raw (not L2-normalised) features and labels to a .safetensors or .npz file.

    Arrays: `{split}_features` (N, F) float32 and `{split}_labels` (N,) int64, labels indexing the first split's
    classes; the class names are the `classes` metadata entry (JSON list) of a .safetensors file and the
    `classes` array of a .npz. Under torch.distributed the rows are in rank-major order and rank 0 writes.
    """
    output = Path(output)
    if output.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"export file must end in .safetensors or .npz, got {output.name}")
    if distributed_rank_world()[0] == 0:
        check_writable(output)
    features, classes = split_features(backbone, data_path, tuple(splits), image_size=image_size,
                                       batch_size=batch_size, device=device, num_workers=num_workers,
                                       pooling=pooling, normalize=False, need_labels=False)
    if distributed_rank_world()[0] != 0:
        return output
    tensors = {}
    for split, (feats, labels) in features.items():
        tensors[f"{split}_features"], tensors[f"{split}_labels"] = feats.cpu().contiguous(), labels.cpu()
    if output.suffix == ".safetensors":
        metadata = {"classes": json.dumps(classes), "pooling": pooling}
        return atomic_write(output, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def write_npz(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temp file name
            np.savez(f, classes=np.array(classes), **{k: v.numpy() for k, v in tensors.items()})

    return atomic_write(output, write_npz)


def check_writable(path, *, folder: bool = False) -> None:
    """Raise OSError now, before any work, when `path` (a file, or a folder with `folder`) cannot be written."""
    path = Path(path)
    directory = path if folder else path.parent
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".fastdino-write-test-{time.time_ns()}"
    probe.write_bytes(b"")
    probe.unlink()


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling
