"""The DINO network: backbone + head over all crops (`DINOModel`), built from a run's config (`build_model`) with
the run's initial weights (`initial_state`).

The initial weights come from one unsharded CPU model seeded with `cfg.seed`, so they do not depend on the number
of ranks (DTensor random init on the CPU draws the same values on every shard), and the untrained baseline of the
k-NN evaluation is exactly the network training started from.
"""
import torch
import torch.nn as nn

from fastdino.engine.config import TrainConfig
from fastdino.engine.head import DINOHead
from fastdino.engine.vit import create_model


class DINOModel(nn.Module):
    """Backbone + head over all crops in one pass, like DINO's MultiCropWrapper (same `backbone.`/`head.` keys)."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.init_weights()

    def forward(self, crops: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Crops [(B, C, H, W)] * V -> (V*B, K), in crop order."""
        return self.head(self.backbone(crops))


def build_model(cfg: TrainConfig, *, student: bool) -> DINOModel:
    """Backbone + head from the config; the teacher has no stochastic depth. The head's parameters are created,
    not set: build under `torch.device("meta")` and load `initial_state(cfg)`, or call `init_weights()`."""
    overrides = {k: getattr(cfg.model, k) for k in ("embed_dim", "depth", "num_heads") if getattr(cfg.model, k)}
    # The registry's patch-8 and patch-16 entries differ only in patch_size, which is passed explicitly.
    backbone = create_model(f"{cfg.model.arch}_patch16", patch_size=cfg.model.patch_size, img_size=cfg.model.img_size,
                            drop_path_rate=cfg.model.drop_path_rate if student else 0.0,
                            attention=cfg.model.attention, pos_embed_resample=cfg.model.pos_embed_resample,
                            **overrides)
    h = cfg.head
    head = DINOHead(backbone.embed_dim, h.out_dim, use_bn=h.use_bn, norm_last_layer=h.norm_last_layer,
                    nlayers=h.nlayers, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim)
    return DINOModel(backbone, head)


def initial_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The run's initial weights: a full CPU DINOModel initialised from `cfg.seed`, the same on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, student=True)
        model.init_weights()
    return model.state_dict()
