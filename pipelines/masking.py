"""DINOv2's block-wise masks of the global crops (iBOT), made in the data pipeline's workers with the batch.

`MaskingGenerator` is dinov2's (facebookresearch/dinov2: dinov2/data/masking.py): blocks of at least
`min_num_patches` patches, aspect ratio log-uniform in (min_aspect, 1 / min_aspect), at most 10 attempts a block,
until the crop has its number of masked patches (or a block finds no room). `draw_masks` is the masking half of
dinov2's `collate_data_and_cast` (dinov2/data/collate.py): of the batch's 2B global crops, int(2B * probability)
are masked, with ratios stratified over linspace(ratio_min, ratio_max) (one ratio drawn in each of the intervals),
the others not at all, and the list shuffled. Every draw comes from one `random.Random` per (seed, rank, epoch,
batch), so a batch's masks are a pure function of its position: seeded and resumable like the crops, and the
same for any number of workers.

`MaskBatch` is what travels with the batch: the masks, the flat indices of the masked patches, their weights
(1 / masked patches of their crop, dinov2's `masks_weight`) and their count, padded to the batch's static upper
bound (dinov2's `upperbound`: sum over the masked crops of int(N * their interval's top), the same for every
batch of a run) so that the step's shapes never depend on the data and nothing is read back from the device.
The padding indexes patch 0 with weight 0. The pipelines know nothing of models: they are told the patch grid.
"""
import math
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MaskingConfig:
    """iBOT's masking of the global crops (dinov2 configs/ssl_default_config.yaml `ibot:` and train/train.py)."""

    grid: int
    """Patches per side of a global crop (global_crops_size // patch_size)."""
    ratio_min_max: tuple[float, float] = (0.1, 0.5)
    """Range of the masked share of a masked crop's patches (dinov2 `mask_ratio_min_max`)."""
    probability: float = 0.5
    """Share of the global crops that are masked (dinov2 `mask_sample_probability`)."""
    max_block_share: float = 0.5
    """Largest block as a share of the crop's patches (dinov2 train.py: max_num_patches = 0.5 * N)."""

    def __post_init__(self):
        object.__setattr__(self, "ratio_min_max", tuple(self.ratio_min_max))
        if int(self.grid) != self.grid or self.grid < 1:
            raise ValueError(f"grid must be a positive integer, got {self.grid!r}")
        low, high = self.ratio_min_max
        if not 0 <= low <= high <= 1:
            raise ValueError(f"ratio_min_max must be (low, high) with 0 <= low <= high <= 1, got {self.ratio_min_max}")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")
        if not 0 < self.max_block_share <= 1:
            raise ValueError(f"max_block_share must be in (0, 1], got {self.max_block_share!r}")

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    def generator(self, rng=random) -> "MaskingGenerator":
        return MaskingGenerator((self.grid, self.grid), max_num_patches=self.max_block_share * self.n_tokens, rng=rng)

    def upper_bound(self, n_crops: int) -> int:
        """The most masked patches a batch of `n_crops` global crops can have (dinov2's `upperbound`)."""
        probs = torch.linspace(*self.ratio_min_max, int(n_crops * self.probability) + 1)
        return sum(int(self.n_tokens * p) for p in probs[1:])


class MaskingGenerator:
    """dinov2's MaskingGenerator; `rng` (a random.Random, default the `random` module as dinov2) draws."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None, *, rng=random):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches) -> int:
        """Add one block of at most `max_mask_patches` new patches (10 attempts); the number added."""
        rng = self.rng
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]  # a view
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # dinov2 fills the block's unmasked patches one by one
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches=0) -> np.ndarray:
        """(height, width) bool mask with up to `num_masking_patches` patches masked, in blocks."""
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            delta = self._mask(mask, min(num_masking_patches - mask_count, self.max_num_patches))
            if delta == 0:
                break
            mask_count += delta
        return mask


def draw_masks(config: MaskingConfig, n_crops: int, rng=random) -> np.ndarray:
    """(n_crops, N) bool masks of a batch's global crops, crop-major as the batch (dinov2 collate_data_and_cast)."""
    generator = config.generator(rng)
    n_masked = int(n_crops * config.probability)
    probs = torch.linspace(*config.ratio_min_max, n_masked + 1)  # float32, as dinov2's
    # The min only matters when float32 rounding puts the draw an ulp above its interval (never above the bound).
    masks = [generator(min(int(config.n_tokens * rng.uniform(probs[i], probs[i + 1])), int(config.n_tokens * probs[i + 1])))
             for i in range(n_masked)]
    masks += [generator(0) for _ in range(n_masked, n_crops)]
    rng.shuffle(masks)
    return np.stack(masks).reshape(n_crops, -1)


def batch_rng(seed: int, rank: int, epoch: int, batch: int) -> random.Random:
    """The generator of one batch's masks."""
    return random.Random(int(np.random.SeedSequence((seed, rank, epoch, batch, 1)).generate_state(1)[0]))


@dataclass
class MaskBatch:
    """A batch's iBOT masks, padded to the static `upperbound` (see the module docstring)."""

    masks: torch.Tensor
    """(n_crops, N) bool, the global crops in batch order (crop-major: crop v of image b is row v * B + b)."""
    indices: torch.Tensor
    """(upperbound,) int64 flat indices into masks.flatten() of the masked patches, then 0."""
    weights: torch.Tensor
    """(upperbound,) float32: 1 / masked patches of the patch's crop, 0 on the padding."""
    n_masked: torch.Tensor
    """(1,) int64, the number of masked patches (dinov2's `n_masked_patches`)."""
    upperbound: int
    """The number of rows of `indices`, the same for every batch of a run."""

    @classmethod
    def from_masks(cls, masks, upperbound: int) -> "MaskBatch":
        masks = torch.as_tensor(masks, dtype=torch.bool)
        if masks.ndim != 2:
            raise ValueError(f"masks must be (n_crops, N), got shape {tuple(masks.shape)}")
        indices = masks.flatten().nonzero().flatten()
        n = indices.numel()
        if n > upperbound:
            raise ValueError(f"{n} masked patches exceed the upper bound {upperbound}")
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        pad = upperbound - n
        return cls(masks, torch.cat([indices, indices.new_zeros(pad)]), torch.cat([weights, weights.new_zeros(pad)]),
                   torch.tensor([n]), upperbound)

    @property
    def valid(self) -> torch.Tensor:
        """(upperbound,) bool: the rows that are masked patches, not padding."""
        return torch.arange(self.upperbound, device=self.indices.device) < self.n_masked

    def to(self, device, non_blocking: bool = False) -> "MaskBatch":
        move = dict(device=device, non_blocking=non_blocking)
        return MaskBatch(self.masks.to(**move), self.indices.to(**move), self.weights.to(**move),
                         self.n_masked.to(**move), self.upperbound)

    def pin_memory(self) -> "MaskBatch":  # DataLoader(pin_memory=True) calls it
        return MaskBatch(self.masks.pin_memory(), self.indices.pin_memory(), self.weights.pin_memory(),
                         self.n_masked.pin_memory(), self.upperbound)


class CropBatch(list):
    """The loader's batch: the list of 2 + N views (B, 3, S, S), global first, and `masks`, the global crops'
    MaskBatch (None without masking)."""

    def __init__(self, views, masks: MaskBatch | None = None):
        super().__init__(views)
        self.masks = masks
