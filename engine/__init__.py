"""Model, loss, training loop and evaluation: composes kernels, pipelines and models.

The public names are imported on first use (PEP 562), so that `fastdino --help` and the config code start
without loading torch, timm and Triton.
"""
import importlib

_EXPORTS = {"TrainConfig": "config", "DINOHead": "head", "DINOModel": "model", "DINOLoss": "loss",
            "VisionTransformer": "vit", "build_backbone": "vit", "create_model": "vit"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
