"""Backbone weights on disk: fastdino's safetensors format, timm's ViT / Eva weights, official DINO checkpoints and
Meta's DINOv2 / DINOv3 ones (meta_checkpoints.py maps their names).

fastdino writes `teacher_backbone.safetensors`: the backbone's timm-named tensors plus header metadata
(`format`, `arch`, `patch_size`, `img_size`, `extra` as JSON). It reads that, any other safetensors file of timm
ViT weights (timm's DINOv3 Eva names converted: `to_timm` / `from_timm`), Meta's DINOv2 / DINOv3 backbone and
teacher checkpoints, and the official DINO checkpoints (github.com/facebookresearch/dino): a full training checkpoint
(`teacher` / `student` dicts with `backbone.` / `module.backbone.` prefixes; the teacher is preferred, heads are
ignored) or a bare backbone state dict (`dino_deitsmall16_pretrain.pth`). DINO's ViT already uses timm's key
names. Where metadata is missing, the architecture and patch size are inferred from tensor shapes: a DINO ViT, or
the DINOv2 / DINOv3 model (by timm's name) whose parameter names and shapes the file has.

Resized models (a run's `model.embed_dim` / `depth` / `num_heads` overrides) load too: width and depth are read
off the shapes, the number of heads from `extra["model"]["num_heads"]` (the trainer stores its ModelConfig
there) or the run's config.json.
"""
import argparse
import json
import logging
import math
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastdino.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "fastdino.backbone/1"
RUN_FILE = "teacher_backbone.safetensors"
# Official DINO checkpoints: which dict holds the backbone, in order of preference.
_CHECKPOINT_KEYS = ("teacher", "student")
_WRAPPER_PREFIXES = ("module.", "backbone.")


# timm's Eva (its DINOv3 models) names the LayerScales gamma_1 / gamma_2 where fastdino and timm's ViT say ls1.gamma.
_EVA_NAMES = (("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"))


def to_timm(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fastdino backbone state dict under the parameter names of timm's model `name` (a DINOv3 model renames
    its LayerScales; every other model already has timm's names)."""
    if "_dinov3" not in name:
        return dict(state_dict)
    return {_rename(key, _EVA_NAMES): value for key, value in state_dict.items()}


def from_timm(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_timm`: timm model `name`'s state dict under fastdino's names."""
    if "_dinov3" not in name:
        return dict(state_dict)
    return {_rename(key, [(b, a) for a, b in _EVA_NAMES]): value for key, value in state_dict.items()}


def _rename(key: str, pairs) -> str:
    """`blocks.N.<old>` -> `blocks.N.<new>` for the first matching (old, new) pair."""
    for old, new in pairs:
        if key.startswith("blocks.") and key.endswith("." + old):
            return key[: -len(old)] + new
    return key


def timm_model(info: dict) -> tuple[str, dict]:
    """(name, keyword arguments) of the timm.create_model call whose model has the backbone `info` describes
    (read_backbone's info): a DINOv2 / DINOv3 model by its own name, a DINO ViT as timm's vit_*_patch16_224 with
    its patch and image size; resized models with their sizes."""
    from fastdino.engine.config import ARCHS
    from fastdino.engine.families import FAMILY_MODELS

    own = FAMILY_MODELS.get(info["arch"])
    if own is None:
        name, own = f"{info['arch']}_patch16_224", {**ARCHS[info["arch"]], "patch_size": 16, "img_size": 224}
    else:
        name = info["arch"]
        own = {**own, "img_size": info["img_size"] if "dinov3" in name else own["img_size"]}  # RoPE: any size
    kwargs = {k: info[k] for k in ("patch_size", "img_size", "embed_dim", "depth", "num_heads") if info[k] != own[k]}
    return name, {"num_classes": 0, **kwargs}


def export_timm_weights(checkpoint, output) -> tuple[Path, str]:
    """Write the backbone of `checkpoint` under timm's parameter names (.safetensors or .pth) and return (the path,
    the timm.create_model call that loads it strictly)."""
    output = Path(output)
    if output.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"--output {output}: weights are written as .safetensors or .pth")
    load_backbone(checkpoint)  # the weights build and load into fastdino's backbone: a ValueError otherwise
    state_dict, info = read_backbone(checkpoint)
    name, kwargs = timm_model(info)
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_timm(name, state_dict).items()}
    if output.suffix == ".safetensors":
        # The heads always: no shape shows them, and a resized model's are not its arch's (read_backbone reads them).
        metadata = {"timm_model": name, "timm_kwargs": json.dumps({**kwargs, "num_heads": info["num_heads"]})}
        atomic_write(output, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    else:
        atomic_write(output, lambda tmp: torch.save(tensors, tmp))
    call = f"timm.create_model({name!r}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return output, call


def save_backbone(backbone_state_dict, path, *, arch: str, patch_size: int, img_size: int, extra=None) -> Path:
    """Write a full (unsharded) backbone state dict as safetensors with its architecture in the header."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in backbone_state_dict.items()}
    metadata = {"format": FORMAT, "arch": arch, "patch_size": str(int(patch_size)), "img_size": str(int(img_size)),
                "extra": json.dumps(extra or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_backbone(path) -> tuple[dict[str, torch.Tensor], dict]:
    """`(state_dict, info)` of a run dir, .safetensors file or official DINO .pth.

    info: arch, patch_size, img_size, embed_dim, depth, num_heads, pos_embed_resample, extra (dict). embed_dim
    and depth come from the tensor shapes; arch, patch_size and img_size from fastdino's header, else from the
    shapes too. The number of heads (which no shape shows) comes from `extra["model"]["num_heads"]`, else from a
    run dir's config.json, else from the arch when embed_dim and depth are the arch's own; pos_embed_resample
    likewise, else "timm" for .safetensors and "dino" for official .pth files.
    """
    path, run_dir = Path(path), None
    if path.is_dir():
        if not (path / RUN_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {RUN_FILE}: not a finished fastdino run directory")
        path, run_dir = path / RUN_FILE, path
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state_dict, metadata = _read_safetensors(path)
    else:
        state_dict, metadata = _backbone_state_dict(_torch_load(path), path), {}
    meta_heads = _meta_num_heads(state_dict)
    state_dict, source, dropped = _to_fastdino_names(state_dict)
    if metadata.get("format") == FORMAT:
        info = {"arch": metadata["arch"], "patch_size": int(metadata["patch_size"]),
                "img_size": int(metadata["img_size"]), **_shape_info(state_dict, path)}
        info["extra"] = json.loads(metadata["extra"])
    else:
        info = {**infer_architecture(state_dict, path), "extra": {}}
    run_model = _run_model_config(run_dir) if run_dir else {}
    if run_model.get("arch", info["arch"]) != info["arch"]:
        raise ValueError(f"{run_dir / 'config.json'} trains a {run_model['arch']} but {path} holds a {info['arch']}")
    timm_kwargs = json.loads(metadata.get("timm_kwargs", "{}"))  # what `export --weights` records
    info["num_heads"] = (info["extra"].get("model", {}).get("num_heads") or run_model.get("num_heads")
                         or timm_kwargs.get("num_heads") or meta_heads
                         or _default_heads(info, path, recorded=bool(info["extra"].get("model") or run_model)))
    # How other input sizes resample the position embeddings: as trained; official DINO .pth files the official way.
    info["pos_embed_resample"] = (info["extra"].get("model", {}).get("pos_embed_resample")
                                  or run_model.get("pos_embed_resample") or _native_resample(info, source, path))
    info["source"], info["dropped"] = source, dropped
    return state_dict, info


def _meta_num_heads(state_dict: dict) -> int | None:
    """The number of heads a Meta DINOv3 state dict records: its RoPE periods are a quarter of the head dim."""
    periods = state_dict.get("rope_embed.periods")
    if periods is None or "cls_token" not in state_dict:
        return None
    return state_dict["cls_token"].shape[-1] // (4 * periods.numel())


def _native_resample(info: dict, source: str, path: Path) -> str:
    """How the checkpoint's own code resamples position embeddings: DINO's and Meta's DINOv2 without registers
    with DINO's offset formula ("dino"), Meta's reg4 models, timm and fastdino files with timm's ("timm")."""
    from fastdino.engine.families import FAMILY_MODELS

    if source == "meta-dinov2":
        return "timm" if "reg4" in info["arch"] else "dino"
    return "timm" if path.suffix == ".safetensors" or info["arch"] in FAMILY_MODELS else "dino"


def _to_fastdino_names(state_dict: dict) -> tuple[dict, str, list[str]]:
    """(state dict under fastdino's names, its source layout, what was dropped): Meta's DINOv2 / DINOv3 layouts and
    timm's Eva names converted; anything else (fastdino, timm ViT, DINO) as is."""
    from fastdino.engine.meta_checkpoints import from_meta, meta_family

    family = meta_family(state_dict)
    if family is not None:
        converted, dropped = from_meta(state_dict)
        return converted, f"meta-{family}", dropped
    if any(key.endswith(".gamma_1") for key in state_dict):
        return from_timm("_dinov3", state_dict), "timm-eva", []
    return state_dict, "as-is", []


def load_backbone(path, *, device="cpu", arch: str | None = None, patch_size: int | None = None):
    """Build the VisionTransformer a checkpoint holds and load its weights (eval mode, on `device`).

    `arch` / `patch_size`, when given, are what the caller expects: a checkpoint of anything else is a ValueError.
    """
    from fastdino.engine.vit import build_backbone

    state_dict, info = read_backbone(path)
    for key, expected in (("arch", arch), ("patch_size", patch_size)):
        if expected is not None and info[key] != expected:
            raise ValueError(f"{path} holds a {info['arch']}/{info['patch_size']} backbone, "
                             f"but {key}={expected} was asked for")
    _model_name(info["arch"], info["patch_size"], path)  # a ValueError naming the known ones
    with torch.device("meta"):  # no memory and no init for weights about to be replaced
        model = build_backbone(info["arch"], info["patch_size"], img_size=info["img_size"],
                               **{k: info[k] for k in ("embed_dim", "depth", "num_heads", "pos_embed_resample")})
    missing, unexpected = _key_mismatch(model.state_dict(), state_dict)
    if missing or unexpected:
        raise ValueError(f"{path} does not match {info['arch']}/{info['patch_size']}: "
                         f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    half = sorted({str(t.dtype) for t in state_dict.values() if t.is_floating_point() and t.dtype != torch.float32})
    if half:  # exported weights are often fp16 / bf16: evaluate in fp32, as the inputs are
        logger.info("%s holds %s weights: loading them as float32", path, " and ".join(half))
        state_dict = {k: t.float() if t.is_floating_point() else t for k, t in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    logger.info("loaded %s/%d backbone (D=%d, depth %d, %d heads, img_size %d) from %s", info["arch"],
                info["patch_size"], info["embed_dim"], info["depth"], info["num_heads"], info["img_size"], path)
    return model.to(device).eval()


def infer_architecture(state_dict, path="checkpoint") -> dict:
    """arch, patch_size, img_size, embed_dim and depth of a timm-named ViT state dict, from its tensor shapes.

    A DINOv2 / DINOv3 state dict (LayerScales, registers, SwiGLU or no position embeddings) is the FAMILY_MODELS
    model with its parameter names and per-block shapes at its width (of those, the one of the same width and depth,
    else of the same width: any other width and depth are a resized model of that structure); a DINO ViT's (embed_dim,
    depth, patch_size) triple must be one of a registered arch's."""
    from fastdino.engine.vit import MODELS

    info = _shape_info(state_dict, path)
    if _is_family_model(state_dict):
        return {"arch": _family_model(state_dict, info, path), **info}
    shape = {k: info[k] for k in ("embed_dim", "depth", "patch_size")}
    found = [name for name, args in MODELS.items() if all(args[k] == v for k, v in shape.items())]
    # DINO's archs differ only in width, depth and heads: another width and depth are a resized one of the same
    # patch size (the closest width named; the heads come from the file's record, else a clear error).
    found = found or sorted((name for name, args in MODELS.items() if args["patch_size"] == shape["patch_size"]),
                            key=lambda name: abs(MODELS[name]["embed_dim"] - shape["embed_dim"]))
    if not found:
        raise ValueError(f"{path}: no known ViT has patch size {shape['patch_size']} (embed dim "
                         f"{shape['embed_dim']}, depth {shape['depth']}); known: {', '.join(sorted(MODELS))}")
    return {"arch": found[0].rsplit("_patch", 1)[0], **info}  # MODELS names are f"{arch}_patch{p}"


def _shape_info(state_dict, path) -> dict:
    """patch_size, img_size, embed_dim and depth read off the tensor shapes (img_size 224 for RoPE models, which
    have no native grid)."""
    if "patch_embed.proj.weight" not in state_dict or not {"pos_embed", "cls_token"} & set(state_dict):
        raise ValueError(f"{path} is not a ViT backbone: no patch_embed.proj.weight / pos_embed "
                         f"(keys: {_few(sorted(state_dict))})")
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    grid = 224 // patch_size
    if "pos_embed" in state_dict:
        positions = state_dict["pos_embed"].shape[1]  # (1, [1 +] g*g, D): a CLS slot or not, then the g x g grid
        slots = 0 if math.isqrt(positions) ** 2 == positions else 1
        grid = math.isqrt(positions - slots)
        if grid < 1 or grid * grid != positions - slots:
            raise ValueError(f"{path}: pos_embed has {positions} positions, not a square grid (after a CLS slot)")
    return {"patch_size": int(patch_size), "img_size": int(grid * patch_size), "embed_dim": int(embed_dim),
            "depth": depth}


def _is_family_model(state_dict) -> bool:
    """Whether a state dict has what DINOv2 / DINOv3 add to DINO's ViT: LayerScales, registers, SwiGLU, q/v biases
    or no position embeddings (RoPE)."""
    markers = (".ls1.gamma", ".attn.q_bias", ".mlp.fc1_g.weight")
    return "reg_token" in state_dict or "pos_embed" not in state_dict or any(k.endswith(markers) for k in state_dict)


def _structure_mismatch(state_dict, args: dict, cls) -> tuple[list[str], list[str]]:
    """(missing, unexpected) of the model `cls(**args)` at the state dict's width and patch size, one block, against
    the state dict's non-block and block-0 tensors (names and shapes)."""
    info = _shape_info(state_dict, "checkpoint")
    args = {**args, "embed_dim": info["embed_dim"], "depth": 1, "num_heads": 1, "patch_size": info["patch_size"],
            "img_size": info["img_size"]}
    try:
        with torch.device("meta"):
            expected = cls(**args).state_dict()
    except ValueError as err:  # not buildable at this width (e.g. an odd packed SwiGLU width)
        return [f"(no such model at width {info['embed_dim']}: {err})"], []
    actual = {k: v for k, v in state_dict.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    return _key_mismatch(expected, actual)


def _family_model(state_dict, info: dict, path) -> str:
    """The FAMILY_MODELS name whose structure the state dict has; a ValueError naming the closest one's missing and
    unexpected tensors when none has it."""
    from fastdino.engine.families import FAMILY_MODELS
    from fastdino.engine.vit import VisionTransformer

    mismatch = {name: _structure_mismatch(state_dict, args, VisionTransformer) for name, args in FAMILY_MODELS.items()}
    found = [name for name, m in mismatch.items() if m == ([], [])]
    if not found:
        closest = min(mismatch, key=lambda name: sum(map(len, mismatch[name])))
        missing, unexpected = mismatch[closest]
        raise ValueError(f"{path}: no known DINO, DINOv2 or DINOv3 ViT has these tensors; the closest, {closest}, "
                         f"has missing {_few(missing, 8)} and unexpected {_few(unexpected, 8)}")
    def distance(name):  # the registered size first: same width and depth, then same width
        args = FAMILY_MODELS[name]
        return args["embed_dim"] != info["embed_dim"], args["depth"] != info["depth"]

    return min(found, key=distance)


def _model_name(arch: str, patch_size: int, path) -> str:
    from fastdino.engine.vit import MODELS

    name = arch if arch in MODELS and MODELS[arch]["patch_size"] == patch_size else f"{arch}_patch{patch_size}"
    if name not in MODELS:
        raise ValueError(f"{path}: unknown backbone {arch}/{patch_size}; known: {', '.join(sorted(MODELS))}")
    return name


def _default_heads(info: dict, path, recorded: bool = False) -> int:
    """The arch's number of heads, when the checkpoint has the arch's own width (a shallower one too), or when its
    recorded model config leaves them to the arch (`num_heads: null`, as built)."""
    from fastdino.engine.vit import MODELS

    args = MODELS[_model_name(info["arch"], info["patch_size"], path)]
    if args["embed_dim"] != info["embed_dim"] and not recorded:
        raise ValueError(f"{path}: a {info['arch']} resized to D={info['embed_dim']}, depth {info['depth']}, "
                         f"and no record of its number of heads (save it with extra={{'model': {{'num_heads': H}}}})")
    return args["num_heads"]


def _run_model_config(run_dir: Path) -> dict:
    """The `model` section of a run dir's config.json ({} when the run dir has none)."""
    config = run_dir / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text()).get("model", {})
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from err


def _read_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"cannot read checkpoint {path}: not a safetensors file, or truncated or corrupt "
                         f"({_first_sentence(str(err))})") from None
    return _strip_heads(tensors), metadata


def _torch_load(path: Path):
    # weights_only keeps pickled code out; DINO's full checkpoints also pickle their argparse.Namespace `args`.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # what torch.load raises on bad files
            raise ValueError(f"cannot read checkpoint {path}: {_load_error(err)}") from None


def _load_error(err: Exception) -> str:
    """Why torch.load failed, without its advice to retry with weights_only=False (that runs pickled code)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return (f"not a PyTorch checkpoint of tensors, or truncated or corrupt ({' '.join(reason.split())}); "
                f"fastdino never loads pickled code")
    return f"not a PyTorch checkpoint, or truncated or corrupt ({_first_sentence(text) or type(err).__name__})"


def _first_sentence(text: str) -> str:
    return " ".join(text.split()).split(". ")[0].rstrip(".")


def _backbone_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of an official DINO checkpoint, prefixes removed and heads dropped."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in _CHECKPOINT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path} is not a backbone state dict: {name!r} is a {type(value).__name__} "
                             f"(top-level keys: {_few(sorted(obj))})")
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        tensors[name] = value
    return _strip_heads(tensors)


HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")


def read_head(path) -> dict[str, torch.Tensor]:
    """The DINO head a .pth checkpoint holds beside its backbone, under fastdino's `DINOHead` names: DINO's and
    fastdino's `head.*`, DINOv2 / DINOv3's `dino_head.*` (the teacher's when it has one); {} when it has none (bare
    backbones, .safetensors files, run dirs)."""
    path = Path(path)
    if path.suffix == ".safetensors" or path.is_dir():
        return {}
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        return {}
    obj = next((obj[key] for key in _CHECKPOINT_KEYS if isinstance(obj.get(key), dict)), obj)
    head = {}
    for name, value in obj.items():
        name = name.removeprefix("module.")
        for prefix in ("head.", "dino_head."):
            if name.startswith(prefix) and isinstance(value, torch.Tensor):
                head[name.removeprefix(prefix)] = value
    return head


def _strip_heads(tensors: dict) -> dict:
    """Drop projection / classifier heads: DINO's `head.*`, timm's classifier `head.*`, DINOv2 / DINOv3's
    `dino_head.*` and `ibot_head.*`."""
    return {name: t for name, t in tensors.items() if not name.startswith(HEAD_PREFIXES)}


def _key_mismatch(expected: dict, actual: dict) -> tuple[list[str], list[str]]:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    shapes = sorted(k for k in set(expected) & set(actual) if expected[k].shape != actual[k].shape)
    return missing + [f"{k} (shape)" for k in shapes], unexpected


def _few(names, n: int = 3) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"
