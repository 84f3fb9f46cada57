"""`build_loader`: the multi-crop training loader, on DALI or on the torchvision fallback, sharded and resumable."""
import io
import logging
from pathlib import Path

import torch
from PIL import Image

from fastdino.pipelines.config import MultiCropConfig
from fastdino.pipelines.feeder import BatchFeeder
from fastdino.pipelines.masking import MaskingConfig
from fastdino.pipelines.sources import ImageSource, open_source

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torchvision")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """(backend, reason). "auto" takes DALI when it imports and decodes a probe image on `device` (it beats the
    fallback on the CPU as well); an explicit "dali" that cannot is a ValueError."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torchvision":
        return "torchvision", "requested"
    try:
        import nvidia.dali
    except ImportError as err:
        return _without_dali(requested, f"nvidia.dali does not import ({err})")
    from fastdino.pipelines.dali import dali_decode_error

    problem = dali_decode_error(_probe_jpeg(), device=device)
    if problem is not None:
        return _without_dali(requested, f"DALI cannot decode on {device} ({problem})")
    return "dali", "requested" if requested == "dali" else f"nvidia-dali {nvidia.dali.__version__} decodes here"


def _without_dali(requested: str, reason: str) -> tuple[str, str]:
    if requested == "dali":
        raise ValueError(f"backend='dali' but {reason}; install it with `pip install nvidia-dali-cuda130` or use "
                         f"backend='torchvision'")
    return "torchvision", reason


def _probe_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buffer, "JPEG")
    return buffer.getvalue()


class MultiCropLoader:
    """Batches of multi-crop views of one rank: iterating yields a list of 2 + N tensors (B, 3, S, S) on `device`,
    ImageNet-normalised, global views first (a `masking.CropBatch`: with masking, its `masks` are the global crops'
    iBOT masks, on `device`).

    Position: iteration runs from the current (epoch, batch) to the end of that epoch, then moves to
    (epoch + 1, 0). `set_epoch(e)` moves to (e, 0) unless the loader already stands in epoch e (so that a loaded
    mid-epoch position survives the usual `set_epoch` call at the top of the epoch loop). `state_dict()` is the
    position; `load_state_dict` restores it, and iteration continues with exactly the batches that would have
    come next.
    """

    def __init__(self, feeder: BatchFeeder, backend: str, *, device: torch.device, dtype: torch.dtype,
                 num_workers: int):
        self.feeder, self.backend, self.device, self.dtype = feeder, backend, device, dtype
        self.epoch, self.batch = 0, 0
        self.decode_failures: set[int] = set()
        if backend == "dali":
            from fastdino.pipelines.dali import DaliEngine

            self.engine = DaliEngine(feeder, feeder.crops, device=device, num_threads=max(1, num_workers),
                                     py_workers=num_workers // 4, dtype=dtype, on_failure=self._failed)
        else:
            from fastdino.pipelines.torchvision_loader import TorchvisionEngine

            self.engine = TorchvisionEngine(feeder, num_workers=num_workers, device=device, dtype=dtype,
                                            on_failure=self._failed)

    @property
    def num_images(self) -> int:
        """Images of the dataset (all ranks) after validation."""
        return len(self.feeder.source)

    @property
    def batch_size(self) -> int:
        return self.feeder.batch_size

    @property
    def labelled(self) -> bool:
        """Whether every image has a class label (only evaluation needs them)."""
        return self.feeder.source.labelled

    @property
    def num_skipped(self) -> int:
        """Files skipped at validation plus images that failed to decode since."""
        return self.feeder.source.num_skipped + len(self.decode_failures)

    def __len__(self) -> int:
        return self.feeder.num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def __iter__(self):
        epoch = self.epoch
        for views in self.engine.iterate(epoch, self.batch):
            self.batch += 1
            yield views
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict:
        f = self.feeder
        return {"epoch": self.epoch, "batch": self.batch, "num_images": len(f.source), "batch_size": f.batch_size,
                "world_size": f.world_size, "seed": f.seed}

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        for key in ("num_images", "batch_size", "world_size", "seed"):
            if state[key] != expected[key]:
                raise ValueError(f"cannot resume the data loader: it was saved with {key}={state[key]}, this one "
                                 f"has {key}={expected[key]} (the batches would differ)")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"cannot resume at batch {state['batch']}: an epoch has {len(self)} batches")
        self.epoch, self.batch = state["epoch"], state["batch"]

    def close(self) -> None:
        self.engine.close()
        self.feeder.source.close()

    def _failed(self, index: int, message: str) -> None:
        """An image that passed validation failed to decode: count it once, skip it from now on."""
        if index not in self.decode_failures:
            self.decode_failures.add(index)
            count = len(self.decode_failures)
            if count <= 10 or count % 1000 == 0:  # a vanished dataset fails every image: a line each would flood
                logger.warning("skipping undecodable image %s (%s); %d image(s) skipped since validation",
                               self.feeder.source.describe(index), message, count)
        self.feeder.mark_bad(index)


def build_loader(source: str | Path | ImageSource, crops: MultiCropConfig, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, backend: str = "auto", device: str | torch.device = "cpu",
                 num_workers: int = 2, dtype: torch.dtype = torch.float32,
                 masking: MaskingConfig | None = None) -> MultiCropLoader:
    """The multi-crop loader of `rank` over `source` (a path as `resolve_split` returns, or an opened source).

    batch_size is per rank; len(loader) = images // (batch_size * world_size) batches per epoch (drop last).
    num_workers: DataLoader workers (torchvision) or DALI CPU threads, with num_workers // 4 processes reading
    files (0 = read in the main process). The backend choice and its reason are logged once, here.
    masking: draw DINOv2's block masks of the global crops with every batch (pipelines/masking.py).
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    name, reason = select_backend(backend, device)
    if not isinstance(source, ImageSource):
        source = open_source(str(source), num_threads=max(4, num_workers))
    feeder = BatchFeeder(source, crops, batch_size, seed=seed, rank=rank, world_size=world_size, masking=masking)
    loader = MultiCropLoader(feeder, name, device=device, dtype=dtype, num_workers=num_workers)
    where = "GPU" if device.type == "cuda" else "CPU"
    logger.info("data: backend %s on the %s (%s); %d images in %s, %d batches of %d per rank and epoch, %d views",
                name, where, reason, len(source), source.root, len(loader), batch_size, crops.num_views)
    return loader
