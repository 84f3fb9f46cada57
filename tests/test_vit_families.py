"""DINOv2 and DINOv3 backbones equal timm's models of the same names: shapes at full size, features both ways.

For every registered family name, timm's model is built with pretrained=False (nothing is downloaded), its
weights perturbed off their init (LayerScales from 1e-5 to U(0.5, 1.5), every tensor moved by N(0, 0.02²): at
timm's init the blocks are near identities and the zero q/v biases would test nothing), loaded into fastdino's
backbone, and the final-normed CLS and patch tokens compared in fp32 at the training crop sizes (224 and 96 for
patch 16, 224 and 98 for patch 14) and one other, non-square size, through fastdino's packed multi-crop forward
(all sizes in one pass) and its one-crop token output. The ViT-S names run at their real size; the others with 2
blocks, and the widest ones narrowed, where timm takes the same overrides.
"""
import pytest
import timm
import torch

from fastdino.engine.backbone_io import from_timm, to_timm
from fastdino.engine.families import FAMILY_MODELS
from fastdino.engine.vit import create_model

REL_TOL = 1e-5  # ||ours - timm|| / ||timm|| over a crop's tokens
NARROW = dict(embed_dim=192, num_heads=4)  # giant, huge_plus, 7b: SwiGLU widths stay even and aligned


def _size_overrides(name: str) -> dict:
    if "_small_" in name:
        return {}  # the real ViT-S (and S+) configs
    return dict(depth=2, **(NARROW if any(s in name for s in ("giant", "huge", "7b")) else {}))


def _timm(name: str, **overrides):
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides).eval()


def _perturbed(state_dict: dict) -> dict:
    return {k: torch.rand_like(v) + 0.5 if "gamma" in k else v + 0.02 * torch.randn_like(v)
            for k, v in state_dict.items()}


def _timm_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """timm's final-normed tokens, CLS then patches (registers left out)."""
    tokens = model.forward_features(x)
    return torch.cat([tokens[:, :1], tokens[:, model.num_prefix_tokens:]], dim=1)


def _crop_sizes(patch: int) -> list[tuple[int, int]]:
    local = 96 if patch == 16 else 98
    return [(224, 224), (local, local), (8 * patch, 5 * patch)]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_full_size_model_has_timms_parameter_names_and_shapes(name):
    with torch.device("meta"):
        ours = create_model(name)
        ref = timm.create_model(name, pretrained=False, num_classes=0)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in to_timm(name, ours.state_dict()).items()} == expected


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_timm_weights_load_both_ways_and_give_timms_features(name):
    torch.manual_seed(0)
    overrides = _size_overrides(name)
    ref = _timm(name, **overrides)
    ref.load_state_dict(_perturbed(ref.state_dict()))
    ours = create_model(name, attention="sdpa", **overrides).eval()
    ours.load_state_dict(from_timm(name, ref.state_dict()), strict=True)
    back = _timm(name, **overrides)
    back.load_state_dict(to_timm(name, ours.state_dict()), strict=True)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ref.state_dict().items())

    patch = FAMILY_MODELS[name]["patch_size"]
    crops = [torch.randn(2, 3, h, w) for h, w in _crop_sizes(patch)]
    with torch.no_grad():
        packed_cls = ours(crops).split([c.shape[0] for c in crops])  # all crop sizes in one packed pass
        for crop, cls in zip(crops, packed_cls):
            expected = _timm_tokens(ref, crop)
            size = tuple(crop.shape[-2:])
            assert _relative_error(cls, expected[:, 0]) <= REL_TOL, f"{name} CLS {size}"
            tokens = ours.get_intermediate_layers(crop)[0]
            assert tokens.shape == expected.shape, f"{name} tokens {size}"
            assert _relative_error(tokens, expected) <= REL_TOL, f"{name} CLS + patch tokens {size}"


def _tiny(name: str, **overrides):
    return create_model(name, depth=2, embed_dim=64, num_heads=2, attention="sdpa", **overrides)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3_qkvb"])
def test_layer_scale_keeps_the_residual_stream_in_bf16_under_autocast(name):
    model = _tiny(name)
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    patch = FAMILY_MODELS[name]["patch_size"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.randn(2, 3, 4 * patch, 4 * patch), torch.randn(2, 3, 2 * patch, 2 * patch)])
    assert dtypes == [torch.bfloat16] * 2 and out.dtype == torch.bfloat16


def test_rope_blocks_with_drop_path_and_activation_checkpointing_give_the_same_gradients():
    crops = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 48)]
    grads = []
    for every in (0, 1):
        torch.manual_seed(0)
        model = _tiny("vit_small_patch16_dinov3_qkvb", drop_path_rate=0.3).train()
        model.checkpoint_blocks(every)
        torch.manual_seed(1)
        model(crops).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0]), "checkpointed blocks recompute differently"
    assert grads[0]["blocks.0.attn.q_bias"].abs().sum() > 0  # the separate q bias trains


def test_registers_are_left_out_of_the_attention_maps():
    model = _tiny("vit_small_patch14_reg4_dinov2").eval()
    probs = model.get_last_self_attention(torch.randn(1, 3, 56, 42))
    assert probs.shape == (1, 2, 1 + 4 * 3, 1 + 4 * 3)  # CLS + the 4 x 3 patches; the 4 registers' rows and columns go


@pytest.mark.parametrize("name", ["vit_small_plus_patch16_dinov3_qkvb"])  # RoPE, registers, LayerScale, SwiGLU
def test_family_blocks_compile_without_graph_break_and_equal_eager(monkeypatch, name):
    """Every block compiled as the trainer compiles it (fullgraph=True; backend aot_eager: dynamo and AOTAutograd,
    what decides graph breaks), with drop path and RoPE tables as arguments: forward and backward equal eager."""
    import copy

    from fastdino.engine.parallelize import compile_forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="aot_eager", **kwargs))
    eager = _tiny(name, drop_path_rate=0.2).train()
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        compile_forward(block)
    patch = FAMILY_MODELS[name]["patch_size"]
    crops = [torch.randn(2, 3, 4 * patch, 4 * patch), torch.randn(3, 3, 2 * patch, 3 * patch)]
    grads = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        model(crops).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, grad in grads[0].items():
        assert torch.allclose(grads[1][key], grad, rtol=1e-4, atol=1e-6), key
