"""The DINO network: backbone + head over all crops (`DINOModel`), built from a run's config (`build_model`) with
the run's initial weights (`initial_state`).

The initial weights come from one unsharded CPU model seeded with `cfg.seed`, so they do not depend on the number
of ranks (DTensor random init on the CPU draws the same values on every shard), and the untrained baseline of the
k-NN evaluation is exactly the network training started from. With `model.init` (`fastdino train --init PATH`)
the backbone's weights are then replaced by the checkpoint's (any format backbone_io reads), and the head's by the
checkpoint's DINO head when it has one of the run's head shape; student and teacher start from the result.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from fastdino.engine.config import ARCHS, TrainConfig
from fastdino.engine.families import FAMILY_MODELS
from fastdino.engine.head import DINOHead
from fastdino.engine.vit import build_backbone


class Outputs(NamedTuple):
    """What the DINOv2 objective takes from one packed forward (DINOModel.forward with patch_index or cls_tokens)."""

    cls: torch.Tensor
    """(V*B, K) head outputs of the CLS tokens, in crop order."""
    patches: torch.Tensor | None
    """(M, K) iBOT head outputs of the patch tokens at `patch_index` ((M, bottleneck_dim) with patch_bottleneck),
    or None."""
    cls_tokens: torch.Tensor | None
    """(V*B, D) final-norm backbone CLS features (KoLeo's input), or None."""


class DINOModel(nn.Module):
    """Backbone + head over all crops in one pass, like DINO's MultiCropWrapper (same `backbone.`/`head.` keys);
    with `ibot_head`, DINOv2's separate iBOT head for the patch tokens (else they share `head`, DINOv2's default)."""

    def __init__(self, backbone: nn.Module, head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ibot_head = ibot_head

    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.init_weights()
        if self.ibot_head is not None:
            self.ibot_head.init_weights()

    def forward(self, crops: torch.Tensor | list[torch.Tensor], *, bottleneck: bool = False,
                masks: torch.Tensor | None = None, patch_index: torch.Tensor | None = None,
                cls_tokens: bool = False, patch_bottleneck: bool = False) -> torch.Tensor | Outputs:
        """Crops [(B, C, H, W)] * V -> (V*B, K), in crop order; with `bottleneck`, the head's (V*B, bottleneck_dim)
        features before its last layer (see DINOHead.forward).

        DINOv2: `masks` (2B, N) bool replace the global crops' masked patch embeddings by the mask token;
        `patch_index` (M,) picks the global crops' patch tokens for the iBOT head (see VisionTransformer.forward),
        `cls_tokens` asks for the backbone's CLS features; with either, returns `Outputs`. A shared head runs once
        over the CLS and patch rows together, as DINOv2's. `patch_bottleneck`: the patch rows' bottleneck features
        (the fused iBOT loss, loss.ibot_impl=fused), as `bottleneck` for the CLS rows."""
        if patch_index is None and not cls_tokens:
            return self.head(self.backbone(crops, masks=masks) if masks is not None else self.backbone(crops),
                             bottleneck=bottleneck)
        if patch_index is None:
            tokens, patch_tokens = self.backbone(crops, masks=masks), None
        else:
            tokens, patch_tokens = self.backbone(crops, masks=masks, patch_index=patch_index)
        patches = None
        if patch_tokens is None:
            cls = self.head(tokens, bottleneck=bottleneck)
        elif self.ibot_head is not None:
            cls = self.head(tokens, bottleneck=bottleneck)
            patches = self.ibot_head(patch_tokens, bottleneck=patch_bottleneck)
        else:
            cls, patches = self.head(torch.cat([tokens, patch_tokens]), bottleneck=(bottleneck, patch_bottleneck),
                                     split=(tokens.shape[0], patch_tokens.shape[0]))
        return Outputs(cls, patches, tokens if cls_tokens else None)

    def cancel_last_layer_gradients(self) -> None:
        """Drop the heads' last-layer gradients (frozen for the first epochs); the trainer decides when."""
        self.head.cancel_last_layer_gradients()
        if self.ibot_head is not None:
            self.ibot_head.cancel_last_layer_gradients()


def build_model(cfg: TrainConfig, *, student: bool) -> DINOModel:
    """Backbone + head from the config; the teacher has no stochastic depth. The head's parameters are created,
    not set: build under `torch.device("meta")` and load `initial_state(cfg)`, or call `init_weights()`."""
    m = cfg.model
    ibot = cfg.loss.ibot_weight > 0
    backbone = build_backbone(m.arch, m.patch_size, img_size=m.img_size,
                              drop_path_rate=m.drop_path_rate if student else 0.0, attention=m.attention,
                              pos_embed_resample=m.pos_embed_resample, embed_dim=m.embed_dim, depth=m.depth,
                              num_heads=m.num_heads, mask_token=ibot, mlp_impl=m.mlp_impl)
    h = cfg.head

    def head(out_dim: int) -> DINOHead:
        return DINOHead(backbone.embed_dim, out_dim, use_bn=h.use_bn, norm_last_layer=h.norm_last_layer,
                        nlayers=h.nlayers, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim)

    return DINOModel(backbone, head(h.out_dim), head(h.ibot_out_dim or h.out_dim) if ibot and h.ibot_separate else None)


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
