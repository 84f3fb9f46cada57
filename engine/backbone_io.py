"""Backbone weights on disk: fastdino's safetensors format and official DINO checkpoints.

fastdino writes `teacher_backbone.safetensors`: the backbone's timm-named tensors plus header metadata
(`format`, `arch`, `patch_size`, `img_size`, `extra` as JSON). It reads that, any other safetensors file of timm
ViT weights, and the official DINO checkpoints (github.com/facebookresearch/dino): a full training checkpoint
(`teacher` / `student` dicts with `backbone.` / `module.backbone.` prefixes; the teacher is preferred, heads are
ignored) or a bare backbone state dict (`dino_deitsmall16_pretrain.pth`). DINO's ViT already uses timm's key
names. Where metadata is missing, the architecture and patch size are inferred from tensor shapes.
"""
import argparse
import json
import logging
import math
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

FORMAT = "fastdino.backbone/1"
RUN_FILE = "teacher_backbone.safetensors"
# Official DINO checkpoints: which dict holds the backbone, in order of preference.
_CHECKPOINT_KEYS = ("teacher", "student")
_WRAPPER_PREFIXES = ("module.", "backbone.")


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path onto `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_backbone(backbone_state_dict, path, *, arch: str, patch_size: int, img_size: int, extra=None) -> Path:
    """Write a full (unsharded) backbone state dict as safetensors with its architecture in the header."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in backbone_state_dict.items()}
    metadata = {"format": FORMAT, "arch": arch, "patch_size": str(int(patch_size)), "img_size": str(int(img_size)),
                "extra": json.dumps(extra or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_backbone(path) -> tuple[dict[str, torch.Tensor], dict]:
    """`(state_dict, info)` of a run dir, .safetensors file or official DINO .pth; info has arch, patch_size,
    img_size (header metadata, else inferred from shapes) and `extra` (dict)."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {RUN_FILE}: not a finished fastdino run directory")
        path = path / RUN_FILE
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state_dict, metadata = _read_safetensors(path)
    else:
        state_dict, metadata = _backbone_state_dict(_torch_load(path), path), {}
    info = infer_architecture(state_dict, path)
    if metadata.get("format") == FORMAT:
        info = {"arch": metadata["arch"], "patch_size": int(metadata["patch_size"]),
                "img_size": int(metadata["img_size"]), "extra": json.loads(metadata["extra"])}
    else:
        info["extra"] = {}
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
    model = build_backbone(info["arch"], info["patch_size"], img_size=info["img_size"])
    missing, unexpected = _key_mismatch(model.state_dict(), state_dict)
    if missing or unexpected:
        raise ValueError(f"{path} does not match {info['arch']}/{info['patch_size']}: "
                         f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    model.load_state_dict(state_dict)
    logger.info("loaded %s/%d backbone (img_size %d) from %s", info["arch"], info["patch_size"], info["img_size"],
                path)
    return model.to(device).eval()


def infer_architecture(state_dict, path="checkpoint") -> dict:
    """arch, patch_size and img_size of a timm-named ViT state dict, from its tensor shapes."""
    from fastdino.engine.vit import MODELS

    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError(f"{path} is not a ViT backbone: no patch_embed.proj.weight / pos_embed "
                         f"(keys: {_few(sorted(state_dict))})")
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    shape = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_size}
    found = [name for name, args in MODELS.items() if all(args[k] == v for k, v in shape.items())]
    if not found:
        raise ValueError(f"{path}: no known ViT has embed dim {embed_dim}, depth {depth} and patch size "
                         f"{patch_size}; known: {', '.join(sorted(MODELS))}")
    positions = state_dict["pos_embed"].shape[1]  # pos_embed (1, 1 + g*g, D): a CLS slot, then the g x g grid
    grid = math.isqrt(positions - 1)
    if grid < 1 or grid * grid != positions - 1:
        raise ValueError(f"{path}: pos_embed has {positions} positions, not 1 CLS + a square grid")
    arch = found[0].rsplit("_patch", 1)[0]  # MODELS names are f"{arch}_patch{p}", as build_backbone builds them
    return {"arch": arch, "patch_size": int(patch_size), "img_size": int(grid * patch_size)}


def _read_safetensors(path: Path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _strip_heads(tensors), metadata


def _torch_load(path: Path):
    # weights_only keeps pickled code out; DINO's full checkpoints also pickle their argparse.Namespace `args`.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # what torch.load raises on bad files
            raise ValueError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err


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
