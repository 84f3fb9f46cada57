"""DINO head against the official implementation, last-layer freezing, and the full student model."""

import pytest
import torch

from _helpers import assert_close
from fastdino.engine.head import DINOHead, convert_official_head
from fastdino.engine.model import DINOModel
from fastdino.engine.vit import VisionTransformer
from fastdino.official_dino import DINOHead as OfficialDINOHead

TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4)}
SMALL = dict(out_dim=37, hidden_dim=24, bottleneck_dim=16)  # odd K on purpose


def _head(**options) -> DINOHead:
    head = DINOHead(8, **{**SMALL, **options})
    head.init_weights()
    return head


@pytest.mark.parametrize(
    "options",
    [dict(), dict(use_bn=True, norm_last_layer=False, nlayers=4), dict(nlayers=1), dict(norm_last_layer=False)],
    ids=["default", "all-options", "nlayers1", "learned-norm"],
)
def test_matches_official_head_through_the_key_map(options):
    official = OfficialDINOHead(8, **SMALL, **options)
    if not options.get("norm_last_layer", True):
        official.last_layer.weight_g.data.uniform_(0.5, 2.0)  # a trained gain
    ours = DINOHead(8, **SMALL, **options)
    state = convert_official_head(official.state_dict(), norm_last_layer=options.get("norm_last_layer", True))
    ours.load_state_dict(state, strict=True)
    x = torch.randn(5, 8)
    x_ours = x.clone().requires_grad_()
    x_official = x.clone().requires_grad_()
    out_ours, out_official = ours(x_ours), official(x_official)
    assert_close(out_ours, out_official, **TOL[torch.float32], name="head output")
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_official.backward(grad)
    assert_close(x_ours.grad, x_official.grad, **TOL[torch.float32], name="input grad")
    assert_close(ours.last_layer.weight_v.grad, official.last_layer.weight_v.grad, **TOL[torch.float32],
                 name="weight_v grad")
    if ours.last_layer.weight_g is not None:
        assert_close(ours.last_layer.weight_g.grad, official.last_layer.weight_g.grad, **TOL[torch.float32],
                     name="weight_g grad")


def test_key_map_takes_a_prefix_and_refuses_to_drop_a_trained_gain():
    official = OfficialDINOHead(8, **SMALL).state_dict()
    checkpoint = {"backbone.cls_token": torch.zeros(1, 1, 8), **{f"head.{k}": v for k, v in official.items()}}
    converted = convert_official_head(checkpoint, prefix="head.")
    assert set(converted) == set(_head().state_dict())
    checkpoint["head.last_layer.weight_g"] = torch.full_like(official["last_layer.weight_g"], 2.0)
    with pytest.raises(ValueError, match="norm_last_layer=False"):
        convert_official_head(checkpoint, prefix="head.")
    with pytest.raises(ValueError, match="prefix 'student.'"):
        convert_official_head(checkpoint, prefix="student.")


def test_output_is_cosine_similarity_to_unit_prototypes():
    head = _head()
    x = torch.randn(6, 8)
    out = head(x)
    assert out.shape == (6, 37)
    assert out.abs().max() <= 1 + 1e-6  # unit features against unit prototypes
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)  # the prototypes' scale never reaches the output
    assert_close(head(x), out, **TOL[torch.float32], name="scale invariance")
    assert head.last_layer.weight_g is None  # norm_last_layer: the gain is fixed at 1, no parameter


def test_cancel_last_layer_gradients_freezes_it_through_an_optimizer_step():
    head = _head(norm_last_layer=False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.04)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    head(torch.randn(4, 8)).square().sum().backward()
    head.cancel_last_layer_gradients()
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    optimizer.step()
    for name, p in head.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("last_layer"), name


def test_meta_build_then_to_empty_and_init_weights():
    with torch.device("meta"):
        head = DINOHead(64, out_dim=4096, use_bn=True, hidden_dim=256, bottleneck_dim=64)
    head.to_empty(device="cpu")
    head.init_weights()
    for name, p in head.named_parameters():
        if name.startswith("last_layer"):  # nn.Linear's default init, as the official head: U(+-1/sqrt(64))
            assert p.abs().max() <= 64**-0.5 and p.std() > 0, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.02 * 0.1, name
        else:  # BatchNorm weight
            assert torch.all(p == 1), name
    assert torch.isfinite(head(torch.randn(3, 64))).all()


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="nlayers must be >= 1, got 0"):
        DINOHead(8, nlayers=0)
    with pytest.raises(ValueError, match="out_dim must be >= 1, got 0"):
        DINOHead(8, out_dim=0)


def _student(drop_path_rate=0.0) -> DINOModel:
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                 drop_path_rate=drop_path_rate)
    model = DINOModel(backbone, DINOHead(32, use_bn=True, **SMALL))
    model.init_weights()
    return model


def test_model_forward_equals_head_of_each_crop():
    model = _student().eval()  # eval: BatchNorm then uses running statistics, so rows are independent
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(4)]
    out = model(crops)
    assert out.shape == (6 * 2, 37)  # (V*B, K)
    expected = torch.cat([model.head(model.backbone(c)) for c in crops])
    assert_close(out, expected, **TOL[torch.float32], name="multi-crop model")


def test_gradients_reach_every_student_parameter():
    model = _student(drop_path_rate=0.1).train()
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    model(crops).logsumexp(dim=-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
