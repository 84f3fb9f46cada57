"""ViT backbone: timm equivalence both ways, packed multi-crop forward, stochastic depth, meta build, compile."""
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch._dynamo.utils import counters

from _helpers import assert_close
from fastdino.engine import vit as vit_module
from fastdino.engine.vit import MODELS, Block, VisionTransformer, build_backbone, create_model, drop_add_residual

TOL = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    # Gradients at init pass through LayerNorms of near-constant tokens (std ~.03), which amplify fp32 rounding
    # to ~1e-4 relative on the CLS row; float64 checks the gradient path itself.
    torch.float64: dict(atol=1e-8, rtol=1e-6),
}
# A float64 model whose position embeddings are resampled: timm interpolates them in float32 (as ours does), so
# what depends on them agrees to float32 rounding of the embedding (|pos_embed| ~1 after the +1 below), not better.
RESAMPLED_F64_TOL = dict(atol=2 * torch.finfo(torch.float32).eps, rtol=2 * torch.finfo(torch.float32).eps)
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _tiny(**overrides) -> VisionTransformer:
    model = VisionTransformer(**{**TINY, **overrides})
    model.init_weights()
    return model


def _timm_tiny() -> TimmViT:
    """timm's own class with the same config (no registry weights: nothing is downloaded)."""
    return TimmViT(**TINY, num_classes=0, dynamic_img_size=True)


def _timm_tokens(model: TimmViT, x: torch.Tensor) -> list[torch.Tensor]:
    """Final-normed tokens after every block, computed with timm's own modules."""
    x = model._pos_embed(model.patch_embed(x))
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(model.norm(x))
    return outputs


def _crops(global_size=32, local_size=16, batch=2, n_local=3):
    return [torch.randn(batch, 3, global_size, global_size) for _ in range(2)] + [
        torch.randn(batch, 3, local_size, local_size) for _ in range(n_local)
    ]


@pytest.mark.parametrize("direction", ["timm_to_fastdino", "fastdino_to_timm"])
def test_timm_round_trip_gives_equal_features(direction):
    ours, ref = _tiny().eval(), _timm_tiny().eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    if direction == "timm_to_fastdino":
        ours.load_state_dict(ref.state_dict(), strict=True)
    else:
        ref.load_state_dict(ours.state_dict(), strict=True)
    for size in (32, 16, 24, 40):  # native grid, then resampled position embeddings (down and up)
        x = torch.randn(2, 3, size, size)
        assert_close(ours(x), ref(x), **TOL[torch.float32], name=f"features {size}px")
        ours_tokens = ours.get_intermediate_layers(x, n=2)
        for i, expected in enumerate(_timm_tokens(ref, x)):
            assert_close(ours_tokens[i], expected, **TOL[torch.float32], name=f"block {i} tokens {size}px")


def test_resampled_pos_embed_gets_timms_gradient_on_every_call():
    ours, ref = _tiny().double(), _timm_tiny().double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)  # a 2x2 grid: only resampled position embeddings are used
    ref(x).square().sum().backward()
    for call in ("first", "cached"):
        ours.zero_grad()
        ours(x).square().sum().backward()
        assert_close(ours.pos_embed.grad, ref.pos_embed.grad, **RESAMPLED_F64_TOL, name=f"pos_embed grad, {call}")
    with torch.no_grad():
        ours.pos_embed.add_(1.0)  # the cache holds interpolation weights, not values: a new parameter is seen
        ref.pos_embed.add_(1.0)
    assert_close(ours.eval()(x), ref.eval()(x), **RESAMPLED_F64_TOL, name="features after a parameter update")


def test_packed_multi_crop_equals_each_crop_alone():
    model = _tiny().eval()
    # Same-resolution crops that are not consecutive make separate groups; order must be kept.
    crops = _crops() + [torch.randn(3, 3, 32, 32), torch.randn(1, 3, 24, 24)]
    alone = torch.cat([model(c) for c in crops])
    assert_close(model(crops), alone, **TOL[torch.float32], name="packed vs alone")


def test_drop_path_rate_zero_in_training_is_exact():
    model = _tiny()
    crops = _crops()
    train_out = model.train()(crops)
    assert torch.equal(train_out, model.eval()(crops))


def test_drop_add_residual_skips_dropped_images_and_is_unbiased():
    layout = ((5, 3), (4, 2))  # groups of (B images, N tokens)
    x = torch.randn(5 * 3 + 4 * 2, 6)  # (T, D)
    weight = torch.randn(6, 6)
    seen = []

    def branch(tokens, kept_layout):
        seen.append(kept_layout)
        return tokens @ weight

    dense = x + x @ weight  # the un-dropped residual
    out = drop_add_residual(x, layout, (3, 2), branch)
    assert seen == [((3, 3), (2, 2))]  # only the kept images are computed
    offset = 0
    for (b, n), keep in zip(layout, (3, 2)):
        per_image = out[offset : offset + b * n].view(b, n, -1)
        x_image = x[offset : offset + b * n].view(b, n, -1)
        added = (per_image - x_image).abs().amax(dim=(1, 2)) > 0
        assert int(added.sum()) == keep  # the others pass through untouched
        scaled = x_image + (b / keep) * (x_image @ weight)
        assert_close(per_image[added], scaled[added], **TOL[torch.float32], name="kept images")
        offset += b * n
    # In expectation the result is the un-dropped residual: 4000 draws, ~5 standard errors of tolerance.
    mean = torch.stack([drop_add_residual(x, layout, (3, 2), lambda t, _: t @ weight) for _ in range(4000)]).mean(0)
    assert_close(mean, dense, atol=0.1 * (x @ weight).abs().max().item(), rtol=0, name="expectation")


def test_kept_images_follow_the_drop_path_rate():
    block = Block(32, 2, drop_path=0.4)
    assert block.kept_images(((5, 3), (1, 2))) == (3, 1)  # int(B * 0.6), at least one
    assert block.eval().kept_images(((5, 3),)) is None
    assert Block(32, 2).kept_images(((5, 3),)) is None  # rate 0 in training: every image, no index ops


def test_training_with_drop_path_runs_only_kept_images_through_blocks():
    model = _tiny(drop_path_rate=0.5).train()
    rows = []
    model.blocks[-1].mlp.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    out = model(_crops(batch=4, n_local=2))
    # last block: rate 0.5, global group (8 images x 17 tokens) keeps 4, local group (8 x 5) keeps 4
    assert rows == [4 * 17 + 4 * 5]
    assert out.shape == (4 * 4, 32) and torch.isfinite(out).all()


def test_last_self_attention_matches_timm_and_needs_eval():
    ours, ref = _tiny(), _timm_tiny()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 24, 24)
    with pytest.raises(RuntimeError, match="eval"):
        ours.get_last_self_attention(x)
    probs = ours.eval().get_last_self_attention(x)
    assert probs.shape == (2, 2, 10, 10)  # (B, H, N, N)
    tokens = ref._pos_embed(ref.patch_embed(x))
    tokens = ref.blocks[0](tokens)
    last = ref.blocks[1].attn
    q, k, _ = last.qkv(ref.blocks[1].norm1(tokens)).view(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    expected = (q @ k.transpose(-2, -1) * last.scale).softmax(-1)
    assert_close(probs, expected, **TOL[torch.float32], name="attention")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_arch_builds_on_meta_with_the_right_shapes(name):
    with torch.device("meta"):
        model = create_model(name)
        out = model([torch.empty(2, 3, 224, 224)] * 2 + [torch.empty(2, 3, 96, 96)] * 3)
    cfg = MODELS[name]
    assert (model.embed_dim, model.num_heads, model.patch_size, len(model.blocks)) == (
        cfg["embed_dim"], cfg["num_heads"], cfg["patch_size"], cfg["depth"])
    assert model.pos_embed.shape == (1, (224 // cfg["patch_size"]) ** 2 + 1, cfg["embed_dim"])
    assert out.shape == (10, cfg["embed_dim"])


def test_build_backbone_is_the_registry_model_with_any_patch_size_and_size_overrides():
    torch.manual_seed(0)
    by_name = create_model("vit_tiny_patch8", img_size=32, depth=2)
    torch.manual_seed(0)
    by_arch = build_backbone("vit_tiny", 8, img_size=32, depth=2)
    assert by_name.state_dict().keys() == by_arch.state_dict().keys()
    assert all(torch.equal(a, by_arch.state_dict()[k]) for k, a in by_name.state_dict().items())
    with torch.device("meta"):
        resized = build_backbone("vit_small", 4, img_size=16, embed_dim=32, depth=1, num_heads=2)
    assert (resized.patch_size, resized.embed_dim, len(resized.blocks), resized.num_heads) == (4, 32, 1, 2)


def test_meta_build_then_to_empty_and_init_weights():
    with torch.device("meta"):
        model = VisionTransformer(**{**TINY, "embed_dim": 64})
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    # DINO's init: trunc-normal std .02 for pos_embed, cls_token and Linear weights; zero biases; unit norms.
    for name, p in model.named_parameters():
        if name.startswith("patch_embed"):  # PyTorch's default conv init, as in DINO: U(+-1/sqrt(fan_in))
            assert p.abs().max() <= (3 * 8 * 8) ** -0.5 and p.std() > 0, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".norm" in name or name.startswith("norm"):
            assert torch.all(p == 1), name
        elif p.dim() == 2 or name in ("pos_embed", "cls_token"):  # Linear weights and tokens, >= 64 values
            assert abs(p.std().item() - 0.02) < 0.02 * 0.3, name
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


def test_no_weight_decay_names_are_parameters():
    model = _tiny()
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


def test_attention_backend_is_selected_once_per_device_and_dtype(monkeypatch):
    calls = []
    real = vit_module.select_attention_backend

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(vit_module, "select_attention_backend", counting)
    model = _tiny(attention="sdpa").eval()
    x = torch.randn(1, 3, 32, 32)
    model(x)
    model([x, x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert calls == [("sdpa", torch.device("cpu"), torch.float32, 16), ("sdpa", torch.device("cpu"), torch.bfloat16, 16)]


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="vit_huge_patch16"):
        create_model("vit_huge_patch16")
    with pytest.raises(ValueError, match="vit_huge.*vit_tiny"):
        build_backbone("vit_huge", 16)
    with pytest.raises(ValueError, match="'flash'"):
        _tiny(attention="flash")
    with pytest.raises(ValueError, match="1.0"):
        _tiny(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="empty"):
        _tiny()([])


def test_block_compiles_with_static_shapes_and_matches_eager():
    """Tracing only (aot_eager): Inductor's CPU codegen would take most of this file's time budget; the
    compiled GPU path (Inductor, CUDA graphs) is exercised by benchmarks/bench_model.py --compile."""
    torch._dynamo.reset()
    block = _tiny(drop_path_rate=0.2).blocks[1]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=False)
    layout = ((4, 17), (6, 5))  # (B, N) per resolution group
    x = torch.randn(4 * 17 + 6 * 5, 32, requires_grad=True)  # (T, D)
    block.eval()
    expected = block(x, layout)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    actual = compiled(x, layout)
    (grad_actual,) = torch.autograd.grad(actual.square().sum(), x)
    assert_close(actual, expected, **TOL[torch.float32], name="compiled block")
    assert_close(grad_actual, grad_expected, **TOL[torch.float32], name="compiled block grad")
    block.train()  # stochastic depth (randperm, index_add) traces into one graph too
    assert compiled(x, layout, "sdpa", block.kept_images(layout)).shape == x.shape


def test_block_parameter_names_match_timm():
    ours = Block(32, 2)
    theirs = TimmViT(**TINY, num_classes=0).blocks[0]
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
    assert all(m.eps == 1e-6 for m in ours.modules() if isinstance(m, nn.LayerNorm))


def test_per_block_compile_of_a_drop_path_student_needs_few_graphs():
    """Blocks differ in drop-path rate, hence in kept images; passed as integer arguments, the counts become
    dynamic, so the graph count does not grow with depth (dynamic=False: one graph per block). aot_eager, because AOT tracing is what
    specialises a float rate read inside the block (Inductor does too; plain dynamo tracing does not)."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny(depth=8, drop_path_rate=0.1)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    crops = _crops(batch=8)
    for _ in range(2):
        model.train()(crops).sum().backward()
    # block 0 (rate 0), block 1 (counts first seen as constants), then at most one recompile per resolution
    # group as its count changes and becomes a symbol: 4 graphs for 8 blocks
    train_graphs = counters["stats"]["unique_graphs"]
    assert train_graphs <= 2 + 2
    model.eval()(crops)
    assert counters["stats"]["unique_graphs"] == train_graphs + 1  # the teacher's path
