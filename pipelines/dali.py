"""The DALI backend: one pipeline definition for both devices, and the engine that runs it batch by batch.

Graph (per batch; V = 2 + N views):
  external_source (BatchFeeder: encoded bytes, (B, V, P) view parameters)
  -> decoders.image once per image ("mixed" = nvJPEG on the GPU, "cpu" = libjpeg-turbo)
  -> per view: resize of the crop box (bicubic, antialiased) -> color_twist -> gaussian_blur
     -> [solarize: second global view] -> crop_mirror_normalize (flip, ImageNet mean/std, CHW, fp16/fp32)
Every random value comes from the feeder's parameter rows (see `augment.py`), so no DALI random operator is used
and this graph computes exactly what `augment.finish_views` computes on the fallback path. Each image is decoded
once and its 2 + N crops are cut from the decoded pixels. ROI decoding (decoders.image_crop per view) would decode
the overlapping crops of one image up to 12 times; that trade-off has not been measured on a GPU yet.

Off the GPU the same graph runs with device_id=None and the CPU decoder, which is how the tests exercise it.
"""
import logging

import numpy as np
import torch

from fastdino.pipelines.augment import (BLUR_SIGMA_COL, BRIGHTNESS, CONTRAST, FLIP, GRAY, HUE, SATURATION, SOLARIZE,
                                        X0, X1, Y0, Y1)
from fastdino.pipelines.config import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, MultiCropConfig
from fastdino.pipelines.feeder import BatchFeeder
from fastdino.pipelines.masking import CropBatch
from fastdino.pipelines.sources import DECODE_ERRORS, decode_rgb

logger = logging.getLogger(__name__)

PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the one being consumed


def multicrop_graph(feeder: BatchFeeder, crops: MultiCropConfig, *, gpu: bool, py_workers: int, half: bool):
    """The pipeline body (called inside `pipeline_def`): returns V outputs (B, 3, S, S), then with masking the
    (B, 2, N) masks (CPU).

    py_workers > 0 runs the feeder in that many worker processes, each with up to two batches in flight.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    parallel = dict(parallel=True, prefetch_queue_depth=2 * py_workers) if py_workers > 0 else {}
    masking = feeder.masking is not None  # a third output: the masks, drawn by the feeder (in its workers)
    outputs = fn.external_source(source=feeder, num_outputs=3 if masking else 2, batch=True, batch_info=True,
                                 dtype=[types.UINT8, types.FLOAT, types.UINT8][:3 if masking else 2],
                                 ndim=[1, 2, 2][:3 if masking else 2], **parallel)
    encoded, params = outputs[:2]
    # jpeg_fancy_upsampling: the chroma upsampling of libjpeg-turbo (and PIL), so that both devices and the
    # fallback decode the same pixels.
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                               jpeg_fancy_upsampling=True)
    views = []
    for v, size in enumerate(crops.view_sizes()):
        x = fn.resize(images, roi_start=params[v, Y0:X0 + 1], roi_end=params[v, Y1:X1 + 1], roi_relative=True,
                      size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True)
        x = fn.color_twist(x, brightness=params[v, BRIGHTNESS], contrast=params[v, CONTRAST],
                           saturation=params[v, SATURATION] * (1.0 - params[v, GRAY]), hue=params[v, HUE] * 360.0)
        # gaussian_blur rejects sigma 0, so "no blur" is a 1-tap window (an exact identity).
        sigma = params[v, BLUR_SIGMA_COL]
        blur = sigma > 0.0
        window = fn.cast(blur * (2.0 * dmath.ceil(3.0 * sigma) + 1.0) + (1.0 - blur), dtype=types.INT32)
        x = fn.gaussian_blur(x, sigma=sigma + (1.0 - blur), window_size=window)
        if v == 1:  # only the second global view is ever solarised (DALI moves the CPU flag to the image's device)
            x = fn.cast(x, dtype=types.FLOAT)
            x = x + params[v, SOLARIZE] * (x >= float(SOLARIZE_THRESHOLD)) * (255.0 - 2.0 * x)
        views.append(fn.crop_mirror_normalize(x, mirror=fn.cast(params[v, FLIP], dtype=types.INT32),
                                              mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                              dtype=types.FLOAT16 if half else types.FLOAT, output_layout="CHW"))
    return tuple(views) + tuple(outputs[2:])


def build_pipeline(feeder: BatchFeeder, crops: MultiCropConfig, *, device: torch.device, num_threads: int,
                   py_workers: int, half: bool):
    """Build the DALI pipeline on `device` (cuda: mixed decoding, GPU ops; cpu: device_id=None)."""
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    pipe = pipeline_def(multicrop_graph, batch_size=feeder.batch_size, num_threads=num_threads,
                        device_id=_device_id(device),
                        prefetch_queue_depth=PREFETCH_DEPTH, py_num_workers=max(1, py_workers),
                        py_start_method="spawn")(feeder, crops, gpu=gpu, py_workers=py_workers, half=half)
    pipe.build()
    return pipe


def dali_decode_error(data: bytes, *, device: torch.device) -> str | None:
    """Why DALI's decoder on `device` rejects `data`, or None when it decodes it (a one-image pipeline)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    array = np.frombuffer(data, dtype=np.uint8)

    def graph():
        encoded = fn.external_source(source=lambda: [array], dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)

    try:
        pipe = pipeline_def(graph, batch_size=1, num_threads=1, device_id=_device_id(device))()
        pipe.build()
        pipe.run()
    except RuntimeError as err:
        return _first_line(err)
    return None


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # DALI's CPU-only mode
    return device.index if device.index is not None else torch.cuda.current_device()


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip() and "Critical error" not in line]
    return lines[0] if lines else type(err).__name__


class DaliEngine:
    """Runs the pipeline from any (epoch, batch) position and turns its outputs into torch tensors.

    A pipeline serves consecutive epochs (its feeder maps DALI's epoch counter to ours); jumping elsewhere, or
    recovering from a decode error, builds a new one. On an error the images of the failed batch and of the
    batches prefetched behind it are checked with PIL (then, if PIL decodes them all, with DALI one by one); the
    culprits are dropped for the rest of training and the pipeline restarts at the failed batch.
    """

    def __init__(self, feeder: BatchFeeder, crops: MultiCropConfig, *, device: torch.device, num_threads: int,
                 py_workers: int, dtype: torch.dtype, on_failure):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        self._feed_ndarray, self._to_torch_type = feed_ndarray, to_torch_type
        self.feeder, self.crops, self.device, self.dtype = feeder, crops, device, dtype
        self.num_threads, self.py_workers, self.on_failure = num_threads, py_workers, on_failure
        self.pipe, self.next = None, None

    def _build(self, epoch: int, batch: int) -> None:
        self.close()
        self.feeder.first = (epoch, batch)
        self.pipe = build_pipeline(self.feeder, self.crops, device=self.device, num_threads=self.num_threads,
                                   py_workers=self.py_workers, half=self.dtype != torch.float32)
        self.next = (epoch, batch)

    def iterate(self, epoch: int, start: int):
        if start >= self.feeder.num_batches:
            return
        if self.pipe is None or self.next != (epoch, start):
            self._build(epoch, start)
        batch = start
        while batch < self.feeder.num_batches:
            try:
                outputs = self.pipe.run()
            except (RuntimeError, OSError) as err:  # OSError: a file read by the feeder in this process
                self._recover(epoch, batch, err)
                continue
            n_views = self.crops.num_views
            views = [self._to_torch(out) for out in outputs[:n_views]]
            masks = None
            if len(outputs) > n_views:  # (B, 2, N) per image -> (2B, N) crop-major, as the views
                per_image = torch.from_numpy(outputs[n_views].as_array())
                masks = self.feeder.mask_batch(per_image.transpose(0, 1).flatten(0, 1).bool())
                masks = masks.to(self.device, non_blocking=True)
            batch += 1
            self.next = (epoch, batch)
            if batch == self.feeder.num_batches:
                self._end_epoch(epoch)
            yield CropBatch(views, masks)

    def _to_torch(self, output) -> torch.Tensor:
        tensor = output.as_tensor()
        out = torch.empty(tensor.shape(), dtype=self._to_torch_type[tensor.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._feed_ndarray(tensor, out, cuda_stream=stream)
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def _end_epoch(self, epoch: int) -> None:
        """Take DALI's end-of-epoch signal, so that the same pipeline goes on with the next epoch."""
        try:
            self.pipe.run()
        except StopIteration:
            self.pipe.reset()
            self.next = (epoch + 1, 0)
            return
        raise AssertionError("the DALI pipeline produced more batches than the epoch has")

    def _recover(self, epoch: int, batch: int, err: Exception) -> None:
        self.close()  # a pipeline that raised is no longer usable
        stop = min(self.feeder.num_batches, batch + PREFETCH_DEPTH + 1)
        suspects = np.unique(np.concatenate([self.feeder.indices(epoch, b) for b in range(batch, stop)]))
        found = []
        for index in suspects:
            try:
                decode_rgb(self.feeder.source.read(index))
            except DECODE_ERRORS as pil_err:
                found.append((index, f"{type(pil_err).__name__}: {pil_err}"))
        if not found:
            for index in suspects:
                reason = dali_decode_error(self.feeder.source.read(index), device=self.device)
                if reason is not None:
                    found.append((index, f"DALI: {reason}"))
        if not found:
            raise RuntimeError(f"the DALI pipeline failed on batch {batch} of epoch {epoch} and every image of it "
                               f"decodes on its own: {_first_line(err)}") from err
        for index, message in found:
            self.on_failure(int(index), message)
        self._build(epoch, batch)

    def close(self) -> None:
        self.pipe, self.next = None, None  # dropping the pipeline stops its threads and worker processes
