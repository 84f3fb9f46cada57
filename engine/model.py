"""The DINO network: backbone + head over all crops (`DINOModel`), built from a run's config (`build_model`) with
the run's initial weights (`initial_state`).

The initial weights come from one unsharded CPU model seeded with `cfg.seed`, so they do not depend on the number
of ranks (DTensor random init on the CPU draws the same values on every shard), and the untrained baseline of the
k-NN evaluation is exactly the network training started from. With `model.init` (`fastdino train --init PATH`)
the backbone's weights are then replaced by the checkpoint's (any format backbone_io reads), and the head's by the
checkpoint's DINO head when it has one of the run's head shape; student and teacher start from the result.
"""
import torch
import torch.nn as nn

from fastdino.engine.config import ARCHS, TrainConfig
from fastdino.engine.families import FAMILY_MODELS
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
    """The run's initial weights: a full CPU DINOModel initialised from `cfg.seed`, the same on every rank, then
    `model.init`'s weights where it sets them (`init_weights`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, student=True)
        model.init_weights()
    state = model.state_dict()
    if cfg.model.init is not None:
        state.update(init_weights(cfg, state)[0])
    return state


def init_weights(cfg: TrainConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors of `state` that checkpoint `cfg.model.init` replaces, one line saying what was loaded and what
    was initialised). A backbone that does not fit the run's is a ValueError listing the missing and unexpected
    tensors; a head that does not fit the run's head config leaves the head fresh."""
    from fastdino.engine.backbone_io import _few, _key_mismatch, read_backbone, read_head

    path = cfg.model.init
    backbone, info = read_backbone(path)
    ours = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    missing, unexpected = _key_mismatch(ours, backbone)
    if missing or unexpected:
        raise ValueError(f"model.init {path} holds a {info['arch']} that does not fit the run's backbone "
                         f"{cfg.model.arch}: missing {_few(missing, 8)}, unexpected {_few(unexpected, 8)}")
    loaded = {f"backbone.{k}": v.to(ours[k].dtype) for k, v in backbone.items()}
    head = read_head(path)
    heads = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    if head and _key_mismatch(heads, head) == ([], []):
        loaded.update({f"head.{k}": v.to(heads[k].dtype) for k, v in head.items()})
        head_text = f"DINO head loaded ({len(head)} tensors)"
    else:
        why = "it has none" if not head else "its head does not fit the run's head config"
        head_text = f"DINO head initialised from seed {cfg.seed} ({why})"
    dropped = f"; dropped {', '.join(info['dropped'])}" if info["dropped"] else ""
    return loaded, (f"model.init: student and teacher start from {path}: {info['arch']} backbone loaded "
                    f"({len(backbone)} tensors, {info['source']} layout{dropped}); {head_text}")


def init_settings(path) -> dict[str, object]:
    """The model.* values that build the backbone checkpoint `path` holds: arch, patch_size, img_size,
    pos_embed_resample (as its own code resamples), and embed_dim / depth / num_heads when resized (else None)."""
    from fastdino.engine.backbone_io import read_backbone

    _, info = read_backbone(path)
    own = FAMILY_MODELS.get(info["arch"]) or ARCHS[info["arch"]]
    sizes = {k: info[k] if info[k] != own[k] else None for k in ("embed_dim", "depth", "num_heads")}
    return {"arch": info["arch"], "patch_size": info["patch_size"], "img_size": info["img_size"],
            "pos_embed_resample": info["pos_embed_resample"], **sizes}
