"""DINO projection head (Caron et al. 2021, Sec. 3.1 and App. C).

`DINOHead` is the official head (facebookresearch/dino: vision_transformer.py, DINOHead): an MLP to a
bottleneck, L2 normalisation, and a weight-normalised linear layer to K prototypes. The official code wraps
the last layer in `nn.utils.weight_norm`, a hook that recomputes `weight` from `weight_g` and `weight_v`;
here the same g * v / ||v|| is computed explicitly in `forward` from plain parameters, so FSDP2, DCP and
torch.compile see ordinary tensors. The parameter names are the official ones (`mlp.*`,
`last_layer.weight_v`, `last_layer.weight_g`); with `norm_last_layer=True` the gain is fixed at 1 and is
no parameter at all, which is all `convert_official_head` has to account for.
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight g * v / ||v|| (rows normalised); g fixed to 1 unless `learn_norm`."""

    def __init__(self, in_features: int, out_features: int, learn_norm: bool = False, device=None, dtype=None):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.weight_g = (
            nn.Parameter(torch.empty(out_features, 1, device=device, dtype=dtype)) if learn_norm else None
        )

    def init_weights(self) -> None:
        # nn.Linear's default init, as the official head (it builds the last layer after its trunc-normal
        # init): only v's direction reaches the output, but its scale sets how far each optimizer step turns it.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        if self.weight_g is not None:
            nn.init.ones_(self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight_v, dim=1)  # (K, bottleneck), unit rows
        if self.weight_g is not None:
            weight = weight * self.weight_g
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (GELU, optional BatchNorm) -> bottleneck -> L2 normalise -> weight-normalised linear to K outputs.

    The constructor only creates parameters; call `init_weights()` (also after `to_empty` from the meta device).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        sizes = dict(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        dd = dict(device=device, dtype=dtype)
        if nlayers == 1:  # the official head's keys are then `mlp.weight`, not `mlp.0.weight`
            self.mlp = nn.Linear(in_dim, bottleneck_dim, **dd)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
            layers = []
            for i in range(nlayers):
                layers.append(nn.Linear(dims[i], dims[i + 1], **dd))
                if i < nlayers - 1:
                    if use_bn:
                        layers.append(nn.BatchNorm1d(dims[i + 1], **dd))
                    layers.append(nn.GELU())
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer, **dd)

    def init_weights(self) -> None:
        """Trunc-normal(std .02) Linear weights and zero biases in the MLP (as DINO), reset BatchNorms."""
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        self.last_layer.init_weights()

    def forward(self, x: torch.Tensor, *, bottleneck: bool | tuple[bool, ...] = False,
                split: tuple[int, ...] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(N, in_dim) -> (N, K); with `bottleneck`, the L2-normalised (N, bottleneck_dim) features the last layer
        would take (the fused head + loss applies `last_layer.weight_v` itself). With `split` (row counts summing
        to N), the parts, each at the bottleneck or not by the flags `bottleneck` (one per part): one head pass for
        DINOv2's CLS and patch rows when only one of the losses is fused, inside this module's forward (FSDP2
        gathers the last layer for it)."""
        x = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck)
        if split is None:
            return x if bottleneck else self.last_layer(x)
        if isinstance(bottleneck, bool) or len(bottleneck) != len(split):
            raise ValueError(f"bottleneck must be one flag per part of split={split}, got {bottleneck!r}")
        if len(set(bottleneck)) == 1:  # one last layer over all rows (one weight normalisation)
            return (x if bottleneck[0] else self.last_layer(x)).split(list(split))
        return tuple(part if flag else self.last_layer(part) for part, flag in zip(x.split(list(split)), bottleneck))

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layer's gradients (DINO freezes it for the first epochs); the trainer decides when."""
        for param in self.last_layer.parameters():
            param.grad = None


def convert_official_head(
    state_dict: dict[str, torch.Tensor], *, norm_last_layer: bool = True, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Official DINO head state dict -> `DINOHead` state dict.

    Takes the keys starting with `prefix` (e.g. "head." for a checkpoint's "teacher" entry) and strips it.
    Names are the same; for `norm_last_layer=True` the official `last_layer.weight_g` (fixed at 1) is dropped.
    A weight_g that is not all ones comes from a run with norm_last_layer=False: dropping it would change the
    head, so that raises ValueError.
    """
    head = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not head:
        raise ValueError(f"no head keys with prefix {prefix!r}; first keys: {list(state_dict)[:5]}")
    if norm_last_layer:
        gain = head.pop("last_layer.weight_g", None)
        if gain is not None and not torch.all(gain == 1):
            raise ValueError(
                "checkpoint's last_layer.weight_g is not all ones (trained with norm_last_layer=False): "
                "build DINOHead(norm_last_layer=False) to load it"
            )
    return head
