"""`build_eval_loader`: labelled images for evaluation, resized and center-cropped (DINO's eval transform)."""
import logging
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from fastdino.pipelines.config import IMAGENET_MEAN, IMAGENET_STD
from fastdino.pipelines.sources import DECODE_ERRORS, ImageSource, decode_rgb, open_source

logger = logging.getLogger(__name__)

RESIZE_RATIO = 256 / 224  # resize the shorter side to 256 for a 224 crop, as in DINO's eval_knn / eval_linear


class EvalBatches(Dataset):
    """Item b: (images (b, 3, S, S) float32 normalised, labels (b,) int64, failures [(path, message)]).

    An image that fails to decode is left out of its batch (evaluation must not count any image twice).
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, image_size: int, batch_size: int):
        self.source, self.indices, self.image_size, self.batch_size = source, indices, image_size, batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, batch: int):
        images, labels, failures = [], [], []
        for index in self.indices[batch * self.batch_size:(batch + 1) * self.batch_size]:
            try:
                img = decode_rgb(self.source.read(index))
            except DECODE_ERRORS as err:
                failures.append((self.source.describe(index), f"{type(err).__name__}: {err}"))
                continue
            img = TF.resize(img, round(self.image_size * RESIZE_RATIO), interpolation=InterpolationMode.BICUBIC)
            images.append(TF.pil_to_tensor(TF.center_crop(img, self.image_size)))
            labels.append(self.source.labels[index])
        size = self.image_size
        x = torch.stack(images).float() if images else torch.empty(0, 3, size, size)  # (b, 3, S, S)
        x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        return x, torch.tensor(np.array(labels, dtype=np.int64)), failures


class EvalLoader:
    """Iterating yields (images (B, 3, S, S) float32, labels (B,) int64) on `device`; rank r holds images
    r, r + world_size, ... of the split in listing order, so the ranks together see every image once."""

    def __init__(self, source: ImageSource, indices: np.ndarray, *, image_size: int, batch_size: int,
                 num_workers: int, device: torch.device):
        self.source, self.device = source, device
        self.decode_failures = 0
        self.dataset = EvalBatches(source, indices, image_size, batch_size)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                 pin_memory=device.type == "cuda")

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def num_images(self) -> int:
        """Images of the split (all ranks) after validation."""
        return len(self.source)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for images, labels, failures in self.loader:
            for where, message in failures:
                self.decode_failures += 1
                logger.warning("skipping undecodable image %s (%s); %d skipped in this pass", where, message,
                               self.decode_failures)
            if len(labels):
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def build_eval_loader(source: str | Path | ImageSource, *, image_size: int = 224, batch_size: int = 256,
                      rank: int = 0, world_size: int = 1, num_workers: int = 2,
                      device: str | torch.device = "cpu") -> EvalLoader:
    """Evaluation loader of `rank`: bicubic resize of the shorter side to image_size * 256/224, center crop."""
    for name, value in (("image_size", image_size), ("batch_size", batch_size), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not isinstance(source, ImageSource):
        source = open_source(str(source), num_threads=max(4, num_workers))
    indices = np.arange(rank, len(source), world_size)
    return EvalLoader(source, indices, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                      device=torch.device(device))
