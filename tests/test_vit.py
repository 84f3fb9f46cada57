"""ViT backbone: timm equivalence both ways, packed multi-crop forward, stochastic depth, meta build, compile."""
import math

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch._dynamo.utils import counters

from _helpers import assert_close
from fastdino.engine import vit as vit_module
from fastdino.engine.families import FAMILY_MODELS
from fastdino.engine.vit import (MODELS, Block, VisionTransformer, build_backbone, create_model, drop_path_constants,
                                 drop_path_scales)

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


def _official_drop_path_masks(uniforms: torch.Tensor, keep: float) -> torch.Tensor:
    """DINO's drop_path decision for uniforms u (fp32): floor(keep + u), as vision_transformer.py computes it."""
    return (keep + uniforms).floor_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_drop_path_scales_drop_as_dino_with_mean_exactly_one(dtype):
    """Over a fine grid of uniforms u (the expectation to ~1/n), the scales drop exactly where DINO's floor(keep + u)
    is 0, take 1/keep's two neighbours in `dtype` elsewhere, and average to 1 per rate, in every dtype: rounding
    1/keep to the nearest bf16 would be off by up to 4e-3, far above this grid's 1e-6 resolution."""
    keep = [0.9, 0.95454545, 0.5, 0.7]  # DINO ViT-S rates 0.1 and 0.1 * 5/11; 1/0.5 is exact in every dtype
    n = 2**18
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    boundary = torch.tensor([1 - k for k in keep], dtype=torch.float32)  # u at DINO's decision boundary ...
    edges = torch.stack([torch.nextafter(boundary, torch.zeros(())), boundary, torch.nextafter(boundary,
                                                                                               torch.ones(()))], 1)
    draws = torch.cat([grid.expand(len(keep), n), edges], dim=1)  # (S, n + 3): ... and its fp32 neighbours
    constants = drop_path_constants(keep, dtype)
    scales = drop_path_scales(draws, *constants)  # (S, n + 3)
    assert scales.dtype == dtype and scales.shape == draws.shape
    _, _, lo, hi = constants
    for s, k in enumerate(keep):
        kept = _official_drop_path_masks(draws[s], k) == 1
        assert torch.equal(scales[s] != 0, kept), f"keep {k}: not DINO's drop decision"
        values = set(scales[s][kept].unique().tolist())
        assert values <= {lo[s].item(), hi[s].item()} and lo[s].item() <= 1 / k < hi[s].item()
        assert torch.nextafter(lo[s], torch.tensor(math.inf, dtype=dtype)) == hi[s], "lo, hi are not neighbours"
        mean = scales[s, :n].double().mean().item()
        assert mean == pytest.approx(1.0, abs=4 / n), f"keep {k}: mean scale {mean}"


def test_training_drop_path_scales_are_per_image_and_off_in_eval():
    """In training, each block with drop path gets two (T, 1) scales in the tokens' dtype, constant over each
    image's tokens, random over images (a fraction near the rate dropped); block 0 (rate 0) and eval get None."""
    model = _tiny(depth=3, drop_path_rate=0.4).train()  # rates 0, 0.2, 0.4
    layout = ((300, 5), (500, 2))  # (B, N) per group
    tokens = torch.empty(300 * 5 + 500 * 2, 32)  # (T, D)
    torch.manual_seed(0)
    scales = model.drop_scales(tokens, layout)
    assert scales[0] is None and all(len(s) == 2 for s in scales[1:])
    for block, rate in ((1, 0.2), (2, 0.4)):
        for branch in scales[block]:
            assert branch.shape == (300 * 5 + 500 * 2, 1)
            groups = branch.split([300 * 5, 500 * 2])
            per_image = [g.view(b, n) for g, (b, n) in zip(groups, layout)]
            assert all(torch.equal(p, p[:, :1].expand_as(p)) for p in per_image), "scale varies within an image"
            dropped = torch.cat([p[:, 0] for p in per_image]) == 0
            # 800 images, binomial: 5 standard deviations of the dropped fraction
            assert abs(dropped.float().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / 800), block
    assert not torch.equal(scales[1][0], scales[1][1]) and not torch.equal(scales[1][0], scales[2][0])
    torch.manual_seed(0)
    again = model.drop_scales(tokens, layout)
    assert all(torch.equal(a, b) for s, t in zip(scales[1:], again[1:]) for a, b in zip(s, t)), "not from the RNG"
    assert model.eval().drop_scales(tokens, layout) == [None] * 3


def test_block_with_drop_scales_is_the_scaled_residual():
    """Block.forward with scales: x + s_attn * attn(norm1(x)), then + s_mlp * mlp(norm2(.)), row by row."""
    block = _tiny(drop_path_rate=0.5).blocks[1].eval()
    layout = ((3, 5), (2, 4))
    x = torch.randn(3 * 5 + 2 * 4, 32)  # (T, D)
    s_attn, s_mlp = torch.rand(x.shape[0], 1) * 2, torch.rand(x.shape[0], 1) * 2
    h = x + s_attn * block.attn(block.norm1(x), layout)
    expected = h + s_mlp * block.mlp(block.norm2(h))
    assert_close(block(x, layout, "sdpa", (s_attn, s_mlp)), expected, **TOL[torch.float32], name="scaled block")


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_triton_mlp_branch_equals_the_composition(layer_scale):
    """mlp_impl=triton (kernels/gelu_mlp.py, the interpreter here) in a training student with stochastic depth:
    the same features bit for bit (the forward's ops are the composition's) and the same gradients to fp32
    rounding, LayerScale folded in alike; a checkpointed block keeps the composition."""
    torch.manual_seed(1)
    models = {impl: _tiny(drop_path_rate=0.5, layer_scale=layer_scale, mlp_impl=impl).train()
              for impl in ("triton", "torch")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    crops = _crops()
    results = {}
    for impl, model in models.items():
        torch.manual_seed(0)  # the same stochastic depth draws
        features = model(crops)
        features.backward(torch.ones_like(features))
        results[impl] = features, {n: p.grad for n, p in model.named_parameters()}
    assert torch.equal(results["triton"][0], results["torch"][0])
    for name, grad in results["torch"][1].items():
        assert_close(results["triton"][1][name], grad, **TOL[torch.float32], name=name)
    assert "GeluMlpResidualBackward" in _graph_nodes(models["triton"](crops))
    models["triton"].checkpoint_blocks(1)
    assert "GeluMlpResidualBackward" not in _graph_nodes(models["triton"](crops))


def _graph_nodes(output: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind `output`."""
    seen, todo, names = set(), [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def _block_dtypes(model: VisionTransformer) -> list:
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_residual_stream_equals_low_precision_parameters(dtype):
    """Under autocast (fp32 weights, as one process and DDP train) the residual stream is in autocast's dtype from
    the embedding on, and the features and every gradient are bit for bit those of the same model with parameters in
    that dtype and no autocast (the numerics of FSDP2's param_dtype), stochastic depth included."""
    autocast = _tiny(drop_path_rate=0.3, img_size=16, patch_size=4).train()
    low = _tiny(drop_path_rate=0.3, img_size=16, patch_size=4).train()
    low.load_state_dict(autocast.state_dict())
    low.to(dtype)
    crops = _crops(global_size=16, local_size=8, batch=3, n_local=2)  # native and resampled position embeddings
    autocast_blocks, low_blocks = _block_dtypes(autocast), _block_dtypes(low)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype):
        features = autocast(crops)
    torch.manual_seed(0)  # the same stochastic depth draws
    expected = low([c.to(dtype) for c in crops])
    assert autocast_blocks == low_blocks == [(dtype, dtype)] * len(autocast.blocks)
    assert features.dtype == dtype and torch.equal(features, expected)
    grad = torch.randn_like(features)
    features.backward(grad)
    expected.backward(grad)
    for (name, p), q in zip(autocast.named_parameters(), low.parameters()):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, q.grad.float()), name


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


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(FAMILY_MODELS)))  # the others: test_vit_families.py
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

    def counting(*args, **kwargs):
        calls.append((*args, kwargs["shape"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(vit_module, "select_attention_backend", counting)
    model = _tiny(attention="sdpa").eval()
    x = torch.randn(1, 3, 32, 32)
    model(x)
    model([x, x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model([x, torch.randn(3, 3, 16, 16)])
    # the shape is the largest attention call's (B, N, H, hd): 17 tokens of 1 image before 5 tokens of 3
    assert calls == [("sdpa", torch.device("cpu"), torch.float32, 16, (1, 17, 2, 16)),
                     ("sdpa", torch.device("cpu"), torch.bfloat16, 16, (1, 17, 2, 16))]


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
    scales = tuple(torch.rand(x.shape[0], 1) for _ in range(2))  # stochastic depth's (T, 1) scales
    for drop_scales in (None, scales):
        expected = block(x, layout, "sdpa", drop_scales)
        (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
        actual = compiled(x, layout, "sdpa", drop_scales)
        (grad_actual,) = torch.autograd.grad(actual.square().sum(), x)
        assert_close(actual, expected, **TOL[torch.float32], name=f"compiled block, scales {drop_scales is not None}")
        assert_close(grad_actual, grad_expected, **TOL[torch.float32], name="compiled block grad")


def test_block_parameter_names_match_timm():
    ours = Block(32, 2)
    theirs = TimmViT(**TINY, num_classes=0).blocks[0]
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
    assert all(m.eps == 1e-6 for m in ours.modules() if isinstance(m, nn.LayerNorm))


def test_per_block_compile_of_a_drop_path_student_needs_few_graphs():
    """Blocks differ in drop-path rate, but their scales are tensor arguments and the blocks read no rate: every
    student block with drop path shares one graph, whatever the depth. aot_eager, because AOT tracing is what
    specialises a float read inside the block (Inductor does too; plain dynamo tracing does not)."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny(depth=8, drop_path_rate=0.1)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    crops = _crops(batch=8)
    for _ in range(2):
        model.train()(crops).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2  # block 0 (rate 0, no scales), blocks 1-7 (scales)
    model.eval()(crops)
    # eval mode (the teacher's path): block 0's graph again (no scales; the blocks read no training flag: no dropout)
    assert counters["stats"]["unique_graphs"] == 2
