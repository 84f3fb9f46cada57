"""Model, loss, training loop and evaluation: composes kernels, pipelines and models."""
from fastdino.engine.config import TrainConfig
from fastdino.engine.head import DINOHead
from fastdino.engine.loss import DINOLoss
from fastdino.engine.model import DINOModel
from fastdino.engine.vit import VisionTransformer, build_backbone, create_model

__all__ = ["DINOHead", "DINOLoss", "DINOModel", "TrainConfig", "VisionTransformer", "build_backbone", "create_model"]
