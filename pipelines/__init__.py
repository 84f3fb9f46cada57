"""Data: multi-crop pipelines (DALI on the GPU, torchvision fallback) over ImageFolder and tar sources."""
from fastdino.pipelines.config import MultiCropConfig
from fastdino.pipelines.eval_loader import EvalLoader, build_eval_loader
from fastdino.pipelines.loader import MultiCropLoader, build_loader, select_backend
from fastdino.pipelines.sources import ImageSource, epoch_batches, open_source, resolve_split
from fastdino.pipelines.synthetic import default_dataset_dir, make_shapes_dataset

__all__ = ["EvalLoader", "ImageSource", "MultiCropConfig", "MultiCropLoader", "build_eval_loader", "build_loader",
           "default_dataset_dir", "epoch_batches", "make_shapes_dataset", "open_source", "resolve_split",
           "select_backend"]
