"""The DINOv2 objective in the step: the mask token and the patch tokens of the one packed forward, the step's loss
as dinov2's SSLMetaArch.forward_backward computes it from the same outputs (tests/dinov2_reference.py), its named
terms in metrics.jsonl, the shared and separate iBOT heads, Sinkhorn-Knopp, a skipped step, DINOv2's lr factors,
and the dinov2_vit_small14 preset training on the CPU from the loader's masks."""
import json
import math
import random

import pytest
import torch

import dinov2_reference as ref
from _helpers import assert_close
from fastdino.engine import config as C
from fastdino.engine.model import Outputs
from fastdino.engine.train import lr_multiplier, masking_config
from fastdino.engine.vit import build_backbone
from fastdino.pipelines.masking import MaskBatch, draw_masks
from test_train import make_trainer, synthetic_batches, tiny_config

DINOV2 = ["loss.ibot_weight=1.0", "loss.koleo_weight=0.1", "model.drop_path_rate=0.0"]


def batch_masks(cfg, seed=0) -> MaskBatch:
    config = masking_config(cfg)
    n_crops = 2 * cfg.data.batch_size
    return MaskBatch.from_masks(draw_masks(config, n_crops, random.Random(seed)), config.upper_bound(n_crops))


def test_mask_token_and_patch_tokens_of_the_packed_forward():
    backbone = build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=2, num_heads=2, mask_token=True)
    with torch.no_grad():
        backbone.mask_token.normal_()  # zeros at init (as DINOv2): make it visible
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(3, 3, 8, 8, generator=g)]
    masks = torch.rand(6, 16, generator=g) < 0.4
    index = masks.flatten().nonzero().flatten()
    cls, patches = backbone(crops, masks=masks, patch_index=index)

    def replace(module, args, out):  # the reference: DINOv2 swaps the patch embeddings for the token
        return torch.where(masks.view(6, 4, 4, 1), backbone.mask_token.view(1, 1, 1, -1), out)

    hook = backbone.patch_embed.register_forward_hook(replace)
    tokens = backbone.get_intermediate_layers(torch.cat(crops[:2]))[0]  # (6, 17, D), final norm
    hook.remove()
    assert_close(patches, tokens[:, 1:].flatten(0, 1)[index], atol=1e-5, rtol=1e-5, name="patch tokens")
    assert_close(cls[:6], tokens[:, 0], atol=1e-5, rtol=1e-5, name="cls")
    assert_close(cls[6:], backbone(crops[2]), atol=1e-5, rtol=1e-5, name="local cls")
    with pytest.raises(ValueError, match="masks must be bool"):
        backbone(crops, masks=masks[:, :5])
    with pytest.raises(ValueError, match="mask token"):
        build_backbone("vit_tiny", 4, img_size=16, embed_dim=32, depth=2, num_heads=2)(crops, masks=masks)


def _reference_loss(trainer, crops, masks, teacher_temp):
    """dinov2's loss from the trainer's models (fresh centers: 0), through tests/dinov2_reference.py."""
    cfg, b, n = trainer.cfg, crops[0].shape[0], int(masks.n_masked)
    with torch.no_grad():
        teacher = trainer.teacher(crops[:2], patch_index=masks.indices)
    student = trainer.student(crops, masks=masks.masks, patch_index=masks.indices, cls_tokens=True)
    t = torch.softmax(teacher.cls / teacher_temp, dim=-1).view(2, b, -1)
    teacher_cls_probs = torch.stack([t[1], t[0]])  # ssl_meta_arch.py:164, crops swapped
    teacher_patch_probs = torch.softmax(teacher.patches[:n] / teacher_temp, dim=-1)
    terms = ref.ssl_losses(student.cls[:2 * b], student.cls[2 * b:], teacher_cls_probs, student.patches[:n],
                           teacher_patch_probs, masks.masks, masks.weights[:n], student.cls_tokens[:2 * b],
                           cfg.loss.koleo_weight, cfg.loss.ibot_weight, cfg.data.local_crops_number)
    return terms


@pytest.mark.parametrize("separate", [False, True])
def test_step_loss_and_gradients_are_dinov2s(separate):
    cfg = tiny_config(*DINOV2, f"head.ibot_separate={str(separate).lower()}", "head.ibot_out_dim=128")
    trainer = make_trainer(cfg)
    assert (trainer.model.ibot_head is not None) == separate
    crops, masks, temp = synthetic_batches(cfg, 1)[0], batch_masks(cfg), 0.04
    terms = _reference_loss(trainer, crops, masks, temp)
    expected = sum(terms.values())
    expected.backward()
    expected_grads = [p.grad.clone() for p in trainer.params]
    trainer.student.zero_grad()
    loss, named = trainer._dinov2_loss(trainer.teacher, trainer.student, crops, masks, temp)
    loss.backward()
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(named[0], terms["dino_local"] + terms["dino_global"], atol=1e-5, rtol=1e-5, name="dino")
    assert_close(named[1], terms["ibot"], atol=1e-5, rtol=1e-5, name="ibot")
    assert_close(named[2] * cfg.loss.koleo_weight, terms["koleo"], atol=1e-5, rtol=1e-5, name="koleo")
    for (name, p), grad in zip(trainer.model.named_parameters(), expected_grads):
        assert_close(p.grad, grad, atol=1e-6, rtol=1e-4, name=name)
    assert trainer.model.backbone.mask_token.grad.abs().sum() > 0  # the mask token learns


def test_terms_off_cost_nothing_and_dino_alone_is_the_dino_step():
    cfg = tiny_config()
    trainer = make_trainer(cfg)
    assert trainer.ibot_fn is None and trainer.koleo_fn is None and trainer.masking_config() is None
    assert trainer.model.backbone.mask_token is None and trainer.model.ibot_head is None
    assert trainer.loss_terms() == []
    koleo_only = make_trainer(tiny_config("loss.koleo_weight=0.1"))
    assert koleo_only.model.backbone.mask_token is None and koleo_only.loss_terms() == ["dino_loss", "koleo_loss"]
    koleo_only.train_step(synthetic_batches(cfg, 1)[0])  # no masks needed
    assert math.isfinite(koleo_only.stats.read()["koleo_loss"])


def test_ibot_without_masks_is_a_clear_error():
    cfg = tiny_config(*DINOV2)
    with pytest.raises(ValueError, match="iBOT masks"):
        make_trainer(cfg).train_step(synthetic_batches(cfg, 1)[0])


def test_sinkhorn_knopp_step_and_a_skipped_step_restores_both_centers():
    cfg = tiny_config(*DINOV2, "loss.teacher_norm=sinkhorn_knopp")
    trainer = make_trainer(cfg)
    for i, crops in enumerate(synthetic_batches(cfg, 2)):
        trainer.train_step(crops, batch_masks(cfg, i))
    stats = trainer.stats.read()
    assert all(math.isfinite(stats[k]) for k in trainer.loss_terms())
    assert 0 < stats["teacher_patch_entropy"] <= math.log(cfg.head.out_dim) + 1e-4

    centering = make_trainer(tiny_config(*DINOV2))
    batches = synthetic_batches(cfg, 2)
    centering.train_step(batches[0], batch_masks(cfg, 0))
    center, ibot_center = centering.loss_fn.center.clone(), centering.ibot_fn.center.clone()
    assert ibot_center.abs().sum() > 0
    poisoned = [c.clone() for c in batches[1]]
    poisoned[0][0, 0, 0, 0] = float("nan")
    centering.train_step(poisoned, batch_masks(cfg, 1))
    assert centering.stats.read()["skipped_steps"] == 1
    assert torch.equal(center, centering.loss_fn.center) and torch.equal(ibot_center, centering.ibot_fn.center)


def test_lr_factors_are_dinov2s():
    cfg = tiny_config(*DINOV2, "optim.layer_decay=0.9", "optim.patch_embed_lr_mult=0.2")
    model = make_trainer(cfg).model
    for part in ("backbone", "head"):
        expected = ref.lr_wd_multipliers(getattr(model, part), 0.9, 0.2)
        for name, (lr, _) in expected.items():
            assert lr_multiplier(f"{part}.{name}", len(model.backbone.blocks), 0.9, 0.2) == pytest.approx(lr), name


def test_param_groups_carry_the_factors_into_the_schedules():
    cfg = tiny_config(*DINOV2, "optim.layer_decay=0.5", "optim.patch_embed_lr_mult=0.2", "optim.warmup_epochs=0")
    trainer = make_trainer(cfg)
    trainer.train_step(synthetic_batches(cfg, 1)[0], batch_masks(cfg))
    values = trainer.schedules.at(0)
    by_param = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    backbone = trainer.model.backbone
    assert by_param[id(backbone.patch_embed.proj.weight)]["lr"] == pytest.approx(values.lr * 0.5 ** 3 * 0.2)
    assert by_param[id(backbone.blocks[1].mlp.fc1.weight)]["lr"] == pytest.approx(values.lr * 0.5)
    assert by_param[id(trainer.model.head.mlp[0].weight)]["lr"] == pytest.approx(values.lr)
    assert by_param[id(backbone.blocks[0].norm1.weight)]["weight_decay"] == 0.0
    assert by_param[id(backbone.mask_token)]["weight_decay"] == pytest.approx(values.weight_decay)


def test_sqrt_lr_scaling():
    from fastdino.engine.schedules import peak_lr

    cfg = C.apply_overrides(C.dinov2_vit_small14(), overrides=["data.batch_size=256"])
    assert peak_lr(cfg) == pytest.approx(4e-3 * 0.5)


def test_preset_is_dinov2s_default_recipe():
    cfg = C.preset("dinov2_vit_small14")
    assert (cfg.model.patch_size, cfg.data.global_crops_size, cfg.data.local_crops_size) == (14, 224, 98)
    assert cfg.data.global_crops_scale == (0.32, 1.0) and cfg.data.local_crops_scale == (0.05, 0.32)
    assert cfg.data.local_crops_number == 8 and cfg.head.out_dim == 65536 and not cfg.head.norm_last_layer
    assert (cfg.optim.teacher_momentum, cfg.optim.teacher_momentum_end) == (0.992, 1.0)
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs) == (0.04, 0.07,
                                                                                                          30)
    assert (cfg.optim.base_lr, cfg.optim.lr_scaling, cfg.optim.warmup_epochs) == (4e-3, "sqrt_1024", 10)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (cfg.optim.layer_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.freeze_last_layer_epochs) == (0.9, 0.2, 1)
    assert (cfg.loss.ibot_weight, cfg.loss.koleo_weight, cfg.head.ibot_separate) == (1.0, 0.1, False)
    assert cfg.loss.ibot_mask_ratio == (0.1, 0.5) and cfg.loss.ibot_mask_probability == 0.5


def test_preset_trains_on_the_cpu_from_the_loaders_masks(tmp_path):
    """The preset, scaled down (a 2-block ViT-S/14 width 96, K = 512, 56-px global and 28-px local crops, batch
    4), trained by `Trainer.train` from the loader's masks: every term finite and in metrics.jsonl."""
    from fastdino.engine.cli import build_train_loader
    from fastdino.engine.train import Trainer
    from test_sources import make_image_folder

    cfg = C.apply_overrides(C.dinov2_vit_small14(), overrides=[
        "model.embed_dim=96", "model.depth=2", "model.num_heads=2", "model.img_size=56", "head.out_dim=512",
        "head.hidden_dim=128", "head.bottleneck_dim=64", "data.global_crops_size=56", "data.local_crops_size=28",
        "data.local_crops_number=2", "data.batch_size=4", "data.num_workers=0", "data.backend=torchvision",
        "epochs=1", "log_every=2", "logging.tensorboard=false", "checkpoint.every_steps=0"])
    folder = make_image_folder(tmp_path / "train")
    loader = build_train_loader(cfg, str(folder), torch.device("cpu"))
    trainer = Trainer(cfg, len(loader), device=torch.device("cpu"), output_dir=tmp_path / "run")
    trainer.train(loader)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and trainer.step == len(loader)
    for name in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_patch_entropy"):
        assert all(math.isfinite(row[name]) for row in rows), name
    row = rows[-1]
    assert row["loss"] == pytest.approx(row["dino_loss"] + row["ibot_loss"] + 0.1 * row["koleo_loss"], rel=1e-4)
    loader.close()


def test_outputs_of_the_packed_forward():
    cfg = tiny_config(*DINOV2)
    trainer = make_trainer(cfg)
    crops, masks = synthetic_batches(cfg, 1)[0], batch_masks(cfg)
    out = trainer.student(crops, masks=masks.masks, patch_index=masks.indices, cls_tokens=True)
    assert isinstance(out, Outputs)
    views = 2 + cfg.data.local_crops_number
    assert out.cls.shape == (views * 4, cfg.head.out_dim) and out.cls_tokens.shape == (views * 4, 32)
    assert out.patches.shape == (masks.upperbound, cfg.head.out_dim)
    assert trainer.ibot_fn.impl == "torch"  # ibot_impl=auto on the CPU


@pytest.mark.parametrize("separate", [False, True])
def test_packed_forward_stops_either_rows_at_the_bottleneck(separate):
    """bottleneck / patch_bottleneck: the CLS or the patch rows (or both) as the head's bottleneck features, whose
    last layer gives the logits of the plain forward; one head pass for a shared head either way."""
    cfg = tiny_config(*DINOV2, f"head.ibot_separate={str(separate).lower()}")
    trainer = make_trainer(cfg)
    crops, masks = synthetic_batches(cfg, 1)[0], batch_masks(cfg)
    model = trainer.model
    plain = model(crops, masks=masks.masks, patch_index=masks.indices)
    patch_head = model.ibot_head if separate else model.head
    for cls_flag, patch_flag in ((True, False), (False, True), (True, True)):
        out = model(crops, masks=masks.masks, patch_index=masks.indices, bottleneck=cls_flag,
                    patch_bottleneck=patch_flag)
        cls = model.head.last_layer(out.cls) if cls_flag else out.cls
        patches = patch_head.last_layer(out.patches) if patch_flag else out.patches
        assert out.patches.shape[1] == (cfg.head.bottleneck_dim if patch_flag else cfg.head.out_dim)
        assert_close(cls, plain.cls, atol=1e-6, rtol=1e-5, name=f"cls {cls_flag, patch_flag}")
        assert_close(patches, plain.patches, atol=1e-6, rtol=1e-5, name=f"patches {cls_flag, patch_flag}")
    with pytest.raises(ValueError, match="one flag per part"):
        model.head(torch.randn(3, 32), bottleneck=True, split=(1, 2))


def test_head_with_a_trainable_gain_loads_dinov2s_head_and_computes_the_same():
    from fastdino.engine import DINOHead

    theirs = ref.DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    with torch.no_grad():
        theirs.last_layer.weight_g.uniform_(0.5, 2.0)  # a gain that has trained
    ours = DINOHead(32, 64, norm_last_layer=False, hidden_dim=48, bottleneck_dim=16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(5, 32)
    mine, expected = ours(x), theirs(x)
    assert_close(mine, expected, atol=1e-6, rtol=1e-5, name="head")
    mine.square().sum().backward()
    expected.square().sum().backward()
    assert_close(ours.last_layer.weight_g.grad, theirs.last_layer.weight_g.grad, atol=1e-6, rtol=1e-4, name="gain")


def test_a_resumed_dinov2_run_equals_the_uninterrupted_one(tmp_path):
    from test_distributed import _Position

    cfg = tiny_config(*DINOV2, "model.drop_path_rate=0.1")
    batches = synthetic_batches(cfg, 4)
    whole = make_trainer(cfg)
    for i, crops in enumerate(batches):
        whole.train_step(crops, batch_masks(cfg, i))
    first = make_trainer(cfg, output_dir=tmp_path)
    for i, crops in enumerate(batches[:2]):
        first.train_step(crops, batch_masks(cfg, i))
    first.save_checkpoint(_Position())
    resumed = make_trainer(cfg, output_dir=tmp_path)
    assert resumed.resume(_Position()) and resumed.step == 2
    resumed.restore_rng()
    for i, crops in enumerate(batches[2:], start=2):
        resumed.train_step(crops, batch_masks(cfg, i))
    assert torch.equal(resumed.ibot_fn.center, whole.ibot_fn.center)
    assert torch.equal(resumed.loss_fn.center, whole.loss_fn.center)
    for (name, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_koleo_with_the_fused_dino_head_follows_the_unfused_step():
    losses = {}
    for fused in ("false", "true"):
        cfg = tiny_config("loss.koleo_weight=0.1", "model.drop_path_rate=0.0", f"loss.fused_head={fused}")
        trainer = make_trainer(cfg)
        for crops in synthetic_batches(cfg, 2):
            trainer.train_step(crops)
        losses[fused] = trainer.stats.read()
    for name in ("loss", "dino_loss", "koleo_loss"):
        assert losses["true"][name] == pytest.approx(losses["false"][name], rel=1e-4), name


def test_compiled_blocks_and_heads_give_the_eager_dinov2_step():
    """model.compile (on by default on CUDA) with iBOT's shared and separate heads: backend aot_eager, as in
    test_distributed.py (dynamo + AOTAutograd without inductor's C++ builds)."""
    from test_distributed import _compiled_trainer

    for separate in ("false", "true"):
        cfg = tiny_config(*DINOV2, f"head.ibot_separate={separate}")
        eager, compiled = make_trainer(cfg), _compiled_trainer(cfg, None, "all")
        for i, crops in enumerate(synthetic_batches(cfg, 2)):
            eager.train_step(crops, batch_masks(cfg, i))
            compiled.train_step(crops, batch_masks(cfg, i))
        expected, actual = eager.stats.read(), compiled.stats.read()
        for name in eager.loss_terms() + ["loss"]:
            assert actual[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (separate, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dinov2_step_on_cuda_bf16_compiled_follows_fp32_eager():
    """On CUDA: bf16 autocast, Inductor-compiled blocks, heads and iBOT loss, the Triton DINO loss; every term
    follows an fp32 eager run of the same batches and masks within bf16 rounding (test_cuda.py's tolerance)."""
    from test_cuda import BF16_LOSS_RTOL, config, trainer_on

    cfg = config(*DINOV2, "optim.base_lr=5e-4")
    batches, terms = synthetic_batches(cfg, 3), {}
    for precision, compiled in (("fp32", "false"), ("bf16", "true")):
        trainer = trainer_on(C.apply_overrides(cfg, overrides=[f"parallel.precision={precision}",
                                                               f"model.compile={compiled}"]), "cuda")
        rows = []
        for i, crops in enumerate(batches):
            trainer.train_step([c.cuda() for c in crops], batch_masks(cfg, i).to("cuda"))
            rows.append(trainer.stats.read())
        names = ["loss", "dino_loss", "ibot_loss", "koleo_loss"]  # not the entropy of a teacher at temperature 0.02
        terms[precision] = torch.tensor([[row[k] for k in names] for row in rows])
    assert torch.isfinite(terms["bf16"]).all(), terms["bf16"]
    assert_close(terms["bf16"], terms["fp32"], atol=1e-3, rtol=BF16_LOSS_RTOL, name="bf16 compiled terms")


@pytest.mark.parametrize("overrides, match", [
    (["loss.ibot_weight=1", "loss.ibot_impl=triton"], "loss.ibot_impl"),
    (["loss.koleo_weight=0.1", "optim.cuda_graph=true"], "cuda_graph"),
    (["optim.layer_decay=0.9", "optim.cuda_graph=true"], "one lr for every parameter"),
    (["loss.koleo_weight=0.1", "data.batch_size=1"], "nearest neighbour"),
    (["loss.ibot_mask_ratio=[0.6, 0.2]"], "ibot_mask_ratio"),
    (["optim.lr_scaling=cubic"], "lr_scaling"),
])
def test_config_refuses_what_the_dinov2_step_cannot_do(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(*overrides)
