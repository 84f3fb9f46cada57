"""The config tree: presets are valid, files and key=value overrides apply and are validated, errors name the key."""
import json

import pytest

from fastdino.engine import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_are_valid_and_round_trip_through_json(name):
    cfg = C.preset(name)
    assert C.from_dict(C.TrainConfig, json.loads(json.dumps(C.to_dict(cfg)))) == cfg


def test_paper_preset_is_the_papers_recipe():
    cfg = C.vit_small16_imagenet()
    assert (cfg.model.arch, cfg.model.patch_size, cfg.head.out_dim) == ("vit_small", 16, 65536)
    assert (cfg.data.batch_size, cfg.data.global_crops_size, cfg.data.local_crops_number,
            cfg.data.local_crops_size) == (1024, 224, 10, 96)
    assert (cfg.epochs, cfg.optim.warmup_epochs, cfg.optim.base_lr) == (100, 10, 5e-4)
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp) == (0.04, 0.07)
    assert (cfg.optim.teacher_momentum, cfg.optim.teacher_momentum_end) == (0.996, 1.0)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (cfg.optim.clip_grad_mode, cfg.loss.teacher_temp_schedule) == ("per_tensor", "per_epoch")  # official


def test_small_preset_changes_only_what_its_docstring_lists():
    small, paper = C.to_dict(C.small()), C.to_dict(C.vit_small16_imagenet())
    changed = {(section, key) for section, values in small.items() if isinstance(values, dict)
               for key, value in values.items() if paper[section][key] != value}
    assert changed == {("head", "out_dim"), ("optim", "teacher_momentum"), ("data", "batch_size"),
                       ("data", "local_crops_number"), ("eval", "at_end"), ("eval", "knn_every_epochs"),
                       ("checkpoint", "every_steps")}
    assert (small["head"]["out_dim"], small["optim"]["teacher_momentum"], small["data"]["batch_size"]) == \
        (4096, 0.99, 128)
    assert {k: v for k, v in small.items() if not isinstance(v, dict)} == \
        {k: v for k, v in paper.items() if not isinstance(v, dict)}


def test_overrides_and_file_values_apply_in_order(tmp_path):
    file_values = {"optim": {"base_lr": 1e-3}, "epochs": 7}
    cfg = C.apply_overrides(C.demo(), file_values=file_values,
                            overrides=["epochs=9", "data.global_crops_scale=[0.2, 1]", "optim.min_lr=1e-6",
                                       "max_steps=null", "data.path=/tmp/x"])
    assert cfg.optim.base_lr == 1e-3 and cfg.epochs == 9  # the override wins over the file
    assert cfg.data.global_crops_scale == (0.2, 1.0) and cfg.optim.min_lr == 1e-6  # YAML's "1e-6" is a string
    assert cfg.max_steps is None and cfg.data.path == "/tmp/x"
    assert cfg.model == C.demo().model  # untouched sections keep the preset's values
    cfg = C.apply_overrides(C.demo(), overrides=["model.compile=true", "model.activation_checkpointing=every-2"])
    assert (cfg.model.compile, C.checkpoint_every(cfg.model.activation_checkpointing)) == ("true", 2)


def test_yaml_file_is_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  base_lr: 0.002\nlog_every: 3\n")
    cfg = C.apply_overrides(C.demo(), file_values=C.load_yaml(path))
    assert (cfg.optim.base_lr, cfg.log_every) == (0.002, 3)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=1", "unknown config key 'optim.lr'"),
    ("optimizer.base_lr=1", "unknown config key 'optimizer'"),
    ("optim.base_lr=fast", "optim.base_lr must be float, got 'fast'"),
    ("optim.base_lr=-1", "optim.base_lr must be > 0, got -1.0"),
    ("data.batch_size=1.5", "data.batch_size must be int, got 1.5"),
    ("epochs=true", "epochs must be int, got True"),
    ("model.arch=vit_huge", "model.arch must be one of"),
    ("data.local_crops_scale=[0.5, 0.1]", "data.local_crops_scale must be"),
    ("parallel.precision=fp8", "parallel.precision must be one of"),
    ("model.compile=maybe", "model.compile must be one of ['auto', 'true', 'false'], got 'maybe'"),
    ("model.activation_checkpointing=every-0", "model.activation_checkpointing must be none, all, selective or every-N"),
    ("model.pos_embed_resample=bilinear", "model.pos_embed_resample must be one of"),
    ("minutes=-2", "minutes must be > 0 or null, got -2.0"),
    ("optim.clip_grad_mode=per_param", "optim.clip_grad_mode must be one of"),
    ("loss.teacher_temp_schedule=per_batch", "loss.teacher_temp_schedule must be one of"),
    ("loss.ibot_impl=triton", "loss.ibot_impl must be one of ['auto', 'torch', 'fused'], got 'triton'"),
    ("eval.knn_every_epochs=-1", "eval.knn_every_epochs must be >= 0, got -1.0"),
    ("logging.tensorboard=maybe", "logging.tensorboard must be one of ['auto', 'true', 'false'], got 'maybe'"),
    ("optim=3", "optim must be a mapping"),
    ("no_equals_sign", "override must look like section.key=value"),
])
def test_bad_values_raise_value_error_naming_the_key(override, message):
    with pytest.raises(ValueError) as error:
        C.apply_overrides(C.demo(), overrides=[override])
    assert message in str(error.value)


def test_a_per_epoch_teacher_temperature_warms_up_over_whole_epochs():
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs must be a whole number with "
                                         "teacher_temp_schedule=per_epoch, got 2.5"):
        C.apply_overrides(C.vit_small16_imagenet(), overrides=["loss.warmup_teacher_temp_epochs=2.5"])
    C.apply_overrides(C.vit_small16_imagenet(), overrides=["loss.warmup_teacher_temp_epochs=2.5",
                                                           "loss.teacher_temp_schedule=per_step"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        C.load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        C.load_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        C.load_yaml(tmp_path / "broken.yaml")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets"):
        C.preset("nope")


def test_the_fused_ibot_term_goes_with_the_fused_dino_head_and_may_change_on_resume():
    """loss.fused_head=true with iBOT (the CLS and the patch rows both fused, or either alone) is a valid run, and
    switching loss.ibot_impl on resume changes how the step is computed, not what it computes."""
    for fused_head in ("true", "false"):
        for impl in ("fused", "torch", "auto"):
            cfg = C.apply_overrides(C.dinov2_vit_small14(),
                                    overrides=[f"loss.fused_head={fused_head}", f"loss.ibot_impl={impl}"])
            assert (cfg.loss.fused_head, cfg.loss.ibot_impl) == (fused_head == "true", impl)
    assert any("loss.ibot_impl".startswith(prefix) for prefix in C.MAY_CHANGE_ON_RESUME)
