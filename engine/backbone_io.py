"""Backbone weights on disk: fastdino's safetensors format and official DINO checkpoints.

fastdino writes `teacher_backbone.safetensors`: the backbone's timm-named tensors plus header metadata
(`format`, `arch`, `patch_size`, `img_size`, `extra` as JSON). It reads that, any other safetensors file of timm
ViT weights, and the official DINO checkpoints (github.com/facebookresearch/dino): a full training checkpoint
(`teacher` / `student` dicts with `backbone.` / `module.backbone.` prefixes; the teacher is preferred, heads are
ignored) or a bare backbone state dict (`dino_deitsmall16_pretrain.pth`). DINO's ViT already uses timm's key
names. Where metadata is missing, the architecture and patch size are inferred from tensor shapes.

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
    if metadata.get("format") == FORMAT:
        info = {"arch": metadata["arch"], "patch_size": int(metadata["patch_size"]),
                "img_size": int(metadata["img_size"]), **_shape_info(state_dict, path)}
        info["extra"] = json.loads(metadata["extra"])
    else:
        info = {**infer_architecture(state_dict, path), "extra": {}}
    run_model = _run_model_config(run_dir) if run_dir else {}
    if run_model.get("arch", info["arch"]) != info["arch"]:
        raise ValueError(f"{run_dir / 'config.json'} trains a {run_model['arch']} but {path} holds a {info['arch']}")
    info["num_heads"] = (info["extra"].get("model", {}).get("num_heads") or run_model.get("num_heads")
                         or _default_heads(info, path))
    # How other input sizes resample the position embeddings: as trained; official DINO .pth files the official way.
    info["pos_embed_resample"] = (info["extra"].get("model", {}).get("pos_embed_resample")
                                  or run_model.get("pos_embed_resample")
                                  or ("timm" if path.suffix == ".safetensors" else "dino"))
    return state_dict, info


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
    """arch, patch_size, img_size, embed_dim and depth of a timm-named ViT state dict, from its tensor shapes;
    the (embed_dim, depth, patch_size) triple must be one of a registered arch's."""
    from fastdino.engine.vit import MODELS

    info = _shape_info(state_dict, path)
    shape = {k: info[k] for k in ("embed_dim", "depth", "patch_size")}
    found = [name for name, args in MODELS.items() if all(args[k] == v for k, v in shape.items())]
    if not found:
        raise ValueError(f"{path}: no known ViT has embed dim {shape['embed_dim']}, depth {shape['depth']} and "
                         f"patch size {shape['patch_size']}; known: {', '.join(sorted(MODELS))}")
    return {"arch": found[0].rsplit("_patch", 1)[0], **info}  # MODELS names are f"{arch}_patch{p}"


def _shape_info(state_dict, path) -> dict:
    """patch_size, img_size, embed_dim and depth read off the tensor shapes."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError(f"{path} is not a ViT backbone: no patch_embed.proj.weight / pos_embed "
                         f"(keys: {_few(sorted(state_dict))})")
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    positions = state_dict["pos_embed"].shape[1]  # pos_embed (1, 1 + g*g, D): a CLS slot, then the g x g grid
    grid = math.isqrt(positions - 1)
    if grid < 1 or grid * grid != positions - 1:
        raise ValueError(f"{path}: pos_embed has {positions} positions, not 1 CLS + a square grid")
    return {"patch_size": int(patch_size), "img_size": int(grid * patch_size), "embed_dim": int(embed_dim),
            "depth": depth}


def _model_name(arch: str, patch_size: int, path) -> str:
    from fastdino.engine.vit import MODELS

    name = f"{arch}_patch{patch_size}"
    if name not in MODELS:
        raise ValueError(f"{path}: unknown backbone {arch}/{patch_size}; known: {', '.join(sorted(MODELS))}")
    return name


def _default_heads(info: dict, path) -> int:
    """The arch's number of heads, when the checkpoint has the arch's own width and depth."""
    from fastdino.engine.vit import MODELS

    args = MODELS[_model_name(info["arch"], info["patch_size"], path)]
    if (args["embed_dim"], args["depth"]) != (info["embed_dim"], info["depth"]):
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


def _strip_heads(tensors: dict) -> dict:
    """Drop projection / classifier heads: DINO's `head.*` and timm's classifier `head.*`."""
    return {name: t for name, t in tensors.items() if not name.startswith("head.")}


def _key_mismatch(expected: dict, actual: dict) -> tuple[list[str], list[str]]:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    shapes = sorted(k for k in set(expected) & set(actual) if expected[k].shape != actual[k].shape)
    return missing + [f"{k} (shape)" for k in shapes], unexpected


def _few(names, n: int = 3) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"
