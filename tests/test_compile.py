"""The step as a compiled program: per-block torch.compile (inductor on the CPU) with no graph break, and
activation checkpointing equal to none (loss and every gradient)."""
import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from fastdino.engine.head import DINOHead
from fastdino.engine.model import DINOModel
from fastdino.engine.loss import DINOLoss
from fastdino.engine.parallelize import apply_ac, apply_compile, compile_forward, resolve_compile
from fastdino.engine.vit import VisionTransformer

from _helpers import assert_close

K, NCROPS, BATCH = 64, 4, 3  # odd batch
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4)}
# Inductor fuses and reorders reductions (layer norms, the head's L2 normalisation, softmax): fp32 rounding.
COMPILED_TOL = dict(atol=1e-4, rtol=1e-3)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts without the graphs of the previous ones: blocks of all models share one code object, whose
    graphs count towards one recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_dino(depth: int = 3, drop_path_rate: float = 0.2) -> DINOModel:
    backbone = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2,
                                 drop_path_rate=drop_path_rate, attention="sdpa")
    model = DINOModel(backbone, DINOHead(32, K, hidden_dim=48, bottleneck_dim=16))
    model.init_weights()
    return model


def crops() -> list[torch.Tensor]:
    return [torch.randn(BATCH, 3, 16, 16) for _ in range(2)] + [torch.randn(BATCH, 3, 8, 8) for _ in range(2)]


def loss_module() -> DINOLoss:
    return DINOLoss(K, NCROPS, 0.04, 0.04, 0, 10, impl="torch")


def loss_and_grads(model: DINOModel, loss_fn: DINOLoss, images: list[torch.Tensor], seed: int = 1):
    """Loss, gradients (by name) and center after one student forward/backward from the RNG state `seed`."""
    torch.manual_seed(seed)
    teacher_out = torch.randn(2 * BATCH, K)
    torch.manual_seed(seed)  # stochastic depth draws the same images in every run
    loss = loss_fn(model(images), teacher_out, 0, teacher_temp=0.05)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, loss_fn.center.clone()


def assert_same_step(actual, expected, tol):
    for what, a, e in zip(("loss", "center"), actual[::2], expected[::2]):
        assert_close(a, e, **tol, name=what)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        assert_close(actual[1][name], grad, **tol, name=f"grad {name}")


def checkpointed(model: DINOModel) -> list[bool]:
    return [block.checkpoint_context_fn is not None for block in model.backbone.blocks]


@pytest.mark.parametrize("spec, blocks", [("all", [True, True, True]), ("every-2", [False, True, False]),
                                          ("none", [False, False, False]), ("selective", [True, True, True])])
def test_activation_checkpointing_equals_none(spec, blocks):
    """Checkpointed blocks recompute their forward (all of it, or what the selective policy does not keep) in
    backward, with the same dropped images (drop path 0.2): the loss and every gradient are those without
    checkpointing."""
    images = crops()
    model = tiny_dino()
    expected = loss_and_grads(model, loss_module(), images)
    apply_ac(model, spec)
    assert checkpointed(model) == blocks
    assert_same_step(loss_and_grads(model, loss_module(), images), expected, TOL[torch.float32])


class _Allocations(TorchDispatchMode):
    """Follows the storages of every op's outputs: `live_bytes` is what of them is still held."""

    def __init__(self):
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages += [weakref.ref(t.untyped_storage()) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def live_bytes(self, excluding: list[torch.Tensor]) -> int:
        outside = {id(t.untyped_storage()) for t in excluding}
        live = {id(s): s.nbytes() for ref in self.storages if (s := ref()) is not None}  # ids of live objects: unique
        return sum(n for key, n in live.items() if key not in outside)


def block_memory_and_flops(spec: str) -> tuple[int, int]:
    """For one fp32 block with stochastic depth on two crop groups under `spec`: the bytes its forward allocated
    that are still held after it (kept for backward, and its output), and the FLOPs of forward and backward."""
    torch.manual_seed(0)
    model = tiny_dino(depth=2, drop_path_rate=0.5)
    apply_ac(model, spec)
    block = model.backbone.blocks[1]
    x = torch.randn(sum(b * n for b, n in LAYOUT), block.norm1.normalized_shape[0], requires_grad=True)
    scales = tuple(torch.rand(x.shape[0], 1).round() * 2 for _ in range(2))
    with FlopCounterMode(display=False) as flops:
        with _Allocations() as allocations:
            out = block(x, LAYOUT, "sdpa", scales)
        kept = allocations.live_bytes(excluding=[*block.parameters(), x, *scales])
        out.sum().backward()
    return kept, flops.get_total_flops()


LAYOUT = ((3, 17), (4, 5))  # two crop groups of (images, tokens)


def test_selective_checkpointing_keeps_matmul_and_attention_outputs_only():
    """The selective policy keeps, of a block's forward, the qkv, attention, projection and fc1 outputs (3 + 1 +
    1 + 4 token x width units, plus attention's log-sum-exp) and recomputes the rest (the norms, GELU, the
    concatenation, the residual adds); none keeps more, all keeps nothing but the output. Backward recomputes no
    matmul and no attention: the FLOPs are those without checkpointing (all's recompute has more)."""
    width, heads, tokens = 32, 2, sum(b * n for b, n in LAYOUT)
    (none_kept, none_flops), (all_kept, all_flops), (kept, flops) = map(block_memory_and_flops,
                                                                        ("none", "all", "selective"))
    unit = tokens * width * 4  # a (tokens, width) fp32 tensor
    assert kept == (3 + 1 + 1 + 4) * unit + tokens * heads * 4 + unit  # + the fp32 log-sum-exp + the output
    assert all_kept == unit
    assert none_kept > kept + 6 * unit  # the norms' outputs, GELU's output, the concatenation, the first add
    assert flops == none_flops < all_flops


def test_compiled_selective_block_saves_what_the_policy_keeps(monkeypatch):
    """Under torch.compile the partitioner applies the selective policy's tags: the compiled block saves for backward
    the qkv, attention, projection and fc1 outputs (and the log-sum-exp), as the eager block keeps (its output is
    not saved: the last residual add is outside the checkpoint). Backend aot_eager, whose partitioner is
    inductor's; the saved tensors are those the compiled autograd function packs."""
    torch.manual_seed(0)
    model = tiny_dino(depth=2, drop_path_rate=0.5)
    apply_ac(model, "selective")
    block = model.backbone.blocks[1]
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="aot_eager", **kwargs))
    compile_forward(block)
    width, heads = block.norm1.normalized_shape[0], block.attn.num_heads
    x = torch.randn(sum(b * n for b, n in LAYOUT), width, requires_grad=True)
    scales = tuple(torch.rand(x.shape[0], 1).round() * 2 for _ in range(2))
    outside = {id(t.untyped_storage()) for t in [*block.parameters(), x, *scales]}
    saved = {}

    def pack(t):
        if id(t.untyped_storage()) not in outside:
            saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, LAYOUT, "sdpa", scales)
    unit = x.shape[0] * width * 4
    assert sum(saved.values()) == (3 + 1 + 1 + 4) * unit + x.shape[0] * heads * 4


def test_compile_choice():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("true", torch.device("cpu")) is True
    assert resolve_compile("false", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="model.compile must be auto, true or false, got 'yes'"):
        resolve_compile("yes", torch.device("cpu"))


def test_head_and_loss_trace_without_graph_break():
    model, loss_fn = tiny_dino(depth=1), loss_module()
    features = torch.randn(NCROPS * BATCH, 32)
    head = torch._dynamo.explain(model.head)(features)
    loss = torch._dynamo.explain(loss_fn)(torch.randn(NCROPS * BATCH, K, requires_grad=True),
                                          torch.randn(2 * BATCH, K), 0, teacher_temp=0.05)
    for what, explained in (("head", head), ("loss", loss)):
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (what, explained.break_reasons)


def test_auto_loss_impl_is_resolved_before_compile():
    """impl="auto" would log its choice inside the traced forward, a graph break: the trainer resolves it first."""
    loss_fn = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 10, impl="auto")
    assert loss_fn.resolve_impl(torch.device("cpu")) == "torch" and loss_fn.impl == "torch"


@pytest.mark.parametrize("spec", ["all", "selective"])
def test_compiled_block_equals_eager_with_checkpointing_and_drop_path(spec):
    """A block compiled by inductor on the CPU with fullgraph=True (a graph break would raise), checkpointed (all,
    or by the selective policy, which inductor's partitioner applies) and with stochastic depth: two steps' losses,
    centers and gradients equal eager's, the second without recompiling. One block only, as inductor's C++ builds
    take ~30 s of CPU per block graph: all blocks share the block's code, and the head and the loss are traced by
    test_head_and_loss_trace_without_graph_break."""
    images = crops()
    eager = tiny_dino(depth=1)
    eager.backbone.blocks[0].drop_path = 0.2  # a 1-block ViT has rate 0 (rates grow from 0 with depth)
    apply_ac(eager, spec)
    compiled, eager_loss, compiled_loss = copy.deepcopy(eager), loss_module(), loss_module()
    compile_forward(compiled.backbone.blocks[0])  # as apply_compile does for every block
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            assert_same_step(loss_and_grads(compiled, compiled_loss, images, seed),
                             loss_and_grads(eager, eager_loss, images, seed), COMPILED_TOL)


def test_compiled_blocks_head_and_loss_without_graph_break(monkeypatch):
    """apply_compile and compile_forward(loss) on a 2-block student with stochastic depth and one checkpointed block:
    every block, the head and the loss compile with fullgraph=True, and the step equals eager. Backend aot_eager
    (dynamo + AOTAutograd, what decides graph breaks) keeps it fast; inductor's numerics are the test above."""
    compile_ = torch.compile
    compiled_fns = []

    def aot_eager_compile(fn, **kwargs):
        compiled_fns.append(fn.__self__)
        return compile_(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    images = crops()
    eager = tiny_dino(depth=2)
    apply_ac(eager, "every-2")
    compiled, eager_loss, compiled_loss = copy.deepcopy(eager), loss_module(), loss_module()
    apply_compile(compiled)
    compile_forward(compiled_loss)
    assert compiled_fns == [*compiled.backbone.blocks, compiled.head, compiled_loss]
    for seed in (1, 2):
        assert_same_step(loss_and_grads(compiled, compiled_loss, images, seed),
                         loss_and_grads(eager, eager_loss, images, seed), TOL[torch.float32])


@pytest.mark.parametrize("precision, spec", [("bf16", "all"), ("fp16", "all"), ("bf16", "selective")])  # fp32: FSDP2
def test_trainer_with_compile_and_checkpointing_equals_eager(monkeypatch, precision, spec):
    """model.compile=true and activation_checkpointing=all or selective wired through the Trainer (single process,
    autocast in bf16 / fp16 with loss scaling): three steps give eager's losses, student and teacher (backend
    aot_eager; test_distributed.py has FSDP2 and DDP)."""
    from test_train import make_trainer, synthetic_batches, tiny_config

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="aot_eager", **kwargs))
    overrides = ["model.drop_path_rate=0.2", f"parallel.precision={precision}"]
    runs = []
    for extra in ([], ["model.compile=true", f"model.activation_checkpointing={spec}"]):
        cfg = tiny_config(*overrides, *extra)
        torch.manual_seed(0)
        trainer = make_trainer(cfg)
        losses = []
        for crops_ in synthetic_batches(cfg, 3):
            trainer.train_step(crops_)
            losses.append(trainer.stats.read()["loss"])
        runs.append((trainer, torch.tensor(losses)))
    (eager, eager_losses), (compiled, compiled_losses) = runs
    assert compiled.compile and all(checkpointed(compiled.model))
    assert_close(compiled_losses, eager_losses, **TOL[torch.float32], name="losses")
    for name, params in (("student", "params"), ("teacher", "teacher_params")):
        for i, (a, e) in enumerate(zip(getattr(compiled, params), getattr(eager, params), strict=True)):
            assert_close(a, e, **TOL[torch.float32], name=f"{name} parameter {i}")
