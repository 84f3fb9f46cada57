"""Model, loss, training loop and evaluation: composes kernels, pipelines and models (public names imported
on first use: fastdino/lazy.py)."""
from fastdino.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "TrainConfig": "config", "DINOHead": "head", "DINOModel": "model", "DINOLoss": "loss",
    "VisionTransformer": "vit", "build_backbone": "vit", "create_model": "vit",
    "iBOTPatchLoss": "ibot_loss", "KoLeoLoss": "koleo_loss",
})
