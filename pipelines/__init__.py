"""Data: multi-crop pipelines (DALI on the GPU, torchvision fallback) over ImageFolder and tar sources.

The public names are imported on first use (PEP 562), as in fastdino.engine, so that the config code (which
takes `MultiCropConfig` from pipelines/config.py) starts without loading torch and DALI.
"""
import importlib

_EXPORTS = {"MultiCropConfig": "config", "EvalLoader": "eval_loader", "build_eval_loader": "eval_loader",
            "MultiCropLoader": "loader", "build_loader": "loader", "select_backend": "loader",
            "ImageSource": "sources", "epoch_batches": "sources", "open_source": "sources",
            "resolve_split": "sources", "default_dataset_dir": "synthetic", "make_shapes_dataset": "synthetic"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
