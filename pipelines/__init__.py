"""Data: multi-crop pipelines (DALI on the GPU, torchvision fallback) over ImageFolder and tar sources (public
names imported on first use: fastdino/lazy.py)."""
from fastdino.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "MultiCropConfig": "config", "EvalLoader": "eval_loader", "build_eval_loader": "eval_loader",
    "MultiCropLoader": "loader", "build_loader": "loader", "select_backend": "loader",
    "DatasetUnreadableError": "sources", "ImageSource": "sources", "epoch_batches": "sources",
    "open_source": "sources", "resolve_split": "sources",
    "default_dataset_dir": "synthetic", "make_shapes_dataset": "synthetic",
    "CropBatch": "masking", "MaskBatch": "masking", "MaskingConfig": "masking", "MaskingGenerator": "masking",
})
