"""The fallback backend: PIL decoding and resizing in DataLoader workers, augmentations by `augment.py` in torch.

It applies the same parameter rows as the DALI pipeline, so it is also the reference the DALI path is tested
against. Each worker makes a whole batch (one `(epoch, batch)` position), so batches do not depend on the number
of workers.
"""
import atexit
import logging
import signal
import weakref

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from fastdino.pipelines.augment import X0, X1, Y0, Y1, finish_views
from fastdino.pipelines.feeder import BatchFeeder
from fastdino.pipelines.masking import CropBatch
from fastdino.pipelines.sources import DECODE_ERRORS, DatasetUnreadableError, decode_rgb

logger = logging.getLogger(__name__)


def resized_crops(img: Image.Image, params: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Cut every view's box out of `img` and resize it (bicubic, antialiased) to its side: (S, S, 3) uint8 each.

    Boxes are whole pixels (the sampler draws them so); rounding undoes the float32 storage of their corners.
    """
    width, height = img.size
    out = []
    for row, size in zip(params, sizes):
        box = tuple(round(float(c)) for c in (row[X0] * width, row[Y0] * height, row[X1] * width, row[Y1] * height))
        out.append(np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box)))
    return out


def decode_batch(feeder: BatchFeeder, indices: np.ndarray):
    """Decode the images of a batch, replacing any that fails by the feeder's substitute.

    Returns (images, indices actually used, failures [(index, message)]).
    """
    images, used, failures = [], [], []
    for index in indices:
        index = feeder.substitute(int(index))
        while True:
            try:
                images.append(decode_rgb(feeder.source.read(index)))
                used.append(index)
                break
            except DECODE_ERRORS as err:
                failures.append((index, f"{type(err).__name__}: {err}"))
                feeder.mark_bad(index)
                index = feeder.substitute(index)
    return images, np.array(used, dtype=np.int64), failures


class MultiCropBatches(Dataset):
    """Map-style dataset whose items are whole batches: item (epoch, batch) -> (views, failures, unreadable).

    views: a CropBatch of V float32 tensors (B, 3, S, S), global views first, with the global crops' iBOT masks
    (drawn here, in the worker) when the feeder masks. unreadable: None, or (views None) why no
    image of the dataset can be read any more, as a message: a worker's exception would reach the main process
    wrapped in its traceback.
    """

    def __init__(self, feeder: BatchFeeder):
        self.feeder = feeder

    def __len__(self) -> int:
        return self.feeder.num_batches

    def __getitem__(self, position: tuple[int, int]):
        epoch, batch = position
        try:
            images, indices, failures = decode_batch(self.feeder, self.feeder.indices(epoch, batch))
        except DatasetUnreadableError as error:
            return None, [], str(error)
        params = np.stack([self.feeder.params(epoch, i) for i in indices])  # (B, V, P)
        sizes = self.feeder.crops.view_sizes()
        per_image = [resized_crops(img, p, sizes) for img, p in zip(images, params)]
        params = torch.from_numpy(params)
        views = [finish_views(torch.from_numpy(np.stack([crops[v] for crops in per_image])), params[:, v])
                 for v in range(len(sizes))]
        return CropBatch(views, self.feeder.mask_batch(self.feeder.masks(epoch, batch))), failures, None


class _Positions(Sampler):
    """(epoch, batch) positions from a start batch to the end of the epoch; reset by the engine each epoch."""

    def __init__(self):
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.start, self.stop)])

    def __len__(self) -> int:
        return self.stop - self.start


def _single_thread_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers run in parallel already; intra-op threads would oversubscribe the cores
    # A terminal's Ctrl-C and torchrun's SIGTERM reach the workers too. The main process stops the run cleanly
    # (engine/stop.py) and needs them until the step in flight has its batch; it shuts them down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shut_down_workers(loader: DataLoader) -> None:
    """Stop the persistent workers now, through their queues. They ignore SIGTERM, so leaving them to
    multiprocessing's exit hook (which terminates daemon processes with SIGTERM, then joins them) would hang."""
    iterator = loader._iterator  # where the DataLoader keeps its persistent workers
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


_live_engines = weakref.WeakSet()


@atexit.register  # registered after torch imported multiprocessing, so it runs before multiprocessing's exit hook
def _shut_down_live_engines() -> None:
    for engine in list(_live_engines):
        engine.close()


class TorchvisionEngine:
    """Batches from a DataLoader over `MultiCropBatches`, moved to `device` as `dtype`."""

    def __init__(self, feeder: BatchFeeder, *, num_workers: int, device: torch.device, dtype: torch.dtype,
                 on_failure):
        self.feeder, self.device, self.dtype, self.on_failure = feeder, device, dtype, on_failure
        self.positions = _Positions()
        self.loader = DataLoader(MultiCropBatches(feeder), sampler=self.positions, batch_size=None,
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                                 worker_init_fn=_single_thread_worker if num_workers else None)
        self._shut_down = weakref.finalize(self, _shut_down_workers, self.loader)  # when collected or closed
        _live_engines.add(self)

    def iterate(self, epoch: int, start: int):
        self.positions.epoch, self.positions.start, self.positions.stop = epoch, start, self.feeder.num_batches
        for views, failures, unreadable in self.loader:
            for index, message in failures:
                self.on_failure(index, message)
            if unreadable is not None:
                raise DatasetUnreadableError(unreadable)
            masks = views.masks.to(self.device, non_blocking=True) if views.masks is not None else None
            yield CropBatch([v.to(self.device, self.dtype, non_blocking=True) for v in views], masks)

    def close(self) -> None:
        self._shut_down()
        self.loader = None
