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
from fastdino.engine.vit import build_backbone


class DINOModel(nn.Module):
    """Backbone + head over all crops in one pass, like DINO's MultiCropWrapper (same `backbone.`/`head.` keys)."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.init_weights()

    def forward(self, crops: torch.Tensor | list[torch.Tensor], *, bottleneck: bool = False) -> torch.Tensor:
        """Crops [(B, C, H, W)] * V -> (V*B, K), in crop order; with `bottleneck`, the head's (V*B, bottleneck_dim)
        features before its last layer (see DINOHead.forward)."""
        return self.head(self.backbone(crops), bottleneck=bottleneck)


def build_model(cfg: TrainConfig, *, student: bool) -> DINOModel:
    """Backbone + head from the config; the teacher has no stochastic depth. The head's parameters are created,
    not set: build under `torch.device("meta")` and load `initial_state(cfg)`, or call `init_weights()`."""
    m = cfg.model
    backbone = build_backbone(m.arch, m.patch_size, img_size=m.img_size,
                              drop_path_rate=m.drop_path_rate if student else 0.0, attention=m.attention,
                              pos_embed_resample=m.pos_embed_resample, embed_dim=m.embed_dim, depth=m.depth,
                              num_heads=m.num_heads)
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
