"""What goes into each batch: the images of a rank's batch and their view parameters, for both backends.

`BatchFeeder` is a plain picklable object, so that DALI's parallel external source and torch DataLoader workers
can each hold a copy and compute any batch from its (epoch, batch) position alone.
"""
import numpy as np

from fastdino.pipelines.augment import view_params
from fastdino.pipelines.config import MultiCropConfig
from fastdino.pipelines.masking import MaskBatch, MaskingConfig, batch_rng, draw_masks
from fastdino.pipelines.sources import DatasetUnreadableError, ImageSource, epoch_batches


class BatchFeeder:
    """Image indices, encoded bytes and (B, V, NUM_PARAMS) view parameters of every batch of one rank.

    Images found undecodable after validation are `bad`; a bad image's slot takes the next good image of the
    source (deterministically, so a recomputed batch is the same batch).
    """

    def __init__(self, source: ImageSource, crops: MultiCropConfig, batch_size: int, *, seed: int, rank: int,
                 world_size: int, masking: MaskingConfig | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.source, self.crops, self.batch_size = source, crops, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.masking = masking
        self.num_batches = len(epoch_batches(len(source), batch_size, seed=seed, epoch=0, rank=rank,
                                             world_size=world_size))
        self.bad: set[int] = set()
        self.first = (0, 0)  # (epoch, batch) of the first batch a DALI pipeline asks for; see __call__
        self._plan: tuple[int, np.ndarray] | None = None

    def mark_bad(self, index: int) -> None:
        """Skip image `index` from now on; DatasetUnreadableError once no image is left."""
        self.bad.add(int(index))
        if len(self.bad) >= len(self.source):
            raise DatasetUnreadableError(f"no image of the dataset {self.source.root} can be read any more (all "
                                         f"{len(self.source)} failed since it was listed: deleted, moved or "
                                         f"unmounted?)")

    def substitute(self, index: int) -> int:
        """`index`, or the next good image after it when it is bad."""
        while index in self.bad:
            index = (index + 1) % len(self.source)
        return index

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """(B,) image indices of batch `batch` of `epoch`, bad images substituted."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_batches(len(self.source), self.batch_size, seed=self.seed, epoch=epoch,
                                               rank=self.rank, world_size=self.world_size))
        return np.array([self.substitute(int(i)) for i in self._plan[1][batch]], dtype=np.int64)

    def params(self, epoch: int, index: int) -> np.ndarray:
        """(V, NUM_PARAMS) view parameters of image `index` in `epoch`."""
        height, width = self.source.sizes[index]
        return view_params(self.seed, epoch, int(index), int(height), int(width), self.crops)

    def masks(self, epoch: int, batch: int) -> np.ndarray | None:
        """(2B, N) bool iBOT masks of batch `batch` of `epoch`'s global crops (crop-major), None without masking."""
        if self.masking is None:
            return None
        return draw_masks(self.masking, 2 * self.batch_size, batch_rng(self.seed, self.rank, epoch, batch))

    def mask_batch(self, masks) -> MaskBatch | None:
        """`masks` (2B, N) padded to the run's static upper bound (masking.MaskBatch)."""
        if masks is None:
            return None
        return MaskBatch.from_masks(masks, self.masking.upper_bound(2 * self.batch_size))

    def __call__(self, info):
        """DALI batch source: encoded images (list of (nbytes,) uint8) and (B, V, NUM_PARAMS) parameters.

        DALI counts epochs from 0 at pipeline build and iterations from 0 in each; DALI epoch k is our epoch
        first[0] + k, starting at batch first[1] when k == 0. The loader rebuilds the pipeline to jump elsewhere.
        With masking, a third output: the (B, 2, N) uint8 masks of each image's two global crops.
        """
        epoch = self.first[0] + info.epoch_idx
        batch = info.iteration + (self.first[1] if info.epoch_idx == 0 else 0)
        if batch >= self.num_batches:
            raise StopIteration
        indices = self.indices(epoch, batch)
        encoded = [np.frombuffer(self.source.read(i), dtype=np.uint8) for i in indices]
        params = np.stack([self.params(epoch, i) for i in indices])
        if self.masking is None:
            return encoded, params
        masks = self.masks(epoch, batch).reshape(2, self.batch_size, -1).transpose(1, 0, 2)  # per image
        return encoded, params, np.ascontiguousarray(masks, dtype=np.uint8)
