"""Linear probe on frozen features, after DINO's `eval_linear.py` (Caron et al. 2021, Sec. 4.1 and App. D).

Features: ViT-S-like backbones (D < 768) use the CLS tokens of the last 4 blocks concatenated, ViT-B and larger
the last CLS + the mean patch token, as in DINO; `pooling` overrides. The linear layer (weights N(0, 0.01), zero
bias) trains with SGD, momentum 0.9, no weight decay, lr = 0.001 * batch_size / 256 by default, cosine-annealed to
0 over the epochs (one value per epoch), and is validated after every epoch.

Deliberate difference from DINO: the features are extracted once, without augmentation, and the layer trains on
the cached features. DINO re-encodes every image every epoch under RandomResizedCrop + flip; that costs
`epochs` backbone passes over the training set, where this costs one, for an accuracy usually a little below
DINO's published linear numbers. The cache lives in memory: a resumed probe extracts the features again.

Resuming: after every epoch `output_dir/linear_checkpoint.pth` (layer, optimizer, history, and the settings with
the backbone's weights digest) is replaced atomically; run the same command again to continue. A checkpoint of
another backbone or other settings is refused. The shuffling of epoch e depends only on (seed, e), so a
resumed probe ends with the same weights as an uninterrupted one.
"""
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdino.engine.eval import check_writable, distributed_rank_world, split_features
from fastdino.files import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT = "linear_checkpoint.pth"
RESULTS = "linear_results.json"
# Validation rows per forward: bounds the (rows, classes) logits block.
_EVAL_ROWS = 8192


def default_pooling(embed_dim: int) -> str:
    """DINO's probe features: 4 x CLS for ViT-S-like widths, CLS + mean patch token from ViT-B (D = 768) up."""
    return "cls4" if embed_dim < 768 else "cls_avgpool"


def train_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, *, num_classes: int, epochs: int = 100, lr: float | None = None,
                 batch_size: int = 1024, momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 output_dir=None, features_of: str | None = None) -> dict:
    """Train a linear classifier on cached features (N, F); returns final and best validation accuracy (%).

    With `output_dir`, rank 0 checkpoints after every epoch and a matching checkpoint found there is resumed;
    `features_of` names what the features come from (`linear_probe`: the backbone's weights digest and the
    pooling), so that a probe of other features is never resumed.
    Result: {"top1", "top5", "best_top1", "epochs", "history": [{"epoch", "lr", "loss", "top1", "top5"}, ...]}.
    """
    lr = 0.001 * batch_size / 256 if lr is None else lr
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    device = train_feats.device
    settings = {"num_features": train_feats.shape[1], "num_classes": num_classes, "num_train": train_feats.shape[0],
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
                "weight_decay": weight_decay, "seed": seed, "features_of": features_of}
    linear = nn.Linear(train_feats.shape[1], num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(linear.bias)
    linear.to(device)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    history = _resume(Path(output_dir) / CHECKPOINT, settings, linear, optimizer) if output_dir else []
    is_writer = distributed_rank_world()[0] == 0
    for epoch in range(len(history), epochs):
        epoch_lr = 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr
        order = torch.randperm(train_feats.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].to(device)
            loss = F.cross_entropy(linear(train_feats[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
        top1, top5 = accuracy(linear, val_feats, val_labels)
        history.append({"epoch": epoch + 1, "lr": epoch_lr, "loss": loss_sum.item() / len(order),  # host sync
                        "top1": top1, "top5": top5})
        logger.info("linear epoch %d/%d: lr %.4g loss %.4f val top-1 %.2f top-5 %.2f", epoch + 1, epochs,
                    epoch_lr, history[-1]["loss"], top1, top5)
        if output_dir and is_writer:
            state = {"settings": settings, "linear": linear.state_dict(), "optimizer": optimizer.state_dict(),
                     "history": history}
            atomic_write(Path(output_dir) / CHECKPOINT, lambda tmp: torch.save(state, tmp))
    result = {"top1": history[-1]["top1"], "top5": history[-1]["top5"],
              "best_top1": max(h["top1"] for h in history), "epochs": epochs, "history": history}
    if output_dir and is_writer:
        atomic_write(Path(output_dir) / RESULTS, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return result


@torch.no_grad()
def accuracy(linear: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-min(5, classes) accuracy (%) of `linear` on (N, F) features."""
    correct = torch.zeros(2, dtype=torch.long, device=feats.device)
    for start in range(0, feats.shape[0], _EVAL_ROWS):
        logits = linear(feats[start:start + _EVAL_ROWS])  # (b, classes)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[start:start + _EVAL_ROWS, None]
        correct += torch.stack([hits[:, 0].sum(), hits.sum()])
    top1, top5 = (correct.double() * 100.0 / max(1, feats.shape[0])).tolist()  # host sync: once per call
    return top1, top5


def _resume(path: Path, settings: dict, linear: nn.Module, optimizer) -> list[dict]:
    """Load a probe checkpoint into `linear` / `optimizer`; returns its history ([] when there is none)."""
    if not path.is_file():
        return []
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if "features_of" in changed:
        raise ValueError(f"{path} is the probe of other features ({changed['features_of'][0]}; these are "
                         f"{changed['features_of'][1]}): use another output directory, or delete it")
    if changed:
        raise ValueError(f"{path} is a probe with other settings (saved, now): {changed}; "
                         f"use another output directory or delete it")
    linear.load_state_dict(state["linear"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming the linear probe from %s after epoch %d", path, len(state["history"]))
    return state["history"]


def linear_probe(backbone, data_path, output_dir, *, pooling: str = "auto", image_size: int = 224,
                 epochs: int = 100, lr: float | None = None, batch_size: int = 1024, extract_batch_size: int = 256,
                 device="cpu", num_workers: int = 2, seed: int = 0) -> dict:
    """Linear probe of a frozen backbone on `data_path` (train/ and val/); results as `train_linear`'s."""
    pooling = default_pooling(backbone.embed_dim) if pooling == "auto" else pooling
    if distributed_rank_world()[0] == 0:
        check_writable(output_dir, folder=True)
    features, classes = split_features(backbone, data_path, ("train", "val"), image_size=image_size,
                                       batch_size=extract_batch_size, device=device, num_workers=num_workers,
                                       pooling=pooling, normalize=False)
    logger.info("linear probe on %s features (%d classes)", pooling, len(classes))
    features_of = f"{pooling} at {image_size} px of the backbone with weights digest {weights_digest(backbone)}"
    return train_linear(*features["train"], *features["val"], num_classes=len(classes), epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, output_dir=output_dir, features_of=features_of)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a model's tensors, names and dtypes: the same weights give the same digest
    whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
